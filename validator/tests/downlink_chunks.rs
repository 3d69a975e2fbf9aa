//! A blocklist snapshot in signed chunks at the validator (issue 22): chunks in any order are
//! packed as they come and journalled; the list in force changes only with the last one; a
//! half-received snapshot survives a restart without replacing anything; forged chunks and
//! chunks signed by a retired key version are refused and change nothing.

mod support;

use ed25519_dalek::{Signer, SigningKey};
use purse::blocklist::chunked::{cut, SnapshotChunk};
use purse::blocklist::{ListKind, ListUpdate};
use purse::keys::{KeySet, Role};
use purse::rotation::SignedMessage;
use purse::sam::SoftwareSam;
use rand::rngs::StdRng;
use rand::SeedableRng;
use validator::daemon::{apply_downlink_outcome, restore, Downlink, DownlinkOutcome};
use validator::gate::Gate;
use validator::journal::Journal;

fn gate(keys: &KeySet) -> Gate {
    support::downlink_gate(SoftwareSam::validator(keys, 7).unwrap(), 7, 1)
}

fn uid(i: u32) -> [u8; 7] {
    let mut u = [4, 0, 0, 0, 0, 0, 0];
    u[3..].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
    u
}

/// The snapshot of cards `ids` at `version`, in chunks of `per`, signed by `key`.
fn chunks(
    key: &SigningKey,
    version: u64,
    ids: impl Iterator<Item = u32>,
    per: usize,
) -> Vec<Vec<u8>> {
    let mut uids: Vec<[u8; 7]> = ids.map(uid).collect();
    uids.sort_unstable();
    cut("metro", version, &uids, per)
        .iter()
        .map(|c| c.sign_with(|m| key.sign(m).to_bytes()))
        .collect()
}

fn single(key: &SigningKey, kind: ListKind, from: u64, to: u64, ids: &[u32]) -> Vec<u8> {
    ListUpdate {
        kind,
        operator: "metro".into(),
        from_version: from,
        to_version: to,
        entries: ids.iter().map(|i| (uid(*i), true)).collect(),
    }
    .sign_with(|m| key.sign(m).to_bytes())
}

