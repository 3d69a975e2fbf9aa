//! The journey quote is the lowest total (issue 16): for journeys of up to six legs it equals
//! the brute-force oracle (`fare_rules::oracle`: the minimum over every way of splitting the
//! journey into priced groups the rules allow), on GTFS feeds built to catch a chain kept
//! when a new fare is cheaper, and on the synthetic town; and a validator's tap-by-tap charges
//! add up to that lowest total.

use fare_rules::cases::SimCard;
use fare_rules::engine::{CardView, Engine, Leg, Rider, Tap};
use fare_rules::gtfs::load_and_compile;
use fare_rules::oracle::lowest_total;
use fare_rules::record::TapKind;
use fare_rules::synth::{city_source, CitySize};
use fare_rules::table::NONE;
use proptest::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

const ANY: Rider = Rider {
    category: NONE,
    medium: NONE,
};

fn feed(name: &str) -> Engine {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/gtfs-feeds")
        .join(name);
    Engine::new(load_and_compile(&dir).unwrap_or_else(|e| panic!("{name}: {e}"))).unwrap()
}

fn lowest() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| feed("lowest"))
}

fn transfers() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| feed("transfers"))
}

fn town() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| {
        let src = city_source(CitySize::TOWN);
        Engine::new(fare_rules::source::compile("town.toml", &src).unwrap()).unwrap()
    })
}

/// 2025-03-04 00:00 local (a Tuesday); day 4 of the week offset is 2025-03-08 (Saturday).
const TUESDAY: i64 = 1_741_046_400;

/// A random leg: (route, from stop, to stop, gap before it in minutes, ride minutes).
type Spec = (usize, usize, usize, i64, i64);

fn legs_strategy(max: usize) -> impl Strategy<Value = Vec<Spec>> {
    prop::collection::vec(
        (0usize..64, 0usize..64, 0usize..64, 0i64..100, 1i64..40),
        1..=max,
    )
}

/// Legs on any route between any stops of `e` (GTFS feeds: no chainage).
fn build(e: &Engine, start: i64, spec: &[Spec]) -> Vec<Leg> {
    let t = e.table();
    let mut now = start;
    spec.iter()
        .map(|&(r, a, b, gap, ride)| {
            let route = r % t.routes.len();
            let ch = &t.routes[route].chainage;
            let stop = |x: usize| {
                if ch.is_empty() {
                    (x % t.stops.len()) as u16
                } else {
                    ch[x % ch.len()].0
                }
            };
            now += gap * 60;
            let dep = now;
            now += ride * 60;
            Leg {
                route: route as u16,
                from_stop: stop(a),
                to_stop: stop(b),
                departure_s: dep,
                arrival_s: now,
            }
        })
        .collect()
}

fn check(e: &Engine, legs: &[Leg]) -> Result<(), TestCaseError> {
    let quoted = e.price_journey(ANY, legs).map(|p| p.total_minor);
    let oracle = lowest_total(e, ANY, legs);
    match (quoted, oracle) {
        (Ok(q), Ok(Some(o))) => prop_assert_eq!(q, o, "legs {:?}", legs),
        (Ok(_), Ok(None)) => {}
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        (q, o) => prop_assert!(false, "quote {q:?} but oracle {o:?} for {legs:?}"),
    }
    Ok(())
}

/// Taps in only (these feeds have no tap-out): what validators charge, tap by tap.
fn tap_by_tap(e: &Engine, legs: &[Leg]) -> u64 {
    let mut card = SimCard::default();
    let mut paid = 0u64;
    for l in legs {
        let view = CardView {
            rider: ANY,
            history: &card.history,
            passes: &[],
        };
        let tap = Tap {
            kind: TapKind::In,
            time_s: l.departure_s as u32,
            route: l.route,
            stop: l.from_stop,
        };
        let q = e.quote_tap(&view, &tap).unwrap();
        assert!(!q.repeat);
        paid += u64::from(q.fare_minor);
        card.write(&q.record);
    }
    paid
}

#[test]
fn the_issues_journeys_match_the_oracle_and_the_taps() {
    let e = lowest();
    let (a, b, c) = (
        e.route("tram_a").unwrap(),
        e.route("bus_1").unwrap(),
        e.route("tram_b").unwrap(),
    );
    let s = |x| e.stop(x).unwrap();
    for (day, want) in [(TUESDAY, 360), (TUESDAY + 4 * 86_400, 0)] {
        let at = |m: i64| day + m * 60;
        let legs = [
            Leg {
                route: a,
                from_stop: s("quays"),
                to_stop: s("station"),
                departure_s: at(480),
                arrival_s: at(490),
            },
            Leg {
                route: b,
                from_stop: s("station"),
                to_stop: s("square"),
                departure_s: at(510),
                arrival_s: at(520),
            },
            Leg {
                route: c,
                from_stop: s("square"),
                to_stop: s("airport"),
                departure_s: at(550),
                arrival_s: at(560),
            },
        ];
        assert_eq!(e.price_journey(ANY, &legs).unwrap().total_minor, want);
        assert_eq!(lowest_total(e, ANY, &legs).unwrap(), Some(want));
        assert_eq!(tap_by_tap(e, &legs[..1]), if want == 0 { 0 } else { 180 });
        assert_eq!(tap_by_tap(e, &legs), want);
    }
    // Four legs more than an hour apart: the taps charge 1.80, 1.80, 1.80, then 1.10 (the
    // 24h product, 6.50, is now the lowest total).
    let at = |m: i64| TUESDAY + m * 60;
    let legs: Vec<Leg> = (0..4)
        .map(|i| Leg {
            route: a,
            from_stop: s("quays"),
            to_stop: s("station"),
            departure_s: at(480 + 70 * i),
            arrival_s: at(490 + 70 * i),
        })
        .collect();
    assert_eq!(e.price_journey(ANY, &legs).unwrap().total_minor, 650);
    assert_eq!(tap_by_tap(e, &legs), 650);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_quote_is_the_lowest_split_on_the_lowest_feed(day in 0i64..7, start in 300i64..1300, spec in legs_strategy(6)) {
        let e = lowest();
        check(e, &build(e, TUESDAY + day * 86_400 + start * 60, &spec))?;
    }

    #[test]
    fn the_quote_is_the_lowest_split_on_the_transfers_feed(start in 300i64..1300, spec in legs_strategy(6)) {
        let e = transfers();
        check(e, &build(e, TUESDAY + start * 60, &spec))?;
    }

    #[test]
    fn the_quote_is_the_lowest_split_in_the_town(start in 300i64..1300, spec in legs_strategy(6)) {
        let e = town();
        check(e, &build(e, TUESDAY + start * 60, &spec))?;
    }

    #[test]
    fn taps_add_up_to_the_lowest_total_on_the_lowest_feed(day in 0i64..7, start in 300i64..1300, spec in legs_strategy(6)) {
        let e = lowest();
        let legs = build(e, TUESDAY + day * 86_400 + start * 60, &spec);
        let whole = e.price_journey(ANY, &legs).unwrap().total_minor;
        prop_assert_eq!(tap_by_tap(e, &legs), whole, "legs {:?}", legs);
    }
}
