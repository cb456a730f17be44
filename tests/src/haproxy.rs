//! HAProxy (Debian's `haproxy`) in front of a pgquorum cluster on loopback, configured
//! from the shipped deploy/haproxy/haproxy.cfg with only its addresses replaced, so
//! the tests exercise the configuration users copy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use pgquorum_testkit::{free_port, Proc};

/// The configuration shipped in deploy/.
pub fn shipped_config() -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy/haproxy.cfg");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Ports HAProxy listens on.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub rw: u16,
    pub ro: u16,
    pub stats: u16,
}

/// `config` with every `bind` on 127.0.0.1 and the ports in `ports` (5000 → rw,
/// 5001 → ro, 7000 → stats), and server `nodeN` pointing at `nodes[N-1]`
/// = (postgres port, keeper HTTP port) on 127.0.0.1. Everything else is kept as is.
pub fn render(config: &str, ports: Ports, nodes: &[(u16, u16)]) -> String {
    let mut out = String::new();
    let mut servers = 0;
    for line in config.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let indent = &line[..line.len() - line.trim_start().len()];
        let new = match words.as_slice() {
            ["bind", addr, rest @ ..] => {
                let port = match addr.rsplit_once(':').map(|(_, p)| p) {
                    Some("5000") => ports.rw,
                    Some("5001") => ports.ro,
                    Some("7000") => ports.stats,
                    other => panic!("unexpected bind {other:?} in haproxy.cfg"),
                };
                format!("{indent}bind 127.0.0.1:{port} {}", rest.join(" "))
            }
            ["server", name, _addr, rest @ ..] => {
                let n: usize = name
                    .strip_prefix("node")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("server {name}: expected nodeN"));
                servers += 1;
                match nodes.get(n - 1) {
                    None => continue,
                    Some((pg, http)) => {
                        let mut rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
                        let i = rest
                            .iter()
                            .position(|w| w == "port")
                            .expect("server line has `port` (the keeper's)");
                        rest[i + 1] = http.to_string();
                        format!("{indent}server {name} 127.0.0.1:{pg} {}", rest.join(" "))
                    }
                }
            }
            _ => line.to_string(),
        };
        out.push_str(new.trim_end());
        out.push('\n');
    }
    assert!(servers > 0, "no server lines in haproxy.cfg");
    out
}

/// A running `haproxy -db -f CONFIG`, SIGKILLed on drop.
pub struct Haproxy {
    pub ports: Ports,
    pub proc: Proc,
    pub config: PathBuf,
}

pub fn haproxy_bin() -> PathBuf {
    [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.is_file())
    .unwrap_or_else(|| {
        panic!("haproxy is not installed: apt-get install haproxy (tests/run does it as root)")
    })
}

impl Haproxy {
    /// Starts HAProxy with the shipped configuration for `nodes`, in `dir`.
    pub fn start(dir: &Path, nodes: &[(u16, u16)]) -> Haproxy {
        let ports = Ports {
            rw: free_port(),
            ro: free_port(),
            stats: free_port(),
        };
        let config = dir.join("haproxy.cfg");
        std::fs::write(&config, render(&shipped_config(), ports, nodes)).unwrap();
        let bin = haproxy_bin();
        let check = std::process::Command::new(&bin)
            .args(["-c", "-q", "-f"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c: {}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = dir.join("haproxy.log");
        let proc = Proc::spawn(
            "haproxy",
            &bin,
            ["-db".as_ref(), "-f".as_ref(), config.as_os_str()],
            &log,
        )
        .expect("spawn haproxy");
        Haproxy {
            ports,
            proc,
            config,
        }
    }

    /// Connects through the read-write (`rw = true`) or read-only port.
    pub async fn connect(&self, rw: bool) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        pgquorum_testkit::postgres::connect_tcp(
            if rw { self.ports.rw } else { self.ports.ro },
            "postgres",
        )
        .await
    }

    /// Servers of `listen` (`pgquorum_rw`, `pgquorum_ro`) HAProxy sends connections to, from
    /// its statistics page.
    pub fn up_servers(&self, listen: &str) -> Option<Vec<String>> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.ports.stats));
        let (code, body) = pgquorum_testkit::postgres::http_get(addr, "/;csv")?;
        if code != 200 {
            return None;
        }
        // HAProxy answers chunked even to HTTP/1.0.
        let body = dechunk(&body);
        let mut lines = body.lines().skip_while(|l| !l.starts_with("# pxname"));
        let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
        let status = header.iter().position(|h| *h == "status")?;
        Some(
            lines
                .map(|l| l.split(',').collect::<Vec<_>>())
                .filter(|f| f.len() > status && f[0] == listen)
                // "UP 1/2" (going down) still takes connections.
                .filter(|f| f[1] != "FRONTEND" && f[1] != "BACKEND" && f[status].starts_with("UP"))
                .map(|f| f[1].to_string())
                .collect(),
        )
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }
}