#[test]
fn chunks_in_any_order_switch_the_list_at_the_last_and_survive_a_restart() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let bo = SigningKey::from_bytes(&[1; 32]);
    let pk = bo.verifying_key().to_bytes();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 26).unwrap();
    let mut g = gate(&keys);
    let bl = Downlink::Blocklist;
    let apply = |g: &mut Gate, b: &[u8]| apply_downlink_outcome(g, &j, &pk, bl, b);
    // In force: a single-message snapshot (cards 0..10) and a delta (card 1000).
    let snap = single(&bo, ListKind::Snapshot, 0, 3, &(0..10).collect::<Vec<_>>());
    assert_eq!(apply(&mut g, &snap), Ok(DownlinkOutcome::Applied(3)));
    let delta = single(&bo, ListKind::Delta, 3, 4, &[900_000]);
    assert_eq!(apply(&mut g, &delta), Ok(DownlinkOutcome::Applied(4)));

    // Version 9: cards 5..5005 in 5 chunks of 1,000, given in the order 3, 0, 3, 4, 1, 2 with
    // an older snapshot's chunk (version 6) and an empty message (a cleared topic) between.
    let v9 = chunks(&bo, 9, 5..5_005, 1_000);
    let v6 = chunks(&bo, 6, 0..3_000, 1_000);
    assert_eq!(v9.len(), 5);
    for (step, i) in [3usize, 0, 3, 4, 1].into_iter().enumerate() {
        let out = apply(&mut g, &v9[i]).unwrap();
        let received = [1, 2, 2, 3, 4][step];
        assert_eq!(
            out,
            DownlinkOutcome::Pending {
                version: 9,
                received,
                count: 5
            }
        );
        assert_eq!(g.blocklist.version(), 4, "not before the last chunk");
        assert!(g.blocklist.is_blocked(&uid(0)) && g.blocklist.is_blocked(&uid(900_000)));
    }
    assert!(matches!(
        apply(&mut g, &v6[0]),
        Ok(DownlinkOutcome::Pending { version: 9, .. })
    ));
    assert!(matches!(
        apply(&mut g, &[]),
        Ok(DownlinkOutcome::AlreadyHeld { held: 4, .. })
    ));
    assert_eq!(apply(&mut g, &v9[2]), Ok(DownlinkOutcome::Applied(9)));
    assert_eq!(g.blocklist.len(), 5_000);
    assert!(!g.blocklist.is_blocked(&uid(0)) && !g.blocklist.is_blocked(&uid(900_000)));
    assert!(g.blocklist.is_blocked(&uid(5)) && g.blocklist.is_blocked(&uid(5_004)));
    // The journal now holds this snapshot's five chunks alone.
    let held: Vec<String> = j
        .blobs("blocklist/")
        .unwrap()
        .into_iter()
        .map(|b| b.0)
        .collect();
    assert_eq!(held.len(), 5, "{held:?}");
    assert!(held
        .iter()
        .all(|k| k.starts_with("blocklist/0-chunk/00000000000000000009/")));
    // Retained again after a reconnect: already held. A delta on top applies.
    assert!(matches!(
        apply(&mut g, &v9[0]),
        Ok(DownlinkOutcome::AlreadyHeld { held: 9, got: 9 })
    ));
    let delta = single(&bo, ListKind::Delta, 9, 10, &[7_777]);
    assert_eq!(apply(&mut g, &delta), Ok(DownlinkOutcome::Applied(10)));

    // Version 12 half received, then a restart: the list in force comes back (chunks, then
    // the delta) and the half-received snapshot waits for its missing chunks.
    let v12 = chunks(&bo, 12, 100..2_100, 1_000);
    assert!(matches!(
        apply(&mut g, &v12[1]),
        Ok(DownlinkOutcome::Pending { .. })
    ));
    let mut g2 = gate(&keys);
    restore(&mut g2, &j, &pk).unwrap();
    assert_eq!(g2.blocklist, g.blocklist);
    assert_eq!(g2.blocklist.version(), 10);
    assert!(g2.blocklist.is_blocked(&uid(7_777)));
    assert_eq!(g2.blocklist.incoming().map(|a| a.missing()), Some(vec![0]));
    let out = apply_downlink_outcome(&mut g2, &j, &pk, bl, &v12[0]).unwrap();
    assert_eq!(out, DownlinkOutcome::Applied(12));
    assert_eq!(g2.blocklist.len(), 2_000);
    assert!(g2.blocklist.is_blocked(&uid(100)) && !g2.blocklist.is_blocked(&uid(5)));
}

