//! The operator's own HTTP port: `/metrics` (Prometheus text format 0.0.4, or OpenMetrics
//! when the scraper asks for it), `/healthz` (the process is alive) and `/readyz` (the CRD
//! could be listed once at start-up; after that, watches reconnect on their own and the
//! process stays ready).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::{ExpositionFormat, Metrics};

#[derive(Default)]
pub struct Health {
    ready: AtomicBool,
}

/// What the port serves from.
#[derive(Clone)]
struct Served {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }
}

/// Serves until `shutdown`. The bound address is logged (port 0 picks a free port).
pub async fn serve(
    address: SocketAddr,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(Served { health, metrics });
    let listener = tokio::net::TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving /metrics, /healthz and /readyz");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}

async fn readyz(State(served): State<Served>) -> (StatusCode, &'static str) {
    if served.health.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics_text(
    State(served): State<Served>,
    headers: axum::http::HeaderMap,
) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    let accept = headers.get(axum::http::header::ACCEPT).and_then(|value| value.to_str().ok());
    let format = ExpositionFormat::negotiate(accept);
    (
        [(axum::http::header::CONTENT_TYPE, format.content_type())],
        served.metrics.encode(format),
    )
}
