//! One local PostgreSQL under the keeper's control: its data directory, its postmaster
//! (a child of the keeper), and the keeper's persisted run-state.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgquorum_core::HostName;
use tokio_postgres::Client;

use crate::error::{KeeperError, Result};
use crate::pg::postmaster::{self, Postmaster, StopMode};
use crate::pg::{data_dir_version, ControlData, PgBin};
use crate::settings::{sibling, Settings};
use crate::shared::Shared;
use crate::sql;
use crate::state::RunState;

pub struct Instance {
    pub settings: Settings,
    pub bin: PgBin,
    pub state: RunState,
    pub shared: Arc<Shared>,
    postmaster: Option<Postmaster>,
    /// The latest assignment, as the heartbeat publishes it: a transition that waits
    /// (for streaming to start) gives up as soon as the goal it serves is replaced.
    pub assignments: Option<tokio::sync::watch::Receiver<Option<pgquorum_core::Assignment>>>,
    /// The upstream address written into primary_conninfo last (None: by name only).
    pub(crate) conf_upstream_addr: Option<std::net::IpAddr>,
    /// When the certificate files were last compared with postgres' copies.
    pub(crate) tls_checked: Instant,
    /// Whether primary_conninfo's slot was written last (see `uses_slot`).
    pub(crate) conf_slot: bool,
    /// A standby uses its slot from the first stream on (assignments given by hand,
    /// `keeper apply`, whose primary is told its peers by hand too).
    pub slot_from_start: bool,
    /// When the primary last reconciled its replication slots.
    pub(crate) slots_checked: Instant,
    /// The running primary was started from its own data directory with clients kept
    /// out (`pgconf::ClientAccess::Gated`) until a synchronous standby confirms its WAL.
    pub(crate) gated: bool,
    /// The assignment the transition under way serves (None between transitions): its
    /// waits give up when the heartbeat publishes another goal.
    pub(crate) serving: Option<pgquorum_core::Assignment>,
}

/// Refuses what can never work, before anything is touched.
pub fn preflight(settings: &Settings) -> Result<PgBin> {
    if nix::unistd::geteuid().is_root() {
        return Err(KeeperError::RunAsRoot);
    }
    settings.validate()?;
    let bin = PgBin::locate(settings.bindir.as_deref())?;
    if settings.pg_tls.is_some() && !bin.path("psql").is_file() {
        // The upstream's system identifier is read with psql over TLS.
        return Err(KeeperError::MissingBinaries(format!(
            "psql is not in {}",
            bin.dir.display()
        )));
    }
    if let Some(v) = data_dir_version(&settings.pgdata) {
        if v != bin.major {
            return Err(KeeperError::VersionMismatch {
                what: format!("data directory {}", settings.pgdata.display()),
                found: v,
                expected: bin.major,
            });
        }
    }
    Ok(bin)
}

impl Instance {
    /// Opens the instance: checks the environment, loads the run-state and finishes a
    /// data-directory swap that a killed keeper left half done.
    pub fn open(settings: Settings, shared: Arc<Shared>) -> Result<Instance> {
        let bin = preflight(&settings)?;
        let old = sibling(&settings.pgdata, "pgquorum-old");
        if !settings.pgdata.exists() && old.exists() {
            tracing::warn!(dir = %old.display(), "restoring the data directory of an interrupted swap");
            std::fs::rename(&old, &settings.pgdata)
                .map_err(|e| KeeperError::io(format!("renaming {}", old.display()), e))?;
        }
        // Refused before the keeper registers, so that a keeper that cannot run leaves
        // no node (and no replication slot on the primary) behind. A postmaster of this
        // data directory that is still going down (its keeper just died) holds the port
        // legitimately; start() waits for it.
        if postmaster::running_pid(&settings.pgdata).is_none() {
            postmaster::check_port_free(&settings.listen_addresses, settings.pg_port)?;
        }
        let state = RunState::load(&settings.state_file)?;
        crate::pgconf::write_passfile(&settings)?;
        if let Some(t) = &settings.pg_tls {
            crate::pgconf::sync_tls_files(t)?;
        }
        shared.update_status(|s| {
            s.node_id = state.node_id;
            s.current_state = Some(state.current_state);
        });
        Ok(Instance {
            settings,
            bin,
            state,
            shared,
            postmaster: None,
            assignments: None,
            conf_upstream_addr: None,
            tls_checked: Instant::now(),
            conf_slot: false,
            slot_from_start: false,
            slots_checked: Instant::now(),
            gated: false,
            serving: None,
        })
    }

