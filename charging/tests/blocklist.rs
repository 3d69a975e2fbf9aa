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
    // Asked for chunks (the gateway's relay), a list that fits one chunk stays one message.
    let r = ureq::get(&format!("{b}/v1/blocklist/signed/snapshot?chunked=1"))
        .set("Authorization", &format!("Bearer {GW}"))
        .call()
        .unwrap();
    assert_eq!(r.header("x-tapgate-blocklist-version"), Some("2"));
    assert_eq!(r.content_type(), "application/octet-stream");
    let mut one = Vec::new();
    std::io::Read::read_to_end(&mut r.into_reader(), &mut one).unwrap();
    assert_eq!(one, snap);
}

/// More blocked cards than one chunk holds: the chunked snapshot is length-prefixed signed
/// chunks, sorted across chunks, that rebuild the list (issue 22).
#[test]
fn a_list_beyond_one_chunk_is_answered_in_signed_chunks() {
    use purse::blocklist::chunked::{ChunkProgress, SnapshotChunk, CHUNK_ENTRIES};
    use purse::rotation::SignedMessage;
    let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(2));
    let srv = common::start(&keys, |cfg| {
        cfg.tokens = vec![TokenEntry {
            name: "gw".into(),
            role: Role::Gateway,
            sha256: Auth::hash_token(GW),
        }];
        // 65,546 cards blocked in one transaction (each a shadow, a numbered change and two
        // index entries): more than the test kit's 32 MiB ledger.
        cfg.ledger_map_size_bytes = 256 << 20;
    });
    let n = CHUNK_ENTRIES + 10;
    let uid = |i: usize| -> [u8; 7] {
        let mut u = [4, 0, 0, 0, 0, 0, 0];
        u[3..].copy_from_slice(&((i as u32).wrapping_mul(2_654_435_761)).to_be_bytes());
        u
    };
    srv.state
        .loads
        .ledger()
        .transact(move |t| {
            for i in 0..n {
                t.set_blocked(&uid(i), true, "lost", 0)?;
            }
            Ok(())
        })
        .unwrap();
    let fetch = || {
        let r = ureq::get(&format!(
            "{}/v1/blocklist/signed/snapshot?chunked=1",
            srv.base
        ))
        .set("Authorization", &format!("Bearer {GW}"))
        .call()
        .unwrap();
        assert_eq!(r.content_type(), "application/x-tapgate-chunks");
        let count: u32 = r
            .header("x-tapgate-blocklist-chunks")
            .unwrap()
            .parse()
            .unwrap();
        let version: u64 = r
            .header("x-tapgate-blocklist-version")
            .unwrap()
            .parse()
            .unwrap();
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut body).unwrap();
        (count, version, body)
    };
    let rebuild = |version: u64, body: &[u8]| {
        let mut list = purse::blocklist::Blocklist::new("default");
        let (mut pos, mut last) = (0, None);
        while pos < body.len() {
            let len = u32::from_be_bytes(body[pos..pos + 4].try_into().unwrap()) as usize;
            let c =
                SnapshotChunk::verify(&body[pos + 4..pos + 4 + len], &keys.verifying_key).unwrap();
            assert_eq!((c.count, c.version), (2, version));
            last = Some(list.apply_chunk(&c).unwrap());
            pos += 4 + len;
        }
        assert_eq!(last, Some(ChunkProgress::Complete { version }));
        list
    };
    let (count, version, body) = fetch();
    assert_eq!(count, 2);
    let list = rebuild(version, &body);
    assert_eq!(list.len(), n);
    assert!((0..n).all(|i| list.is_blocked(&uid(i))));
    // Asked again at the same version: the chunks kept, the same bytes.
    assert_eq!(fetch(), (count, version, body.clone()));
    // A new block: a new version's chunks, holding the new card.
    srv.state
        .loads
        .ledger()
        .transact(move |t| t.set_blocked(&uid(n), true, "stolen", 0).map(|_| ()))
        .unwrap();
    let (count2, version2, body2) = fetch();
    assert_eq!(count2, 2);
    assert!(version2 > version, "{version2} after {version}");
    let list = rebuild(version2, &body2);
    assert_eq!(list.len(), n + 1);
    assert!(list.is_blocked(&uid(n)));
}
