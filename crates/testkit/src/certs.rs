//! Certificates for tests: a CA per test, member, keeper and client certificates made
//! with pgquorum's own code, as `pgquorum cert ...` would make them.
//!
//! End-to-end tests run with TLS unless `PGQUORUM_TEST_INSECURE=1` (then every process
//! gets `--insecure`, e.g. for a benchmark's side-by-side run).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pgquorum_trust::{CertsDir, Identity, Security, Tls, Validity};

use crate::postgres::postgres_ids;

/// Whether tests run without TLS (`PGQUORUM_TEST_INSECURE=1`).
pub fn insecure_requested() -> bool {
    std::env::var("PGQUORUM_TEST_INSECURE").is_ok_and(|v| v == "1")
}

/// A test's CA and the certificates it issued, in one directory owned by root.
#[derive(Clone, Debug)]
pub struct TestCerts {
    pub dir: CertsDir,
}

const HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

impl TestCerts {
    /// A new CA in `dir` with client certificates `admin` (operator) and `viewer`.
    pub fn new(dir: &Path) -> TestCerts {
        let certs = TestCerts {
            dir: CertsDir::new(dir),
        };
        certs.dir.create_ca(Validity::days(30), false).unwrap();
        certs.issue(&Identity::Operator("admin".into()));
        certs.issue(&Identity::Viewer("viewer".into()));
        certs
    }

    pub fn path(&self) -> &Path {
        &self.dir.path
    }

    /// Makes `id`'s certificate (valid for 127.0.0.1 and localhost) unless it exists.
    pub fn issue(&self, id: &Identity) {
        if !self.dir.cert_path(id).exists() {
            let hosts: Vec<String> = match id {
                Identity::Member(_) | Identity::Keeper(_) => {
                    HOSTS.iter().map(|h| h.to_string()).collect()
                }
                _ => Vec::new(),
            };
            self.dir
                .create(id, &hosts, Validity::days(30), false)
                .unwrap();
        }
    }

    /// Re-issues `id`'s certificate with `validity` (renewal, or an expired one).
    pub fn reissue(&self, id: &Identity, validity: Validity) {
        let hosts: Vec<String> = match id {
            Identity::Member(_) | Identity::Keeper(_) => {
                HOSTS.iter().map(|h| h.to_string()).collect()
            }
            _ => Vec::new(),
        };
        self.dir.create(id, &hosts, validity, true).unwrap();
    }

    /// A directory under `parent` with the CA certificate and keeper `name`'s own
    /// certificate and key, owned by the `postgres` user the keeper runs as.
    pub fn keeper_dir(&self, name: &str, parent: &Path) -> PathBuf {
        let id = Identity::keeper(name).unwrap();
        self.issue(&id);
        let own = parent.join(format!("certs-{name}"));
        self.copy_keeper_files(&id, &own);
        own
    }

    /// Copies (again) the keeper's files into its directory: after a renewal.
    pub fn copy_keeper_files(&self, id: &Identity, own: &Path) {
        std::fs::create_dir_all(own).unwrap();
        std::fs::set_permissions(own, std::fs::Permissions::from_mode(0o700)).unwrap();
        let (u, g) = postgres_ids();
        for (from, mode) in [
            (self.dir.ca_cert_path(), 0o644),
            (self.dir.cert_path(id), 0o644),
            (self.dir.key_path(id), 0o600),
        ] {
            let to = own.join(from.file_name().unwrap());
            let tmp = to.with_extension("copying");
            std::fs::copy(&from, &tmp).unwrap();
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).unwrap();
            nix::unistd::chown(&tmp, Some(u), Some(g)).unwrap();
            std::fs::rename(&tmp, &to).unwrap();
        }
        nix::unistd::chown(own, Some(u), Some(g)).unwrap();
    }

    /// The security of a client acting as `id` (its certificate is made if missing).
    pub fn security(&self, id: Identity) -> Security {
        self.issue(&id);
        Security::Tls(Tls::load(self.dir.path.clone(), id).unwrap())
    }

    /// The arguments that give a `pgquorum` command this directory.
    pub fn args(&self) -> Vec<String> {
        vec!["--certs-dir".into(), self.dir.path.display().to_string()]
    }
}
