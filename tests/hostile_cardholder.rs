//! A hostile cardholder against the running charging daemon (issue 14 items 1, 10 and the
//! voucher half of 12), over HTTP and through `tapgate charge`: each attack is tried and does no
//! harm. Another cardholder cannot fund from alice's mileage or load alice's card; internal-
//! looking instrument names get a clear 4xx and move nothing; points are earned only through
//! the partner API with the programme's partner token; an Idempotency-Key reused with another
//! body gets 422; voucher codes travel in bodies only. After each, the ledger agrees with the
//! card (`tapgate charging reconcile`). Crate-level twins: charging/tests/hostile_cardholder.rs.

mod support;

use purse::card::{Card, Nvm, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use std::path::Path;
use std::process::Command;
use tapgate_testkit::http::call;
use tapgate_testkit::Kill;

const PASS: &str = "hostile-cardholder-pass";
const ALICE: &str = "tg_alice_phone";
const BOB: &str = "tg_bob_phone";
const OPS: &str = "tg_ops";
const AIRLINE: &str = "tg_airline";
const MALL: &str = "tg_mall_partner";

struct Server {
    _child: Kill,
    base: String,
    dir: tempfile::TempDir,
    keys: KeySet,
}

fn start() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let keys = support::keys_init(dir.path(), PASS);
    let mut cfg = format!(
        "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n\n[[points]]\nname = \"mileage\"\nminor_per_point_num = 1\nminor_per_point_den = 1\npartners = [\"airline\"]\n",
        dir.path().join("data").to_str().unwrap(),
    );
    cfg.push_str(&support::tokens_toml(&[
        ("alice", "cardholder", ALICE),
        ("bob", "cardholder", BOB),
        ("ops", "operator", OPS),
        ("airline", "partner", AIRLINE),
        ("mall", "partner", MALL),
    ]));
    std::fs::write(dir.path().join("charging.toml"), cfg).unwrap();
    let support::Charging {
        process: child,
        base,
    } = support::start_charging(
        &dir.path().join("charging.toml"),
        &dir.path().join("keys"),
        PASS,
    );
    Server {
        _child: child,
        base,
        dir,
        keys,
    }
}

impl Server {
    fn post(&self, path: &str, token: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        call(
            "POST",
            &format!("{}{path}", self.base),
            Some(token),
            None,
            Some(body),
        )
    }

    fn credit(
        &self,
        token: &str,
        member: &str,
        account: &str,
        points: i64,
        reference: &str,
    ) -> (u16, serde_json::Value) {
        self.post(
            "/v1/partner/points",
            token,
            serde_json::json!({"program": "mileage", "member_id": member, "account": account, "points": points, "reference": reference}),
        )
    }

    /// An emulated card, registered by the operator (with `owner`, if any).
    fn card(&self, uid: [u8; 7], balance: i32, owner: Option<&str>) -> Card {
        let mut body =
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": balance});
        if let Some(o) = owner {
            body["owner"] = o.into();
        }
        let (code, b) = self.post("/v1/cards", OPS, body);
        assert_eq!(code, 201, "{b}");
        Card::personalise(
            &Personalisation::transit(uid, balance),
            SoftwareHsm::new(&self.keys)
                .unwrap()
                .card_keys(&uid, 1)
                .unwrap(),
        )
    }

    /// Starts a load and relays it to its final answer; (status, answer).
    fn load(
        &self,
        token: &str,
        card: &mut Card,
        amount: i32,
        funding: (&str, &str),
        key: &str,
    ) -> (u16, serde_json::Value) {
        let (code, mut reply) = call(
            "POST",
            &format!("{}/v1/loads", self.base),
            Some(token),
            Some(key),
            Some(
                serde_json::json!({"card_uid": hex::encode_upper(card.state().uid), "amount_minor": amount, "funding": {"source": funding.0, "instrument": funding.1}}),
            ),
        );
        let mut rng = rand::rngs::OsRng;
        while code == 200 && reply["status"] == "command" {
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
            let (c, next) = self.post(
                &format!("/v1/loads/{id}/steps"),
                token,
                serde_json::json!({"seq": reply["seq"], "responses": answers}),
            );
            assert_eq!(c, 200, "{next}");
            reply = next;
        }
        (code, reply)
    }

