//! The gates of the day: the metro's validators (rail gates with tap in and out, bus doors, the
//! flat night bus), each the validator crate's `Gate` with a software SAM, the signed
//! metro-city fare table and an LMDB journal; and the Grand Hotel's pay-TV box, a charge gate
//! with the hotel's signed table on the hotel's own topics.

use crate::fleet::Fleet;
use crate::SimError;
use fare_rules::record::TapKind as GateKind;
use fare_rules::table::Table;
use purse::blocklist::Blocklist;
use purse::keys::KeySet;
use purse::sam::{Hsm, SoftwareHsm, SoftwareSam};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;
use validator::gate::{Gate, Placement, Sale};
use validator::journal::Journal;

/// The gates of the day, by validator index (cycled): entries and exits on the metro lines, a
/// bus route with tap-out, the flat night bus.
pub const GATES: [(&str, &str, GateKind); 8] = [
    ("M1", "Central", GateKind::In),
    ("M1", "University", GateKind::Out),
    ("M2", "Old Town", GateKind::In),
    ("M2", "Stadium", GateKind::Out),
    ("B7", "University", GateKind::In),
    ("B7", "Lakeside", GateKind::Out),
    ("N1", "Market", GateKind::Entry),
    ("M1", "Harbor", GateKind::Out),
];

/// 2026-12-01 05:00 in Metro City (UTC+9), unix ms.
pub const DAY0_MS: u64 = 1_796_068_800_000;

/// Metro City's offset from UTC.
const UTC_OFFSET_S: i32 = 9 * 3600;

/// Outbox bound and map size of each validator's journal.
const JOURNAL_CAPACITY_TAPS: u64 = 10_000_000;
const JOURNAL_MAP_BYTES: usize = 1 << 30;

/// The first device id; validator `vi` is device `FIRST_DEVICE + vi`.
pub const FIRST_DEVICE: u32 = 1000;

/// Every gate of the day, by device index; the last one is the hotel's pay-TV box.
pub struct Gates {
    /// The gates.
    pub gates: Vec<Gate>,
    /// Their journals.
    pub journals: Vec<Journal>,
    /// The network of each gate's route (`u16::MAX`: none).
    pub network: Vec<u16>,
    /// What each gate does (in, out, entry, charge).
    pub kind: Vec<GateKind>,
    /// The index of the pay-TV box.
    pub tv: usize,
    /// The metro's fare table.
    pub table: Table,
    /// The hotel's fare table's header (its currency).
    pub hotel_meta: fare_rules::table::Meta,
}

impl Gates {
    /// The metro's gates and the hotel's box, their journals under `dir`.
    pub fn install(
        keys: &KeySet,
        hsm: &SoftwareHsm,
        validators: u32,
        seed: u64,
        dir: &Path,
    ) -> Result<Gates, SimError> {
        let sams: Vec<SoftwareSam> = (0..validators)
            .map(|i| SoftwareSam::validator(keys, FIRST_DEVICE + i))
            .collect::<Result<_, _>>()?;
        let hotel_table = compile_sample(
            "fare-rules/samples/hotel/rules.toml",
            include_str!("../../fare-rules/samples/hotel/rules.toml"),
        )?;
        // The fare table every validator holds: the metro-city sample, signed by the back
        // office, verified by each validator as it would be over MQTT.
        let table = compile_sample(
            "fare-rules/samples/metro-city/rules.toml",
            include_str!("../../fare-rules/samples/metro-city/rules.toml"),
        )?;
        let signed = sign_table(hsm, &table)?;
        let n = sams.len() + 1;
        let mut g = Gates {
            gates: Vec::with_capacity(n),
            journals: Vec::with_capacity(n),
            network: Vec::with_capacity(n),
            kind: Vec::with_capacity(n),
            tv: sams.len(),
            table,
            hotel_meta: hotel_table.meta.clone(),
        };
        for (i, sam) in sams.into_iter().enumerate() {
            let (route, stop, kind) = GATES[i % GATES.len()];
            let engine = fare_rules::signed::verify(&signed, &keys.verifying_key)?;
            let net = engine
                .route(route)
                .map_or(u16::MAX, |r| engine.table().routes[r as usize].network);
            let placement = Placement {
                device_id: FIRST_DEVICE + i as u32,
                operator: "metro".into(),
                stop: stop.into(),
                route: route.into(),
                kind,
                utc_offset_s: UTC_OFFSET_S,
                sale: None,
            };
            let gate = Gate {
                sam,
                engine: Some(engine),
                blocklist: Blocklist::new("metro"),
                placement,
                rng: StdRng::seed_from_u64(seed ^ (i as u64 + 1)),
            };
            g.add(gate, dir, net, kind)?;
        }
        let tv = g.tv_box(keys, hsm, &hotel_table, seed)?;
        g.add(tv, dir, u16::MAX, GateKind::Charge)?;
        Ok(g)
    }

