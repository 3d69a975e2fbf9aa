//! Lost and stolen cards: the owner reports, the card is blocked, loads are refused, and the
//! gateway reads numbered block/unblock changes to publish to validators.

mod common;

use charging::api::{Auth, Role, TokenEntry};
use purse::keys::KeySet;
use rand::SeedableRng;

const ALICE: &str = "tg_alice";
const BOB: &str = "tg_bob";
const OPS: &str = "tg_ops";
const GW: &str = "tg_gateway";

fn get(url: &str, token: &str) -> (u16, serde_json::Value) {
    match ureq::get(url)
        .set("Authorization", &format!("Bearer {token}"))
        .call()
    {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or_default()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn the_owner_reports_a_card_lost_and_the_gateway_sees_numbered_changes() {
    let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(1));
    let srv = common::start(&keys, |cfg| {
        let t = |n: &str, r, tok: &str| TokenEntry {
            name: n.into(),
            role: r,
            sha256: Auth::hash_token(tok),
        };
        cfg.tokens = vec![
            t("alice", Role::Cardholder, ALICE),
            t("bob", Role::Cardholder, BOB),
            t("ops", Role::Operator, OPS),
            t("gw", Role::Gateway, GW),
        ];
    });
    let b = srv.base.clone();
    let uid = "04AABBCCDDEE01";
    let (code, _) = common::post(
        &format!("{b}/v1/cards"),
        OPS,
        serde_json::json!({"card_uid": uid, "personalised_minor": 500, "owner": "alice"}),
    );
    assert_eq!(code, 201);

    // Someone else's card: not found (no hint that it exists).
    let (code, _) = common::post(
        &format!("{b}/v1/cards/{uid}/report"),
        BOB,
        serde_json::json!({"reason": "lost"}),
    );
    assert_eq!(code, 404);
    let (code, _) = common::post(
        &format!("{b}/v1/cards/{uid}/report"),
        ALICE,
        serde_json::json!({"reason": "misplaced maybe"}),
    );
    assert_eq!(code, 400);
    let (code, body) = common::post(
        &format!("{b}/v1/cards/{uid}/report"),
        ALICE,
        serde_json::json!({"reason": "lost"}),
    );
    assert_eq!(
        (code, body["blocklist_version"].as_u64()),
        (200, Some(1)),
        "{body}"
    );
    // Reporting again changes nothing.
    let (_, body) = common::post(
        &format!("{b}/v1/cards/{uid}/report"),
        ALICE,
        serde_json::json!({"reason": "stolen"}),
    );
    assert!(body["blocklist_version"].is_null(), "{body}");

    common::register_instrument(&b, ALICE, "card", "tok_visa");
    // A load may start; the block is checked once the card has been read (see
    // `a_blocked_card_is_refused` in tests/loads.rs).
    let (code, first) = common::post_with_key(
        &format!("{b}/v1/loads"),
        ALICE,
        "k1",
        serde_json::json!({"card_uid": uid, "amount_minor": 100, "funding": {"source": "card", "instrument": "tok_visa"}}),
    );
    assert_eq!(code, 200, "{first}");

    // Only operators unblock; the gateway reads the changes.
    let (code, _) = common::post(
        &format!("{b}/v1/cards/{uid}/unblock"),
        ALICE,
        serde_json::json!({"reason": "found"}),
    );
    assert_eq!(code, 403);
    let (code, body) = common::post(
        &format!("{b}/v1/cards/{uid}/unblock"),
        OPS,
        serde_json::json!({"reason": "found it"}),
    );
    assert_eq!((code, body["blocklist_version"].as_u64()), (200, Some(2)));
    let (code, _) = get(&format!("{b}/v1/blocklist/changes"), ALICE);
    assert_eq!(code, 403);
    let (code, all) = get(&format!("{b}/v1/blocklist/changes"), GW);
    assert_eq!(code, 200);
    assert_eq!(all["latest_version"], 2);
    let changes = all["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(
        (
            changes[0]["action"].as_str(),
            changes[0]["card_uid"].as_str()
        ),
        (Some("block"), Some(uid))
    );
    assert_eq!(changes[1]["action"], "unblock");
    let (_, after1) = get(&format!("{b}/v1/blocklist/changes?after=1"), GW);
    assert_eq!(after1["changes"].as_array().unwrap().len(), 1);

    // Signed lists for validators: the snapshot and the deltas verify under the back office's
    // public key and bring a validator's list to the same state.
    let fetch = |path: &str| -> (u16, Vec<u8>) {
        match ureq::get(&format!("{b}{path}"))
            .set("Authorization", &format!("Bearer {GW}"))
            .call()
        {
            Ok(r) => {
                let code = r.status();
                let mut v = Vec::new();
                std::io::Read::read_to_end(&mut r.into_reader(), &mut v).unwrap();
                (code, v)
            }
            Err(ureq::Error::Status(c, _)) => (c, vec![]),
            Err(e) => panic!("{e}"),
        }
    };
    let pk = keys.verifying_key;
    let (code, snap) = fetch("/v1/blocklist/signed/snapshot");
    assert_eq!(code, 200);
    let mut from_snapshot = purse::blocklist::Blocklist::new("default");
    assert_eq!(from_snapshot.apply(&snap, &pk), Ok(2));
    let (_, delta) = fetch("/v1/blocklist/signed/delta?after=0");
    let mut from_deltas = purse::blocklist::Blocklist::new("default");
    assert_eq!(from_deltas.apply(&delta, &pk), Ok(2));
    let uid_bytes: [u8; 7] = hex::decode(uid).unwrap().try_into().unwrap();
    assert!(!from_snapshot.is_blocked(&uid_bytes) && !from_deltas.is_blocked(&uid_bytes));
    let (code, _) = fetch("/v1/blocklist/signed/delta?after=2");
    assert_eq!(code, 204, "nothing new after the latest version");
    // The gateway reads the version from a header, the bytes as they are.
    let r = ureq::get(&format!("{b}/v1/blocklist/signed/snapshot"))
        .set("Authorization", &format!("Bearer {GW}"))
        .call()
        .unwrap();
    assert_eq!(r.header("x-tapgate-blocklist-version"), Some("2"));
    assert_eq!(r.content_type(), "application/octet-stream");
    // Chunked (issue 22): length-prefixed signed chunks, here one (the list is empty), which
    // brings a validator's list to the same version.
    let r = ureq::get(&format!("{b}/v1/blocklist/signed/snapshot?chunked=1"))
        .set("Authorization", &format!("Bearer {GW}"))
        .call()
        .unwrap();
    assert_eq!(r.header("x-tapgate-blocklist-version"), Some("2"));
    assert_eq!(r.header("x-tapgate-blocklist-chunks"), Some("1"));
    assert_eq!(r.content_type(), "application/x-tapgate-chunks");
    let mut body = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
    let len = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
    assert_eq!(body.len(), 4 + len);
    let chunk = purse::blocklist::chunked::SnapshotChunk::verify(&body[4..], &pk).unwrap();
    assert_eq!((chunk.index, chunk.count, chunk.total), (0, 1, 0));
    let mut from_chunks = purse::blocklist::Blocklist::new("default");
    assert_eq!(
        from_chunks.apply_chunk(&chunk),
        Ok(purse::blocklist::chunked::ChunkProgress::Complete { version: 2 })
    );
    assert_eq!(from_chunks, from_snapshot);
}
