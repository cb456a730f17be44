//! `--certs-dir` / `--insecure` / `--client`, taken by every command, and the `Security`
//! each role builds from them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use pgquorum_trust::{CertsDir, Identity, Security, Tls, INSECURE_WARNING};

#[derive(clap::Args, Clone, Debug, Default)]
pub struct TrustArgs {
    /// Certificates directory: ca.crt and this process's own certificate and key
    /// (member.N.*, keeper.NAME.*, client.NAME.*), made with `pgquorum cert ...`.
    #[arg(long, global = true, env = "PGQUORUM_CERTS_DIR", value_name = "DIR")]
    pub certs_dir: Option<PathBuf>,
    /// Run without TLS and without authentication. Anyone who can reach the ports then
    /// controls the cluster and, through it, the database: for throwaway tests only.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Which client certificate the operator commands use: client.NAME.crt in the
    /// certificates directory (default: the only client certificate there, else
    /// "admin").
    #[arg(long, global = true, env = "PGQUORUM_CLIENT", value_name = "NAME")]
    pub client: Option<String>,
}

/// The identity a process acts as.
pub enum Who {
    Member(u64),
    Keeper(String),
    /// The operator's commands: the client certificate chosen by `--client`.
    Client,
}

impl TrustArgs {
    /// The certificates directory, required unless `--insecure`.
    pub fn dir(&self) -> anyhow::Result<PathBuf> {
        match &self.certs_dir {
            Some(d) => Ok(d.clone()),
            None => bail!(
                "no certificates directory: give --certs-dir DIR (or PGQUORUM_CERTS_DIR); create one with `pgquorum cert create-ca --certs-dir DIR`"
            ),
        }
    }

    /// How `who` talks to the others. Refuses to go on without certificates unless
    /// `--insecure` was given, and says loudly what `--insecure` means.
    pub fn security(&self, who: Who) -> anyhow::Result<Security> {
        match (&self.certs_dir, self.insecure) {
            (Some(_), true) => bail!("--insecure and --certs-dir exclude each other: choose one"),
            (None, true) => {
                tracing::warn!("{INSECURE_WARNING}");
                Ok(Security::Insecure)
            }
            (None, false) => bail!(
                "no certificates: give --certs-dir DIR (or PGQUORUM_CERTS_DIR) with the CA and this process's certificate (see `pgquorum cert --help`), or --insecure to run without TLS and authentication (anyone who reaches the ports then controls the cluster)"
            ),
            (Some(dir), false) => {
                let identity = match who {
                    Who::Member(id) => Identity::Member(id),
                    Who::Keeper(name) => Identity::keeper(&name)?,
                    Who::Client => self.client_identity(dir)?,
                };
                let tls = Tls::load(dir.clone(), identity)
                    .with_context(|| format!("certificates in {}", dir.display()))?;
                Ok(Security::Tls(tls))
            }
        }
    }

    /// Like [`TrustArgs::security`] for a long-running process: certificate files renewed
    /// on disk are picked up (every 5 s, and at once on SIGHUP). Call inside a runtime.
    pub fn security_watched(&self, who: Who) -> anyhow::Result<Security> {
        let s = self.security(who)?;
        if let Security::Tls(t) = &s {
            t.spawn_watcher(Duration::from_secs(5));
        }
        Ok(s)
    }

    /// The client certificate's identity: `--client NAME`, else the only client
    /// certificate in the directory, else `admin`. Its role comes from the certificate.
    fn client_identity(&self, dir: &std::path::Path) -> anyhow::Result<Identity> {
        let name = match &self.client {
            Some(n) => n.clone(),
            None => {
                let mut names: Vec<String> = std::fs::read_dir(dir)
                    .with_context(|| format!("cannot read {}", dir.display()))?
                    .filter_map(|e| e.ok())
                    .filter_map(|e| {
                        let f = e.file_name().to_string_lossy().into_owned();
                        f.strip_prefix("client.")
                            .and_then(|r| r.strip_suffix(".crt"))
                            .map(str::to_owned)
                    })
                    .collect();
                names.sort();
                match names.len() {
                    1 => names.remove(0),
                    0 => bail!(
                        "no client certificate in {}: create one with `pgquorum cert create-client --name NAME --role operator|viewer --certs-dir {}`",
                        dir.display(),
                        dir.display()
                    ),
                    _ if names.iter().any(|n| n == "admin") => "admin".to_owned(),
                    _ => bail!(
                        "several client certificates in {} ({}): choose one with --client NAME (or PGQUORUM_CLIENT)",
                        dir.display(),
                        names.join(", ")
                    ),
                }
            }
        };
        let path = CertsDir::new(dir).path.join(format!("client.{name}.crt"));
        let pem = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "no client certificate {} (create it with `pgquorum cert create-client --name {name} --role operator|viewer`)",
                path.display()
            )
        })?;
        let der = pgquorum_trust::certs::pem_der(&path, &pem, "CERTIFICATE")?;
        let id = Identity::from_der(&der).with_context(|| format!("{}", path.display()))?;
        match id {
            Identity::Operator(_) | Identity::Viewer(_) => Ok(id),
            other => bail!(
                "{} names {other}, not an operator or viewer",
                path.display()
            ),
        }
    }
}
