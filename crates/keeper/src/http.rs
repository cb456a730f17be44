//! Health endpoints with Patroni's meaning, so HAProxy and Kubernetes probe
//! configurations written for Patroni work unchanged; and Prometheus metrics.
//!
//! Unlike Patroni's `/primary` (which follows the leader lock even when postgres is
//! dead), every answer here also requires postgres itself to be up and answering.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use pgquorum_core::Lsn;

use crate::shared::Shared;

#[derive(Clone)]
struct App {
    shared: Arc<Shared>,
    name: String,
}

pub fn router(shared: Arc<Shared>, name: String) -> Router {
    let app = App { shared, name };
    let probe = |f: fn(&Facts, &Params) -> bool| {
        get(
            move |State(app): State<App>, Query(q): Query<HashMap<String, String>>| async move {
                answer(&app, &q, f)
            },
        )
        .options(
            move |State(app): State<App>, Query(q): Query<HashMap<String, String>>| async move {
                answer(&app, &q, f)
            },
        )
    };
    Router::new()
        .route("/primary", probe(|f, _| f.primary))
        .route("/master", probe(|f, _| f.primary))
        .route("/read-write", probe(|f, _| f.primary))
        .route("/replica", probe(replica_ok))
        .route("/read-only", probe(|f, q| f.primary || replica_ok(f, q)))
        .route("/health", probe(|f, _| f.pg_up))
        .route("/readiness", probe(|f, q| f.primary || replica_ok(f, q)))
        .route("/liveness", probe(|_, _| true))
        .route("/", probe(|f, _| f.primary))
        .route("/metrics", get(metrics))
        .with_state(app)
}

/// Connections the HTTP server keeps open at once. A probe needs one for a few
/// milliseconds; when a client holds them all (idle connections by the thousand), the
/// oldest is closed to make room, so that a new probe is always served.
pub const MAX_CONNECTIONS: usize = 256;
/// A connection must deliver a request's headers within this time (an idle keep-alive
/// connection waiting for its next request included), or it is closed.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, however busy.
pub const MAX_CONNECTION_LIFE: Duration = Duration::from_secs(60);

/// The open connections, oldest first: an id, and the sender whose drop closes it.
type OpenConnections = VecDeque<(u64, oneshot::Sender<()>)>;

/// Serves `router` on `listener` with the bounds above. Accept errors (out of file
/// descriptors under a flood) are waited out, never fatal: the probes must outlive
/// the flood.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let open: Arc<Mutex<OpenConnections>> = Arc::default();
    let mut next_id = 0u64;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::debug!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        let (close_tx, close_rx) = oneshot::channel::<()>();
        if let Ok(mut q) = open.lock() {
            while q.len() >= MAX_CONNECTIONS {
                // Dropping the sender wakes the oldest connection's task, which closes it.
                q.pop_front();
            }
            q.push_back((id, close_tx));
        }
        let svc = TowerToHyperService::new(router.clone());
        let open = open.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = close_rx => {}
                _ = tokio::time::sleep(MAX_CONNECTION_LIFE) => {}
            }
            if let Ok(mut q) = open.lock() {
                q.retain(|(i, _)| *i != id);
            }
        });
    }
}

/// What the endpoints decide on, computed once per request.
#[derive(Debug, serde::Serialize)]
struct Facts {
    node: String,
    role: &'static str,
    state: Option<String>,
    goal_state: Option<String>,
    in_transition: bool,
    pg_up: bool,
    primary: bool,
    streaming: bool,
    lsn: Option<String>,
    lsn_bytes: Option<u64>,
    received_lsn: Option<u64>,
    replayed_lsn: Option<u64>,
    timeline: Option<u32>,
    lag_bytes: Option<u64>,
    lease_ms_left: u64,
}

/// As PostgreSQL writes it; 0/0 (PostgreSQL's own text for no position) when unknown.
fn lsn_text(l: Option<Lsn>) -> String {
    l.map_or_else(|| "0/0".to_string(), |l| l.to_string())
}

