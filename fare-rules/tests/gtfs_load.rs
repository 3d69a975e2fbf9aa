//! Loads and compiles the GTFS-Fares v2 feeds under `tests/gtfs-feeds/` and checks the tables
//! they produce (and the errors the malformed ones produce).

use std::path::PathBuf;

use fare_rules::gtfs::{self, GtfsError};
use fare_rules::table::{code24, DurationFrom, Idx, Table, TransferKind, NONE};

fn feed_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/gtfs-feeds")
        .join(name)
}

fn table(name: &str) -> Table {
    match gtfs::load_and_compile(&feed_dir(name)) {
        Ok(t) => {
            assert_indices_in_range(&t);
            t
        }
        Err(e) => panic!("feed {name}: {e}"),
    }
}

/// Every index the compiler wrote points into its vector (or is `NONE` where that is allowed).
fn assert_indices_in_range(t: &Table) {
    let ok = |i: Idx, len: usize, none_ok: bool| (none_ok && i == NONE) || usize::from(i) < len;
    for s in &t.stops {
        assert!(s.areas.iter().all(|&a| ok(a, t.areas.len(), false)));
        assert!(s.areas.windows(2).all(|w| w[0] < w[1]), "{s:?}");
    }
    for r in &t.routes {
        assert!(ok(r.network, t.networks.len(), true));
    }
    for g in &t.timeframes {
        assert!(g
            .spans
            .iter()
            .all(|s| ok(s.service, t.services.len(), true)));
        assert!(g
            .spans
            .iter()
            .all(|s| s.start_s < s.end_s && s.end_s <= 86_400));
    }
    for p in &t.products {
        for price in &p.prices {
            assert!(ok(price.category, t.categories.len(), true));
            assert!(ok(price.medium, t.media.len(), true));
        }
    }
    for r in &t.leg_rules {
        assert!(ok(r.leg_group, t.leg_groups.len(), true));
        assert!(ok(r.network, t.networks.len(), true));
        assert!(ok(r.from_area, t.areas.len(), true) && ok(r.to_area, t.areas.len(), true));
        assert!(ok(r.from_timeframe, t.timeframes.len(), true));
        assert!(ok(r.to_timeframe, t.timeframes.len(), true));
        assert!(ok(r.product, t.products.len(), false));
    }
    for j in &t.join_rules {
        assert!(ok(j.from_network, t.networks.len(), false));
        assert!(ok(j.to_network, t.networks.len(), false));
        assert!(ok(j.from_stop, t.stops.len(), true) && ok(j.to_stop, t.stops.len(), true));
    }
    for r in &t.transfer_rules {
        assert!(ok(r.from_group, t.leg_groups.len(), true));
        assert!(ok(r.to_group, t.leg_groups.len(), true));
        assert!(ok(r.product, t.products.len(), true));
    }
    assert_eq!(t.stop_codes.len(), t.stops.len());
    assert_eq!(t.route_codes.len(), t.routes.len());
    assert!(t.stop_codes.windows(2).all(|w| w[0].0 < w[1].0));
    assert!(t.route_codes.windows(2).all(|w| w[0].0 < w[1].0));
    for &(code, i) in &t.stop_codes {
        assert_eq!(t.stops[usize::from(i)].code, code);
    }
    for &(code, i) in &t.route_codes {
        assert_eq!(t.routes[usize::from(i)].code, code);
    }
}

fn error(name: &str) -> String {
    match gtfs::load_and_compile(&feed_dir(name)) {
        Ok(_) => panic!("feed {name} compiled but should not"),
        Err(e) => e.to_string(),
    }
}

fn idx_of<T>(items: &[T], id: impl Fn(&T) -> &str, want: &str) -> Idx {
    let i = items
        .iter()
        .position(|x| id(x) == want)
        .unwrap_or_else(|| panic!("no {want}"));
    Idx::try_from(i).expect("index fits")
}

