//! A crowd of cards through a key rotation (issue 19, docs/key-rotation.md): the issuer adds
//! card-key version 2 beside version 1; the charging server's HSM and the validators' SAMs hold
//! both. Some cards load online and are moved to version 2 in the same relay session; some
//! only tap validators and stay on version 1, accepted; one is pulled in the middle of its
//! ChangeKeys. Every tap's transaction MAC verifies in the HSM as clearing checks it, whatever
//! mix of versions the card held. Then the operator retires version 1: a card still on it is
//! refused at the gate with `key_version_retired`, no value taken, and its next online load
//! moves it — so no card holds value it cannot spend.

mod support;

use charging::load::{LoadConfig, LoadService, Reply};
use fare_rules::record::TapKind;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::receipt::TxClaim;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use purse::tap::{RefusalReason, TapRecord};
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::{load_in_process, Tear};
use validator::gate::{Answer, Gate};
use validator::journal::Journal;

/// 2026-12-01 08:00 in Metro City (UTC+9) as unix ms.
const T0_MS: u64 = 1_796_079_600_000;
const START_MINOR: i32 = 20_000;
const DEVICE: u32 = 1001;
/// APDUs of a whole rotation after a load (select, four GetKeyVersion, authentication,
/// ChangeKey 0, authentication, ChangeKey 1, 3, 2).
const REKEY_APDUS: usize = 13;

fn gate(keys: &KeySet, stop: &str, kind: TapKind) -> Gate {
    let sam = SoftwareSam::validator(keys, DEVICE).unwrap();
    support::gate::metro_gate(sam, DEVICE, stop, kind, 9)
}

struct World {
    _dir: tempfile::TempDir,
    keys: KeySet,
    hsm: SoftwareHsm,
    svc: LoadService,
    journal: Journal,
    now_ms: u64,
    loaded: i64,
    _pg: Option<tapgate_testkit::postgres::TestDb>,
}

impl World {
    /// Alice's load of `amount`, relayed until its final reply (or the tear).
    fn load(
        &mut self,
        card: &mut Card,
        amount: i32,
        key: &str,
        tear: Option<Tear>,
    ) -> (Reply, usize) {
        load_in_process(
            &self.svc,
            "alice",
            card,
            amount,
            key,
            &mut self.now_ms,
            tear,
        )
    }

    /// A tap in at Central and out at University an hour later (each gate built from the key
    /// set the validators hold now).
    fn trip(&mut self, card: &mut Card) -> [Answer; 2] {
        let mut answers = Vec::new();
        for (stop, kind) in [("Central", TapKind::In), ("University", TapKind::Out)] {
            self.now_ms += 1_800_000;
            let mut g = gate(&self.keys, stop, kind);
            let mut reader = EmulatedReader {
                card: &mut *card,
                rng: StdRng::seed_from_u64(self.now_ms),
            };
            let out = g
                .tap(&mut reader, &self.journal, self.now_ms, &mut |_| {})
                .unwrap();
            card.remove_from_field();
            answers.push(out.answer);
        }
        answers.try_into().unwrap()
    }

    /// Every journalled tap, its device MAC verified; each accepted one's transaction MAC
    /// verified by the HSM as clearing does.
    fn cleared_taps(&self) -> Vec<TapRecord> {
        let sam = SoftwareSam::validator(&self.keys, DEVICE).unwrap();
        let key = purse::sam::Sam::device_key(&sam).clone();
        let taps: Vec<TapRecord> = self
            .journal
            .outbox_after(0, 10_000)
            .unwrap()
            .into_iter()
            .map(|(_, w)| TapRecord::decode_verified(&w, "metro", |_| Some(key.clone())).unwrap())
            .collect();
        for t in taps.iter().filter(|t| t.refusal().is_none()) {
            let claim = TxClaim {
                uid: t.uid(),
                tmc: t.tmc(),
                tmv: t.tmv(),
                kind: t.kind(),
                amount_minor: t.amount_minor(),
                balance_after_minor: t.balance_after_minor(),
                key_version: t.key_version(),
                reader_id: None,
            };
            self.hsm
                .verify_claim(&claim)
                .unwrap_or_else(|e| panic!("tap {} of card {:02X?}: {e}", t.tmc(), t.uid()));
        }
        taps
    }
}

