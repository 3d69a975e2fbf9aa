//! Relay sessions under sustained load: finished sessions never hold a place that a new load
//! needs, a retried last step gets the same final answer, and what is kept is bounded.

use charging::ledger::Ledger;
use charging::load::{LoadConfig, LoadError, LoadRequest, LoadService, Reply};
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::load_service_on;
use tapgate_testkit::fixtures::transit_card;

const NOW: u64 = 1_700_000_000_000;

fn service(dir: &std::path::Path, cfg: LoadConfig) -> (LoadService, SoftwareHsm) {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(3));
    let ledger = Ledger::open(&dir.join("ledger"), 64 << 20).unwrap();
    let (svc, _) = load_service_on(ledger, &keys, dir, cfg);
    svc.register_instrument("alice", "card", "tok_visa", NOW)
        .unwrap();
    (svc, SoftwareHsm::new(&keys).unwrap())
}

fn card(svc: &LoadService, hsm: &SoftwareHsm, n: u16) -> Card {
    let uid = [0x04, 0x51, (n >> 8) as u8, n as u8, 3, 4, 5];
    svc.register_card(&uid, 0, NOW).unwrap();
    transit_card(hsm, uid, 0)
}

/// Alice's load of 5.00 onto `card` with her card token under `key`.
fn req(card: &Card, key: &str) -> LoadRequest {
    LoadRequest {
        uid: card.state().uid,
        amount_minor: 500,
        funding_source: "card".into(),
        instrument: "tok_visa".into(),
        idempotency_key: key.into(),
    }
}

/// Runs one load to its final answer; returns the session id, the last step's seq and the
/// final reply.
fn load(svc: &LoadService, card: &mut Card, key: &str) -> (String, u32, Reply) {
    let mut rng = StdRng::seed_from_u64(5);
    let mut reply = svc.start("alice", req(card, key), NOW).unwrap();
    loop {
        let Reply::Command {
            session_id,
            seq,
            commands,
        } = &reply
        else {
            unreachable!("the loop returns on a final reply");
        };
        let answers: Vec<Vec<u8>> = commands
            .iter()
            .map(|c| card.process(&hex::decode(c).unwrap(), &mut rng).unwrap())
            .collect();
        let next = svc
            .respond("alice", session_id, *seq, &answers, NOW)
            .unwrap();
        if !matches!(next, Reply::Command { .. }) {
            return (session_id.clone(), *seq, next);
        }
        reply = next;
    }
}

#[test]
fn finished_sessions_do_not_count_against_the_limit_and_answer_a_retried_last_step() {
    let dir = tempfile::tempdir().unwrap();
    let (svc, hsm) = service(
        dir.path(),
        LoadConfig {
            max_sessions: 1,
            max_finished_sessions: 2,
            ..LoadConfig::default()
        },
    );
    let mut finished = Vec::new();
    for n in 0..4u16 {
        let mut c = card(&svc, &hsm, n);
        let (id, seq, reply) = load(&svc, &mut c, &format!("k{n}"));
        assert!(matches!(reply, Reply::Completed { .. }), "{reply:?}");
        assert_eq!(c.state().balance_minor, 500);
        // The last step again: the same answer, and the card is not touched.
        let again = svc.respond("alice", &id, seq, &[vec![0x91, 0x00]], NOW);
        assert_eq!(again.unwrap(), reply);
        // Somebody else's session is not theirs to read.
        assert!(matches!(
            svc.respond("mallory", &id, seq, &[vec![0x91, 0x00]], NOW),
            Err(LoadError::NotYours)
        ));
        finished.push((id, seq, reply));
    }
    // Only the two newest finished sessions are kept; an older one is gone, and a retried
    // start with its idempotency key still gets the stored final answer from the ledger.
    let (old_id, old_seq, old_reply) = &finished[0];
    assert!(matches!(
        svc.respond("alice", old_id, *old_seq, &[vec![0x91, 0x00]], NOW),
        Err(LoadError::NoSession(_))
    ));
    // (The same request: card 0's load again.)
    let c0 = card(&svc, &hsm, 0);
    let replay = svc.start("alice", req(&c0, "k0"), NOW).unwrap();
    assert_eq!(&replay, old_reply);
    assert_eq!(c0.state().balance_minor, 0);
    let (new_id, new_seq, _) = &finished[3];
    assert!(svc
        .respond("alice", new_id, *new_seq, &[vec![0x91, 0x00]], NOW)
        .is_ok());
    // Expiry drops finished sessions too.
    assert_eq!(svc.expire_sessions(NOW + 60_000), 2);
    // A session in progress does count: with one open, a second load is refused as busy.
    let c1 = card(&svc, &hsm, 200);
    let open = svc.start("alice", req(&c1, "open"), NOW);
    assert!(matches!(open, Ok(Reply::Command { .. })));
    let busy = svc.start("alice", req(&c0, "second"), NOW);
    assert!(matches!(busy, Err(LoadError::Busy)), "{busy:?}");
}
