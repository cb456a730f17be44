//! A member whose Raft core stops at runtime (issue 12, item 4): its data directory's
//! file system fills up under it (a real fault: a tmpfs of its own, filled by a file),
//! its storage write fails, and the member must exit non-zero (so that systemd or
//! Kubernetes restarts it) instead of staying up with a dead core. Restarted once
//! there is room again, it rejoins from its data directory and catches up.
//! Needs root (mount) and the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);

/// A tmpfs mounted on `dir`, unmounted (lazily: a process may still hold it) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "mount: {out:?}");
        Tmpfs(dir.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes `path` until the file system has no room left; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut n = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => n += k as u64,
        }
    }
    let _ = f.sync_all();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_whose_storage_fails_exits_non_zero_and_rejoins_after_a_restart() {
    let mut g = MonitorGroup::new(3);
    let victim = 3;
    let dir = g.members[&victim].data_dir.clone();
    let fs = Tmpfs::mount(&dir, "64m");
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    let c = g.client().retry_for(Duration::from_millis(200));
    let mut acked = BTreeSet::new();
    for i in 0..20 {
        let n = format!("before-{i}");
        create_formation(&c, &n).await.unwrap();
        acked.insert(n);
    }
    g.wait_applied(victim, &acked, WAIT).await;

    // The disk fills up; the group keeps committing with the two others, and the
    // victim's next log write fails.
    let filler = dir.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);
    let deadline = Instant::now() + WAIT;
    let mut i = 0;
    let code = loop {
        if let Some(code) = g
            .members
            .get_mut(&victim)
            .and_then(|m| m.proc.as_mut())
            .and_then(|p| p.exit_code())
        {
            break code;
        }
        assert!(
            Instant::now() < deadline,
            "member {victim} still runs with a full disk\n{}",
            g.log(victim)
        );
        let n = format!("during-{i}");
        i += 1;
        create_formation(&c, &n).await.unwrap();
        acked.insert(n);
    };
    let log = g.log(victim);
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("Raft core stopped"), "{log}");
    // Nothing was lost for the group meanwhile.
    for id in [1, 2] {
        g.wait_applied(id, &acked, WAIT).await;
    }

    // Room again, restarted as a supervisor would: it comes back from its data
    // directory and catches up.
    std::fs::remove_file(&filler).unwrap();
    g.members.get_mut(&victim).unwrap().proc = None;
    g.start(victim);
    for j in 0..5 {
        let n = format!("after-{j}");
        create_formation(&c, &n).await.unwrap();
        acked.insert(n);
    }
    g.wait_applied(victim, &acked, WAIT).await;
    let status = g
        .status(victim)
        .await
        .expect("the restarted member answers");
    assert!(status.leader_id.is_some(), "{status:?}");
    // The tmpfs first (lazily: member 3 may still hold it), so that the group's temporary
    // directory is an ordinary directory again when the group removes it: removed the
    // other way round, the mount point was busy and the directory stayed behind.
    drop(fs);
    drop(g);
}