fn world() -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(19);
    let mut keys = KeySet::generate(&mut rng);
    // The operator's `tapgate keys rotate`: version 2 beside version 1, in the HSM and the
    // validators' SAMs alike.
    assert_eq!(keys.rotate_card_keys(&mut rng).unwrap(), 2);
    let (pg, svc, _processor) =
        tapgate_testkit::charging::load_service(dir.path(), &keys, LoadConfig::default());
    svc.register_instrument("alice", "card", "tok_visa", 0)
        .unwrap();
    let journal = Journal::open(&dir.path().join("journal"), 10_000, 1 << 26).unwrap();
    World {
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys,
        svc,
        journal,
        now_ms: T0_MS,
        loaded: 0,
        _dir: dir,
        _pg: pg,
    }
}

/// A card issued before the rotation: every key at version 1.
fn issue(w: &World, n: u8) -> Card {
    let uid = [0x04, 0x19, n, 1, 2, 3, 4];
    w.svc
        .register_card(&uid, i64::from(START_MINOR), w.now_ms)
        .unwrap();
    let p = Personalisation::transit(uid, START_MINOR);
    Card::personalise(&p, w.hsm.card_keys(&uid, 1).unwrap())
}

fn accepted(a: &Answer) -> bool {
    matches!(a, Answer::Accepted { .. })
}

