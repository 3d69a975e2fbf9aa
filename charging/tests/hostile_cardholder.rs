//! A hostile cardholder against the load service (issue 14 items 1, 8, 10): each attack is tried
//! and shown to do no harm — funding instruments belong to their account, names from requests
//! never reach an internal account, an authorisation never outlives an intent that could not be
//! written, and an Idempotency-Key is bound to the request it was first used for. After each,
//! value is conserved. The same attacks over HTTP and through `tapgate charge` are in
//! tests/hostile_cardholder.rs at the workspace root.

use charging::funding::{FundingError, FundingRequest, FundingSource, PointsProgram};
use charging::ledger::{FundingDay, Ledger};
use charging::load::{LoadConfig, LoadError, LoadRequest, LoadService, Reply};
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::{Arc, Mutex};
use tapgate_testkit::charging::relay_in_process;
use tapgate_testkit::fixtures::transit_card;

const NOW: u64 = 1_700_000_000_000;

/// A card processor that records what it was asked.
#[derive(Default)]
struct Recording {
    calls: Mutex<Vec<String>>,
}

impl FundingSource for Recording {
    fn name(&self) -> &str {
        "card"
    }
    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError> {
        self.calls.lock().unwrap().push("authorise".into());
        Ok(format!("auth-{}", req.reference))
    }
    fn capture(&self, _auth: &str) -> Result<(), FundingError> {
        self.calls.lock().unwrap().push("capture".into());
        Ok(())
    }
    fn void(&self, _auth: &str) -> Result<(), FundingError> {
        self.calls.lock().unwrap().push("void".into());
        Ok(())
    }
    fn refund(&self, _auth: &str, _amount: i64) -> Result<(), FundingError> {
        self.calls.lock().unwrap().push("refund".into());
        Ok(())
    }
}

struct World {
    _dir: tempfile::TempDir,
    ledger: Ledger,
    svc: LoadService,
    miles: Arc<PointsProgram>,
    hsm: SoftwareHsm,
}

fn world(map_size_bytes: usize, card_source: Arc<dyn FundingSource>) -> World {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(14));
    let ledger = Ledger::open(&dir.path().join("ledger"), map_size_bytes).unwrap();
    let miles = Arc::new(
        PointsProgram::new("mileage", ledger.clone(), 1, 1).with_partners(vec!["airline".into()]),
    );
    let svc = LoadService::new(
        ledger.clone(),
        Box::new(SoftwareHsm::new(&keys).unwrap()),
        vec![card_source, miles.clone()],
        LoadConfig::default(),
    );
    World {
        _dir: dir,
        ledger,
        svc,
        miles,
        hsm: SoftwareHsm::new(&keys).unwrap(),
    }
}

fn processor(dir: &tempfile::TempDir) -> Arc<dyn FundingSource> {
    Arc::new(charging::funding::SandboxProcessor::open(&dir.path().join("processor")).unwrap())
}

impl World {
    fn card(&self, n: u8, balance: i32) -> Card {
        let uid = [0x04, 0x14, n, 1, 2, 3, 4];
        self.svc
            .register_card(&uid, i64::from(balance), NOW)
            .unwrap();
        transit_card(&self.hsm, uid, balance)
    }

    fn start(
        &self,
        caller: &str,
        card: &Card,
        amount: i32,
        funding: (&str, &str),
        key: &str,
    ) -> Result<Reply, LoadError> {
        self.svc.start(
            caller,
            LoadRequest {
                uid: card.state().uid,
                amount_minor: amount,
                funding_source: funding.0.into(),
                instrument: funding.1.into(),
                idempotency_key: key.into(),
            },
            NOW,
        )
    }

    /// Relays to the final answer (or the first error): the kit's relay, at one instant.
    fn relay(&self, caller: &str, card: &mut Card, reply: Reply) -> Result<Reply, LoadError> {
        let mut now = NOW;
        relay_in_process(&self.svc, caller, card, reply, &mut now, 0, None).map(|(r, _)| r)
    }

    /// Value is conserved: the ledger's balances sum to zero, no load is left open, and the
    /// card's shadow purse equals the card.
    fn assert_conserved(&self, card: &Card) {
        let r = self.ledger.read().unwrap();
        let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
        assert_eq!(sum, 0, "the ledger's balances sum to zero");
        let uid = card.state().uid;
        assert!(r.open_intents(&uid).unwrap().is_empty());
        assert_eq!(
            r.balance(&charging::ledger::card_account(&uid)).unwrap(),
            i64::from(card.state().balance_minor),
            "the shadow purse agrees with the card"
        );
    }
}