    pub fn pgdata(&self) -> &Path {
        &self.settings.pgdata
    }

    pub fn save_state(&self) -> Result<()> {
        self.state.save(&self.settings.state_file)
    }

    pub fn has_data(&self) -> bool {
        self.pgdata().join("PG_VERSION").is_file()
    }

    pub fn is_running(&self) -> bool {
        self.postmaster.as_ref().is_some_and(|p| p.is_running())
    }

    /// Changes when the postmaster exits (for the main loop's select).
    pub fn exit_watch(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<Option<std::process::ExitStatus>>> {
        self.postmaster.as_ref().map(|p| p.exit_watch())
    }

    pub async fn controldata(&self) -> Result<ControlData> {
        self.bin.controldata(self.pgdata()).await
    }

    /// The data directory must belong to the cluster this node is part of.
    pub async fn check_identity(&self) -> Result<ControlData> {
        if let Some(v) = data_dir_version(self.pgdata()) {
            if v != self.bin.major {
                return Err(KeeperError::VersionMismatch {
                    what: format!("data directory {}", self.pgdata().display()),
                    found: v,
                    expected: self.bin.major,
                });
            }
        }
        let cd = self.controldata().await?;
        if let Some(expected) = self.state.system_identifier {
            if expected != cd.system_identifier {
                return Err(KeeperError::SystemIdentifierMismatch {
                    pgdata: self.pgdata().to_path_buf(),
                    found: cd.system_identifier,
                    expected,
                });
            }
        }
        Ok(cd)
    }

    pub async fn connect(&self) -> Result<Client> {
        sql::connect_local(&self.settings, Duration::from_secs(5)).await
    }

    /// Starts postgres as the configuration on disk says (standby.signal or not).
    pub async fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.postmaster = None;
        // A postmaster this keeper did not start (or an old one still going down after
        // its keeper died) holds the data directory: give it a moment, then refuse.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Some(pid) = postmaster::running_pid(self.pgdata()) {
            if Instant::now() > deadline {
                return Err(KeeperError::AlreadyRunning {
                    pid,
                    pgdata: self.pgdata().to_path_buf(),
                });
            }
            self.check_serving()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.clear_stale_locks();
        postmaster::check_port_free(&self.settings.listen_addresses, self.settings.pg_port)?;
        let pm = Postmaster::start(
            &self.bin,
            &self.settings.pgdata,
            &self.settings.log_file,
            self.settings.start_timeout,
            || self.check_serving(),
        )
        .await?;
        self.shared.set_postmaster(Some(pm.pid()));
        self.postmaster = Some(pm);
        Ok(())
    }

    /// See [`postmaster::clear_stale_locks`]: before anything runs postgres on this
    /// data directory (the postmaster, pg_rewind's single-user recovery).
    fn clear_stale_locks(&self) {
        for pid in postmaster::clear_stale_locks(
            self.pgdata(),
            &self.settings.socket_dir,
            self.settings.pg_port,
        ) {
            tracing::warn!(node = %self.settings.name, pid, "removed a stale lock file naming a process that is no postgres (a postmaster killed earlier)");
        }
    }

    pub async fn stop(&mut self, mode: StopMode) {
        // Writability (and with it the fence guard's deadline) ends when postgres has
        // exited, not when the stop begins: a keeper paused in between must still be
        // fenced.
        if let Some(pm) = self.postmaster.take() {
            if pm.is_running() {
                pm.stop(mode).await;
            }
        }
        self.shared.set_writable(false);
        self.shared.set_postmaster(None);
    }