#[test]
fn a_crowd_of_cards_goes_through_a_rotation_and_none_is_left_with_value_it_cannot_spend() {
    let mut w = world();
    let mut cards: Vec<Card> = (0..10).map(|n| issue(&w, n)).collect();
    let (online, validators_only, torn) = (0..4, 4..9, 9);

    // How many APDUs a load takes (a card already on version 2 is not rotated).
    let mut probe = {
        let uid = [0x04, 0x19, 0xFF, 1, 2, 3, 4];
        w.svc.register_card(&uid, 0, w.now_ms).unwrap();
        let mut p = Personalisation::transit(uid, 0);
        p.key_version = 2;
        Card::personalise(&p, w.hsm.card_keys(&uid, 2).unwrap())
    };
    let (r, load_apdus) = w.load(&mut probe, 100, "probe", None);
    assert!(matches!(r, Reply::Completed { .. }), "{r:?}");
    assert_eq!(probe.state().key_versions(), [2; 4]);

    // The window: both versions work everywhere.
    for i in online.clone() {
        assert!(
            w.trip(&mut cards[i]).iter().all(accepted),
            "card {i} on version 1"
        );
        let (r, n) = w.load(&mut cards[i], 1_000, &format!("load-{i}"), None);
        assert!(
            matches!(
                r,
                Reply::Completed {
                    amount_minor: 1_000,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            n,
            load_apdus + REKEY_APDUS,
            "card {i}: the load, then the rotation"
        );
        w.loaded += 1_000;
        assert_eq!(cards[i].state().key_versions(), [2; 4], "card {i}");
        assert!(
            w.trip(&mut cards[i]).iter().all(accepted),
            "card {i} on version 2"
        );
    }
    for i in validators_only.clone() {
        assert!(w.trip(&mut cards[i]).iter().all(accepted), "card {i}");
        assert_eq!(cards[i].state().key_versions(), [1; 4]);
    }
    // Pulled after ChangeKey 0, 1 and 3 reached it, before ChangeKey 2: the load is done and
    // booked; the card holds both versions, each key usable.
    let tear = Tear {
        at: load_apdus + REKEY_APDUS - 1,
        delivered: true,
    };
    let (r, _) = w.load(&mut cards[torn], 1_000, "load-torn", Some(tear));
    assert!(
        matches!(r, Reply::Command { .. }),
        "the client vanished mid-rotation: {r:?}"
    );
    w.loaded += 1_000;
    assert_eq!(cards[torn].state().key_versions(), [2, 2, 1, 2]);
    assert_eq!(
        w.svc.stats().completed,
        (online.len() + 2) as u64,
        "the torn card's load was completed before its rotation began"
    );
    assert!(w.trip(&mut cards[torn]).iter().all(accepted));
    // Every tap so far, on whatever version, clears.
    let before_retirement = w.cleared_taps();
    assert!(before_retirement.iter().all(|t| t.refusal().is_none()));

    // The operator retires version 1 (`tapgate keys retire --version 1`): validators' SAMs are
    // cut again and hold version 2 only; the HSM keeps version 1 to move the laggards.
    w.keys.retire(1).unwrap();
    for i in validators_only.clone() {
        let before = cards[i].state().balance_minor;
        let [a, _] = w.trip(&mut cards[i]);
        assert!(
            matches!(
                a,
                Answer::Refused {
                    reason: RefusalReason::KeyVersionRetired,
                    ..
                }
            ),
            "card {i}: {a:?}"
        );
        assert_eq!(cards[i].state().balance_minor, before, "no value taken");
    }
    // The torn card's debit key is already at version 2: the gate accepts it.
    assert!(w.trip(&mut cards[torn]).iter().all(accepted));

    // No card holds value it cannot spend: every card with value is on a version the
    // validators accept, or is moved at its next load — which then lets it through the gate.
    for (i, card) in cards.iter_mut().enumerate() {
        assert!(card.state().balance_minor > 0);
        if card.state().key_versions()[1] != 2 || card.state().key_versions()[2] != 2 {
            let (r, _) = w.load(card, 500, &format!("migrate-{i}"), None);
            assert!(matches!(r, Reply::Completed { .. }), "card {i}: {r:?}");
            w.loaded += 500;
        }
        assert_eq!(card.state().key_versions(), [2; 4], "card {i}");
        assert!(
            w.trip(card).iter().all(accepted),
            "card {i} after the rotation"
        );
    }
    assert_eq!(
        w.svc.stats().keys_rotated,
        10,
        "each card issued on version 1, once"
    );

    // Value is conserved: what the cards hold is what they were issued, plus the loads, less
    // the fares the validators journalled (refusals took nothing).
    let taps = w.cleared_taps();
    let refused = taps.iter().filter(|t| t.refusal().is_some()).count();
    assert!(
        refused >= validators_only.len(),
        "{refused} refusals journalled"
    );
    assert!(taps
        .iter()
        .filter_map(|t| t.refusal())
        .all(|r| r == RefusalReason::KeyVersionRetired));
    let fares: i64 = taps
        .iter()
        .filter(|t| t.refusal().is_none())
        .map(|t| i64::from(t.amount_minor()))
        .sum();
    let held: i64 = cards
        .iter()
        .map(|c| i64::from(c.state().balance_minor))
        .sum();
    assert_eq!(held, 10 * i64::from(START_MINOR) + w.loaded - fares);
}

/// `tapgate keys rotate` / `retire` / `provision` on a key directory.
fn keys_cli(dir: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .arg("keys")
        .args(args)
        .arg("--keys")
        .arg(dir.join("keys"))
        .env("TAPGATE_KEY_PASSPHRASE", "rotate me")
        .output()
        .expect("run tapgate keys")
}

fn sealed(path: &std::path::Path) -> KeySet {
    KeySet::unseal(&std::fs::read(path).unwrap(), b"rotate me").unwrap()
}

#[test]
fn the_operator_rotates_and_retires_with_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["keys", "init", "--out"])
        .arg(dir.path().join("keys"))
        .env("TAPGATE_KEY_PASSPHRASE", "rotate me")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let issuer = dir.path().join("keys/issuer.keys");
    let v1 = sealed(&issuer);

    // Retiring before there is anything newer is refused, and changes nothing.
    let o = keys_cli(dir.path(), &["retire", "--version", "1"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("older than the current"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    let o = keys_cli(dir.path(), &["rotate"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("version 2"), "{out}");
    let v2 = sealed(&issuer);
    assert_eq!(v2.card_version(), Some(2));
    // The old masters are kept unchanged beside the new ones; no key is printed.
    for kind in purse::keys::CARD_MASTERS {
        assert_eq!(v2.get(kind, 1).unwrap(), v1.get(kind, 1).unwrap());
        let hex = hex::encode_upper(v2.get(kind, 2).unwrap().expose_secret());
        assert!(!out.contains(&hex), "a key was printed");
    }

    // A validator provisioned now holds both debit versions; after retirement only the new.
    let sam_file = dir.path().join("v.keys");
    let run_provision = || {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args([
                "keys",
                "provision",
                "--role",
                "validator",
                "--device",
                "7",
                "--keys",
            ])
            .arg(dir.path().join("keys"))
            .arg("--out")
            .arg(&sam_file)
            .env("TAPGATE_KEY_PASSPHRASE", "rotate me")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        sealed(&sam_file)
    };
    assert_eq!(
        run_provision().versions(purse::keys::KeyKind::Debit),
        vec![2, 1]
    );
    let o = keys_cli(dir.path(), &["retire", "--version", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(sealed(&issuer).retired, vec![1]);
    let sam = run_provision();
    assert_eq!(sam.versions(purse::keys::KeyKind::Debit), vec![2]);
    assert!(sam.is_retired(1));
}

/// The whole path as an operator runs it: a card issued on version 1, `tapgate keys rotate`,
/// the charging server started on the rotated key set, `tapgate charge` from the cardholder's
/// PC — the card image comes back on version 2 — then `tapgate keys retire --version 1`.
#[test]
fn tapgate_charge_moves_a_card_after_keys_rotate() {
    const PASS: &str = "rotation-e2e";
    const CARDHOLDER: &str = "tg_cardholder_token_for_rotation";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::keys_init(d, PASS);
    let keys = d.join("keys");
    let card = d.join("card.json");
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tapgate"))
            .args(args)
            .env("TAPGATE_KEY_PASSPHRASE", PASS)
            .env("TAPGATE_TOKEN", CARDHOLDER)
            .output()
            .unwrap()
    };
    let ok = |o: &std::process::Output| {
        assert!(
            o.status.success(),
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).to_string()
    };
    let k = keys.to_str().unwrap();
    let c = card.to_str().unwrap();
    ok(&run(&[
        "card",
        "issue",
        "--keys",
        k,
        "--uid",
        "04B1B2B3B4B5B6",
        "--balance",
        "300",
        "--out",
        c,
    ]));
    assert!(ok(&run(&["card", "show", c])).contains("key_version     1"));
    assert!(ok(&run(&["keys", "rotate", "--keys", k])).contains("version 2"));

    std::fs::write(
        d.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = {:?}\nledger_map_size_bytes = 67108864\n{}",
            d.join("data").to_str().unwrap(),
            support::tokens_toml(&[("alice", "cardholder", CARDHOLDER)])
        ),
    )
    .unwrap();
    let server = support::start_charging(&d.join("charging.toml"), &keys, PASS);
    let charge = |key: &str| {
        run(&[
            "charge",
            "--server",
            &server.base,
            "--amount",
            "1000",
            "--funding",
            "card:tok_visa",
            "--card",
            c,
            "--keys",
            k,
            "--idempotency-key",
            key,
        ])
    };
    let first = ok(&charge("r1"));
    assert!(
        first.starts_with("load completed: amount_minor=1000 balance_minor=1300"),
        "{first}"
    );
    assert!(ok(&run(&["card", "show", c])).contains("key_version     2"));
    // The next load needs no rotation: fewer round trips than the first.
    let second = ok(&charge("r2"));
    let trips = |out: &str| -> u32 {
        out.split("round_trips=")
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(trips(&second) < trips(&first), "{first} / {second}");
    assert!(second.contains("balance_minor=2300"), "{second}");

    assert!(ok(&run(&["keys", "retire", "--keys", k, "--version", "1"])).contains("retired"));
    drop(server);
}
