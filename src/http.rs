//! `/metrics` (Prometheus text), `/healthz` (the process answers and its relay loop is not
//! wedged) and `/readyz` (database reachable, producer healthy, not stalled).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry::{Health, Metrics};

#[derive(Clone)]
struct HttpState {
    metrics: Metrics,
    health: Arc<Health>,
    liveness_timeout: Duration,
}

pub(crate) fn router(metrics: Metrics, health: Arc<Health>, liveness_timeout: Duration) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(liveness))
        .route("/readyz", get(readiness))
        .with_state(HttpState {
            metrics,
            health,
            liveness_timeout,
        })
}

/// Connections served at once; more are closed on arrival until one ends.
pub(crate) const MAX_CONNECTIONS: usize = 32;
/// Connections served at once from one address, so that one client cannot take them all
/// and starve the kubelet's probes and the scraper.
pub const MAX_CONNECTIONS_PER_PEER: usize = 8;
/// Requests handled at once over all connections.
const MAX_REQUESTS_IN_FLIGHT: usize = 16;
/// How long a client may take to send a request's headers.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a connection is kept, however busy: a scrape takes milliseconds.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);

/// Serves until `cancel`. The endpoints are read-only and unauthenticated, so what a
/// client can hold is bounded: a few connections, headers within a timeout, a lifetime.
pub(crate) async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    health: Arc<Health>,
    liveness_timeout: Duration,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    // One limit for the whole server (a layer on the router would be one per route).
    let app = tower::limit::ConcurrencyLimit::new(
        router(metrics, health, liveness_timeout),
        MAX_REQUESTS_IN_FLIGHT,
    );
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_peer: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Out of file descriptors, or a connection reset before it was accepted:
                // keep serving once the moment passes.
                Err(err) => {
                    warn!(error = %err, "accepting an HTTP connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            debug!("HTTP connection refused: {MAX_CONNECTIONS} already open");
            continue;
        };
        let Some(peer_slot) = PeerSlot::take(&per_peer, peer.ip()) else {
            debug!(%peer, "HTTP connection refused: {MAX_CONNECTIONS_PER_PEER} already open from this address");
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::timeout(CONNECTION_LIFETIME, connection) => {}
            }
            drop(peer_slot);
            drop(permit);
        });
    }
}

/// One of a peer's connections; the count goes down when it is dropped.
struct PeerSlot {
    counts: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(counts: &Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut map = counts.lock().ok()?;
        let count = map.entry(ip).or_default();
        if *count >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *count += 1;
        Some(Self {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        if let Ok(mut map) = self.counts.lock() {
            if let Some(count) = map.get_mut(&self.ip) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&self.ip);
                }
            }
        }
    }
}

async fn render_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Fails once the relay loop has been stuck inside one step for `relay.liveness_timeout`:
/// a wedge only a restart clears. Waiting for acks or backing off is not stuck.
async fn liveness(State(state): State<HttpState>) -> impl IntoResponse {
    match state.health.loop_stuck_for() {
        Some(stuck) if stuck > state.liveness_timeout => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "wedged: the relay loop has been stuck in one step for {}s (relay.liveness_timeout = {}s)\n",
                stuck.as_secs(),
                state.liveness_timeout.as_secs()
            ),
        ),
        _ => (StatusCode::OK, "ok\n".to_string()),
    }
}

async fn readiness(State(state): State<HttpState>) -> impl IntoResponse {
    match state.health.not_ready_reason() {
        None => {
            let waiting = state.health.waiting_topics();
            if waiting.is_empty() {
                (StatusCode::OK, "ready\n".to_string())
            } else {
                // Every other topic flows: ready, with the topics whose rows wait named.
                (
                    StatusCode::OK,
                    format!(
                        "ready; rows wait for topics the broker does not know: {}\n",
                        waiting.join(", ")
                    ),
                )
            }
        }
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