fn area(t: &Table, id: &str) -> Idx {
    idx_of(&t.areas, |a| &a.id, id)
}
fn network(t: &Table, id: &str) -> Idx {
    idx_of(&t.networks, |n| &n.id, id)
}
fn product(t: &Table, id: &str) -> Idx {
    idx_of(&t.products, |p| &p.id, id)
}
fn leg_group(t: &Table, id: &str) -> Idx {
    idx_of(&t.leg_groups, |g| &g.id, id)
}
fn stop(t: &Table, id: &str) -> Idx {
    idx_of(&t.stops, |s| &s.id, id)
}
fn category(t: &Table, id: &str) -> Idx {
    idx_of(&t.categories, |c| &c.id, id)
}
fn medium(t: &Table, id: &str) -> Idx {
    idx_of(&t.media, |m| &m.id, id)
}
fn service(t: &Table, id: &str) -> Idx {
    idx_of(&t.services, |s| &s.id, id)
}

fn stop_areas(t: &Table, id: &str) -> Vec<String> {
    t.stops[usize::from(stop(t, id))]
        .areas
        .iter()
        .map(|&a| t.areas[usize::from(a)].id.clone())
        .collect()
}

/// Days since 1970-01-01 of a date.
fn day(y: i32, m: u32, d: u32) -> i32 {
    let date = chrono::NaiveDate::from_ymd_opt(y, m, d).expect("valid date");
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date");
    i32::try_from(date.signed_duration_since(epoch).num_days()).expect("fits")
}

#[test]
fn flat_fare_with_bom_extra_columns_and_reordered_header() {
    let t = table("flat");
    assert_eq!(t.meta.name, "Harbor Bay Transit");
    assert_eq!(t.meta.version, 1);
    assert_eq!(t.meta.currency, "USD");
    assert_eq!(t.meta.currency_exponent, 2);
    assert_eq!(t.meta.effective_from_day, i32::MIN / 2);
    assert_eq!(t.meta.effective_until_day, None);
    assert_eq!(t.meta.max_transfers, 255);
    assert!(!t.meta.priority_mode);

    assert_eq!(t.products.len(), 1);
    let p = &t.products[0];
    assert_eq!(
        (p.id.as_str(), p.name.as_str()),
        ("core_single", "Single ride")
    );
    assert_eq!(p.prices.len(), 1);
    assert_eq!(p.prices[0].amount_minor, 275);
    assert_eq!((p.prices[0].category, p.prices[0].medium), (NONE, NONE));

    assert_eq!(t.networks.len(), 1);
    assert_eq!(t.networks[0].id, "core");
    assert!(t.networks[0].explicit);
    assert_eq!(t.routes.len(), 2);
    assert!(t
        .routes
        .iter()
        .all(|r| r.network == 0 && r.chainage.is_empty()));
    assert_eq!(t.routes[0].code, code24("1"));

    assert_eq!(t.leg_rules.len(), 1);
    let r = &t.leg_rules[0];
    assert_eq!(r.origin, "fare_leg_rules.txt:2");
    assert_eq!(r.network, network(&t, "core"));
    assert_eq!(r.product, product(&t, "core_single"));
    assert_eq!((r.from_area, r.to_area), (NONE, NONE));
    assert_eq!((r.from_timeframe, r.to_timeframe), (NONE, NONE));
    assert_eq!(r.priority, 0);
    // No transfer rule names the leg group.
    assert_eq!(t.leg_groups.len(), 1);
    assert!(!t.leg_groups[0].explicit);
    assert_eq!(r.leg_group, 0);

    // Stop and route codes, sorted by code, pointing back at their entries.
    assert_eq!(t.stops.len(), 3);
    assert_eq!(t.stop_codes.len(), 3);
    assert!(t.stop_codes.windows(2).all(|w| w[0].0 < w[1].0));
    for &(code, i) in &t.stop_codes {
        assert_eq!(t.stops[usize::from(i)].code, code);
        assert_eq!(code, code24(&t.stops[usize::from(i)].id));
    }
    assert!(t.route_codes.windows(2).all(|w| w[0].0 < w[1].0));
    for &(code, i) in &t.route_codes {
        assert_eq!(t.routes[usize::from(i)].code, code);
    }
    assert!(t.caps.is_empty() && t.passes.is_empty());
    assert!(t.charges.is_empty() && t.coupons.is_empty());
}

