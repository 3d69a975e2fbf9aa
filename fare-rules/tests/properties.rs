//! Invariants of the evaluator over random journeys in a synthetic town (proptest): a quote is
//! never negative and never above the legs' separate fares (these rules never say otherwise),
//! tap-by-tap charges add up to the journey's price, caps hold, and bad bytes never panic.

use fare_rules::cases::SimCard;
use fare_rules::engine::{CardView, Engine, Leg, Rider, Tap};
use fare_rules::record::{TapKind, TripRecord};
use fare_rules::synth::{city_source, CitySize};
use fare_rules::table::{CapPeriod, NONE};
use proptest::prelude::*;
use std::sync::OnceLock;

fn town() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let src = city_source(CitySize::TOWN);
        Engine::new(fare_rules::source::compile("town.toml", &src).unwrap()).unwrap()
    })
}

/// 2025-12-01 00:00 local (a Monday).
const DAY0: i64 = 1_764_547_200;

/// A random leg: (route, from position, to position, gap before it in minutes, ride minutes).
fn legs_strategy(max: usize) -> impl Strategy<Value = Vec<(usize, usize, usize, i64, i64)>> {
    prop::collection::vec(
        (0usize..64, 0usize..64, 0usize..64, 0i64..90, 1i64..60),
        1..=max,
    )
}

fn build(e: &Engine, start_min: i64, spec: &[(usize, usize, usize, i64, i64)]) -> Vec<Leg> {
    let t = e.table();
    let mut now = DAY0 + start_min * 60;
    spec.iter()
        .map(|&(r, a, b, gap, ride)| {
            let route = &t.routes[r % t.routes.len()];
            let n = route.chainage.len();
            // Chainage is sorted by stop index; the stops are what matters.
            let from = route.chainage[a % n].0;
            let to = route.chainage[b % n].0;
            now += gap * 60;
            let dep = now;
            now += ride * 60;
            Leg {
                route: (r % t.routes.len()) as u16,
                from_stop: from,
                to_stop: to,
                departure_s: dep,
                arrival_s: now,
            }
        })
        .collect()
}

const ADULT: Rider = Rider {
    category: NONE,
    medium: NONE,
};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn never_negative_and_never_above_separate_fares(start in 300i64..1300, spec in legs_strategy(5)) {
        let e = town();
        let legs = build(e, start, &spec);
        let whole = e.price_journey(ADULT, &legs).unwrap();
        let separate: u64 = legs
            .iter()
            .map(|l| e.price_journey(ADULT, std::slice::from_ref(l)).unwrap().total_minor)
            .sum();
        prop_assert!(whole.total_minor <= separate, "{} > {separate}", whole.total_minor);
        let sum: i64 = whole.legs().iter().map(|l| l.charged_minor).sum();
        prop_assert_eq!(sum, whole.total_minor as i64);
    }

    #[test]
    fn tap_by_tap_charges_add_up_to_the_journey_price(start in 300i64..1300, spec in legs_strategy(3)) {
        let e = town();
        let legs = build(e, start, &spec);
        let mut card = SimCard::default();
        let mut paid = 0u64;
        let mut capped = false;
        for l in &legs {
            for (kind, time, stop) in [(TapKind::In, l.departure_s, l.from_stop), (TapKind::Out, l.arrival_s, l.to_stop)] {
                let view = CardView { rider: ADULT, history: &card.history, passes: &[] };
                let q = e.quote_tap(&view, &Tap { kind, time_s: time as u32, route: l.route, stop }).unwrap();
                prop_assert_eq!(q.penalty_minor, 0);
                capped |= q.cap != NONE;
                paid += u64::from(q.fare_minor);
                card.write(&q.record);
            }
        }
        // What validators charge tap by tap from the card is what the journey costs as a whole
        // (unless a cap lowered it).
        let whole = e.price_journey(ADULT, &legs).unwrap().total_minor;
        if capped {
            prop_assert!(paid <= whole, "tap by tap {paid} > journey {whole}");
        } else {
            prop_assert_eq!(paid, whole);
        }
    }

    #[test]
    fn a_capped_rider_pays_nothing_more(spec in legs_strategy(8), extra in legs_strategy(8)) {
        let e = town();
        let mut card = SimCard::default();
        let mut day_paid = 0u64;
        let cap = e.table().caps.iter().filter(|c| c.period == CapPeriod::Day).map(|c| u64::from(c.amount_minor)).min().unwrap();
        // Many trips in one service day; the second batch may run earlier than the first ended
        // (a validator whose clock is behind the card's newest record).
        let legs: Vec<Leg> = build(e, 300, &spec).into_iter().chain(build(e, 700, &extra)).collect();
        for l in legs {
            for (kind, time, stop) in [(TapKind::In, l.departure_s, l.from_stop), (TapKind::Out, l.arrival_s, l.to_stop)] {
                let view = CardView { rider: ADULT, history: &card.history, passes: &[] };
                let Ok(q) = e.quote_tap(&view, &Tap { kind, time_s: time as u32, route: l.route, stop }) else { continue };
                // The service day of 2026-12-01 runs to 04:00 on the 2nd.
                if time < DAY0 + 28 * 3600 {
                    day_paid += u64::from(q.fare_minor - q.penalty_minor);
                }
                card.write(&q.record);
            }
        }
        prop_assert!(day_paid <= cap, "paid {day_paid} over the day cap {cap}");
    }

    #[test]
    fn arbitrary_record_and_table_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..512)) {
        let mut r = [0u8; 32];
        for (i, x) in b.iter().take(32).enumerate() {
            r[i] = *x;
        }
        let _ = TripRecord::decode(&r);
        let mut t = b.clone();
        if t.len() >= 4 {
            t[..4].copy_from_slice(b"TGFT");
        }
        let _ = fare_rules::signed::decode_unverified(&t);
        let _ = fare_rules::signed::verify(&t, &[1; 32]);
    }

    #[test]
    fn arbitrary_card_histories_never_panic(recs in prop::collection::vec(record_strategy(), 0..8),
                                             stop in 0u16..40, route in 0u16..12, time in 0u32..u32::MAX, kind in 0u8..3) {
        let e = town();
        // Valid records (the town's codes, times near the tap), some of them mutated: every
        // record decodes unless a mutation broke its format or kind byte, so the engine sees
        // real histories, not the empty one random bytes almost always decode to.
        let t = e.table();
        let bytes: Vec<[u8; 32]> = recs.iter().map(|r| r.to_bytes(t, time)).collect();
        let history: Vec<TripRecord> = bytes.iter().filter_map(|r| TripRecord::decode(r).ok()).collect();
        let unmutated = recs.iter().filter(|r| r.mutation.is_none()).count();
        prop_assert!(history.len() >= unmutated, "valid records must decode");
        let kind = [TapKind::In, TapKind::Out, TapKind::Entry][kind as usize];
        let tap = Tap { kind, time_s: time, route: route % t.routes.len() as u16, stop: stop % t.stops.len() as u16 };
        let view = CardView { rider: ADULT, history: &history, passes: &[] };
        if let Ok(q) = e.quote_tap(&view, &tap) {
            prop_assert!(q.fare_minor <= fare_rules::record::U24_MAX);
            prop_assert!(q.penalty_minor <= q.fare_minor);
            if !q.repeat {
                prop_assert_eq!(q.record.fare_minor, q.fare_minor);
                prop_assert!(q.record.time_s >= time.min(history.iter().map(|r| r.time_s).max().unwrap_or(time)));
            }
        }
    }
}