/// The body of a chunked response, or `body` itself when it is not chunked.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, after)) = rest.split_once("\r\n") else {
            return body.to_string();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_string();
        };
        if n == 0 || after.len() < n {
            return out;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
}

/// PgBouncer (Debian's `pgbouncer`) with the shipped deploy/pgbouncer/pgbouncer.ini,
/// its server being HAProxy's read-write port. It runs as `postgres` (PgBouncer
/// refuses root) and is SIGKILLed on drop.
pub struct Pgbouncer {
    pub port: u16,
    pub proc: Proc,
}

pub fn pgbouncer_bin() -> PathBuf {
    ["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "pgbouncer is not installed: apt-get install pgbouncer (tests/run does it as root)"
            )
        })
}

/// The shipped pgbouncer.ini with its port, its server port (HAProxy's) and, for the
/// test's loopback cluster whose hba trusts 127.0.0.1, trust authentication.
pub fn render_pgbouncer(config: &str, port: u16, server_port: u16, auth_file: &Path) -> String {
    let mut out = String::new();
    let mut seen = 0;
    for line in config.lines() {
        let key = line.split('=').next().unwrap_or("").trim();
        let new = match key {
            "*" => {
                seen += 1;
                format!("* = host=127.0.0.1 port={server_port}")
            }
            "listen_port" => {
                seen += 1;
                format!("listen_port = {port}")
            }
            "auth_type" => "auth_type = trust".to_string(),
            "auth_file" => format!("auth_file = {}", auth_file.display()),
            _ => line.to_string(),
        };
        out.push_str(&new);
        out.push('\n');
    }
    assert_eq!(
        seen, 2,
        "pgbouncer.ini: expected `* = ...` and `listen_port`"
    );
    out
}

impl Pgbouncer {
    /// Starts PgBouncer in `dir` (owned by `postgres`) in front of `server_port`.
    pub fn start(dir: &Path, server_port: u16) -> Pgbouncer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pgbouncer/pgbouncer.ini");
        let shipped =
            std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let port = free_port();
        let auth = dir.join("userlist.txt");
        std::fs::write(&auth, "\"postgres\" \"\"\n").unwrap();
        let config = dir.join("pgbouncer.ini");
        std::fs::write(
            &config,
            render_pgbouncer(&shipped, port, server_port, &auth),
        )
        .unwrap();
        let (u, g) = pgquorum_testkit::postgres::postgres_ids();
        for f in [&auth, &config] {
            nix::unistd::chown(f.as_path(), Some(u), Some(g)).unwrap();
        }
        let mut cmd = std::process::Command::new(pgbouncer_bin());
        cmd.arg(&config);
        std::os::unix::process::CommandExt::uid(&mut cmd, u.as_raw());
        std::os::unix::process::CommandExt::gid(&mut cmd, g.as_raw());
        let proc = Proc::spawn_with("pgbouncer", &mut cmd, &dir.join("pgbouncer.log"))
            .expect("spawn pgbouncer");
        Pgbouncer { port, proc }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn pgbouncer_render_keeps_pooling_mode() {
        let shipped = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/pgbouncer/pgbouncer.ini"),
        )
        .unwrap();
        let out = render_pgbouncer(&shipped, 16432, 15000, Path::new("/tmp/u.txt"));
        assert!(out.contains("* = host=127.0.0.1 port=15000"), "{out}");
        assert!(out.contains("listen_port = 16432"), "{out}");
        assert!(out.contains("pool_mode = transaction"), "{out}");
    }

    #[test]
    fn dechunks() {
        assert_eq!(super::dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), "abcde");
        assert_eq!(super::dechunk("plain"), "plain");
    }

    use super::*;

    #[test]
    fn render_rewrites_binds_and_servers_only() {
        let ports = Ports {
            rw: 15000,
            ro: 15001,
            stats: 17000,
        };
        let out = render(&shipped_config(), ports, &[(1, 2), (3, 4), (5, 6)]);
        assert!(out.contains("bind 127.0.0.1:15000"), "{out}");
        assert!(out.contains("bind 127.0.0.1:15001"), "{out}");
        assert!(
            out.contains("server node2 127.0.0.1:3 check port 4"),
            "{out}"
        );
        assert!(out.contains("option httpchk GET /primary"), "{out}");
        assert!(out.contains("on-marked-down shutdown-sessions"), "{out}");
        assert!(
            out.lines()
                .filter(|l| l.trim_start().starts_with("server "))
                .all(|l| l.contains("127.0.0.1:")),
            "{out}"
        );
    }
}
