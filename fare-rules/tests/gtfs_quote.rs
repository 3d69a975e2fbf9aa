//! Journeys quoted against the GTFS-Fares v2 test feeds (tests/gtfs-feeds/README.md): the
//! reference's matching semantics through the same engine validators run.

use fare_rules::engine::Engine;
use fare_rules::gtfs::load_and_compile;
use fare_rules::journey::{quote, Journey, JourneyLeg, QuoteOut};
use std::path::Path;

fn engine(feed: &str) -> Engine {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/gtfs-feeds")
        .join(feed);
    Engine::new(load_and_compile(&dir).unwrap_or_else(|e| panic!("{feed}: {e}"))).unwrap()
}

/// (route, from, to, departure, arrival) with times "YYYY-MM-DD HH:MM[:SS]".
type L<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);

fn journey(rider: Option<&str>, medium: Option<&str>, legs: &[L]) -> Journey {
    let t = |s: &str| {
        let s = s.replace(' ', "T");
        if s.len() == 16 {
            format!("{s}:00")
        } else {
            s
        }
    };
    Journey {
        rider_category_id: rider.map(str::to_string),
        fare_media_id: medium.map(str::to_string),
        legs: legs
            .iter()
            .map(|&(r, a, b, d, e)| JourneyLeg {
                route_id: r.into(),
                from_stop_id: a.into(),
                to_stop_id: b.into(),
                departure: t(d),
                arrival: t(e),
            })
            .collect(),
    }
}

fn total(e: &Engine, rider: Option<&str>, medium: Option<&str>, legs: &[L]) -> i64 {
    let q: QuoteOut = quote(e, &journey(rider, medium, legs)).unwrap_or_else(|err| panic!("{err}"));
    let sum: i64 = q.legs.iter().map(|l| l.amount_minor).sum();
    assert_eq!(sum, q.total_minor, "legs add up to the total: {q:?}");
    q.total_minor
}

const D: &str = "2025-03-04"; // a Tuesday

fn at(hm: &str) -> String {
    format!("{D} {hm}")
}

#[test]
fn flat_fare() {
    let e = engine("flat");
    let (a, b) = (at("08:00"), at("08:20"));
    assert_eq!(
        total(&e, None, None, &[("1", "pier", "market", &a, &b)]),
        275
    );
    let (c, d) = (at("08:30"), at("08:45"));
    assert_eq!(
        total(
            &e,
            None,
            None,
            &[
                ("1", "pier", "market", &a, &b),
                ("7", "market", "hospital", &c, &d)
            ]
        ),
        550
    );
    let q = quote(&e, &journey(None, None, &[("1", "pier", "market", &a, &b)])).unwrap();
    assert_eq!(q.currency, "USD");
}

#[test]
fn zones_in_yen() {
    let e = engine("zones");
    let (a, b) = (at("08:00"), at("08:20"));
    let z = |f, t| total(&e, None, None, &[("main_line", f, t, &a, &b)]);
    assert_eq!(z("central_p1", "hillside"), 230);
    assert_eq!(z("central_p2", "terminus"), 290);
    assert_eq!(z("riverside", "hillside"), 180);
    assert_eq!(z("terminus", "riverside"), 230);
}

#[test]
fn transfer_types_counts_and_limits() {
    let e = engine("transfers");
    let t = |legs: &[(&str, &str, &str)]| {
        let owned: Vec<(String, String)> = legs.iter().map(|&(_, d, a)| (at(d), at(a))).collect();
        let ls: Vec<L> = legs
            .iter()
            .zip(&owned)
            .map(|(&(r, _, _), (d, a))| (r, "oak_st", "elm_st", d.as_str(), a.as_str()))
            .collect();
        total(&e, None, None, &ls)
    };
    assert_eq!(
        t(&[("b10", "08:00", "08:20"), ("b22", "08:30", "08:50")]),
        200
    );
    assert_eq!(
        t(&[
            ("b10", "08:00", "08:20"),
            ("b22", "09:30", "09:40"),
            ("b10", "09:50", "09:59")
        ]),
        200
    );
    assert_eq!(
        t(&[("b10", "08:00", "08:20"), ("b22", "10:15", "10:30")]),
        400
    );
    // A matching type-1 rule (bus + 0.50 + rail = 5.50) is left unused: two fares cost 5.00.
    assert_eq!(
        t(&[("b10", "08:00", "08:20"), ("r_green", "09:30", "09:50")]),
        500
    );
    assert_eq!(
        t(&[("b10", "08:00", "08:20"), ("r_green", "10:00", "10:20")]),
        500
    );
    assert_eq!(
        t(&[("r_green", "08:00", "08:30"), ("b10", "08:40", "09:00")]),
        500
    );
    assert_eq!(
        t(&[("r_green", "08:00", "08:25"), ("r_green", "08:40", "08:55")]),
        400
    );
    assert_eq!(
        t(&[("r_green", "08:00", "08:25"), ("r_green", "08:40", "09:05")]),
        600
    );
    assert_eq!(
        t(&[
            ("r_green", "08:00", "08:10"),
            ("r_green", "08:15", "08:25"),
            ("r_green", "08:30", "08:40")
        ]),
        700
    );
}