/// A trip record made of valid parts (a kind, the town's stop and route codes, a time near
/// the tap's), then perhaps one byte changed.
#[derive(Clone, Debug)]
struct RecordSpec {
    kind: u8,
    flags: u8,
    transfers: u8,
    /// Seconds before the tap.
    ago_s: u32,
    route: usize,
    stop: usize,
    entry: usize,
    journey_offset_s: u16,
    amounts: [u32; 4],
    day_trips: u8,
    /// (byte, new value).
    mutation: Option<(usize, u8)>,
}

impl RecordSpec {
    fn to_bytes(&self, t: &fare_rules::table::Table, tap_s: u32) -> [u8; 32] {
        let kind =
            [TapKind::Entry, TapKind::In, TapKind::Out, TapKind::Charge][self.kind as usize % 4];
        let r = TripRecord {
            kind: Some(kind),
            flags: self.flags,
            transfers: self.transfers,
            time_s: tap_s.saturating_sub(self.ago_s),
            route_code: t.routes[self.route % t.routes.len()].code,
            stop_code: t.stops[self.stop % t.stops.len()].code,
            entry_stop_code: t.stops[self.entry % t.stops.len()].code,
            journey_offset_s: self.journey_offset_s,
            fare_minor: self.amounts[0],
            journey_paid_minor: self.amounts[1],
            day_paid_minor: self.amounts[2],
            week_paid_minor: self.amounts[3],
            day_trips: self.day_trips,
        };
        let mut b = r.encode();
        if let Some((i, v)) = self.mutation {
            b[i % 32] = v;
        }
        b
    }
}

fn record_strategy() -> impl Strategy<Value = RecordSpec> {
    (
        (0u8..4, 0u8..16, 0u8..6, 0u32..200_000),
        (0usize..4096, 0usize..4096, 0usize..4096, any::<u16>()),
        prop::array::uniform4(0u32..20_000),
        0u8..12,
        prop::option::weighted(0.2, (0usize..32, any::<u8>())),
    )
        .prop_map(
            |(
                (kind, flags, transfers, ago_s),
                (route, stop, entry, journey_offset_s),
                amounts,
                day_trips,
                mutation,
            )| {
                RecordSpec {
                    kind,
                    flags,
                    transfers,
                    ago_s,
                    route,
                    stop,
                    entry,
                    journey_offset_s,
                    amounts,
                    day_trips,
                    mutation,
                }
            },
        )
}
