//! `/metrics` (Prometheus text), `/healthz` (the process answers and its relay loop is not
//! wedged) and `/readyz` (database reachable, producer healthy, not stalled).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::telemetry::Health;

#[derive(Clone)]
struct HttpState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
}

pub fn router(
    metrics: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
) -> Router {
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

/// Serves until `cancel`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    liveness_timeout: Duration,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, health, liveness_timeout))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
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
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        ),
    }
}
