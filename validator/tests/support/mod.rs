//! What the gate's tests share: a key set with its software HSM and a personalised card, the
//! metro sample's fare engine, and a gate placed on the metro's route M1.

#![allow(dead_code)] // each test binary uses its own part

use fare_rules::engine::Engine;
use fare_rules::record::TapKind;
use purse::blocklist::Blocklist;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::{SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::SeedableRng;
use validator::gate::{Gate, Placement};

/// The card of the tests.
pub const UID: [u8; 7] = [0x04, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66];
/// Its balance when personalised.
pub const START_MINOR: i32 = 10_000;
/// 2026-12-01 08:00 in Metro City (UTC+9) as unix ms.
pub const T0_MS: u64 = 1_796_079_600_000;

/// A key set, its software HSM, the card [`UID`] personalised under it, and the card's random
/// numbers.
pub struct Rig {
    pub keys: KeySet,
    pub hsm: SoftwareHsm,
    pub card: Card,
    pub card_rng: StdRng,
}

impl Rig {
    /// The keys drawn from `seed`, the card's random numbers from `seed + 1`.
    pub fn new(seed: u64) -> Rig {
        let mut rng = StdRng::seed_from_u64(seed);
        let keys = KeySet::generate(&mut rng);
        let hsm = SoftwareHsm::new(&keys).unwrap();
        let card = personalise(&hsm, UID);
        Rig {
            keys,
            hsm,
            card,
            card_rng: StdRng::seed_from_u64(seed + 1),
        }
    }
}

/// A transit card `uid` with [`START_MINOR`], on card key version 1.
pub fn personalise(hsm: &SoftwareHsm, uid: [u8; 7]) -> Card {
    Card::personalise(
        &Personalisation::transit(uid, START_MINOR),
        hsm.card_keys(&uid, 1).unwrap(),
    )
}

/// The metro sample's fare engine.
pub fn metro_engine() -> Engine {
    let src = include_str!("../../../fare-rules/samples/metro-city/rules.toml");
    Engine::new(fare_rules::source::compile("rules.toml", src).unwrap()).unwrap()
}

/// Device `device_id`'s gate with `sam` at `stop` on the metro's route M1 as a `kind`
/// validator (Korean time): the metro engine, an empty blocklist, random numbers from
/// `rng_seed`.
pub fn metro_gate(
    sam: SoftwareSam,
    device_id: u32,
    stop: &str,
    kind: TapKind,
    rng_seed: u64,
) -> Gate {
    let gate = downlink_gate(sam, device_id, rng_seed);
    Gate {
        engine: Some(metro_engine()),
        placement: Placement {
            stop: stop.into(),
            kind,
            utc_offset_s: 9 * 3600,
            ..gate.placement
        },
        ..gate
    }
}

/// Device `device_id`'s gate with `sam` at Central on the metro's route M1 as an entry
/// validator (UTC), with no fare table and an empty blocklist, random numbers from
/// `rng_seed`: what the downlink tests apply lists to.
pub fn downlink_gate(sam: SoftwareSam, device_id: u32, rng_seed: u64) -> Gate {
    Gate {
        sam,
        engine: None,
        blocklist: Blocklist::new("metro"),
        placement: Placement {
            device_id,
            operator: "metro".into(),
            stop: "Central".into(),
            route: "M1".into(),
            kind: TapKind::In,
            utc_offset_s: 0,
            sale: None,
        },
        rng: StdRng::seed_from_u64(rng_seed),
    }
}