#[test]
fn timeframes_and_calendars() {
    let e = engine("timeframes");
    let t = |d: &str, a: &str| total(&e, None, None, &[("red", "capitol", "gallery", d, a)]);
    assert_eq!(t("2025-03-04 08:00", "2025-03-04 08:20"), 300);
    assert_eq!(t("2025-03-04 09:00", "2025-03-04 10:00"), 300);
    assert_eq!(t("2025-03-04 10:00", "2025-03-04 10:20"), 200);
    assert_eq!(t("2025-03-04 18:59:59", "2025-03-04 19:20"), 300);
    assert_eq!(t("2025-03-04 19:00:00", "2025-03-04 19:20"), 200);
    assert_eq!(t("2025-03-08 08:00", "2025-03-08 08:20"), 200);
    assert_eq!(t("2025-07-04 08:00", "2025-07-04 08:20"), 200);
    let err = quote(
        &e,
        &journey(
            None,
            None,
            &[(
                "red",
                "capitol",
                "gallery",
                "2026-01-06 08:00",
                "2026-01-06 08:20",
            )],
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("leg 1 (route red, capitol → gallery"),
        "{err}"
    );
    assert!(err.contains("no fare leg rule matches it"), "{err}");
}

#[test]
fn rule_priority() {
    let e = engine("priority");
    let (a, b) = (at("08:00"), at("08:30"));
    let t = |r, f, to| total(&e, None, None, &[(r, f, to, &a, &b)]);
    assert_eq!(t("l5", "downtown", "midtown"), 250);
    assert_eq!(t("x90", "downtown", "midtown"), 400);
    assert_eq!(t("l5", "downtown", "airport_t1"), 750);
    assert_eq!(t("x90", "midtown", "airport_t2"), 750);
    assert_eq!(t("l5", "airport_t1", "downtown"), 250);
}

#[test]
fn rider_categories_and_media() {
    let e = engine("riders");
    let (a, b) = (at("08:00"), at("08:20"));
    let t =
        |r: Option<&str>, m: Option<&str>| total(&e, r, m, &[("line1", "union", "king", &a, &b)]);
    assert_eq!(t(Some("adult"), Some("citycard")), 330);
    assert_eq!(t(Some("adult"), Some("cash")), 335);
    assert_eq!(t(Some("adult"), Some("contactless")), 330);
    assert_eq!(t(None, Some("citycard")), 330);
    assert_eq!(t(Some("senior"), Some("cash")), 230);
    assert_eq!(t(Some("youth"), Some("citycard")), 240);
    let legs3 = [
        ("line1", "union", "king", at("08:00"), at("08:20")),
        ("bus29", "king", "college", at("08:45"), at("09:00")),
        ("line1", "college", "union", at("09:50"), at("10:10")),
    ];
    let ls: Vec<L> = legs3
        .iter()
        .map(|(r, f, to, d, a)| (*r, *f, *to, d.as_str(), a.as_str()))
        .collect();
    assert_eq!(total(&e, Some("adult"), Some("citycard"), &ls), 330);
    let ls2 = [
        ("line1", "union", "king", a.as_str(), b.as_str()),
        (
            "bus29",
            "king",
            "college",
            "2025-03-04 10:30",
            "2025-03-04 10:50",
        ),
    ];
    let ls2: Vec<(String, String, String, String, String)> = ls2
        .iter()
        .map(|(r, f, to, d, a)| {
            (
                r.to_string(),
                f.to_string(),
                to.to_string(),
                d.replace(' ', "T"),
                a.replace(' ', "T"),
            )
        })
        .collect();
    let ls2: Vec<L> = ls2
        .iter()
        .map(|(r, f, to, d, a)| (r.as_str(), f.as_str(), to.as_str(), d.as_str(), a.as_str()))
        .collect();
    assert_eq!(total(&e, Some("adult"), Some("citycard"), &ls2), 660);
    // No youth contactless row: a clear error naming the leg and the rider.
    let err = quote(
        &e,
        &journey(
            Some("youth"),
            Some("contactless"),
            &[("line1", "union", "king", &a, &b)],
        ),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("no price for rider category youth with medium contactless"),
        "{err}"
    );
}

#[test]
fn leg_join_rules() {
    let e = engine("join");
    let t = |legs: &[L]| total(&e, None, None, legs);
    assert_eq!(
        t(&[("red", "north", "central_red", &at("08:00"), &at("08:10"))]),
        210
    );
    let q = quote(
        &e,
        &journey(
            None,
            None,
            &[
                ("red", "north", "central_red", &at("08:00"), &at("08:10")),
                ("blue", "central_blue", "east", &at("08:15"), &at("08:30")),
            ],
        ),
    )
    .unwrap();
    assert_eq!(q.total_minor, 340);
    assert_eq!(q.legs.len(), 1, "the two legs are one effective leg");
    assert_eq!(q.legs[0].journey_legs, [0, 1]);
    assert_eq!(
        t(&[
            ("blue", "east", "central_blue", &at("08:00"), &at("08:10")),
            ("red", "central_red", "north", &at("08:15"), &at("08:30")),
        ]),
        340
    );
}

#[test]
fn bad_journeys_say_which_leg_and_why() {
    let e = engine("flat");
    let (a, b) = (at("08:00"), at("08:20"));
    let err = |j: Journey| quote(&e, &j).unwrap_err().to_string();
    assert!(err(journey(None, None, &[])).contains("`legs` is empty"));
    let m = err(journey(None, None, &[("1", "pier", "markt", &a, &b)]));
    assert!(
        m.starts_with("leg 1") && m.contains("did you mean \"market\""),
        "{m}"
    );
    let m = err(journey(None, None, &[("1", "pier", "market", &b, &a)]));
    assert!(m.contains("arrival is before departure"), "{m}");
    let m = err(journey(
        Some("martian"),
        None,
        &[("1", "pier", "market", &a, &b)],
    ));
    assert!(m.contains("rider_category_id \"martian\""), "{m}");
    let m = err(journey(
        None,
        None,
        &[("1", "pier", "market", "2025-03-04 8am", &b)],
    ));
    assert!(m.contains("departure: time"), "{m}");
}

/// The `lowest` feed (issue 16): products `1h` 1.80 and `24h` 6.50, type-2 transfer rules
/// (3,600 s → `1h`, 86,400 s → `24h`, departure to departure), and on Saturdays a
/// higher-priority leg rule that makes every leg free.
fn lowest_legs(day: &str, times: &[&str]) -> Vec<(String, String)> {
    times
        .iter()
        .map(|hm| {
            let (h, m) = hm.split_once(':').unwrap();
            let dep = format!("{day} {h}:{m}");
            let m2: u32 = m.parse::<u32>().unwrap() + 10;
            (dep, format!("{day} {h}:{m2:02}"))
        })
        .collect()
}

fn lowest_total(e: &Engine, day: &str, times: &[&str]) -> i64 {
    let routes = ["tram_a", "bus_1", "tram_b"];
    let stops = ["quays", "station", "square", "airport"];
    let owned = lowest_legs(day, times);
    let ls: Vec<L> = owned
        .iter()
        .enumerate()
        .map(|(i, (d, a))| {
            (
                routes[i % 3],
                stops[i % 4],
                stops[(i + 1) % 4],
                d.as_str(),
                a.as_str(),
            )
        })
        .collect();
    total(e, None, None, &ls)
}

#[test]
fn a_new_ticket_is_bought_when_it_costs_less_than_upgrading_the_chain() {
    let e = engine("lowest");
    // The third leg starts 70 minutes after the first: a new 1h ticket (1.80 + 1.80), not the
    // chain upgraded to the 24h product (6.50).
    assert_eq!(lowest_total(&e, D, &["08:00", "08:30", "09:10"]), 360);
    assert_eq!(lowest_total(&e, D, &["08:00", "08:30"]), 180);
    // Four legs more than an hour apart: four tickets (7.20) cost more than the 24h (6.50).
    assert_eq!(
        lowest_total(&e, D, &["08:00", "09:10", "10:20", "11:30"]),
        650
    );
    // Five legs: [08:00 08:40] [09:20 10:00] [10:40] = 5.40, under the 24h.
    assert_eq!(
        lowest_total(&e, D, &["08:00", "08:40", "09:20", "10:00", "10:40"]),
        540
    );
}

#[test]
fn free_legs_stay_free_when_a_paid_transfer_rule_matches() {
    let e = engine("lowest");
    // Saturday 2025-03-08: the priority-1 rule makes every leg free; the transfer rules'
    // paid products match these legs too, but are left unused.
    assert_eq!(
        lowest_total(&e, "2025-03-08", &["08:00", "08:30", "09:10"]),
        0
    );
    assert_eq!(
        lowest_total(&e, "2025-03-08", &["08:00", "09:10", "10:20", "11:30"]),
        0
    );
}

/// `categories`: products per rider category (the single: adult 2.00, child 1.00, senior 0.80)
/// and one for any category (the airport express, 6.00). A rider is priced as their category,
/// a rider with none as the default (adult); a product with an empty `rider_category_id` is
/// eligible for every category.
#[test]
fn products_are_picked_for_the_rider_category() {
    let e = engine("categories");
    let (a, b) = (at("08:00"), at("08:20"));
    let bus = |r: Option<&str>| total(&e, r, None, &[("b1", "quay", "market", &a, &b)]);
    assert_eq!(bus(Some("adult")), 200);
    assert_eq!(bus(Some("child")), 100);
    assert_eq!(bus(Some("senior")), 80);
    assert_eq!(bus(None), 200);
    let air = |r: Option<&str>| total(&e, r, None, &[("ax", "quay", "airport", &a, &b)]);
    assert_eq!(air(Some("child")), 600);
    assert_eq!(air(None), 600);
}
