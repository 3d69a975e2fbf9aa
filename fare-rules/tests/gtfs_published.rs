//! GTFS as agencies publish it: Fares v1 feeds (`fare_attributes.txt`, `fare_rules.txt`), feeds
//! carrying both v1 and v2 (v2 wins, as the reference says), zipped feeds (with a bound on what
//! they decompress to), and `fare check` holding a feed only to what the reference forbids.
//! The feeds are in tests/gtfs-feeds (README.md there describes them).

use fare_rules::check::{check_as, Authored, Level};
use fare_rules::engine::Engine;
use fare_rules::gtfs::{self, GtfsError};
use fare_rules::journey::{quote, Journey, JourneyLeg};
use std::io::Write;
use std::path::{Path, PathBuf};

fn feed_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/gtfs-feeds")
        .join(name)
}

fn engine_at(path: &Path) -> Engine {
    let t = gtfs::load_path(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Engine::new(t).unwrap()
}

/// (route, from, to, departure HH:MM, arrival HH:MM) on Tuesday 2025-03-04.
type L<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str);

fn total(e: &Engine, legs: &[L]) -> i64 {
    let j = Journey {
        rider_category_id: None,
        fare_media_id: None,
        legs: legs
            .iter()
            .map(|&(r, a, b, d, x)| JourneyLeg {
                route_id: r.into(),
                from_stop_id: a.into(),
                to_stop_id: b.into(),
                departure: format!("2025-03-04T{d}:00"),
                arrival: format!("2025-03-04T{x}:00"),
            })
            .collect(),
    };
    let q = quote(e, &j).unwrap_or_else(|err| panic!("{err}"));
    let sum: i64 = q.legs.iter().map(|l| l.amount_minor).sum();
    assert_eq!(sum, q.total_minor, "legs add up to the total: {q:?}");
    q.total_minor
}

/// The v1 feed `v1` (Valley Transit, USD). Fares: local_fare 1.50 on route `local`, one
/// transfer within 3600 s; express_fare 4.00 on route `express`, no transfer; zone12 2.25 from
/// zone 1 to 2 or 2 to 1, any route, unlimited transfers within 5400 s; zone13 3.00 for rides
/// passing through exactly zones 1 and 3, no transfer. Stops: A1 and A2 in zone 1, B1 in 2, C1
/// in 3. Each total worked out by hand:
#[test]
fn a_fares_v1_feed_is_priced_as_the_agency_publishes_it() {
    let e = engine_at(&feed_dir("v1"));
    // One local ride inside zone 1: only local_fare matches (zone12 needs 1→2, zone13 needs
    // zones 1 and 3) = 1.50.
    assert_eq!(total(&e, &[("local", "A1", "A2", "08:00", "08:10")]), 150);
    // Back 20 minutes later: the one transfer local_fare allows, within its hour = 1.50.
    let out_and_back = [
        ("local", "A1", "A2", "08:00", "08:10"),
        ("local", "A2", "A1", "08:30", "08:40"),
    ];
    assert_eq!(total(&e, &out_and_back), 150);
    // A third local ride: transfers = 1 is used up, a new local_fare: 1.50 + 1.50 = 3.00.
    let three = [
        out_and_back[0],
        out_and_back[1],
        ("local", "A1", "A2", "08:50", "09:00"),
    ];
    assert_eq!(total(&e, &three), 300);
    // The second ride boards 65 minutes after the first: transfer_duration 3600 s has passed,
    // 1.50 + 1.50 = 3.00.
    let late = [
        ("local", "A1", "A2", "08:00", "08:10"),
        ("local", "A2", "A1", "09:05", "09:15"),
    ];
    assert_eq!(total(&e, &late), 300);
    // Express from zone 1 to zone 3: express_fare 4.00 or zone13 (zones 1 and 3) 3.00 = 3.00.
    assert_eq!(total(&e, &[("express", "A1", "C1", "08:00", "08:40")]), 300);
    // Local from zone 1 to zone 2: local_fare 1.50 or zone12 2.25 = 1.50.
    assert_eq!(total(&e, &[("local", "A1", "B1", "08:00", "08:20")]), 150);
    // Express 1→2 then express 2→1 40 minutes after boarding: express_fare twice is 8.00
    // (no transfer); zone12 then a free transfer onto zone12 (unlimited, 5400 s) = 2.25.
    let zone_trip = [
        ("express", "A1", "B1", "08:00", "08:20"),
        ("express", "B1", "A2", "08:40", "09:00"),
    ];
    assert_eq!(total(&e, &zone_trip), 225);
}

