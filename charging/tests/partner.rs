//! A partner mall sells vouchers with signed server-to-server requests; a holder redeems one
//! into a purse through the ordinary load relay. Replays sell nothing twice; forged or stale
//! requests are refused; a voucher is redeemed once.

use charging::api::{Auth, Role, TokenEntry};
use charging::partner::{PartnerConfig, Partners};
use ed25519_dalek::{Signer, SigningKey};
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::SeedableRng;

const HOLDER: &str = "tg_holder";

mod common;

fn start(keys: &KeySet, partner_pub: [u8; 32]) -> common::Running {
    common::start(keys, |cfg| {
        cfg.tokens = vec![TokenEntry {
            name: "holder".into(),
            role: Role::Cardholder,
            sha256: Auth::hash_token(HOLDER),
        }];
        cfg.partners = vec![PartnerConfig {
            name: "mall".into(),
            public_key: hex::encode(partner_pub),
            max_voucher_minor: 50_000,
        }];
    })
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn signed(
    base: &str,
    key: &SigningKey,
    partner: &str,
    ts: u64,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let bytes = serde_json::to_vec(body).unwrap();
    let sig = key.sign(&Partners::signed_message(
        "POST",
        "/v1/partner/vouchers",
        ts,
        &bytes,
    ));
    let r = ureq::post(&format!("{base}/v1/partner/vouchers"))
        .set("X-Tapgate-Partner", partner)
        .set("X-Tapgate-Timestamp", &ts.to_string())
        .set("X-Tapgate-Signature", &hex::encode(sig.to_bytes()))
        .set("Content-Type", "application/json")
        .send_bytes(&bytes);
    match r {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

fn load(base: &str, card: &mut Card, amount: i64, code: &str, key: &str) -> serde_json::Value {
    let mut reply: serde_json::Value = ureq::post(&format!("{base}/v1/loads"))
        .set("Authorization", &format!("Bearer {HOLDER}"))
        .set("Idempotency-Key", key)
        .send_json(serde_json::json!({"card_uid": hex::encode_upper(card.state().uid), "amount_minor": amount, "funding": {"source": "voucher", "instrument": code}}))
        .unwrap()
        .into_json()
        .unwrap();
    let mut rng = rand::rngs::OsRng;
    while reply["status"] == "command" {
        let answers: Vec<String> = reply["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                hex::encode_upper(
                    card.process(&hex::decode(c.as_str().unwrap()).unwrap(), &mut rng)
                        .unwrap(),
                )
            })
            .collect();
        let id = reply["session_id"].as_str().unwrap().to_string();
        reply = ureq::post(&format!("{base}/v1/loads/{id}/steps"))
            .set("Authorization", &format!("Bearer {HOLDER}"))
            .send_json(serde_json::json!({"seq": reply["seq"], "responses": answers}))
            .unwrap()
            .into_json()
            .unwrap();
    }
    reply
}

#[test]
fn vouchers_are_sold_once_and_redeemed_once() {
    let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(1));
    let partner_key = SigningKey::from_bytes(&[7u8; 32]);
    let srv = start(&keys, partner_key.verifying_key().to_bytes());
    let base = srv.base.clone();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid = [4, 9, 9, 9, 9, 9, 9];
    let mut card = Card::personalise(
        &Personalisation::transit(uid, 0),
        hsm.card_keys(&uid, 1).unwrap(),
    );

    let order = serde_json::json!({"order_id": "mall-1001", "kind": "gift", "amount_minor": 3_000});
    let (code, v) = signed(&base, &partner_key, "mall", now_ms(), &order);
    assert_eq!(code, 201, "{v}");
    let voucher = v["code"].as_str().unwrap().to_string();
    // A replayed (or retried) order returns the same voucher.
    let (code, again) = signed(&base, &partner_key, "mall", now_ms(), &order);
    assert_eq!(
        (code, again["code"].as_str().unwrap()),
        (201, voucher.as_str())
    );
    // Forged, stale, unknown partner, bad body.
    let other = SigningKey::from_bytes(&[8u8; 32]);
    assert_eq!(signed(&base, &other, "mall", now_ms(), &order).0, 401);
    assert_eq!(
        signed(&base, &partner_key, "mall", now_ms() - 3_600_000, &order).0,
        401
    );
    assert_eq!(signed(&base, &partner_key, "shop", now_ms(), &order).0, 401);
    let (code, err) = signed(
        &base,
        &partner_key,
        "mall",
        now_ms(),
        &serde_json::json!({"order_id": "x", "kind": "gift", "amount_minor": 999_999}),
    );
    assert_eq!(code, 400, "{err}");
    let (code, err) = signed(
        &base,
        &partner_key,
        "mall",
        now_ms(),
        &serde_json::json!({"order_id": "y", "kind": "load", "amount_minor": 100}),
    );
    assert_eq!(code, 400, "{err}");

    // Redeemed into the purse through the relay.
    let wrong_amount = load(&base, &mut card, 2_000, &voucher, "l0");
    assert_eq!(wrong_amount["reason"], "funding_declined", "{wrong_amount}");
    let done = load(&base, &mut card, 3_000, &voucher, "l1");
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(card.state().balance_minor, 3_000);
    let twice = load(&base, &mut card, 3_000, &voucher, "l2");
    assert_eq!(twice["reason"], "funding_declined", "{twice}");
    assert_eq!(card.state().balance_minor, 3_000);

    // A load voucher bound to another card is refused on this one.
    let (_, bound) = signed(
        &base,
        &partner_key,
        "mall",
        now_ms(),
        &serde_json::json!({"order_id": "mall-1002", "kind": "load", "amount_minor": 500, "card_uid": "04000000000001"}),
    );
    let refused = load(&base, &mut card, 500, bound["code"].as_str().unwrap(), "l3");
    assert_eq!(refused["reason"], "funding_declined", "{refused}");

    // The ledger: the partner owes what it sold; the redeemed voucher is netted out.
    let l = srv.state.loads.ledger();
    let r = l.read().unwrap();
    assert_eq!(r.balance("partner:mall").unwrap(), -3_500);
    assert_eq!(
        r.balance("vouchers:outstanding").unwrap(),
        500,
        "the bound voucher is still outstanding"
    );
    assert_eq!(r.balance("funding:voucher").unwrap(), 0);
    assert_eq!(
        r.balance(&charging::ledger::card_account(&uid)).unwrap(),
        3_000
    );
    let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
}
