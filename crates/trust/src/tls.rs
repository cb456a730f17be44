//! TLS 1.3 configurations for one identity, built from the certificates directory and
//! rebuilt when the files change (rotation without a restart).
//!
//! Both sides verify: a server requires a client certificate from our CA (and not in
//! `ca.crl`), a client checks the server's certificate against the host it dialled.
//! New connections use the newest files; established ones keep the certificate they
//! were opened with.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use thiserror::Error;

use crate::certs::{check_key_mode, create_hint, CertError, CertsDir};
use crate::identity::Identity;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("{path}: {why}")]
    Bad { path: PathBuf, why: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS verifier: {0}")]
    Verifier(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The configurations built from one reading of the files.
pub struct Loaded {
    pub server: Arc<ServerConfig>,
    /// HTTPS for load balancers and probes: this identity's certificate, no client
    /// certificate asked for (HAProxy and kubelets have none), HTTP/1.1.
    pub https: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// Expiry of this identity's certificate (seconds since the epoch).
    pub not_after: i64,
}

/// What decides whether the files changed: size and modification time of each.
type Stamp = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

/// One identity's TLS material, reloadable.
pub struct Tls {
    dir: CertsDir,
    identity: Identity,
    current: RwLock<Arc<Loaded>>,
    stamp: Mutex<Stamp>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("dir", &self.dir.path)
            .field("identity", &self.identity)
            .finish()
    }
}

impl Tls {
    /// Loads `identity`'s certificate and key (`member.N`, `keeper.NAME` or
    /// `client.NAME` in `dir`), the CA and the CRL. Refuses files that are missing, a
    /// key others can read, and a certificate that names another identity.
    pub fn load(dir: impl Into<PathBuf>, identity: Identity) -> Result<Arc<Tls>, TlsError> {
        let dir = CertsDir::new(dir);
        let stamp = stamp(&dir, &identity);
        let loaded = build(&dir, &identity)?;
        Ok(Arc::new(Tls {
            dir,
            identity,
            current: RwLock::new(Arc::new(loaded)),
            stamp: Mutex::new(stamp),
        }))
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn dir(&self) -> &std::path::Path {
        &self.dir.path
    }

    pub fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds from the files. On error the old configuration stays in use (a renewal
    /// half-copied by an operator must not take a member off the network).
    pub fn reload(&self) -> Result<(), TlsError> {
        let s = stamp(&self.dir, &self.identity);
        let loaded = build(&self.dir, &self.identity)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) = s;
        Ok(())
    }

    /// Reloads when a file changed since the last load. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now = stamp(&self.dir, &self.identity);
        let changed = *self.stamp.lock().unwrap_or_else(|p| p.into_inner()) != now;
        if changed {
            self.reload()?;
        }
        Ok(changed)
    }

    /// Watches the files (every `every`, and on SIGHUP) and reloads what changed, for
    /// as long as the process runs.
    pub fn spawn_watcher(self: &Arc<Self>, every: Duration) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut hup =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                let forced = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = async {
                        match hup.as_mut() {
                            Some(h) => { h.recv().await; }
                            None => std::future::pending::<()>().await,
                        }
                    } => true,
                };
                let result = if forced {
                    tls.reload().map(|()| true)
                } else {
                    tls.reload_if_changed()
                };
                match result {
                    Ok(true) => tracing::info!(
                        identity = %tls.identity,
                        dir = %tls.dir.path.display(),
                        not_after = tls.current().not_after,
                        "certificates reloaded"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(
                        identity = %tls.identity,
                        error = %e,
                        "certificate reload failed; still using the previous certificates"
                    ),
                }
            }
        });
    }
}

fn stamp(dir: &CertsDir, id: &Identity) -> Stamp {
    [
        dir.ca_cert_path(),
        dir.crl_path(),
        dir.cert_path(id),
        dir.key_path(id),
    ]
    .into_iter()
    .map(|p| {
        let m = std::fs::metadata(&p)
            .ok()
            .and_then(|m| Some((m.len(), m.modified().ok()?)));
        (p, m)
    })
    .collect()
}

fn bad(path: &std::path::Path, why: impl ToString) -> TlsError {
    TlsError::Bad {
        path: path.to_owned(),
        why: why.to_string(),
    }
}

fn build(dir: &CertsDir, id: &Identity) -> Result<Loaded, TlsError> {
    let ca_path = dir.ca_cert_path();
    if !ca_path.exists() {
        return Err(CertError::NoCa(dir.path.clone()).into());
    }
    let cert_path = dir.cert_path(id);
    let key_path = dir.key_path(id);
    for p in [&cert_path, &key_path] {
        if !p.exists() {
            return Err(CertError::Missing(p.clone(), create_hint(id, &dir.path)).into());
        }
    }
    check_key_mode(&key_path)?;

    let mut roots = RootCertStore::empty();
    let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca_path)
        .map_err(|e| bad(&ca_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&ca_path, e))?;
    if ca_certs.is_empty() {
        return Err(bad(&ca_path, "no certificate in the file"));
    }
    for c in ca_certs {
        roots.add(c).map_err(|e| bad(&ca_path, e))?;
    }
    let roots = Arc::new(roots);

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| bad(&cert_path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(&cert_path, e))?;
    let Some(leaf) = chain.first() else {
        return Err(bad(&cert_path, "no certificate in the file"));
    };
    let named = Identity::from_der(leaf).map_err(|e| bad(&cert_path, e))?;
    if &named != id {
        return Err(CertError::WrongIdentity {
            path: cert_path,
            found: named.to_string(),
            expected: id.to_string(),
        }
        .into());
    }
    let not_after = x509_parser::parse_x509_certificate(leaf)
        .map(|(_, c)| c.validity().not_after.timestamp())
        .map_err(|e| bad(&cert_path, e))?;
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| bad(&key_path, e))?;

    let crl_path = dir.crl_path();
    let crls: Vec<CertificateRevocationListDer<'static>> = if crl_path.exists() {
        CertificateRevocationListDer::pem_file_iter(&crl_path)
            .map_err(|e| bad(&crl_path, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| bad(&crl_path, e))?
    } else {
        Vec::new()
    };

    let provider = provider();
    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .build()
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    let mut https = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(chain.clone(), key.clone_key())?;
    https.alpn_protocols = vec![b"http/1.1".to_vec()];

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .with_crls(crls)
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];

    Ok(Loaded {
        server: Arc::new(server),
        https: Arc::new(https),
        client: Arc::new(client),
        not_after,
    })
}
