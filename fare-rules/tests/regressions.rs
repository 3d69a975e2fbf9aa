//! Money defects found in review, each pinned by the scenario that showed it.

use fare_rules::cases::parse_local;
use fare_rules::engine::{CardView, Engine, Rider, Tap};
use fare_rules::record::{TapKind, TripRecord};
use fare_rules::table::NONE;

const HEAD: &str = r#"
[table]
name = "t"
version = 1
currency = "KRW"
effective_from = "2026-01-01"
max_transfers = 8
[media]
card = { default = true }
paper = {}
[networks.metro]
tap_out = { penalty = 2800 }
[[routes]]
id = "M1"
network = "metro"
stops = ["a", "b", "c", "d"]
at = ["0km", "2km", "30km", "32km"]
[products]
base = { price = 1400, by_medium = { paper = 2000 } }
[[fares]]
id = "metro"
network = "metro"
product = "base"
distance = { base = "10km", bands = [{ upto = "50km", every = "5km", add = 100 }] }
[[transfers]]
from = "metro"
to = "metro"
within = "30m"
measured = "last_alighting"
pricing = "distance_combined"
"#;

fn engine(extra: &str) -> Engine {
    let src = format!("{HEAD}{extra}");
    Engine::new(fare_rules::source::compile("t.toml", &src).unwrap_or_else(|e| panic!("{e}")))
        .unwrap()
}

/// Runs taps (route M1) on a card keeping `records` trip records; returns the fares.
fn ride(e: &Engine, records: usize, medium: &str, taps: &[(&str, &str, TapKind)]) -> Vec<u32> {
    let mut history: Vec<TripRecord> = Vec::new();
    let rider = Rider {
        category: NONE,
        medium: e.medium(medium).unwrap(),
    };
    let mut fares = Vec::new();
    for &(at, stop, kind) in taps {
        let tap = Tap {
            kind,
            time_s: parse_local(at).unwrap() as u32,
            route: e.route("M1").unwrap(),
            stop: e.stop(stop).unwrap(),
        };
        let q = e
            .quote_tap(
                &CardView {
                    rider,
                    history: &history,
                    passes: &[],
                },
                &tap,
            )
            .unwrap();
        fares.push(q.fare_minor);
        if !q.repeat {
            history.insert(0, q.record);
            history.truncate(records);
        }
    }
    fares
}

use TapKind::{In, Out};

#[test]
fn a_trip_cap_covers_the_rest_of_a_journey_begun_free() {
    let e = engine("[[caps]]\nperiod = \"day\"\ntrips = 1\n");
    let fares = ride(
        &e,
        7,
        "card",
        &[
            ("2026-12-01T08:00", "a", In),
            ("2026-12-01T08:10", "b", Out),
            ("2026-12-01T10:00", "a", In),
            ("2026-12-01T10:30", "c", Out),
        ],
    );
    assert_eq!(fares, [1400, 0, 0, 0]);
}

#[test]
fn five_legs_on_a_card_with_sixteen_records_stay_one_journey() {
    let e = engine("");
    let mut taps = Vec::new();
    let times = [
        "08:00", "08:05", "08:10", "08:15", "08:20", "08:25", "08:30", "08:35", "08:40", "08:45",
    ];
    let stops = ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"];
    let at: Vec<String> = times.iter().map(|t| format!("2026-12-01T{t}")).collect();
    for (i, (t, s)) in at.iter().zip(stops).enumerate() {
        taps.push((t.as_str(), s, if i % 2 == 0 { In } else { Out }));
    }
    let fares = ride(&e, 16, "card", &taps);
    // 5 legs of 2 km: 10 km in all, one base fare.
    assert_eq!(fares.iter().sum::<u32>(), 1400, "{fares:?}");
}

#[test]
fn a_medium_that_costs_more_is_charged_what_it_costs() {
    let e = engine("");
    assert_eq!(
        ride(&e, 7, "paper", &[("2026-12-01T08:00", "a", In)]),
        [2000]
    );
    assert_eq!(
        ride(&e, 7, "card", &[("2026-12-01T08:00", "a", In)]),
        [1400]
    );
}

#[test]
fn a_late_tap_out_then_a_ride_is_two_journeys() {
    let e = engine("");
    let fares = ride(
        &e,
        7,
        "card",
        &[
            ("2026-12-01T08:00", "a", In),
            ("2026-12-01T13:00", "b", Out),
            ("2026-12-01T13:05", "b", In),
            ("2026-12-01T13:30", "c", Out),
        ],
    );
    // 1400 + (2800 − 1400) for the trip that ran out; then 28 km: 1400 + 400.
    assert_eq!(fares, [1400, 1400, 1400, 400]);
}