fn facts(app: &App) -> Facts {
    let st = app.shared.status();
    let hands_off = app
        .shared
        .hands_off
        .load(std::sync::atomic::Ordering::SeqCst);
    // A dead postmaster is seen at once, not at the next observation.
    let pm_alive = app.shared.postmaster_pid().is_some() || hands_off;
    let obs = st.observation.as_ref().filter(|_| pm_alive);
    let lease = app.shared.lease_left(Instant::now());
    let lease_ms_left = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX);
    let pg_up = obs.is_some();
    let gated = app
        .shared
        .clients_gated
        .load(std::sync::atomic::Ordering::SeqCst);
    let primary =
        obs.is_some_and(|o| !o.in_recovery) && app.shared.writable() && !lease.is_zero() && !gated;
    let role = match obs {
        None => "unknown",
        Some(o) if o.in_recovery => "replica",
        Some(_) if primary => "primary",
        // Restarted in place, clients kept out until a synchronous standby holds its WAL.
        Some(_) if gated && app.shared.writable() => "gated",
        Some(_) => "fenced",
    };
    Facts {
        node: app.name.clone(),
        role,
        state: st.current_state.map(|s| s.to_string()),
        goal_state: st.goal_state.map(|s| s.to_string()),
        in_transition: st.in_transition,
        pg_up,
        primary,
        streaming: obs.is_some_and(|o| o.in_recovery && o.streaming),
        // The endpoint's JSON keeps its u64s with 0 for unknown.
        lsn: obs.map(|o| lsn_text(o.current_lsn)),
        lsn_bytes: obs.map(|o| Lsn::raw(o.current_lsn)),
        received_lsn: obs.map(|o| Lsn::raw(o.received_lsn)),
        replayed_lsn: obs.map(|o| Lsn::raw(o.replayed_lsn)),
        timeline: obs.map(|o| o.timeline),
        lag_bytes: obs.filter(|o| o.in_recovery).map(|o| o.lag_bytes),
        lease_ms_left,
    }
}

/// The query parameters a probe understands, checked before any answer is given.
#[derive(Debug, Default, PartialEq, Eq)]
struct Params {
    /// `?lag=`: the most lag (bytes) a replica may have and still answer 200.
    max_lag: Option<u64>,
}

impl Params {
    /// A malformed value is the caller's mistake, not an unhealthy node: it gets a 400
    /// that says what is wrong (a 503 would read as "replica down" in HAProxy).
    fn parse(q: &HashMap<String, String>) -> Result<Params, String> {
        let max_lag = match q.get("lag") {
            None => None,
            Some(v) => Some(parse_bytes(v).ok_or_else(|| {
                format!(
                    "lag={}: expected a number of bytes, optionally with kB, MB or GB",
                    pgquorum_core::quote_prefix(v)
                )
            })?),
        };
        Ok(Params { max_lag })
    }
}

/// `/replica`: a streaming standby; `?lag=` bounds the lag (bytes, or with kB/MB/GB).
fn replica_ok(f: &Facts, p: &Params) -> bool {
    if !f.streaming {
        return false;
    }
    match p.max_lag {
        None => true,
        Some(max) => f.lag_bytes.unwrap_or(u64::MAX) <= max,
    }
}

