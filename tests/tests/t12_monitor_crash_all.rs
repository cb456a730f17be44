//! All three members SIGKILLed during a stream of writes, then restarted: every write
//! that was acknowledged is there.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_write_survives_killing_the_whole_group() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;

    let acked: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let mut writers = Vec::new();
    for w in 0..4 {
        let c = g.client().retry_for(Duration::from_millis(200));
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0.. {
                let n = format!("w{w}-{i}");
                match create_formation(&c, &n).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(n);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    pgquorum_testkit::wait_until_async(WAIT, "100 acknowledged writes", || async {
        acked.lock().unwrap().len() >= 100
    })
    .await
    .unwrap();
    // Kill while writes are in flight.
    for id in [1, 2, 3] {
        g.kill(id);
    }
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();

    for id in [2, 3, 1] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    for id in [1, 2, 3] {
        g.wait_applied(id, &acked, WAIT).await;
    }
    // And the group takes writes again.
    create_formation(&g.client(), "after-restart")
        .await
        .unwrap();
}