    /// Forgets a postmaster that exited by itself (crash, fence).
    pub fn reap(&mut self) -> bool {
        if self.postmaster.as_ref().is_some_and(|p| !p.is_running()) {
            self.postmaster = None;
            self.shared.set_postmaster(None);
            // The fence guard may have stopped it before the fence task ran (the
            // keeper was paused): counted as a fence all the same.
            if self.shared.take_writable() && !self.shared.lease_valid(Instant::now()) {
                self.shared
                    .fences
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            return true;
        }
        false
    }

    /// Every few seconds: copies a renewed certificate (or a new CRL) for postgres and
    /// makes it reload, so that new connections use it. Returns true when the managed
    /// configuration must be rewritten too (a CRL appeared or went: `ssl_crl_file`).
    pub fn refresh_tls(&mut self) -> Result<bool> {
        let Some(t) = &self.settings.pg_tls else {
            return Ok(false);
        };
        if self.tls_checked.elapsed() < Duration::from_secs(5) {
            return Ok(false);
        }
        self.tls_checked = Instant::now();
        if !crate::pgconf::sync_tls_files(t)? {
            return Ok(false);
        }
        tracing::info!(node = %self.settings.name, "certificate files changed; postgres reloads them");
        let conf = std::fs::read_to_string(self.pgdata().join(crate::pgconf::INCLUDE_FILE))
            .unwrap_or_default();
        self.reload();
        Ok(conf.contains("ssl_crl_file") != t.has_crl())
    }

    pub fn reload(&self) {
        if let Some(pm) = &self.postmaster {
            pm.reload();
        }
    }

    /// initdb into a fresh directory that becomes --pgdata only when complete.
    pub async fn initdb(&mut self) -> Result<()> {
        let target = self.pgdata().to_path_buf();
        let empty_existing = target.is_dir()
            && std::fs::read_dir(&target)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
        if target.exists() && !empty_existing {
            return Err(KeeperError::Unreachable {
                goal: "single".into(),
                reason: format!(
                    "{} exists but is not a PostgreSQL data directory (no PG_VERSION); \
                     remove it or point --pgdata elsewhere",
                    target.display()
                ),
            });
        }
        let dir = if empty_existing {
            target.clone()
        } else {
            sibling(&target, "pgquorum-new")
        };
        remove_dir(&dir)?;
        if empty_existing {
            std::fs::create_dir_all(&dir).map_err(|e| KeeperError::io("recreating pgdata", e))?;
        }
        tracing::info!(step = "initdb", pgdata = %target.display(), "initializing a new cluster");
        let args: Vec<std::ffi::OsString> = vec![
            "-D".into(),
            dir.clone().into(),
            "-U".into(),
            self.settings.superuser.clone().into(),
            // Local connections by peer: the keeper (and postgres) run as one OS user,
            // and no other local user may become the superuser. The managed block of
            // pg_hba.conf repeats this, with a user map when the superuser's name is not
            // the OS user's.
            "--auth-local=peer".into(),
            "--auth-host=scram-sha-256".into(),
            "-E".into(),
            "UTF8".into(),
            "--locale=C".into(),
            "--no-instructions".into(),
        ];
        self.bin.run("initdb", &args, &[]).await?;
        if !empty_existing {
            std::fs::rename(&dir, &target).map_err(|e| {
                KeeperError::io(format!("renaming {} into place", dir.display()), e)
            })?;
        }
        Ok(())
    }

    /// pg_basebackup from `host:port` into a new directory that replaces --pgdata only
    /// once the copy is complete.
    pub async fn basebackup(&mut self, host: &HostName, port: u16) -> Result<()> {
        self.stop(StopMode::Fast).await;
        let target = self.pgdata().to_path_buf();
        let new = sibling(&target, "pgquorum-new");
        let old = sibling(&target, "pgquorum-old");
        remove_dir(&new)?;
        tracing::info!(step = "basebackup", %host, port, into = %new.display(), "cloning the primary");
        let args: Vec<std::ffi::OsString> = vec![
            "-D".into(),
            new.clone().into(),
            // One argument each (`--opt=value`): no value can be read as an option.
            format!("--host={host}").into(),
            format!("--port={port}").into(),
            format!("--username={}", self.settings.replication_user).into(),
            "-X".into(),
            "stream".into(),
            "-c".into(),
            "fast".into(),
            "--no-password".into(),
            "--progress".into(),
            "--verbose".into(),
        ];
        let tls = crate::pgconf::tls_env(&self.settings);
        let mut env = self.password_env();
        env.extend(tls.iter().map(|(k, v)| (*k, v.as_str())));
        if let Err(e) = self.bin.run("pg_basebackup", &args, &env).await {
            let _ = remove_dir(&new);
            return Err(e);
        }
        tracing::info!(
            step = "swap",
            "basebackup complete; replacing the data directory"
        );
        remove_dir(&old)?;
        if target.exists() {
            std::fs::rename(&target, &old)
                .map_err(|e| KeeperError::io(format!("moving {} aside", target.display()), e))?;
        }
        std::fs::rename(&new, &target)
            .map_err(|e| KeeperError::io(format!("renaming {} into place", new.display()), e))?;
        remove_dir(&old)?;
        Ok(())
    }

    /// The replication password for libpq tools: the path of the keeper's password
    /// file, so that the password is in no process's environment or arguments.
    fn password_env(&self) -> Vec<(&'static str, &str)> {
        match (
            &self.settings.replication_password,
            self.settings.passfile.to_str(),
        ) {
            (Some(_), Some(p)) => vec![("PGPASSFILE", p)],
            _ => Vec::new(),
        }
    }

    /// pg_rewind against `host:port`. postgres must be stopped.
    pub async fn rewind(&mut self, host: &HostName, port: u16) -> Result<()> {
        self.stop(StopMode::Fast).await;
        tracing::info!(step = "rewind", %host, port, "pg_rewind against the primary");
        let source = crate::pgconf::replication_conninfo(
            &self.settings,
            host,
            None,
            port,
            5,
            "dbname=postgres",
        );
        let args: Vec<std::ffi::OsString> = vec![
            "-D".into(),
            self.pgdata().as_os_str().to_owned(),
            "--source-server".into(),
            source.into(),
            "--progress".into(),
        ];
        let env = self.password_env();
        // A target that was not shut down cleanly (a crashed primary, a standby killed
        // mid-start) is first recovered by pg_rewind in single-user mode, which refuses
        // to run with standby.signal present ("standby mode is not supported by
        // single-user servers"); the rewind then failed and the node was cloned afresh
        // (seen in the compose test). The signal is back before anything can start it.
        self.clear_stale_locks();
        let standby = self.pgdata().join("standby.signal").exists();
        if standby {
            crate::pgconf::set_standby_signal(self.pgdata(), false)?;
        }
        let out = self.bin.run("pg_rewind", &args, &env).await;
        if standby {
            crate::pgconf::set_standby_signal(self.pgdata(), true)?;
        }
        let out = out?;
        tracing::info!(step = "rewind", "pg_rewind done: {}", out.trim());
        Ok(())
    }
}

impl Instance {
    /// The system identifier of the server at `host:port`, read with psql over the
    /// conninfo pg_rewind uses (TLS, verify-full, the node's certificate): tokio-postgres
    /// here speaks no TLS.
    pub async fn remote_system_identifier(&self, host: &HostName, port: u16) -> Result<u64> {
        let conninfo = crate::pgconf::replication_conninfo(
            &self.settings,
            host,
            None,
            port,
            5,
            "dbname=postgres application_name=pgquorum-keeper",
        );
        let args: Vec<std::ffi::OsString> = vec![
            "--no-psqlrc".into(),
            "--no-align".into(),
            "--tuples-only".into(),
            "--quiet".into(),
            "--command=SELECT system_identifier FROM pg_control_system()".into(),
            format!("--dbname={conninfo}").into(),
        ];
        // connect_timeout bounds the connection; the query reads pg_control only.
        let out = self.bin.run("psql", &args, &[]).await?;
        // bigint on the server; the keeper keeps it as u64, as pg_controldata prints it.
        out.trim()
            .parse::<i64>()
            .map(|v| v as u64)
            .map_err(|_| KeeperError::Unreachable {
                goal: "standby".into(),
                reason: format!(
                    "{host}:{port} answered {} for its system identifier",
                    pgquorum_core::quote_prefix(out.trim())
                ),
            })
    }
}

fn remove_dir(p: &PathBuf) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(KeeperError::io(format!("removing {}", p.display()), e)),
    }
}
