//! The health and metrics endpoint: `/metrics` (OpenMetrics text), `/healthz` (the process is
//! alive) and `/readyz` (whatever the binary calls ready: the worker is connected to NATS and
//! ClickHouse, the operator's caches are filled or it stands by for the leader lease), on one port.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// The content type of what `prometheus_client::encoding::text` writes (it ends with `# EOF`).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Answers whether the process is ready for work, or why not (the reason is `/readyz`'s body).
pub type ReadinessCheck = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// A readiness flag one part of a program sets and `/readyz` reads.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// The flag as a check for [`serve`].
    pub fn check(&self) -> ReadinessCheck {
        let flag = self.clone();
        Arc::new(move || {
            if flag.is_ready() {
                Ok(())
            } else {
                Err("not ready yet".to_string())
            }
        })
    }
}

/// What `/metrics` shows: a program's metrics, registered in one registry (encoding reads their
/// current values).
pub trait MetricsSource: Send + Sync + 'static {
    fn registry(&self) -> &Registry;
}

/// The registry in OpenMetrics text.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut text, registry);
    text
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<dyn MetricsSource>,
    ready: ReadinessCheck,
}

async fn serve_metrics(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    let text = encode(endpoints.metrics.registry());
    ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], text)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(endpoints): State<Endpoints>) -> impl IntoResponse {
    match (endpoints.ready)() {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The routes, apart from the listener so tests can call them directly.
pub fn router(metrics: Arc<dyn MetricsSource>, ready: ReadinessCheck) -> Router {
    Router::new()
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(Endpoints { metrics, ready })
}

/// Binds `addr` and serves until `shutdown`; returns the bound address (useful with port 0) and
/// the serving task, which ends (logging why) if serving fails.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<dyn MetricsSource>,
    ready: ReadinessCheck,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(metrics, ready);
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "metrics endpoint stopped");
        }
    });
    Ok((bound, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct OneCounter(Registry);

    impl MetricsSource for OneCounter {
        fn registry(&self) -> &Registry {
            &self.0
        }
    }

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn serves_openmetrics_and_the_probes() {
        let mut registry = Registry::with_prefix("test");
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc_by(3);
        let readiness = Readiness::default();
        let shutdown = CancellationToken::new();
        let (addr, task) = serve(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            Arc::new(OneCounter(registry)),
            readiness.check(),
            shutdown.clone(),
        )
        .await
        .unwrap();

        let metrics = get(addr, "/metrics").await;
        assert!(
            metrics.contains(&format!("content-type: {OPENMETRICS_CONTENT_TYPE}")),
            "{metrics}"
        );
        assert!(metrics.contains("test_things_total 3"), "{metrics}");
        assert!(metrics.trim_end().ends_with("# EOF"), "{metrics}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 503"));
        readiness.set(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));

        shutdown.cancel();
        task.await.unwrap();
    }
}
