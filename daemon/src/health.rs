//! Readiness with reasons. Each daemon's owner of a piece of state reports into one
//! [`Readiness`] value; it is published on a `watch` channel, mirrored into the gRPC
//! health service (`NOT_SERVING` whenever there is a reason) and, when configured,
//! served over HTTP as `/live` (the process answers) and `/ready` (200 with no reasons,
//! 503 with them), for systemd, load balancers and Kubernetes probes alike.

use std::net::SocketAddr;

use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::sync::watch;

use crate::shutdown::Shutdown;

/// Whether the daemon can do its job now, and if not, why (one sentence each).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Readiness {
    pub reasons: Vec<String>,
}

impl Readiness {
    pub fn is_ready(&self) -> bool {
        self.reasons.is_empty()
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({ "ready": self.is_ready(), "reasons": self.reasons })
    }
}

/// Keeps the gRPC health service in step with `readiness`: the overall status (service
/// "") and each of `services` are SERVING exactly while there is no reason.
pub fn mirror_to_grpc(
    mut readiness: watch::Receiver<Readiness>,
    reporter: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let status = if readiness.borrow_and_update().is_ready() {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in std::iter::once("").chain(services.iter().copied()) {
                reporter.set_service_status(name, status).await;
            }
            if readiness.changed().await.is_err() {
                return;
            }
        }
    })
}

/// Serves `/live` and `/ready` on `addr` until `shutdown`; returns the bound address.
pub async fn serve_http(
    addr: SocketAddr,
    readiness: watch::Receiver<Readiness>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route(
            "/live",
            axum::routing::get(|| async { axum::Json(serde_json::json!({ "live": true })) }),
        )
        .route(
            "/ready",
            axum::routing::get(move || {
                let now = readiness.borrow().clone();
                async move {
                    let code = if now.is_ready() {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, axum::Json(now.json())).into_response()
                }
            }),
        );
    let task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.wait().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "health endpoint failed");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
        let mut out = String::new();
        conn.read_to_string(&mut out).await.expect("read");
        out
    }

    #[tokio::test]
    async fn ready_reflects_reasons() {
        let (tx, rx) = watch::channel(Readiness::default());
        let (trigger, shutdown) = crate::shutdown::channel();
        let (addr, task) = serve_http("127.0.0.1:0".parse().expect("addr"), rx, shutdown)
            .await
            .expect("serve");
        assert!(get(addr, "/live").await.starts_with("HTTP/1.1 200"));
        let ready = get(addr, "/ready").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
        tx.send_replace(Readiness {
            reasons: vec!["the CA expired".into()],
        });
        let not_ready = get(addr, "/ready").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(
            not_ready.contains("\"reasons\":[\"the CA expired\"]"),
            "{not_ready}"
        );
        trigger.trigger();
        task.await.expect("stopped");
    }
}
