//! An in-process charging server on a loopback port, for HTTP tests.
#![allow(dead_code)]

use charging::api::AppState;
use charging::server::{self, ServerConfig, ServerError};

pub struct Running {
    pub base: String,
    pub state: AppState,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    rt: tokio::runtime::Runtime,
    handle: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
    _dir: tempfile::TempDir,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.stop.take().expect("once").send(());
        let h = self.handle.take().expect("once");
        let _ = self.rt.block_on(h);
    }
}

/// Starts a server with the software HSM; `edit` adjusts the configuration.
pub fn start(keys: &purse::keys::KeySet, edit: impl FnOnce(&mut ServerConfig)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 33554432",
        dir.path().to_str().unwrap()
    ))
    .unwrap();
    edit(&mut cfg);
    let state = server::build(&cfg, Box::new(purse::sam::SoftwareHsm::new(keys).unwrap())).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let st = state.clone();
    let handle = rt.spawn(async move {
        server::serve_on(listener, &cfg, st, async {
            let _ = stopped.await;
        })
        .await
    });
    Running {
        base,
        state,
        stop: Some(stop),
        rt,
        handle: Some(handle),
        _dir: dir,
    }
}

/// POST JSON with a bearer token; returns (status, body).
pub fn post(url: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    match ureq::post(url)
        .set("Authorization", &format!("Bearer {token}"))
        .send_json(body)
    {
        Ok(r) => {
            let code = r.status();
            (code, r.into_json().unwrap_or_default())
        }
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

/// POST JSON with a bearer token and an Idempotency-Key.
pub fn post_with_key(
    url: &str,
    token: &str,
    key: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    match ureq::post(url)
        .set("Authorization", &format!("Bearer {token}"))
        .set("Idempotency-Key", key)
        .send_json(body)
    {
        Ok(r) => {
            let code = r.status();
            (code, r.into_json().unwrap_or_default())
        }
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}
