//! Funding-source limits: a per-load limit per source, and a per-day limit per instrument (a card
//! token, a points holder) that a voided load gives back.

use charging::load::{LoadConfig, LoadError, LoadRequest, LoadService, Reply, SourceLimits};
use charging::server::{self, ServerConfig};
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_testkit::charging::{load_service, relay_in_process, Tear};
use tapgate_testkit::fixtures::transit_card;

const DAY: u64 = 86_400_000;

fn req(card: &Card, amount: i32, token: &str, key: &str) -> LoadRequest {
    LoadRequest {
        uid: card.state().uid,
        amount_minor: amount,
        funding_source: "card".into(),
        instrument: token.into(),
        idempotency_key: key.into(),
    }
}

/// Relays a load to its end at `now` (the kit's relay), or pulls the card at command `stop`
/// without delivering it. Returns the last reply and how many commands the card answered.
fn relay(
    svc: &LoadService,
    card: &mut Card,
    reply: Reply,
    mut now: u64,
    stop: Option<usize>,
) -> (Reply, usize) {
    let tear = stop.map(|at| Tear {
        at,
        delivered: false,
    });
    relay_in_process(svc, "alice", card, reply, &mut now, 0, tear).unwrap()
}

fn refused_reason(r: &Reply) -> &str {
    match r {
        Reply::Refused { reason, .. } => reason,
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn per_source_and_per_instrument_limits_hold_and_a_voided_load_gives_its_share_back() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(31));
    let cfg = LoadConfig {
        max_daily_per_instrument_minor: 1_500,
        sources: [(
            "card".to_string(),
            SourceLimits {
                max_load_minor: Some(800),
                max_daily_per_instrument_minor: None,
            },
        )]
        .into(),
        ..LoadConfig::default()
    };
    let (_pg, svc, _) = load_service(dir.path(), &keys, cfg);
    for token in ["tok_a", "tok_b", "tok_c"] {
        svc.register_instrument("alice", "card", token, 0).unwrap();
    }
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let card = |n: u8| {
        let uid = [0x04, 0x33, n, 2, 3, 4, 5];
        svc.register_card(&uid, 0, 1_700_000_000_000).unwrap();
        transit_card(&hsm, uid, 0)
    };
    let mut now = 1_700_000_000_000u64;
    let (mut a, mut b, mut c) = (card(1), card(2), card(3));

    // The card source's per-load limit is tighter than the general one.
    let e = svc
        .start("alice", req(&a, 900, "tok_a", "k0"), now)
        .unwrap_err();
    assert!(
        matches!(&e, LoadError::BadRequest(d) if d.contains("per-load limit of 800 for card")),
        "{e}"
    );

    // One token: 800 + 800 > 1,500 a day, whichever card it loads.
    let r = svc
        .start("alice", req(&a, 800, "tok_a", "k1"), now)
        .unwrap();
    let (done, commands) = relay(&svc, &mut a, r, now, None);
    assert!(matches!(done, Reply::Completed { .. }));
    let r = svc
        .start("alice", req(&b, 800, "tok_a", "k2"), now)
        .unwrap();
    let (refused, _) = relay(&svc, &mut b, r, now, None);
    assert_eq!(refused_reason(&refused), "instrument_daily_limit");
    assert_eq!(b.state().balance_minor, 0);
    // Another token is another instrument.
    let r = svc
        .start("alice", req(&b, 800, "tok_b", "k3"), now)
        .unwrap();
    assert!(matches!(
        relay(&svc, &mut b, r, now, None).0,
        Reply::Completed { .. }
    ));

    // A load torn at its commit (never delivered: the card drops the uncommitted Credit) is
    // voided at the card's next contact and gives its share of the day back: tok_c then
    // loads 700 + 700 within its 1,500.
    let r = svc
        .start("alice", req(&c, 700, "tok_c", "k4"), now)
        .unwrap();
    let (torn, _) = relay(&svc, &mut c, r, now, Some(commands));
    assert!(matches!(torn, Reply::Command { .. }), "{torn:?}");
    assert_eq!(c.state().balance_minor, 0);
    now += 60_000;
    svc.expire_sessions(now);
    for key in ["k5", "k6"] {
        let r = svc.start("alice", req(&c, 700, "tok_c", key), now).unwrap();
        let (done, _) = relay(&svc, &mut c, r, now, None);
        assert!(matches!(done, Reply::Completed { .. }), "{key}: {done:?}");
    }
    assert_eq!(c.state().balance_minor, 1_400);
    let r = svc
        .start("alice", req(&c, 200, "tok_c", "k7"), now)
        .unwrap();
    let (refused, _) = relay(&svc, &mut c, r, now, None);
    assert_eq!(refused_reason(&refused), "instrument_daily_limit");

    // The next day the token's total starts again.
    now += DAY;
    let r = svc
        .start("alice", req(&a, 800, "tok_a", "k8"), now)
        .unwrap();
    assert!(matches!(
        relay(&svc, &mut a, r, now, None).0,
        Reply::Completed { .. }
    ));
    assert_eq!(a.state().balance_minor, 1_600);
}

#[test]
fn a_limit_for_an_unknown_funding_source_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(32));
    let cfg = ServerConfig::from_toml(&format!(
        "data_dir = {:?}\n[limits.sources.crypto]\nmax_load_minor = 100\n",
        dir.path().to_str().unwrap()
    ))
    .unwrap();
    let err = server::build(&cfg, Box::new(SoftwareHsm::new(&keys).unwrap()))
        .err()
        .expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("[limits.sources.crypto]") && text.contains("known: card"),
        "{text}"
    );
}
