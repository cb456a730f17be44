//! The one place that builds network endpoints and servers: every gRPC channel (CLI and
//! tools → monitor, keeper → monitor, member ⇄ member) and every gRPC listener.
//!
//! With certificates, every connection is TLS 1.3 with both sides authenticated; the
//! server puts the client's identity into each request's extensions ([`PeerInfo`]), and
//! a dialler can require the server to be a given identity (a member dialling member 3
//! accepts only member 3's certificate). Without (`--insecure`), plain TCP.
//!
//! Both sides bound what a peer can cost: the dialler bounds name resolution, TCP
//! connect and handshake together by its connect timeout (a vanished host's name must
//! not hold up a failover); the server caps connections and handshake time, so idle or
//! slow connections cannot exhaust file descriptors.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};

use crate::identity::Identity;
use crate::tls::Tls;

/// How a process talks to the others: with its certificates, or (`--insecure`) without
/// any authentication.
#[derive(Clone, Debug)]
pub enum Security {
    Insecure,
    Tls(Arc<Tls>),
}

impl Security {
    pub fn is_tls(&self) -> bool {
        matches!(self, Security::Tls(_))
    }

    /// This process's own identity (None when insecure).
    pub fn identity(&self) -> Option<&Identity> {
        match self {
            Security::Tls(t) => Some(t.identity()),
            Security::Insecure => None,
        }
    }
}

/// The warning every role prints when started with `--insecure`.
pub const INSECURE_WARNING: &str = "running with --insecure: no TLS and no authentication; anyone who can reach these ports controls the cluster and, through it, the database";

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("invalid address {0:?}: use HOST:PORT")]
    BadAddress(String),
}

/// How to dial.
#[derive(Clone, Debug)]
pub struct Dial {
    /// Bounds DNS + TCP connect + TLS handshake together.
    pub connect_timeout: Duration,
    /// Per-request timeout on the channel (None: none).
    pub request_timeout: Option<Duration>,
    /// HTTP/2 keep-alive pings, to notice a vanished peer on an idle channel.
    pub keep_alive: Option<Duration>,
    /// The identity the server must present (besides a certificate valid for the host).
    pub expect: Option<Identity>,
}

impl Default for Dial {
    fn default() -> Self {
        Dial {
            connect_timeout: Duration::from_millis(500),
            request_timeout: None,
            keep_alive: None,
            expect: None,
        }
    }
}

/// Splits `HOST:PORT` (also `[v6]:PORT`, and an `http://` prefix is tolerated).
pub fn split_host_port(addr: &str) -> Option<(String, u16)> {
    let a = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr);
    let (host, port) = a.rsplit_once(':')?;
    let port: u16 = port.parse().ok().filter(|p| *p > 0)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return None;
    }
    Some((host.to_owned(), port))
}

/// A lazily connecting gRPC channel to `addr` (`HOST:PORT`).
pub fn channel(addr: &str, security: &Security, dial: &Dial) -> Result<Channel, DialError> {
    let (host, port) =
        split_host_port(addr).ok_or_else(|| DialError::BadAddress(addr.to_owned()))?;
    // The scheme stays http: TLS happens in our connector, below tonic.
    let authority = if host.contains(':') {
        format!("http://[{host}]:{port}")
    } else {
        format!("http://{host}:{port}")
    };
    let mut ep = Endpoint::from_shared(authority)
        .map_err(|_| DialError::BadAddress(addr.to_owned()))?
        .tcp_nodelay(true);
    if let Some(t) = dial.request_timeout {
        ep = ep.timeout(t);
    }
    if let Some(k) = dial.keep_alive {
        ep = ep
            .http2_keep_alive_interval(k)
            .keep_alive_timeout(k * 2)
            .keep_alive_while_idle(true);
    }
    let connector = Connector {
        host,
        port,
        security: security.clone(),
        timeout: dial.connect_timeout,
        expect: dial.expect.clone(),
    };
    Ok(
        ep.connect_with_connector_lazy(tower::service_fn(move |_uri| {
            let c = connector.clone();
            async move { c.connect().await.map(TokioIo::new) }
        })),
    )
}

#[derive(Clone)]
struct Connector {
    host: String,
    port: u16,
    security: Security,
    timeout: Duration,
    expect: Option<Identity>,
}

impl Connector {
    async fn connect(&self) -> io::Result<ClientStream> {
        let target = format!("{}:{}", self.host, self.port);
        match tokio::time::timeout(self.timeout, self.connect_inner()).await {
            Ok(r) => r.map_err(|e| io::Error::new(e.kind(), format!("{target}: {e}"))),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "{target}: no connection within {} ms (address resolution, TCP connect and TLS handshake)",
                    self.timeout.as_millis()
                ),
            )),
        }
    }

    async fn connect_inner(&self) -> io::Result<ClientStream> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
        tcp.set_nodelay(true)?;
        let Security::Tls(tls) = &self.security else {
            return Ok(ClientStream::Plain(tcp));
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "invalid server name"))?;
        let stream = TlsConnector::from(tls.current().client.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("TLS handshake failed ({e}); is the server started with the same CA, and its certificate valid for {}?", self.host),
                )
            })?;
        if let Some(expect) = &self.expect {
            let found = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| Identity::from_der(c));
            match found {
                Some(Ok(id)) if &id == expect => {}
                Some(Ok(id)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("the server is {id}, expected {expect}"),
                    ))
                }
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        format!("the server presented no pgquorum identity, expected {expect}"),
                    ))
                }
            }
        }
        Ok(ClientStream::Tls(Box::new(stream)))
    }
}

enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Who is on the other end of a served connection; tonic puts it in every request's
/// extensions.
#[derive(Clone, Debug)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS (the server runs with certificates).
    pub tls: bool,
    /// The identity in the client's certificate (None without TLS).
    pub identity: Option<Identity>,
}

impl PeerInfo {
    /// The connection information of a request served by [`incoming`].
    pub fn of<T>(req: &tonic::Request<T>) -> Option<&PeerInfo> {
        req.extensions().get::<PeerInfo>()
    }
}

/// A served connection.
pub struct ServerConn {
    io: ServerIo,
    info: PeerInfo,
    _permit: OwnedSemaphorePermit,
}

enum ServerIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl ServerConn {
    /// The client's address.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.info.remote
    }
}

impl Connected for ServerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Limits of a server.
#[derive(Clone, Debug)]
pub struct Serve {
    /// Connections held at once (handshaking or established); more are closed at once.
    pub max_connections: usize,
    /// A TLS handshake not finished in this time is dropped.
    pub handshake_timeout: Duration,
}

impl Default for Serve {
    fn default() -> Self {
        Serve {
            max_connections: 2048,
            handshake_timeout: Duration::from_secs(5),
        }
    }
}

/// Accepts on `listener` and yields authenticated connections for
/// `tonic::transport::Server::serve_with_incoming*`. Handshakes run concurrently, each
/// bounded in time, so a slow or silent client delays nobody else.
pub fn incoming(
    listener: TcpListener,
    security: Security,
    limits: Serve,
) -> ReceiverStream<io::Result<ServerConn>> {
    accept_loop(listener, security, false, limits)
}

/// Like [`incoming`], for HTTPS endpoints that load balancers and probes call: the
/// server presents its certificate and asks for none.
pub fn https_incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    limits: Serve,
) -> ReceiverStream<io::Result<ServerConn>> {
    accept_loop(listener, Security::Tls(tls), true, limits)
}

fn accept_loop(
    listener: TcpListener,
    security: Security,
    server_only: bool,
    limits: Serve,
) -> ReceiverStream<io::Result<ServerConn>> {
    let (tx, rx) = mpsc::channel::<io::Result<ServerConn>>(64);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::spawn(async move {
        let mut refused_logged = tokio::time::Instant::now() - Duration::from_secs(60);
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning; the Raft core's own
                    // files must still open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                if refused_logged.elapsed() > Duration::from_secs(10) {
                    refused_logged = tokio::time::Instant::now();
                    tracing::warn!(
                        from = %remote,
                        max = limits.max_connections,
                        "connection limit reached: closing new connections"
                    );
                }
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            let security = security.clone();
            let timeout = limits.handshake_timeout;
            tokio::spawn(async move {
                let conn = match &security {
                    Security::Insecure => ServerConn {
                        io: ServerIo::Plain(tcp),
                        info: PeerInfo {
                            remote: Some(remote),
                            tls: false,
                            identity: None,
                        },
                        _permit: permit,
                    },
                    Security::Tls(tls) => {
                        let loaded = tls.current();
                        let config = if server_only {
                            loaded.https.clone()
                        } else {
                            loaded.server.clone()
                        };
                        let acceptor = TlsAcceptor::from(config);
                        let stream = match tokio::time::timeout(timeout, acceptor.accept(tcp)).await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(from = %remote, error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(from = %remote, "TLS handshake timed out");
                                return;
                            }
                        };
                        let identity = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|c| c.first())
                            .and_then(|c| Identity::from_der(c).ok());
                        ServerConn {
                            io: ServerIo::Tls(Box::new(stream)),
                            info: PeerInfo {
                                remote: Some(remote),
                                tls: true,
                                identity,
                            },
                            _permit: permit,
                        }
                    }
                };
                let _ = tx.send(Ok(conn)).await;
            });
        }
    });
    ReceiverStream::new(rx)
}

macro_rules! delegate_io {
    ($ty:ident, $a:ident, $b:ident) => {
        impl AsyncRead for $ty {
            fn poll_read(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_read(cx, buf),
                    $ty::$b(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
                }
            }
        }
        impl AsyncWrite for $ty {
            fn poll_write(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_write(cx, buf),
                    $ty::$b(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
                }
            }
            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_flush(cx),
                    $ty::$b(s) => Pin::new(s.as_mut()).poll_flush(cx),
                }
            }
            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_shutdown(cx),
                    $ty::$b(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
                }
            }
            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    $ty::$a(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    $ty::$b(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
                }
            }
            fn is_write_vectored(&self) -> bool {
                match self {
                    $ty::$a(s) => s.is_write_vectored(),
                    $ty::$b(s) => s.is_write_vectored(),
                }
            }
        }
    };
}

delegate_io!(ClientStream, Plain, Tls);
delegate_io!(ServerIo, Plain, Tls);

impl AsyncRead for ServerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn host_port_split() {
        assert_eq!(
            split_host_port("127.0.0.1:7000"),
            Some(("127.0.0.1".into(), 7000))
        );
        assert_eq!(split_host_port("[::1]:5"), Some(("::1".into(), 5)));
        assert_eq!(
            split_host_port("http://m1.example:9"),
            Some(("m1.example".into(), 9))
        );
        assert_eq!(split_host_port("m1"), None);
        assert_eq!(split_host_port("m1:0"), None);
        assert_eq!(split_host_port(":80"), None);
    }
}
