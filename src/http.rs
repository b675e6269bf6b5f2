//! `/metrics` (Prometheus text), `/healthz` (the process answers) and `/readyz` (database
//! reachable, producer healthy, not stalled).

use std::sync::Arc;

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
}

pub fn router(metrics: PrometheusHandle, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readiness))
        .with_state(HttpState { metrics, health })
}

/// Serves until `cancel`.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

async fn render_metrics(State(state): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
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