#[test]
fn flat_feed_rows_keep_their_line_numbers() {
    let feed = gtfs::load_dir(&feed_dir("flat")).expect("loads");
    assert_eq!(feed.fare_products.len(), 1);
    assert_eq!(feed.fare_products[0].line, 2);
    assert_eq!(feed.fare_products[0].currency, "USD");
    assert_eq!(feed.agencies[0].agency_timezone, "America/New_York");
    let stops = feed.stops.as_ref().expect("stops.txt present");
    assert_eq!(stops.iter().map(|s| s.line).collect::<Vec<_>>(), [2, 3, 4]);
    assert!(!feed.has_rule_priority);
    assert!(feed.fare_transfer_rules.is_empty());
}

#[test]
fn zones_in_yen_with_parent_stations_and_boundary_stops() {
    let t = table("zones");
    assert_eq!(t.meta.currency, "JPY");
    assert_eq!(t.meta.currency_exponent, 0);
    let amounts: Vec<(String, i32)> = t
        .products
        .iter()
        .map(|p| (p.id.clone(), p.prices[0].amount_minor))
        .collect();
    assert_eq!(
        amounts,
        [
            ("one_zone".to_string(), 180),
            ("two_zones".to_string(), 230),
            ("three_zones".to_string(), 290)
        ]
    );

    // The station is in zone1, so are its platforms (via parent_station).
    assert_eq!(stop_areas(&t, "central"), ["zone1"]);
    assert_eq!(stop_areas(&t, "central_p1"), ["zone1"]);
    assert_eq!(stop_areas(&t, "central_p2"), ["zone1"]);
    // A boundary stop is in both zones, sorted.
    assert_eq!(stop_areas(&t, "riverside"), ["zone1", "zone2"]);
    let riverside = &t.stops[usize::from(stop(&t, "riverside"))];
    assert!(riverside.areas.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(stop_areas(&t, "terminus"), ["zone3"]);

    assert_eq!(t.areas.len(), 3);
    assert!(t.areas.iter().all(|a| a.explicit));
    assert_eq!(t.leg_rules.len(), 9);
    let r = &t.leg_rules[7];
    assert_eq!(r.origin, "fare_leg_rules.txt:9");
    assert_eq!(
        (r.from_area, r.to_area, r.product),
        (
            area(&t, "zone1"),
            area(&t, "zone3"),
            product(&t, "three_zones")
        )
    );
    assert_eq!(t.routes[0].network, network(&t, "rail"));
}

#[test]
fn transfers_between_leg_groups() {
    let t = table("transfers");
    assert!(!t.meta.priority_mode);
    // Networks from networks.txt, routes from route_networks.txt.
    assert_eq!(t.networks.len(), 2);
    assert!(t.networks.iter().all(|n| n.explicit));
    assert_eq!(t.routes[0].network, network(&t, "bus"));
    assert_eq!(t.routes[2].network, network(&t, "rail"));

    assert_eq!(t.leg_groups.len(), 2);
    assert!(t.leg_groups.iter().all(|g| g.explicit && g.explicit_to));
    let bus = leg_group(&t, "bus_leg");
    let rail = leg_group(&t, "rail_leg");

    assert_eq!(t.transfer_rules.len(), 3);
    let bb = &t.transfer_rules[0];
    assert_eq!(bb.origin, "fare_transfer_rules.txt:2");
    assert_eq!((bb.from_group, bb.to_group), (bus, bus));
    assert_eq!(bb.transfer_count, None); // -1: no limit
    assert_eq!(bb.duration_limit_s, Some(7200));
    assert_eq!(bb.duration_from, DurationFrom::DepartureToDeparture);
    assert_eq!(bb.kind, TransferKind::FromLegPlusTransfer);
    assert_eq!(bb.product, NONE);
    assert_eq!(bb.at_timeframe, NONE);

    let br = &t.transfer_rules[1];
    assert_eq!((br.from_group, br.to_group), (bus, rail));
    assert_eq!(br.transfer_count, None); // empty
    assert_eq!(br.duration_limit_s, Some(5400));
    assert_eq!(br.duration_from, DurationFrom::ArrivalToDeparture);
    assert_eq!(br.kind, TransferKind::FromLegPlusTransferPlusToLeg);
    assert_eq!(br.product, product(&t, "bus_rail_fee"));
    let fee = &t.products[usize::from(br.product)];
    assert_eq!(fee.prices[0].amount_minor, 50);

    let rr = &t.transfer_rules[2];
    assert_eq!((rr.from_group, rr.to_group), (rail, rail));
    assert_eq!(rr.transfer_count, Some(1));
    assert_eq!(rr.duration_limit_s, Some(3600));
    assert_eq!(rr.duration_from, DurationFrom::DepartureToArrival);
    assert_eq!(rr.kind, TransferKind::TransferOnly);
    assert_eq!(
        t.products[usize::from(rr.product)].prices[0].amount_minor,
        400
    );

    let feed = gtfs::load_dir(&feed_dir("transfers")).expect("loads");
    assert_eq!(feed.fare_transfer_rules[0].transfer_count, Some(-1));
    assert_eq!(feed.fare_transfer_rules[1].transfer_count, None);
}

#[test]
fn timeframes_with_calendar_and_exceptions() {
    let t = table("timeframes");
    assert_eq!(t.services.len(), 2);
    let weekdays = &t.services[usize::from(service(&t, "weekdays"))];
    assert_eq!(weekdays.weekdays, 0b001_1111);
    assert_eq!(weekdays.start_day, Some(day(2025, 1, 1)));
    assert_eq!(weekdays.end_day, Some(day(2025, 12, 31)));
    assert_eq!(weekdays.removed, [day(2025, 7, 4), day(2025, 12, 25)]);
    assert!(weekdays.added.is_empty());
    let weekends = &t.services[usize::from(service(&t, "weekends"))];
    assert_eq!(weekends.weekdays, 0b110_0000);
    assert_eq!(weekends.added, [day(2025, 7, 4), day(2025, 12, 25)]);

    assert_eq!(t.timeframes.len(), 2);
    let peak = &t.timeframes[0];
    assert_eq!(peak.id, "peak");
    let spans: Vec<(u32, u32, Idx)> = peak
        .spans
        .iter()
        .map(|s| (s.start_s, s.end_s, s.service))
        .collect();
    let wd = service(&t, "weekdays");
    assert_eq!(spans, [(21_600, 34_200, wd), (54_000, 68_400, wd)]);
    let off = &t.timeframes[1];
    assert_eq!(off.spans.len(), 4);
    assert_eq!((off.spans[2].start_s, off.spans[2].end_s), (68_400, 86_400));
    // Empty start and end: the whole day.
    assert_eq!(
        (
            off.spans[3].start_s,
            off.spans[3].end_s,
            off.spans[3].service
        ),
        (0, 86_400, service(&t, "weekends"))
    );

    assert_eq!(t.leg_rules[0].from_timeframe, 0);
    assert_eq!(t.leg_rules[1].from_timeframe, 1);
    assert_eq!(t.leg_rules[0].to_timeframe, NONE);
    assert_eq!(
        t.products[usize::from(t.leg_rules[0].product)].prices[0].amount_minor,
        300
    );
}

#[test]
fn rule_priority_column_sets_priority_mode() {
    let t = table("priority");
    assert!(t.meta.priority_mode);
    let priorities: Vec<i32> = t.leg_rules.iter().map(|r| r.priority).collect();
    assert_eq!(priorities, [0, 1, 2]);
    assert_eq!(t.leg_rules[0].network, NONE);
    assert_eq!(t.leg_rules[1].network, network(&t, "express"));
    assert_eq!(t.leg_rules[2].to_area, area(&t, "airport_area"));
    // Named by a rule: explicit; the local network is not.
    assert!(t.networks[usize::from(network(&t, "express"))].explicit);
    assert!(!t.networks[usize::from(network(&t, "local"))].explicit);
    // Named in to_area_id only: explicit for the "to" column.
    let airport = &t.areas[usize::from(area(&t, "airport_area"))];
    assert!(airport.explicit_to && !airport.explicit);
    // Terminals are in the airport area through their parent station.
    assert_eq!(stop_areas(&t, "airport_t1"), ["airport_area"]);
    assert_eq!(stop_areas(&t, "airport_t2"), ["airport_area"]);
    assert!(stop_areas(&t, "downtown").is_empty());
    assert_eq!(
        t.products[usize::from(product(&t, "airport"))].prices[0].amount_minor,
        750
    );
}

#[test]
fn rider_categories_media_and_per_category_prices() {
    let t = table("riders");
    assert_eq!(t.meta.currency, "CAD");
    let cats: Vec<(&str, bool, u16)> = t
        .categories
        .iter()
        .map(|c| (c.id.as_str(), c.default, c.surcharge_percent))
        .collect();
    assert_eq!(
        cats,
        [
            ("adult", true, 100),
            ("senior", false, 100),
            ("youth", false, 100)
        ]
    );
    let media: Vec<&str> = t.media.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(media, ["cash", "citycard", "contactless"]);

    let single = &t.products[usize::from(product(&t, "single"))];
    assert_eq!(single.prices.len(), 7);
    let price = |cat: &str, med: &str| {
        let (c, m) = (category(&t, cat), medium(&t, med));
        single
            .prices
            .iter()
            .find(|p| p.category == c && p.medium == m)
            .map(|p| p.amount_minor)
    };
    assert_eq!(price("adult", "citycard"), Some(330));
    assert_eq!(price("adult", "cash"), Some(335));
    assert_eq!(price("senior", "cash"), Some(230));
    assert_eq!(price("youth", "citycard"), Some(240));
    assert_eq!(price("youth", "contactless"), None);

    let day_pass = &t.products[usize::from(product(&t, "day_pass"))];
    assert_eq!(day_pass.name, "Day pass");
    assert_eq!(day_pass.prices.len(), 1);
    assert_eq!(day_pass.prices[0].category, NONE);
    assert_eq!(day_pass.prices[0].medium, medium(&t, "citycard"));
    assert_eq!(day_pass.prices[0].amount_minor, 1350);

    let tr = &t.transfer_rules[0];
    assert_eq!(tr.transfer_count, None);
    assert_eq!(tr.duration_limit_s, Some(7200));
    assert_eq!(tr.kind, TransferKind::FromLegPlusTransfer);
}

#[test]
fn leg_join_rules_at_an_interchange() {
    let t = table("join");
    assert_eq!(t.meta.currency, "GBP");
    assert_eq!(t.meta.effective_from_day, day(2025, 3, 1));
    assert_eq!(t.meta.effective_until_day, Some(day(2026, 3, 1)));
    assert_eq!(t.join_rules.len(), 2);
    let metro = network(&t, "metro");
    let j = &t.join_rules[0];
    assert_eq!((j.from_network, j.to_network), (metro, metro));
    assert_eq!(
        (j.from_stop, j.to_stop),
        (stop(&t, "central_red"), stop(&t, "central_blue"))
    );
    assert_eq!(t.join_rules[1].from_stop, stop(&t, "central_blue"));
    assert_eq!(stop_areas(&t, "central_red"), ["inner"]);
    assert_eq!(stop_areas(&t, "east"), ["outer"]);
    assert_eq!(
        t.products[usize::from(product(&t, "metro_2z"))].prices[0].amount_minor,
        340
    );
}

#[test]
fn bad_amount_names_file_line_and_field() {
    let e = error("bad-amount");
    assert_eq!(
        e,
        "fare_products.txt line 3, field amount: \"2,75\" is not a decimal amount, e.g. \"2.75\""
    );
}

#[test]
fn unknown_area_names_file_line_field_and_known_areas() {
    let e = error("bad-area");
    assert!(
        e.starts_with(
            "fare_leg_rules.txt line 7, field from_area_id: unknown area \"zone9\" (areas.txt has: zone1, zone2)"
        ),
        "{e}"
    );
    assert!(e.contains("did you mean \"zone1\"?"), "{e}");
}

#[test]
fn missing_fare_products_is_named() {
    let e = error("bad-missing-products");
    assert_eq!(
        e,
        "fare_products.txt: missing (a GTFS-Fares v2 feed needs fare_products.txt and fare_leg_rules.txt; a Fares v1 feed, fare_attributes.txt)"
    );
    match gtfs::load_dir(&feed_dir("bad-missing-products")) {
        Err(GtfsError::MissingFile { file }) => assert_eq!(file, "fare_products.txt"),
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn transfer_count_between_different_groups_is_refused() {
    let e = error("bad-transfer-count");
    assert!(
        e.starts_with("fare_transfer_rules.txt line 3, field transfer_count: "),
        "{e}"
    );
    assert!(e.contains("bus_leg") && e.contains("rail_leg"), "{e}");
}

#[test]
fn unknown_timeframe_service_is_named() {
    let e = error("bad-timeframe-service");
    assert!(
        e.starts_with("timeframes.txt line 4, field service_id: unknown service \"weekend\""),
        "{e}"
    );
    assert!(e.contains("did you mean \"weekends\"?"), "{e}");
}

#[test]
fn mixed_currencies_are_refused() {
    let e = error("bad-mixed-currency");
    assert!(
        e.starts_with(
            "fare_products.txt line 3, field currency: currency CHF differs from EUR on line 2"
        ),
        "{e}"
    );
}

#[test]
fn a_missing_directory_reports_the_required_file() {
    let e = error("no-such-feed");
    assert!(e.starts_with("fare_products.txt: missing"), "{e}");
}

/// A copy of feed `name` in a fresh directory, with `line` appended to each `(file, line)`.
fn feed_with(name: &str, tag: &str, appended: &[(&str, &str)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tg-gtfs-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(feed_dir(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    for (file, line) in appended {
        let mut text = std::fs::read_to_string(dir.join(file)).unwrap();
        text.push_str(line);
        text.push('\n');
        std::fs::write(dir.join(file), text).unwrap();
    }
    dir
}

#[test]
fn networks_and_areas_are_defined_once_and_may_be_named_only_elsewhere() {
    let compile = |tag, appended: &[(&str, &str)]| {
        let dir = feed_with(
            if tag == "area" || tag == "named-area" {
                "zones"
            } else {
                "transfers"
            },
            tag,
            appended,
        );
        let out = gtfs::load_and_compile(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        out
    };
    let e = compile("network", &[("networks.txt", "bus,Another bus")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "networks.txt line 4, field network_id: duplicate network id \"bus\""
    );
    let e = compile("area", &[("areas.txt", "zone2,Zone 2 again")]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "areas.txt line 5, field area_id: duplicate area id \"zone2\""
    );
    // Named in stop_areas.txt (or route_networks.txt) alone: an id all the same.
    let t = compile("named-area", &[("stop_areas.txt", "zone9,central")]).unwrap();
    assert!(stop_areas(&t, "central").contains(&"zone9".to_string()));
    let t = compile(
        "named-network",
        &[("routes.txt", "t1,T1,0"), ("route_networks.txt", "tram,t1")],
    )
    .unwrap();
    assert_eq!(t.networks.len(), 3, "{:?}", t.networks);
    assert_eq!(usize::from(network(&t, "tram")), 2);
}