    /// Value is conserved: the ledger's shadow purse equals the card, and the reconciliation
    /// (another process, reading the ledger) finds every card balanced.
    fn assert_conserved(&self, card: &Card) {
        support::assert_shadow_equals_card(&self.base, OPS, card);
        let report = support::reconcile(&self.dir.path().join("data"));
        assert_eq!(report["cards"], report["balanced"], "{report}");
    }

    /// A card image on disk for `tapgate charge`.
    fn card_image(&self, card: &Card, name: &str) -> std::path::PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, serde_json::to_string_pretty(card.nvm()).unwrap()).unwrap();
        path
    }

    fn charge(
        &self,
        token: &str,
        image: &Path,
        amount: &str,
        funding: &str,
    ) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args([
                "charge",
                "--server",
                &self.base,
                "--amount",
                amount,
                "--funding",
                funding,
                "--card",
            ])
            .arg(image)
            .arg("--keys")
            .arg(self.dir.path().join("keys"))
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("TAPGATE_TOKEN", token)
            .output()
            .unwrap()
    }
}

fn image_balance(image: &Path) -> i32 {
    let nvm: Nvm = serde_json::from_str(&std::fs::read_to_string(image).unwrap()).unwrap();
    nvm.main.balance_minor
}

#[test]
fn a_cardholder_cannot_fund_from_another_holders_points() {
    let s = start();
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 10_000, "flight-1");
    assert_eq!(code, 201, "{b}");
    // Bob, with a valid cardholder token and his own card, names alice's membership.
    let bobs = s.card([0x04, 0xB0, 0, 0, 0, 0, 1], 100, Some("bob"));
    let image = s.card_image(&bobs, "bob.json");
    let out = s.charge(BOB, &image, "5000", "mileage:M-ALICE");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("not registered to your account"),
        "{stderr}"
    );
    assert_eq!(image_balance(&image), 100, "bob's card got nothing");
    // Alice's miles are untouched (the programme's replayed credit answers her balance).
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 10_000, "flight-1");
    assert_eq!(
        (code, b["balance_points"].as_i64()),
        (200, Some(10_000)),
        "{b}"
    );
    // Alice may, with the same flag.
    let alices = s.card([0x04, 0xA1, 0, 0, 0, 0, 1], 0, Some("alice"));
    let image = s.card_image(&alices, "alice.json");
    let out = s.charge(ALICE, &image, "5000", "mileage:M-ALICE");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(image_balance(&image), 5_000);
    let (_, b) = s.credit(AIRLINE, "M-ALICE", "alice", 10_000, "flight-1");
    assert_eq!(b["balance_points"].as_i64(), Some(5_000), "{b}");
    let report = support::reconcile(&s.dir.path().join("data"));
    assert_eq!(report["cards"], report["balanced"], "{report}");
}

#[test]
fn internal_looking_instrument_names_get_a_clear_4xx_and_move_no_value() {
    let s = start();
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 10_000, "flight-1");
    assert_eq!(code, 201, "{b}");
    let mut card = s.card([0x04, 0xC0, 0, 0, 0, 0, 1], 0, Some("alice"));
    // An honest redemption first: the programme's pool of redeemed points holds something.
    let (code, done) = s.load(ALICE, &mut card, 2_000, ("mileage", "M-ALICE"), "honest");
    assert_eq!(
        (code, done["status"].as_str()),
        (200, Some("completed")),
        "{done}"
    );
    let mut bobs = s.card([0x04, 0xC0, 0, 0, 0, 0, 2], 0, Some("bob"));
    let long = "x".repeat(65);
    for (i, bad) in [
        "redeemed",
        "issued",
        "held",
        "redeemed:x",
        "held:M-ALICE|x",
        "../redeemed",
        "a/b",
        "",
        long.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        for (token, card) in [(ALICE, &mut card), (BOB, &mut bobs)] {
            let (code, body) = s.load(token, card, 1_000, ("mileage", bad), &format!("bad-{i}"));
            assert!((400..500).contains(&code), "{bad:?}: {code} {body}");
            let detail = body["detail"].as_str().unwrap_or_default();
            assert!(
                detail.contains("letters, digits")
                    || detail.contains("not registered to your account"),
                "{bad:?}: {body}"
            );
        }
    }
    assert_eq!(card.state().balance_minor, 2_000);
    assert_eq!(bobs.state().balance_minor, 0);
    let (_, b) = s.credit(AIRLINE, "M-ALICE", "alice", 10_000, "flight-1");
    assert_eq!(b["balance_points"].as_i64(), Some(8_000), "{b}");
    s.assert_conserved(&card);
    s.assert_conserved(&bobs);
}

