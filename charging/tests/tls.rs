//! The charging listener speaks TLS when configured: a client that trusts the server's
//! certificate gets an answer; plain HTTP to the TLS port gets none.

use charging::server::{self, ServerConfig};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::SeedableRng;
use std::io::{Read, Write};
use std::sync::Arc;

#[test]
fn the_listener_serves_https_with_the_configured_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\nledger_map_size_bytes = 16777216\n[tls]\ncert = {:?}\nkey = {:?}\n",
        dir.path().join("data").to_str().unwrap(),
        dir.path().join("cert.pem").to_str().unwrap(),
        dir.path().join("key.pem").to_str().unwrap(),
    ))
    .unwrap();
    let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(1));
    let state = server::build(&cfg, Box::new(SoftwareHsm::new(&keys).unwrap())).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_cfg = cfg.clone();
    let server = rt.spawn(async move {
        server::serve_on(listener, &server_cfg, state, async {
            let _ = stopped.await;
        })
        .await
    });

    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let client_cfg = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(client_cfg), name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, std::net::TcpStream::connect(addr).unwrap());
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = tls.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok\n"), "{answer}");

    // Plain HTTP to the TLS port is not served.
    let mut plain = std::net::TcpStream::connect(addr).unwrap();
    plain
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf);
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));

    let _ = stop.send(());
    rt.block_on(server).unwrap().unwrap();
}
