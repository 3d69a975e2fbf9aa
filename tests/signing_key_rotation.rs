//! The signing keys rotated end to end (issue 19, docs/key-rotation.md), with the operator's
//! CLI: `tapgate keys rotate --signing` and `--device-master` add new versions beside the old;
//! validator 1001 keeps its old device key (not re-provisioned), validator 1002 is provisioned
//! after the rotation. During the window the gateway stores and confirms both validators'
//! taps, and a validator given the new signing.pub applies lists signed by either signing key.
//! Then `tapgate keys retire --signing|--device-master --version 1`: a list signed by the old
//! key is refused with its own reason, and validator 1001's next tap is quarantined at the
//! gateway with its own reason, unconfirmed, so it stays in 1001's outbox — nothing lost.

mod support;

use ed25519_dalek::{Signer, SigningKey};
use fare_rules::record::TapKind;
use gateway::store::{IngestOutcome, Message, Store};
use purse::blocklist::{ListKind, ListUpdate};
use purse::card::{Card, Personalisation};
use purse::confirm::Confirmation;
use purse::keys::KeySet;
use purse::rotation::TrustedKeys;
use purse::sam::{Sam, SoftwareHsm, SoftwareSam};
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use validator::daemon::{apply_downlink, Downlink};
use validator::gate::{Answer, Gate};
use validator::journal::Journal;

const PASS: &str = "rotate the signers";
/// 2026-12-01 08:00 in Metro City (UTC+9) as unix ms.
const T0_MS: u64 = 1_796_079_600_000;

