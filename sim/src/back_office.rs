//! The back office of the simulated day: the charging server in process on a loopback port
//! (software HSM, LMDB ledger, sandbox card processor, a mileage programme, a partner mall
//! selling vouchers), the tokens of its callers, and the calls the day makes to it.

use crate::SimError;
use charging::api::AppState;
use charging::api::{Auth, Role, TokenEntry};
use charging::partner::{PartnerConfig, Partners};
use charging::server::{self, ServerConfig, ServerError};
use ed25519_dalek::{Signer, SigningKey};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use std::path::Path;
use tokio::runtime::Runtime;

/// The airline's partner token (it credits miles to riders' memberships).
pub const AIRLINE: &str = "tg_demo_airline";
/// The metro gateway's token.
pub const GATEWAY: &str = "tg_demo_gateway";
/// The hotel gateway's token.
pub const HOTEL_GATEWAY: &str = "tg_demo_hotel_gateway";
/// The operator's token (cards, blocks).
pub const OPS: &str = "tg_demo_operator";
/// The rail ticket office's merchant token (its account is `merchant:<crate::shop::MERCHANT>`).
pub const RAIL_SHOP: &str = "tg_demo_rail_tickets";

/// Rider `i`'s cardholder token (its account is `rider-<i>`).
pub fn rider_token(i: u32) -> String {
    format!("tg_demo_rider_{i}")
}

/// The charging server, running.
pub struct BackOffice {
    /// Its base URL.
    pub base: String,
    /// Its state (the ledger, for the day's end).
    pub state: AppState,
    /// The HTTP client the day calls it with.
    pub agent: ureq::Agent,
    partner_key: SigningKey,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
}

impl BackOffice {
    /// The server's configuration: its data under `data`, a token per rider, the airline, the
    /// two gateways (the hotel's books only to "hotel"), the operator and the rail ticket office
    /// (a merchant), the mileage programme and the mall.
    pub fn config(
        data: &Path,
        riders: u32,
        partner_key: &SigningKey,
    ) -> Result<ServerConfig, SimError> {
        let data = data
            .to_str()
            .ok_or_else(|| SimError::Setup("data path is not UTF-8".into()))?;
        let mut cfg = ServerConfig::from_toml(&format!(
            "data_dir = {data:?}\nledger_map_size_bytes = 1073741824"
        ))?;
        let token = |name: &str, role, t: &str| TokenEntry {
            name: name.into(),
            role,
            sha256: Auth::hash_token(t),
        };
        cfg.tokens = vec![
            token("airline", Role::Partner, AIRLINE),
            token("gateway", Role::Gateway, GATEWAY),
            token("hotel-gateway", Role::Gateway, HOTEL_GATEWAY),
            token("ops", Role::Operator, OPS),
            token(crate::shop::MERCHANT, Role::Merchant, RAIL_SHOP),
        ];
        for i in 0..riders {
            cfg.tokens.push(token(
                &format!("rider-{i}"),
                Role::Cardholder,
                &rider_token(i),
            ));
        }
        cfg.limits.loads_per_minute_per_client = 0;
        cfg.operator = "metro".into();
        // The hotel's gateway books the pay-TV sales to the hotel, and only there.
        cfg.gateway_operators
            .insert("hotel-gateway".into(), vec!["hotel".into()]);
        cfg.points.push(charging::server::PointsConfig {
            name: "mileage".into(),
            minor_per_point_num: 2,
            minor_per_point_den: 1,
            partners: vec!["airline".into()],
        });
        cfg.partners.push(PartnerConfig {
            name: "mall".into(),
            public_key: hex::encode(partner_key.verifying_key().to_bytes()),
            max_voucher_minor: 100_000,
        });
        Ok(cfg)
    }

    /// Starts the server of `cfg` on a loopback port, with a software HSM over `keys`.
    pub fn start(
        rt: &Runtime,
        cfg: &ServerConfig,
        keys: &KeySet,
        partner_key: SigningKey,
    ) -> Result<BackOffice, SimError> {
        let state = server::build(cfg, Box::new(SoftwareHsm::new(keys)?))?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (server_state, server_cfg) = (state.clone(), cfg.clone());
        let server = rt.spawn(async move {
            server::serve_on(listener, &server_cfg, server_state, async {
                let _ = stop_rx.await;
            })
            .await
        });
        Ok(BackOffice {
            base,
            state,
            agent: ureq::AgentBuilder::new()
                .timeout(std::time::Duration::from_secs(30))
                .build(),
            partner_key,
            stop: Some(stop),
            server: Some(server),
        })
    }

    /// POSTs `body` to `path` with `token`; the answer's JSON.
    pub fn post(
        &self,
        path: &str,
        token: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, SimError> {
        self.post_keyed(path, token, None, body)
    }

    /// [`BackOffice::post`] with an `Idempotency-Key` header.
    pub fn post_keyed(
        &self,
        path: &str,
        token: &str,
        idempotency_key: Option<&str>,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, SimError> {
        let url = format!("{}{path}", self.base);
        let mut req = self
            .agent
            .post(&url)
            .set("Authorization", &format!("Bearer {token}"));
        if let Some(key) = idempotency_key {
            req = req.set("Idempotency-Key", key);
        }
        match req.send_json(body) {
            Ok(r) => Ok(r.into_json().unwrap_or_default()),
            Err(ureq::Error::Status(status, r)) => {
                let b: serde_json::Value = r.into_json().unwrap_or_default();
                Err(SimError::Http {
                    url,
                    status,
                    detail: b["detail"].to_string(),
                })
            }
            Err(e) => Err(SimError::Unreachable {
                url,
                why: e.to_string(),
            }),
        }
    }

    /// Buys a gift voucher of `amount_minor` at the mall (a signed partner request); its code.
    pub fn buy_voucher(&self, order_id: &str, amount_minor: i64) -> Result<String, SimError> {
        let order =
            serde_json::json!({"order_id": order_id, "kind": "gift", "amount_minor": amount_minor});
        let body = serde_json::to_vec(&order).map_err(|e| SimError::Setup(e.to_string()))?;
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| SimError::Setup(e.to_string()))?
            .as_millis() as u64;
        let sig = self.partner_key.sign(&Partners::signed_message(
            "POST",
            "/v1/partner/vouchers",
            ts,
            &body,
        ));
        let url = format!("{}/v1/partner/vouchers", self.base);
        let v: serde_json::Value = self
            .agent
            .post(&url)
            .set("X-Tapgate-Partner", "mall")
            .set("X-Tapgate-Timestamp", &ts.to_string())
            .set("X-Tapgate-Signature", &hex::encode(sig.to_bytes()))
            .set("Content-Type", "application/json")
            .send_bytes(&body)
            .map_err(|e| SimError::Unreachable {
                url: url.clone(),
                why: e.to_string(),
            })?
            .into_json()?;
        Ok(v["code"].as_str().unwrap_or_default().to_string())
    }

    /// Stops the server and waits for it.
    pub fn stop(&mut self, rt: &Runtime) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            let _ = rt.block_on(server);
        }
    }
}