#[test]
fn a_cardholder_cannot_fund_from_another_holders_points() {
    let pdir = tempfile::tempdir().unwrap();
    let w = world(64 << 20, processor(&pdir));
    w.miles
        .earn("airline", "M-ALICE", "alice", 10_000, "flight:1", NOW)
        .unwrap();
    let mut card = w.card(1, 0);
    // Mallory names alice's membership: refused before the card is touched.
    let got = w.start("mallory", &card, 5_000, ("mileage", "M-ALICE"), "m1");
    assert!(
        matches!(got, Err(LoadError::NotYourInstrument { .. })),
        "{got:?}"
    );
    // The programme cannot be talked into linking alice's membership to mallory either.
    assert!(w
        .miles
        .earn("airline", "M-ALICE", "mallory", 1, "flight:2", NOW)
        .is_err());
    assert_eq!(w.miles.balance("M-ALICE").unwrap(), 10_000);
    w.assert_conserved(&card);
    // Alice herself may.
    let r = w
        .start("alice", &card, 5_000, ("mileage", "M-ALICE"), "a1")
        .unwrap();
    let done = w.relay("alice", &mut card, r).unwrap();
    assert!(matches!(done, Reply::Completed { .. }), "{done:?}");
    assert_eq!(w.miles.balance("M-ALICE").unwrap(), 5_000);
    w.assert_conserved(&card);
}

#[test]
fn internal_account_names_cannot_be_named_as_instruments() {
    let pdir = tempfile::tempdir().unwrap();
    let w = world(64 << 20, processor(&pdir));
    w.miles
        .earn("airline", "M-ALICE", "alice", 10_000, "flight:1", NOW)
        .unwrap();
    let mut card = w.card(2, 0);
    // Alice's earlier redemption filled the programme's pool of redeemed points.
    let r = w
        .start("alice", &card, 5_000, ("mileage", "M-ALICE"), "a1")
        .unwrap();
    assert!(matches!(
        w.relay("alice", &mut card, r).unwrap(),
        Reply::Completed { .. }
    ));
    let pool_before = {
        let r = w.ledger.read().unwrap();
        r.balance("pts:mileage:redeemed").unwrap()
    };
    assert_eq!(pool_before, 5_000);
    let long = "x".repeat(65);
    for (i, bad) in [
        "redeemed",
        "issued",
        "held",
        "redeemed:x",
        "held:M-ALICE|load:1",
        "../redeemed",
        "a/b",
        "member:M-ALICE",
        "",
        " ",
        "M-ALICE\n",
        long.as_str(),
    ]
    .into_iter()
    .enumerate()
    {
        for caller in ["alice", "mallory"] {
            let got = w.start(
                caller,
                &card,
                1_000,
                ("mileage", bad),
                &format!("k{i}{caller}"),
            );
            assert!(
                matches!(
                    got,
                    Err(LoadError::BadRequest(_) | LoadError::NotYourInstrument { .. })
                ),
                "{bad:?} by {caller}: {got:?}"
            );
        }
    }
    let r = w.ledger.read().unwrap();
    assert_eq!(
        r.balance("pts:mileage:redeemed").unwrap(),
        pool_before,
        "nothing drawn from the programme's pool"
    );
    assert_eq!(r.balance("funding:mileage").unwrap(), -5_000);
    drop(r);
    w.assert_conserved(&card);
}

#[test]
fn a_card_token_belongs_to_the_account_that_registered_it() {
    let pdir = tempfile::tempdir().unwrap();
    let w = world(64 << 20, processor(&pdir));
    assert!(w
        .svc
        .register_instrument("alice", "card", "tok_alice_visa", NOW)
        .unwrap());
    assert!(!w
        .svc
        .register_instrument("alice", "card", "tok_alice_visa", NOW)
        .unwrap());
    assert!(matches!(
        w.svc
            .register_instrument("mallory", "card", "tok_alice_visa", NOW),
        Err(LoadError::InstrumentTaken(_))
    ));
    // Memberships are linked by the programme, not claimed by holders.
    assert!(matches!(
        w.svc
            .register_instrument("mallory", "mileage", "M-ALICE", NOW),
        Err(LoadError::BadRequest(_))
    ));
    let card = w.card(3, 0);
    let got = w.start("mallory", &card, 500, ("card", "tok_alice_visa"), "k");
    assert!(
        matches!(got, Err(LoadError::NotYourInstrument { .. })),
        "{got:?}"
    );
    // Unregistered tokens are nobody's.
    let got = w.start("mallory", &card, 500, ("card", "tok_visa"), "k2");
    assert!(
        matches!(got, Err(LoadError::NotYourInstrument { .. })),
        "{got:?}"
    );
    w.assert_conserved(&card);
}