/// `v1-and-v2` is the v2 `flat` feed (one product, 2.75 on network `core`) with the v1 files of
/// `v1` added: the reference says v2 is used and v1 ignored, so route 1 pier → market = 2.75
/// (v1 would not even know route 1).
#[test]
fn a_feed_with_both_fares_v1_and_v2_is_priced_by_v2() {
    let e = engine_at(&feed_dir("v1-and-v2"));
    assert_eq!(total(&e, &[("1", "pier", "market", "08:00", "08:20")]), 275);
}

fn temp_path(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fare-rules-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(format!("{name}.zip"))
}

/// Zips the files of `feed` (under `folder/` when given) into `path`.
fn zip_feed(feed: &str, folder: Option<&str>, path: &Path) {
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default();
    let mut entries: Vec<_> = std::fs::read_dir(feed_dir(feed))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        let name = folder.map_or(name.clone(), |f| format!("{f}/{name}"));
        z.start_file(name, opts).unwrap();
        z.write_all(&std::fs::read(&p).unwrap()).unwrap();
    }
    z.finish().unwrap();
}

#[test]
fn a_zipped_feed_quotes_as_its_directory_does() {
    for (name, folder) in [("root", None), ("folder", Some("valley-gtfs"))] {
        let path = temp_path(&format!("v1-{name}"));
        zip_feed("v1", folder, &path);
        let e = engine_at(&path);
        assert_eq!(total(&e, &[("express", "A1", "C1", "08:00", "08:40")]), 300);
        let t = gtfs::load_path(&path).unwrap();
        assert_eq!(t, gtfs::load_path(&feed_dir("v1")).unwrap(), "{name}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

#[test]
fn a_zip_bomb_is_refused_with_a_clear_error() {
    let path = temp_path("bomb");
    let mut z = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    z.start_file("fare_attributes.txt", opts).unwrap();
    z.write_all(b"fare_id,price,currency_type\n").unwrap();
    // 8 MiB of spaces: a few kilobytes zipped.
    let spaces = vec![b' '; 1 << 20];
    for _ in 0..8 {
        z.write_all(&spaces).unwrap();
    }
    z.finish().unwrap();
    assert!(std::fs::metadata(&path).unwrap().len() < 100_000);
    let e = gtfs::load_zip_bounded(&path, 1 << 20).unwrap_err();
    assert!(
        matches!(&e, GtfsError::Io { file: "fare_attributes.txt", message } if message.contains("decompresses to more than 1048576 bytes")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

#[test]
fn a_file_that_is_not_a_zip_is_a_clear_error() {
    let path = temp_path("notzip");
    std::fs::write(&path, b"stop_id\nA\n").unwrap();
    let e = gtfs::load_path(&path).unwrap_err();
    assert!(e.to_string().starts_with("feed zip: cannot read:"), "{e}");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

fn errors(feed: &str, authored: Authored) -> Vec<String> {
    check_as(&engine_at(&feed_dir(feed)), authored)
        .into_iter()
        .filter(|f| f.level == Level::Error)
        .map(|f| f.to_string())
        .collect()
}

/// A single (2.75) and a day pass (6.00) for the same legs: the reference allows several
/// products for one leg (the rider chooses; tapgate charges the cheapest), so not an error.
#[test]
fn a_single_and_a_day_pass_for_the_same_legs_are_not_an_error() {
    assert_eq!(errors("day-pass", Authored::Gtfs), Vec::<String>::new());
    let e = engine_at(&feed_dir("day-pass"));
    assert_eq!(total(&e, &[("1", "pier", "market", "08:00", "08:20")]), 275);
    // The same rules written as a TOML source would contradict each other.
    assert!(!errors("day-pass", Authored::Source).is_empty());
}

/// A `fare_leg_rules.txt` row repeating another's legs and product repeats the file's primary
/// key, which the reference forbids: an error naming both rows.
#[test]
fn a_repeated_leg_rule_row_is_an_error() {
    let errs = errors("repeated-row", Authored::Gtfs);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].contains("fare_leg_rules.txt:4") && errs[0].contains("fare_leg_rules.txt:2"),
        "{errs:?}"
    );
}

/// `location-groups` is `priority` (2.50 any leg, 4.00 express, 7.50 to `airport_area`) with a
/// location group `airport_shuttle` (downtown and the two airport terminals): the reference
/// defines location groups for on-demand pickup and drop-off only — fare leg rules name areas,
/// and stop_areas.txt puts stops in areas — so the group changes no fare. Downtown is in the
/// group but not in `airport_area`: downtown → midtown stays 2.50.
#[test]
fn location_groups_load_and_price_nothing() {
    let feed = gtfs::load_dir(&feed_dir("location-groups")).unwrap();
    assert_eq!(feed.location_groups.len(), 1);
    assert_eq!(feed.location_groups[0].location_group_id, "airport_shuttle");
    assert_eq!(
        feed.location_groups[0].location_group_name,
        "Airport shuttle pickup points"
    );
    let stops: Vec<_> = feed
        .location_group_stops
        .iter()
        .map(|r| (r.location_group_id.as_str(), r.stop_id.as_str(), r.line))
        .collect();
    assert_eq!(
        stops,
        [
            ("airport_shuttle", "downtown", 2),
            ("airport_shuttle", "airport_t1", 3),
            ("airport_shuttle", "airport_t2", 4)
        ]
    );
    let with = gtfs::load_and_compile(&feed_dir("location-groups")).unwrap();
    assert_eq!(with, gtfs::load_and_compile(&feed_dir("priority")).unwrap());
    let e = engine_at(&feed_dir("location-groups"));
    assert_eq!(
        total(&e, &[("l5", "downtown", "midtown", "08:00", "08:20")]),
        250
    );
    assert_eq!(
        total(&e, &[("x90", "downtown", "midtown", "08:00", "08:20")]),
        400
    );
    assert_eq!(
        total(&e, &[("l5", "downtown", "airport_t1", "08:00", "08:40")]),
        750
    );
    assert_eq!(
        total(&e, &[("l5", "airport_t2", "downtown", "08:00", "08:40")]),
        250
    );
}

/// `bad-location-group-area`: `fare_leg_rules.txt` line 4 names the location group as its
/// `to_area_id`. The reference's fare leg rules name areas only: an error that says what the
/// id is and what the field wants.
#[test]
fn a_fare_leg_rule_naming_a_location_group_is_an_error_that_says_so() {
    let e = gtfs::load_and_compile(&feed_dir("bad-location-group-area")).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with(
            "fare_leg_rules.txt line 4, field to_area_id: \"airport_shuttle\" is a location group"
        ),
        "{msg}"
    );
    assert!(msg.contains("areas.txt, stop_areas.txt"), "{msg}");
}

#[test]
fn an_uploaded_zip_loads_as_the_same_feed_file_does_and_a_signed_table_is_no_upload() {
    let path = temp_path("upload");
    zip_feed("flat", Some("feed"), &path);
    let bytes = std::fs::read(&path).unwrap();
    let (table, authored) = fare_rules::load_bytes("flat.zip", &bytes).unwrap();
    assert_eq!(authored, fare_rules::check::Authored::Gtfs);
    assert_eq!(table, fare_rules::load_any(&path).unwrap());
    // TOML text is source; a signed table is refused (its rules are what is published).
    let src =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("samples/metro-city/rules.toml"))
            .unwrap();
    let (toml_table, authored) = fare_rules::load_bytes("rules.toml", &src).unwrap();
    assert_eq!(authored, fare_rules::check::Authored::Source);
    let signed = fare_rules::signed::encode(&toml_table, |_| [0; 64]).unwrap();
    let err = fare_rules::load_bytes("metro.tgft", &signed).unwrap_err();
    assert!(err.to_string().contains("a signed table"), "{err}");
    // A zip cut short is an error naming the upload, not a panic.
    let err = fare_rules::load_bytes("cut.zip", &bytes[..bytes.len() / 2]).unwrap_err();
    assert!(err.to_string().contains("cut.zip"), "{err}");
}