#[test]
fn points_are_earned_only_through_the_partner_api() {
    let s = start();
    // Nobody but the programme's partner credits points.
    for (token, want) in [
        (Some(ALICE), 403),
        (Some(OPS), 403),
        (Some(MALL), 403),
        (None, 401),
    ] {
        let (code, b) = call(
            "POST",
            &format!("{}/v1/partner/points", s.base),
            token,
            None,
            Some(
                serde_json::json!({"program": "mileage", "member_id": "M-ALICE", "account": "alice", "points": 1_000_000, "reference": "self-service"}),
            ),
        );
        assert_eq!(code, want, "{token:?}: {b}");
    }
    // Nor claims a membership as a holder.
    let (code, b) = s.post(
        "/v1/instruments",
        BOB,
        serde_json::json!({"source": "mileage", "instrument": "M-ALICE"}),
    );
    assert_eq!(code, 400, "{b}");
    // The airline does, once per reference.
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 1_000, "flight-9");
    assert_eq!(
        (code, b["balance_points"].as_i64()),
        (201, Some(1_000)),
        "{b}"
    );
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 1_000, "flight-9");
    assert_eq!((code, b["replayed"].as_bool()), (200, Some(true)), "{b}");
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "alice", 9_000, "flight-9");
    assert_eq!(
        (code, b["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{b}"
    );
    // A membership belongs to one account.
    let (code, b) = s.credit(AIRLINE, "M-ALICE", "bob", 1, "flight-10");
    assert_eq!(code, 409, "{b}");
    for (member, account) in [("redeemed:x", "alice"), ("M-2", "a/b"), ("", "alice")] {
        let (code, b) = s.credit(AIRLINE, member, account, 1, "flight-11");
        assert_eq!(code, 400, "{member:?} {account:?}: {b}");
    }
    let (_, b) = s.credit(AIRLINE, "M-ALICE", "alice", 1_000, "flight-9");
    assert_eq!(b["balance_points"].as_i64(), Some(1_000), "{b}");
}

#[test]
fn a_cardholder_loads_only_its_own_cards_with_its_own_card_tokens() {
    let s = start();
    let mut alices = s.card([0x04, 0xD0, 0, 0, 0, 0, 1], 0, Some("alice"));
    let (code, b) = s.post(
        "/v1/instruments",
        ALICE,
        serde_json::json!({"source": "card", "instrument": "tok_alice"}),
    );
    assert_eq!(code, 201, "{b}");
    let (code, b) = s.post(
        "/v1/instruments",
        BOB,
        serde_json::json!({"source": "card", "instrument": "tok_alice"}),
    );
    assert_eq!(code, 409, "{b}");
    let (code, b) = s.post(
        "/v1/instruments",
        BOB,
        serde_json::json!({"source": "card", "instrument": "tok_bob"}),
    );
    assert_eq!(code, 201, "{b}");
    // Bob cannot pay with alice's token, nor load alice's card with his own.
    let mut bobs = s.card([0x04, 0xD0, 0, 0, 0, 0, 2], 0, Some("bob"));
    let (code, b) = s.load(BOB, &mut bobs, 500, ("card", "tok_alice"), "b1");
    assert_eq!(code, 403, "{b}");
    let (code, b) = s.load(BOB, &mut alices, 500, ("card", "tok_bob"), "b2");
    assert_eq!(code, 403, "{b}");
    assert!(
        b["detail"].as_str().unwrap().contains("another account"),
        "{b}"
    );
    // Their own work.
    let (code, b) = s.load(ALICE, &mut alices, 500, ("card", "tok_alice"), "a1");
    assert_eq!(
        (code, b["status"].as_str()),
        (200, Some("completed")),
        "{b}"
    );
    let (code, b) = s.load(BOB, &mut bobs, 700, ("card", "tok_bob"), "b3");
    assert_eq!(
        (code, b["status"].as_str()),
        (200, Some("completed")),
        "{b}"
    );
    let (code, b) = call(
        "GET",
        &format!("{}/v1/instruments", s.base),
        Some(BOB),
        None,
        None,
    );
    assert_eq!(code, 200);
    assert_eq!(b["instruments"].as_array().unwrap().len(), 1, "{b}");
    s.assert_conserved(&alices);
    s.assert_conserved(&bobs);
}

#[test]
fn an_idempotency_key_reused_with_another_body_gets_422_and_the_same_body_the_stored_answer() {
    let s = start();
    let mut card = s.card([0x04, 0xE0, 0, 0, 0, 0, 1], 0, Some("alice"));
    let (code, _) = s.post(
        "/v1/instruments",
        ALICE,
        serde_json::json!({"source": "card", "instrument": "tok_visa"}),
    );
    assert_eq!(code, 201);
    let (code, first) = s.load(ALICE, &mut card, 1_000, ("card", "tok_visa"), "same-key");
    assert_eq!(
        (code, first["status"].as_str()),
        (200, Some("completed")),
        "{first}"
    );
    // Another amount under the same key: 422 with the reason, and nothing loaded.
    let (code, b) = s.load(ALICE, &mut card, 9_000, ("card", "tok_visa"), "same-key");
    assert_eq!(
        (code, b["error"].as_str()),
        (422, Some("idempotency_key_reused")),
        "{b}"
    );
    assert!(
        b["detail"].as_str().unwrap().contains("different request"),
        "{b}"
    );
    // The same body: the stored answer.
    let (code, again) = s.load(ALICE, &mut card, 1_000, ("card", "tok_visa"), "same-key");
    assert_eq!((code, &again), (200, &first));
    assert_eq!(card.state().balance_minor, 1_000);
    s.assert_conserved(&card);
}

#[test]
fn voucher_codes_travel_in_request_bodies_only() {
    use ed25519_dalek::Signer;
    let dir_key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    // A server with a partner mall that sells vouchers (signed requests).
    let s = {
        let s = start();
        let cfg = s.dir.path().join("charging.toml");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!(
            "\n[[partners]]\nname = \"mall\"\npublic_key = \"{}\"\n",
            hex::encode(dir_key.verifying_key().to_bytes())
        ));
        std::fs::write(&cfg, text).unwrap();
        // Restart on the same data with the partner configured.
        let Server {
            _child, dir, keys, ..
        } = s;
        drop(_child);
        let support::Charging {
            process: child,
            base,
        } = support::start_charging(&cfg, &dir.path().join("keys"), PASS);
        Server {
            _child: child,
            base,
            dir,
            keys,
        }
    };
    let order = serde_json::json!({"order_id": "o-1", "kind": "gift", "amount_minor": 1_500});
    let body = serde_json::to_vec(&order).unwrap();
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let sig = dir_key.sign(&charging::partner::Partners::signed_message(
        "POST",
        "/v1/partner/vouchers",
        ts,
        &body,
    ));
    let v: serde_json::Value = ureq::post(&format!("{}/v1/partner/vouchers", s.base))
        .set("X-Tapgate-Partner", "mall")
        .set("X-Tapgate-Timestamp", &ts.to_string())
        .set("X-Tapgate-Signature", &hex::encode(sig.to_bytes()))
        .set("Content-Type", "application/json")
        .send_bytes(&body)
        .unwrap()
        .into_json()
        .unwrap();
    let code = v["code"].as_str().unwrap().to_string();
    // No route takes the code in its path.
    let (status, _) = call(
        "GET",
        &format!("{}/v1/vouchers/{code}", s.base),
        Some(ALICE),
        None,
        None,
    );
    assert!(status == 404 || status == 405, "{status}");
    let (status, b) = s.post(
        "/v1/vouchers/lookup",
        ALICE,
        serde_json::json!({"code": code}),
    );
    assert_eq!((status, b["state"].as_str()), (200, Some("issued")), "{b}");
    // Redeemed by whoever holds the code (a bearer instrument), exactly once.
    let mut card = s.card([0x04, 0xF0, 0, 0, 0, 0, 1], 0, None);
    let (status, done) = s.load(BOB, &mut card, 1_500, ("voucher", &code), "v1");
    assert_eq!(
        (status, done["status"].as_str()),
        (200, Some("completed")),
        "{done}"
    );
    let (_, b) = s.post(
        "/v1/vouchers/lookup",
        ALICE,
        serde_json::json!({"code": code}),
    );
    assert_eq!(b["state"], "redeemed", "{b}");
    s.assert_conserved(&card);
}