#[test]
fn an_authorisation_is_voided_when_the_intent_cannot_be_written() {
    let recording = Arc::new(Recording::default());
    // A ledger with little room, filled up after the card and the token are registered, so
    // the intent is the write that fails (disk or map full).
    let w = world(1 << 20, recording.clone());
    w.svc
        .register_instrument("alice", "card", "tok_visa", NOW)
        .unwrap();
    let mut card = w.card(4, 1_000);
    let mut filler = 0u64;
    for size in [4_000usize, 400, 40, 4] {
        loop {
            filler += 1;
            let reference = format!("{filler}:{}", "f".repeat(size));
            let ok = w.ledger.transact(move |t| {
                t.post(0, "filler:a", "filler:b", 1, &reference)?;
                Ok(())
            });
            if ok.is_err() {
                break;
            }
        }
    }
    // Last, writes shaped like the intent's (a day total and a card record) until one fails.
    for n in 0u32.. {
        let ok = w.ledger.transact(move |t| {
            let tok = format!("tok_fill{n}");
            t.add_funding_day(FundingDay::new("card", &tok, 0), 1)?;
            let mut uid = [0xFF; 7];
            uid[..4].copy_from_slice(&n.to_be_bytes());
            t.issue_card(&uid, 0, "filler", 0).map(drop)
        });
        if ok.is_err() {
            break;
        }
    }
    let r = w
        .start("alice", &card, 500, ("card", "tok_visa"), "k")
        .unwrap();
    let got = w.relay("alice", &mut card, r);
    assert!(
        matches!(got, Err(LoadError::Ledger(_))),
        "the intent write should have failed (the ledger was not full?): {got:?}"
    );
    assert_eq!(
        *recording.calls.lock().unwrap(),
        ["authorise", "void"],
        "the authorisation is released at once"
    );
    assert_eq!(card.state().balance_minor, 1_000, "no Credit was sent");
    w.assert_conserved(&card);
}

#[test]
fn an_idempotency_key_is_bound_to_the_request_it_was_first_used_for() {
    let pdir = tempfile::tempdir().unwrap();
    let w = world(64 << 20, processor(&pdir));
    w.svc
        .register_instrument("alice", "card", "tok_visa", NOW)
        .unwrap();
    w.svc
        .register_instrument("alice", "card", "tok_other", NOW)
        .unwrap();
    let mut card = w.card(5, 0);
    let other = w.card(6, 0);
    let r = w
        .start("alice", &card, 700, ("card", "tok_visa"), "k")
        .unwrap();
    // While the first is in progress: another body under the same key is refused…
    for (c, amount, tok) in [
        (&card, 800, "tok_visa"),
        (&other, 700, "tok_visa"),
        (&card, 700, "tok_other"),
    ] {
        let got = w.start("alice", c, amount, ("card", tok), "k");
        assert!(
            matches!(got, Err(LoadError::IdempotencyKeyReused(_))),
            "{got:?}"
        );
    }
    // …and the same body gets the same answer.
    assert_eq!(
        w.start("alice", &card, 700, ("card", "tok_visa"), "k")
            .unwrap(),
        r
    );
    let done = w.relay("alice", &mut card, r).unwrap();
    assert!(matches!(done, Reply::Completed { .. }), "{done:?}");
    // Once finished: the same again, from the ledger.
    assert_eq!(
        w.start("alice", &card, 700, ("card", "tok_visa"), "k")
            .unwrap(),
        done
    );
    let got = w.start("alice", &card, 900, ("card", "tok_visa"), "k");
    assert!(
        matches!(got, Err(LoadError::IdempotencyKeyReused(_))),
        "{got:?}"
    );
    assert_eq!(card.state().balance_minor, 700, "loaded once");
    w.assert_conserved(&card);
}

#[test]
fn a_voucher_code_never_reaches_postings_authorisations_or_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path(), 16 << 20).unwrap();
    let order = charging::partner::VoucherOrder {
        order_id: "o-1".into(),
        kind: "gift".into(),
        amount_minor: 1_000,
        card_uid: None,
        valid_days: None,
    };
    let v = charging::partner::issue_voucher(&ledger, "mall", 10_000, order, NOW).unwrap();
    let source = charging::partner::VoucherSource::new(ledger.clone(), Arc::new(|| NOW));
    let auth = source
        .authorise(&FundingRequest {
            amount_minor: 1_000,
            reference: "load:04140101020304:1:s",
            instrument: &v.code,
        })
        .unwrap();
    assert!(!auth.contains(&v.code), "{auth}");
    assert_eq!(auth, charging::partner::voucher_id(&v.code));
    source.capture(&auth).unwrap();
    source.capture(&auth).unwrap();
    // Errors name the voucher by hash or its last four characters only.
    let again = source.void(&auth).unwrap_err().to_string();
    assert!(!again.contains(&v.code), "{again}");
    let unknown = source
        .capture("NOPE-NOPE-NOPE-NOPE")
        .unwrap_err()
        .to_string();
    assert!(!unknown.contains("NOPE-NOPE"), "{unknown}");
    let r = ledger.read().unwrap();
    for p in r.postings_with_prefix("").unwrap() {
        assert!(!p.reference.contains(&v.code), "{p:?}");
    }
    assert_eq!(r.balance("vouchers:outstanding").unwrap(), 0);
    let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
    assert_eq!(sum, 0);
}
