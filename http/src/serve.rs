//! Serving an axum router over HTTP or HTTPS (rustls with ring), with graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// TLS certificate and key files (PEM).
#[derive(Clone, Debug, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Serving errors.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The TLS files could not be loaded.
    #[error("TLS certificate {cert} / key {key}: {detail}")]
    Tls {
        /// cert path
        cert: String,
        /// key path
        key: String,
        /// what went wrong
        detail: String,
    },
    /// I/O on the listener.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A `/metrics` answer: `text`, Prometheus' text exposition format (version 0.0.4).
pub fn prometheus_text(text: String) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// Selects rustls's process-wide crypto provider (ring), once; needed before any TLS setup
/// when more than one provider is compiled in (rumqttc/rumqttd bring their own features).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Serves `router` on `listener` until `shutdown` resolves (then drains for up to 10 s), each
/// request with its id ([`crate::request_id`]) and the peer's address
/// (`axum::extract::ConnectInfo<SocketAddr>`, for per-address limits).
/// Prints `<name> listening on <scheme>://<addr>` once bound.
pub async fn serve_router(
    name: &'static str,
    listener: std::net::TcpListener,
    tls: Option<&TlsFiles>,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    listener.set_nonblocking(true)?;
    let router = router.layer(axum::middleware::from_fn(crate::request_id::layer));
    let handle = axum_server::Handle::new();
    let h2 = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h2.graceful_shutdown(Some(Duration::from_secs(10)));
    });
    match tls {
        Some(tls) => {
            install_crypto_provider();
            let config = axum_server::tls_rustls::RustlsConfig::from_pem_file(&tls.cert, &tls.key)
                .await
                .map_err(|e| ServeError::Tls {
                    cert: tls.cert.display().to_string(),
                    key: tls.key.display().to_string(),
                    detail: e.to_string(),
                })?;
            announce(name, handle.clone(), "https");
            axum_server::from_tcp_rustls(listener, config)
                .handle(handle)
                .serve(router.into_make_service_with_connect_info::<SocketAddr>())
                .await?;
        }
        None => {
            announce(name, handle.clone(), "http");
            axum_server::from_tcp(listener)
                .handle(handle)
                .serve(router.into_make_service_with_connect_info::<SocketAddr>())
                .await?;
        }
    }
    Ok(())
}

fn announce(name: &'static str, handle: axum_server::Handle, scheme: &'static str) {
    tokio::spawn(async move {
        if let Some(addr) = handle.listening().await {
            let addr: SocketAddr = addr;
            println!("{name} listening on {scheme}://{addr}");
            tracing::info!(%addr, scheme, name, "listening");
        }
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_are_prometheus_text_0_0_4() {
        let r = super::prometheus_text("# TYPE x counter\nx 1\n".into());
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()[axum::http::header::CONTENT_TYPE],
            "text/plain; version=0.0.4"
        );
        let body = r.into_body();
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(axum::body::to_bytes(body, 1 << 10))
            .unwrap();
        assert_eq!(&bytes[..], b"# TYPE x counter\nx 1\n");
    }
}
