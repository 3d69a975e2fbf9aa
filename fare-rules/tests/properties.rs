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
    fn arbitrary_card_histories_never_panic(recs in prop::collection::vec(prop::array::uniform32(any::<u8>()), 0..8),
                                             stop in 0u16..40, route in 0u16..12, time in 0u32..u32::MAX, kind in 0u8..3) {
        let e = town();
        let history: Vec<TripRecord> = recs.iter().filter_map(|r| TripRecord::decode(r).ok()).collect();
        let kind = [TapKind::In, TapKind::Out, TapKind::Entry][kind as usize];
        let t = e.table();
        let tap = Tap { kind, time_s: time, route: route % t.routes.len() as u16, stop: stop % t.stops.len() as u16 };
        let view = CardView { rider: ADULT, history: &history, passes: &[] };
        if let Ok(q) = e.quote_tap(&view, &tap) {
            prop_assert!(q.fare_minor <= fare_rules::record::U24_MAX);
        }
    }
}