#[test]
fn forged_and_retired_key_chunks_are_refused_and_change_nothing() {
    let mut issuer = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let old = SigningKey::from_bytes(issuer.signing_seed.as_ref().unwrap());
    issuer
        .rotate_signing(&mut StdRng::seed_from_u64(3))
        .unwrap();
    let new = SigningKey::from_bytes(issuer.signing_seed.as_ref().unwrap());
    issuer.retire_signing(1).unwrap();
    let sam_keys = issuer.for_role(Role::ValidatorSam, 7).unwrap();
    let ring =
        purse::rotation::TrustedKeys::parse(&sam_keys.trusted_signing_keys().render()).unwrap();
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 24).unwrap();
    let mut g = gate(&sam_keys);
    let bl = Downlink::Blocklist;
    let v2 = chunks(&new, 2, 0..300, 100);
    assert!(matches!(
        apply_downlink_outcome(&mut g, &j, &ring, bl, &v2[0]),
        Ok(DownlinkOutcome::Pending { .. })
    ));
    // The old (retired) key's chunk: refused with its own reason, not joined.
    let retired = chunks(&old, 2, 0..300, 100);
    let e = apply_downlink_outcome(&mut g, &j, &ring, bl, &retired[1]).unwrap_err();
    assert!(e.contains("retired signing key version 1"), "{e}");
    // A forged chunk, and one altered after signing.
    let forged = chunks(&SigningKey::from_bytes(&[9; 32]), 2, 0..300, 100);
    let e = apply_downlink_outcome(&mut g, &j, &ring, bl, &forged[1]).unwrap_err();
    assert!(e.contains("signature"), "{e}");
    let mut altered = v2[1].clone();
    let n = altered.len();
    altered[n - 70] ^= 0x40;
    let e = apply_downlink_outcome(&mut g, &j, &ring, bl, &altered).unwrap_err();
    assert!(e.contains("signature"), "{e}");
    assert!(SnapshotChunk::verify(&v2[1], &new.verifying_key().to_bytes()).is_ok());
    assert_eq!(g.blocklist.version(), 0);
    assert_eq!(
        g.blocklist.incoming().map(|a| a.missing()),
        Some(vec![1, 2])
    );
    for c in &v2[1..] {
        apply_downlink_outcome(&mut g, &j, &ring, bl, c).unwrap();
    }
    assert_eq!((g.blocklist.version(), g.blocklist.len()), (2, 300));
}

/// The daemon's path (`apply_blocklist_shared`: verified before the gate is taken, journalled
/// after): chunks over 64 KiB are journalled as files; a new snapshot's last chunk switches the
/// list and removes the old snapshot's files; a restart restores the list from them; a forged
/// chunk is refused and changes nothing.
#[test]
fn the_daemons_path_switches_at_the_last_chunk_and_journals_large_chunks_as_files() {
    use validator::daemon::apply_blocklist_shared;
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let bo = SigningKey::from_bytes(&[1; 32]);
    let pk = bo.verifying_key().to_bytes();
    let trusted = purse::rotation::TrustedKeys::single(pk);
    let d = tempfile::tempdir().unwrap();
    let j = Journal::open(d.path(), 10, 1 << 26).unwrap();
    let g = std::sync::Mutex::new(gate(&keys));
    let files = || std::fs::read_dir(d.path().join("blobs")).unwrap().count();
    // 10,000 cards a chunk: 70 KB, above the 64 KiB kept inline.
    let v3 = chunks(&bo, 3, 0..30_000, 10_000);
    let v5 = chunks(&bo, 5, 10_000..40_000, 10_000);
    for c in &v3[..2] {
        let (out, held) = apply_blocklist_shared(&g, &j, &trusted, c).unwrap();
        assert!(matches!(out, DownlinkOutcome::Pending { version: 3, .. }));
        assert_eq!(held, 0);
    }
    let out = apply_blocklist_shared(&g, &j, &trusted, &v3[2]).unwrap();
    assert_eq!(out, (DownlinkOutcome::Applied(3), 3));
    assert_eq!(files(), 3);
    let forger = SigningKey::from_bytes(&[9; 32]);
    let forged = chunks(&forger, 7, 0..10, 10);
    assert!(apply_blocklist_shared(&g, &j, &trusted, &forged[0]).is_err());
    assert!(g.lock().unwrap().blocklist.incoming().is_none());
    for c in &v5 {
        apply_blocklist_shared(&g, &j, &trusted, c).unwrap();
    }
    let g = g.into_inner().unwrap();
    assert_eq!((g.blocklist.version(), g.blocklist.len()), (5, 30_000));
    assert!(!g.blocklist.is_blocked(&uid(0)) && g.blocklist.is_blocked(&uid(39_999)));
    assert_eq!(files(), 3, "the old snapshot's files removed");
    let mut g2 = gate(&keys);
    restore(&mut g2, &j, &pk).unwrap();
    assert_eq!(g2.blocklist, g.blocklist);
}