fn tapgate(args: &[&str]) -> String {
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(args)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .output()
        .expect("run tapgate");
    assert!(
        o.status.success(),
        "tapgate {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn sealed(path: &Path) -> KeySet {
    KeySet::unseal(&std::fs::read(path).unwrap(), PASS.as_bytes()).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `tapgate keys provision --role <role> --device <d> --out <dir>/<name>/device.keys`: the key
/// set, and the signing.pub written beside it (read as the validator's config reads it).
fn provision(dir: &Path, role: &str, device: u32, name: &str) -> (KeySet, TrustedKeys) {
    let out: PathBuf = dir.join(name).join("device.keys");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let d = device.to_string();
    let keys = dir.join("keys");
    tapgate(&[
        "keys",
        "provision",
        "--role",
        role,
        "--device",
        &d,
        "--keys",
        s(&keys),
        "--out",
        s(&out),
    ]);
    let text = std::fs::read_to_string(out.with_file_name("signing.pub")).unwrap();
    (sealed(&out), TrustedKeys::parse(&text).unwrap())
}

/// A validator: its SAM (from its provisioned key set) and its own journal.
struct Validator {
    device: u32,
    keys: KeySet,
    journal: Journal,
    _dir: tempfile::TempDir,
}

impl Validator {
    fn new(device: u32, keys: KeySet) -> Validator {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path(), 1000, 1 << 24).unwrap();
        Validator {
            device,
            keys,
            journal,
            _dir: dir,
        }
    }

    fn gate(&self) -> Gate {
        let sam = SoftwareSam::validator(&self.keys, self.device).unwrap();
        let seed = u64::from(self.device);
        support::gate::metro_gate(sam, self.device, "Central", TapKind::In, seed)
    }

    /// A card taps in; the tap is journalled in the outbox.
    fn tap(&self, card: &mut Card, now_ms: u64) {
        let mut reader = EmulatedReader {
            card: &mut *card,
            rng: StdRng::seed_from_u64(now_ms),
        };
        let out = self
            .gate()
            .tap(&mut reader, &self.journal, now_ms, &mut |_| {})
            .unwrap();
        card.remove_from_field();
        assert!(
            matches!(out.answer, Answer::Accepted { .. }),
            "{:?}",
            out.answer
        );
    }

    /// The outbox, as it is published on the validator's taps topic.
    fn publish(&self) -> Message {
        let taps = self.journal.outbox_after(0, 100).unwrap();
        Message {
            topic: format!("tapgate/v1/metro/taps/{}", self.device),
            payload: taps.into_iter().flat_map(|(_, w)| w).collect(),
        }
    }

    /// Applies the gateway's confirmation as the validator does: verified under its own device
    /// key, then the taps it names are deleted.
    fn on_confirmation(&self, payload: &str) -> usize {
        let sam = SoftwareSam::validator(&self.keys, self.device).unwrap();
        let c = Confirmation::decode(payload.as_bytes())
            .and_then(|c| c.verify_with_key("metro", self.device, sam.device_key()))
            .expect("the confirmation verifies under the validator's own device key");
        self.journal.confirm(&c).unwrap()
    }
}

/// The gateway's confirmations of an ingest, MAC'd as its sender does: with the device key of
/// the KM_DEVICE version the device's taps verified under.
fn confirm(gw: &KeySet, out: &IngestOutcome, v: &Validator) -> Option<usize> {
    let seqs = out.confirmations.get(&("metro".to_string(), v.device))?;
    let version = out.device_key_versions[&v.device];
    let key = gw.device_key_at(v.device, version).unwrap();
    let body = purse::confirm::encode_with_key("metro", v.device, seqs, &key).unwrap();
    Some(v.on_confirmation(&body))
}

fn blocklist(key: &SigningKey, kind: ListKind, from: u64, to: u64) -> Vec<u8> {
    ListUpdate {
        kind,
        operator: "metro".into(),
        from_version: from,
        to_version: to,
        entries: vec![([4, 0x19, 0, 0, 0, 0, to as u8], true)],
    }
    .sign_with(|m| key.sign(m).to_bytes())
}

#[test]
fn signing_and_device_keys_rotate_both_accepted_then_the_old_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let keys_dir = d.join("keys");
    tapgate(&["keys", "init", "--out", s(&keys_dir)]);
    let issuer_file = keys_dir.join("issuer.keys");
    let before = sealed(&issuer_file);
    let old_signer = SigningKey::from_bytes(before.signing_seed.as_ref().unwrap());
    let hsm = SoftwareHsm::new(&before).unwrap();
    let (v1001_keys, _) = provision(d, "validator", 1001, "v1001");

    // The rotation: a new signing key and a new device master, the old ones kept.
    let out = tapgate(&["keys", "rotate", "--signing", "--keys", s(&keys_dir)]);
    assert!(out.contains("version 2"), "{out}");
    let out = tapgate(&["keys", "rotate", "--device-master", "--keys", s(&keys_dir)]);
    assert!(out.contains("version 2"), "{out}");
    let issuer = sealed(&issuer_file);
    let new_signer = SigningKey::from_bytes(issuer.signing_seed.as_ref().unwrap());
    assert_ne!(
        old_signer.verifying_key().to_bytes(),
        new_signer.verifying_key().to_bytes()
    );
    let (v1002_keys, v1002_trust) = provision(d, "validator", 1002, "v1002");
    assert_eq!(v1002_trust.accepted_versions(), vec![2, 1]);
    let (gw, _) = provision(d, "gateway", 0, "gw");
    let v1001 = Validator::new(1001, v1001_keys);
    let v1002 = Validator::new(1002, v1002_keys);
    // The two validators really MAC under different KM_DEVICE versions.
    let k1001 = SoftwareSam::validator(&v1001.keys, 1001).unwrap();
    assert_eq!(
        k1001.device_key().expose_secret(),
        gw.device_key_at(1001, 1).unwrap().expose_secret()
    );

    let uid = |n: u8| [0x04, 0x19, n, 1, 2, 3, 4];
    let card = |n: u8| {
        let p = Personalisation::transit(uid(n), 20_000);
        Card::personalise(&p, hsm.card_keys(&uid(n), 1).unwrap())
    };
    let (mut alice, mut bob) = (card(1), card(2));
    let mut now = T0_MS;

    // The window: both validators' taps stored, each confirmed under the key it holds.
    v1001.tap(&mut alice, now);
    v1002.tap(&mut bob, now);
    let store_dir = tempfile::tempdir().unwrap();
    let store = Store::open(store_dir.path(), 64 << 20).unwrap();
    let ring = |dev| gw.device_key_ring(dev).unwrap();
    let out = store
        .ingest_with_rings(&[v1001.publish(), v1002.publish()], ring, now)
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (2, 0));
    assert_eq!(confirm(&gw, &out, &v1001), Some(1));
    assert_eq!(confirm(&gw, &out, &v1002), Some(1));
    assert_eq!(v1001.journal.outbox_len().unwrap(), 0);
    assert_eq!(v1002.journal.outbox_len().unwrap(), 0);

    // Lists: the snapshot signed before the rotation and a delta signed after both apply.
    let mut g = v1002.gate();
    let bl = Downlink::Blocklist;
    let snap = blocklist(&old_signer, ListKind::Snapshot, 0, 1);
    assert_eq!(
        apply_downlink(&mut g, &v1002.journal, &v1002_trust, bl, &snap),
        Ok(1)
    );
    let delta = blocklist(&new_signer, ListKind::Delta, 1, 2);
    assert_eq!(
        apply_downlink(&mut g, &v1002.journal, &v1002_trust, bl, &delta),
        Ok(2)
    );

    // Retirement of both old versions; 1002 and the gateway are provisioned again, 1001 not.
    let out = tapgate(&[
        "keys",
        "retire",
        "--signing",
        "--version",
        "1",
        "--keys",
        s(&keys_dir),
    ]);
    assert!(out.contains("version 1 retired"), "{out}");
    let out = tapgate(&[
        "keys",
        "retire",
        "--device-master",
        "--version",
        "1",
        "--keys",
        s(&keys_dir),
    ]);
    assert!(out.contains("version 1 retired"), "{out}");
    let (_, trust_after) = provision(d, "validator", 1002, "v1002");
    assert_eq!(trust_after.accepted_versions(), vec![2]);
    let (gw, _) = provision(d, "gateway", 0, "gw");

    // A list signed by the retired key: refused with its own reason, nothing changed.
    let stale = blocklist(&old_signer, ListKind::Delta, 2, 3);
    let e = apply_downlink(&mut g, &v1002.journal, &trust_after, bl, &stale).unwrap_err();
    assert!(e.contains("retired signing key version 1"), "{e}");
    assert_eq!(g.blocklist.version(), 2);
    let fresh = blocklist(&new_signer, ListKind::Delta, 2, 3);
    assert_eq!(
        apply_downlink(&mut g, &v1002.journal, &trust_after, bl, &fresh),
        Ok(3)
    );

    // Validator 1001 still MACs under the retired device master: quarantined, its own reason,
    // not confirmed; the tap stays in its outbox. 1002's tap goes through.
    now += 3_600_000;
    v1001.tap(&mut alice, now);
    v1002.tap(&mut bob, now);
    let ring = |dev| gw.device_key_ring(dev).unwrap();
    let out = store
        .ingest_with_rings(&[v1001.publish(), v1002.publish()], ring, now)
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (1, 1));
    assert_eq!(confirm(&gw, &out, &v1001), None);
    assert_eq!(confirm(&gw, &out, &v1002), Some(1));
    let q = store.quarantined(10).unwrap();
    assert_eq!(q.len(), 1);
    assert!(
        q[0].reason.contains("retired device-key version 1"),
        "{}",
        q[0].reason
    );
    assert_eq!(q[0].topic, "tapgate/v1/metro/taps/1001");
    assert_eq!(v1001.journal.outbox_len().unwrap(), 1);
    // The operator re-provisions 1001: the same journalled tap is MAC'd under version 1, so
    // it stays; the validator's new taps are accepted.
    let (v1001_new, _) = provision(d, "validator", 1001, "v1001");
    let v1001b = Validator {
        keys: v1001_new,
        ..v1001
    };
    now += 3_600_000;
    v1001b.tap(&mut alice, now);
    let out = store
        .ingest_with_rings(&[v1001b.publish()], ring, now)
        .unwrap();
    assert_eq!((out.stored, out.quarantined), (1, 1));
}
