//! Key rotation at the next online load (docs/key-rotation.md), with either HSM: a card on the
//! old version is moved in the same relay session after its load is booked; a rotation torn
//! part way leaves the load completed and is finished at the card's next load; a card already
//! on the new version loads with no rotation.

#[macro_use]
mod common;

use charging::funding::{FundingSource, SandboxProcessor};
use charging::ledger::card_account;
use charging::load::{LoadConfig, LoadService, Reply};
use common::HsmKind;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::sync::Arc;
use tapgate_testkit::charging::{load_in_process, Tear};

/// APDUs of a rotation: select and four GetKeyVersion, two authentication frames, ChangeKey 0,
/// two authentication frames, ChangeKey 1, 3, 2.
const REKEY_APDUS: usize = 13;

struct World {
    svc: LoadService,
    soft: SoftwareHsm,
    now_ms: u64,
    _pg: Option<tapgate_testkit::postgres::TestDb>,
    _dir: tempfile::TempDir,
}

impl World {
    fn card(&self, n: u8, version: u8) -> Card {
        let uid = [0x04, 0x77, n, 1, 2, 3, 4];
        self.svc.register_card(&uid, 5_000, self.now_ms).unwrap();
        let mut p = Personalisation::transit(uid, 5_000);
        p.key_version = version;
        Card::personalise(&p, self.soft.card_keys(&uid, version).unwrap())
    }

    fn load(&mut self, card: &mut Card, key: &str, tear: Option<Tear>) -> (Reply, usize) {
        load_in_process(&self.svc, "alice", card, 1_000, key, &mut self.now_ms, tear)
    }

    fn shadow(&self, card: &Card) -> i64 {
        let r = self.svc.ledger().read().unwrap();
        r.balance(&card_account(&card.state().uid)).unwrap()
    }
}

fn world(kind: HsmKind) -> World {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(23);
    let mut keys = KeySet::generate(&mut rng);
    assert_eq!(keys.rotate_card_keys(&mut rng).unwrap(), 2);
    let (ledger, pg) = tapgate_testkit::charging::test_ledger(&dir.path().join("ledger"));
    let processor = Arc::new(SandboxProcessor::open(&dir.path().join("processor")).unwrap());
    let svc = LoadService::new(
        ledger,
        common::hsm(kind, &keys),
        vec![processor as Arc<dyn FundingSource>],
        LoadConfig::default(),
    );
    svc.register_instrument("alice", "card", "tok_visa", 0)
        .unwrap();
    World {
        svc,
        soft: SoftwareHsm::new(&keys).unwrap(),
        now_ms: 1_700_000_000_000,
        _pg: pg,
        _dir: dir,
    }
}

fn completed(r: &Reply) -> bool {
    matches!(
        r,
        Reply::Completed {
            amount_minor: 1_000,
            ..
        }
    )
}

fn cards_move_to_the_new_version_at_their_next_load(kind: HsmKind) {
    let mut w = world(kind);
    // A card already on version 2: a load, no rotation.
    let mut current = w.card(1, 2);
    let (r, load_apdus) = w.load(&mut current, "current", None);
    assert!(completed(&r), "{r:?}");
    assert_eq!(w.svc.stats().keys_rotated, 0);

    // A card on version 1: the load, then the rotation, then the load's answer.
    let mut old = w.card(2, 1);
    let (r, n) = w.load(&mut old, "old", None);
    assert!(completed(&r), "{r:?}");
    assert_eq!(n, load_apdus + REKEY_APDUS);
    assert_eq!(old.state().key_versions(), [2; 4]);
    assert_eq!(w.svc.stats().keys_rotated, 1);
    assert_eq!(w.shadow(&old), i64::from(old.state().balance_minor));
    // Its next load does not rotate it again.
    let (r, n) = w.load(&mut old, "old-again", None);
    assert!(completed(&r), "{r:?}");
    assert_eq!(n, load_apdus);

    // Torn after ChangeKey 0 and 1 reached it: the load is booked all the same, the card
    // holds both versions, and its next load finishes the rotation.
    let mut torn = w.card(3, 1);
    let tear = Tear {
        at: load_apdus + 11,
        delivered: true,
    };
    let (r, _) = w.load(&mut torn, "torn", Some(tear));
    assert!(
        matches!(r, Reply::Command { .. }),
        "the client left mid-rotation: {r:?}"
    );
    assert_eq!(torn.state().key_versions(), [2, 2, 1, 1]);
    assert_eq!(torn.state().balance_minor, 6_000);
    assert_eq!(
        w.shadow(&torn),
        6_000,
        "the load was booked before the rotation"
    );
    assert_eq!(w.svc.stats().keys_rotated, 1);
    let (r, n) = w.load(&mut torn, "torn-next", None);
    assert!(completed(&r), "{r:?}");
    assert!(
        n < load_apdus + REKEY_APDUS,
        "only what was still old is changed"
    );
    assert_eq!(torn.state().key_versions(), [2; 4]);
    assert_eq!(w.svc.stats().keys_rotated, 2);
    assert_eq!(w.shadow(&torn), i64::from(torn.state().balance_minor));
}

both_hsms!(cards_move_to_the_new_version_at_their_next_load);