    /// The Grand Hotel's pay-TV box (device `FIRST_DEVICE + tv`), priced by the hotel's signed
    /// table: its sales are the hotel's revenue.
    fn tv_box(
        &self,
        keys: &KeySet,
        hsm: &SoftwareHsm,
        hotel_table: &Table,
        seed: u64,
    ) -> Result<Gate, SimError> {
        let signed = sign_table(hsm, hotel_table)?;
        let placement = Placement {
            device_id: FIRST_DEVICE + self.tv as u32,
            operator: "hotel".into(),
            stop: String::new(),
            route: String::new(),
            kind: GateKind::Charge,
            utc_offset_s: UTC_OFFSET_S,
            sale: Some(Sale {
                charge: "movie".into(),
                items: 1,
                minutes: 0,
            }),
        };
        let engine = fare_rules::signed::verify(&signed, &keys.verifying_key)?;
        placement.check(&engine).map_err(SimError::Setup)?;
        Ok(Gate {
            sam: SoftwareSam::validator(keys, FIRST_DEVICE + self.tv as u32)?,
            engine: Some(engine),
            blocklist: Blocklist::new("metro"),
            placement,
            rng: StdRng::seed_from_u64(seed ^ 0x7e1e),
        })
    }

    fn add(
        &mut self,
        gate: Gate,
        dir: &Path,
        network: u16,
        kind: GateKind,
    ) -> Result<(), SimError> {
        let device = gate.placement.device_id;
        self.journals.push(Journal::open(
            &dir.join(format!("validator-{device}")),
            JOURNAL_CAPACITY_TAPS,
            JOURNAL_MAP_BYTES,
        )?);
        self.gates.push(gate);
        self.network.push(network);
        self.kind.push(kind);
        Ok(())
    }

    /// How many gates (the box included).
    pub fn len(&self) -> usize {
        self.gates.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.gates.is_empty()
    }

    /// Which operator device `vi`'s taps are booked to (its topics and its gateway).
    pub fn operator(&self, vi: usize) -> &'static str {
        if vi == self.tv {
            "hotel"
        } else {
            "metro"
        }
    }

    /// Publishes tap `seq` of gate `vi`'s journal over MQTT; returns the debit it records (0
    /// for others).
    pub fn publish(&self, fleet: &mut Fleet, vi: usize, seq: u64) -> Result<i64, SimError> {
        let (s, wire) = self.journals[vi]
            .outbox_after(seq - 1, 1)?
            .into_iter()
            .next()
            .ok_or_else(|| SimError::Journal("a journalled tap is missing".into()))?;
        if s != seq {
            return Err(SimError::Journal(format!(
                "journal returned tap {s} for {seq}"
            )));
        }
        let amount = crate::taps::debited_minor(&wire);
        fleet.publish(vi, seq, wire)?;
        Ok(amount)
    }
}

/// What a guest buys at the pay-TV box: a film, or a few started hours of sports (capped per
/// TV day by the hotel's table, from the card's own records).
pub fn tv_sale(rng: &mut StdRng) -> Sale {
    if rng.gen_bool(0.5) {
        Sale {
            charge: "movie".into(),
            items: 1,
            minutes: 0,
        }
    } else {
        Sale {
            charge: "sports".into(),
            items: 0,
            minutes: rng.gen_range(30..=240),
        }
    }
}

fn compile_sample(name: &str, text: &str) -> Result<Table, SimError> {
    fare_rules::source::compile(name, text).map_err(|e| SimError::Setup(e.to_string()))
}

/// A fare table signed by the back office, as validators receive it.
pub fn sign_table(hsm: &SoftwareHsm, table: &Table) -> Result<Vec<u8>, SimError> {
    let mut sign_err = None;
    let signed = fare_rules::signed::encode(table, |m| {
        hsm.sign(m).unwrap_or_else(|e| {
            sign_err = Some(e);
            [0; 64]
        })
    })?;
    match sign_err {
        Some(e) => Err(e.into()),
        None => Ok(signed),
    }
}