pub fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (num, unit) = v.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn answer(app: &App, q: &HashMap<String, String>, ok: fn(&Facts, &Params) -> bool) -> Response {
    let params = match Params::parse(q) {
        Ok(p) => p,
        Err(reason) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": reason })),
            )
                .into_response()
        }
    };
    let f = facts(app);
    let code = if ok(&f, &params) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(f)).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let f = facts(&app);
    let sh = &app.shared;
    let mut m = String::new();
    let b = |v: bool| if v { 1 } else { 0 };
    let _ = writeln!(
        m,
        "# HELP pgquorum_keeper_pg_up Whether the local postgres answers."
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_pg_up gauge");
    let _ = writeln!(m, "pgquorum_keeper_pg_up {}", b(f.pg_up));
    let _ = writeln!(
        m,
        "# HELP pgquorum_keeper_role Current role of the local postgres."
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_role gauge");
    for r in ["primary", "replica", "gated", "fenced", "unknown"] {
        let _ = writeln!(m, "pgquorum_keeper_role{{role=\"{r}\"}} {}", b(f.role == r));
    }
    let _ = writeln!(
        m,
        "# HELP pgquorum_keeper_state The keeper's current and goal states."
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_state gauge");
    if let Some(s) = &f.state {
        let _ = writeln!(
            m,
            "pgquorum_keeper_state{{kind=\"current\",state=\"{s}\"}} 1"
        );
    }
    if let Some(s) = &f.goal_state {
        let _ = writeln!(m, "pgquorum_keeper_state{{kind=\"goal\",state=\"{s}\"}} 1");
    }
    let _ = writeln!(m, "# TYPE pgquorum_keeper_lsn_bytes gauge");
    let _ = writeln!(m, "pgquorum_keeper_lsn_bytes {}", f.lsn_bytes.unwrap_or(0));
    let _ = writeln!(m, "# TYPE pgquorum_keeper_timeline gauge");
    let _ = writeln!(m, "pgquorum_keeper_timeline {}", f.timeline.unwrap_or(0));
    let _ = writeln!(m, "# TYPE pgquorum_keeper_replication_lag_bytes gauge");
    let _ = writeln!(
        m,
        "pgquorum_keeper_replication_lag_bytes {}",
        f.lag_bytes.unwrap_or(0)
    );
    let _ = writeln!(
        m,
        "# HELP pgquorum_keeper_lease_remaining_seconds Time left on the primary lease."
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_lease_remaining_seconds gauge");
    let left = if f.lease_ms_left == u64::MAX {
        f64::INFINITY
    } else {
        f.lease_ms_left as f64 / 1000.0
    };
    let _ = writeln!(m, "pgquorum_keeper_lease_remaining_seconds {left}");
    let _ = writeln!(m, "# TYPE pgquorum_keeper_transitions_total counter");
    let _ = writeln!(m, "# TYPE pgquorum_keeper_transition_seconds_total counter");
    for (to, t) in sh.transitions() {
        let _ = writeln!(
            m,
            "pgquorum_keeper_transitions_total{{to=\"{to}\",result=\"ok\"}} {}",
            t.ok
        );
        let _ = writeln!(
            m,
            "pgquorum_keeper_transitions_total{{to=\"{to}\",result=\"failed\"}} {}",
            t.failed
        );
        let _ = writeln!(
            m,
            "pgquorum_keeper_transition_seconds_total{{to=\"{to}\"}} {}",
            t.seconds_sum
        );
    }
    use std::sync::atomic::Ordering::Relaxed;
    let _ = writeln!(m, "# TYPE pgquorum_keeper_postgres_restarts_total counter");
    let _ = writeln!(
        m,
        "pgquorum_keeper_postgres_restarts_total {}",
        sh.postgres_restarts.load(Relaxed)
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_fences_total counter");
    let _ = writeln!(
        m,
        "pgquorum_keeper_fences_total {}",
        sh.fences.load(Relaxed)
    );
    let _ = writeln!(m, "# TYPE pgquorum_keeper_heartbeat_failures_total counter");
    let _ = writeln!(
        m,
        "pgquorum_keeper_heartbeat_failures_total {}",
        sh.heartbeat_failures.load(Relaxed)
    );
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        m,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lag_units() {
        assert_eq!(parse_bytes("1024"), Some(1024));
        assert_eq!(parse_bytes("16MB"), Some(16 << 20));
        assert_eq!(parse_bytes("1kB"), Some(1024));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(parse_bytes("5 parsecs"), None);
    }

    #[test]
    fn bad_queries_are_refused_with_a_reason() {
        let q = |v: &str| HashMap::from([("lag".to_string(), v.to_string())]);
        assert_eq!(Params::parse(&q("16MB")).unwrap().max_lag, Some(16 << 20));
        assert_eq!(Params::parse(&HashMap::new()).unwrap(), Params::default());
        let e = Params::parse(&q("abc")).unwrap_err();
        assert!(e.contains("lag=\"abc\""), "{e}");
        let e = Params::parse(&q(&"9".repeat(100_000))).unwrap_err();
        assert!(e.len() < 200, "{e}");
    }

    #[test]
    fn lsn_format() {
        assert_eq!(lsn_text(Lsn::new(0x1_0000_00A0)), "1/A0");
        assert_eq!(lsn_text(None), "0/0");
    }
}
