//! GTFS-Fares v2: load a feed directory and compile it into a [`crate::table::Table`].
//!
//! [`load_dir`] reads the files of a feed into a [`Feed`]: plain rows, each remembering its
//! 1-based line number, with numbers, dates, times and amounts already parsed (so a malformed
//! value is reported by the loader, with its file, line and field). [`compile`] resolves every id
//! against the files that define it and builds the [`Table`]; an unknown id is reported with the
//! ids that do exist and the closest one.
//!
//! Only the fare-relevant files are read: `agency.txt`, `feed_info.txt`, `stops.txt`,
//! `routes.txt`, `networks.txt`, `route_networks.txt`, `areas.txt`, `stop_areas.txt`,
//! `location_groups.txt`, `location_group_stops.txt`, `calendar.txt`, `calendar_dates.txt`,
//! `timeframes.txt`, `rider_categories.txt`, `fare_media.txt`, `fare_products.txt`,
//! `fare_leg_rules.txt`, `fare_leg_join_rules.txt` and `fare_transfer_rules.txt`. Only `fare_products.txt` and `fare_leg_rules.txt` are required.
//! Columns may come in any order, unknown columns are ignored, values are trimmed and a UTF-8
//! byte-order mark is tolerated.
//!
//! Location groups (`location_groups.txt`, `location_group_stops.txt`) are read and checked as
//! the reference defines them, but priced nowhere: the reference uses them only for on-demand
//! pickup and drop-off (`stop_times.location_group_id`); fare leg rules name areas, and
//! `stop_areas.txt` assigns stops (not location groups) to areas. A fare file naming a location
//! group is an error that says so.
//!
//! Modules by job: `feed` (the rows), `csv` (strict reading, value parsers), `load` (one reader
//! per file), `compile` (one function per file group).

mod archive;
mod compile;
mod csv;
mod feed;
mod load;
mod v1;

use std::path::Path;

pub use archive::{load_zip, load_zip_bounded, load_zip_bytes, MAX_UNZIPPED_BYTES};
pub use compile::compile;
pub use feed::*;

use crate::table::Table;

/// Why a feed could not be loaded or compiled. Every message names the file and, where there is
/// one, the line and field.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GtfsError {
    /// A required file is absent.
    #[error(
        "{file}: missing (a GTFS-Fares v2 feed needs fare_products.txt and fare_leg_rules.txt; a Fares v1 feed, fare_attributes.txt)"
    )]
    MissingFile { file: &'static str },
    /// A file exists but could not be read.
    #[error("{file}: cannot read: {message}")]
    Io { file: &'static str, message: String },
    /// The file is not valid CSV (or not UTF-8) at this line.
    #[error("{file} line {line}: malformed CSV: {message}")]
    Csv {
        file: &'static str,
        line: u64,
        message: String,
    },
    /// The header (line 1) lacks a required column.
    #[error("{file} line 1, field {field}: required column is missing from the header")]
    MissingColumn {
        file: &'static str,
        field: &'static str,
    },
    /// A required value is empty.
    #[error("{file} line {line}, field {field}: required value is empty")]
    Empty {
        file: &'static str,
        line: u64,
        field: &'static str,
    },
    /// A value does not have the expected form.
    #[error("{file} line {line}, field {field}: \"{value}\" is not {expected}")]
    BadValue {
        file: &'static str,
        line: u64,
        field: &'static str,
        value: String,
        expected: &'static str,
    },
    /// A reference to an id no file defines. `hint` lists the known ids and the closest one.
    #[error("{file} line {line}, field {field}: unknown {what} \"{value}\" {hint}")]
    Unknown {
        file: &'static str,
        line: u64,
        field: &'static str,
        what: &'static str,
        value: String,
        hint: String,
    },
    /// Any other inconsistency (duplicate ids, conflicting values, limits).
    #[error("{file} line {line}, field {field}: {message}")]
    Invalid {
        file: &'static str,
        line: u64,
        field: &'static str,
        message: String,
    },
}

type Result<T> = std::result::Result<T, GtfsError>;

pub(crate) const AGENCY: &str = "agency.txt";
pub(crate) const FEED_INFO: &str = "feed_info.txt";
pub(crate) const STOPS: &str = "stops.txt";
pub(crate) const ROUTES: &str = "routes.txt";
pub(crate) const NETWORKS: &str = "networks.txt";
pub(crate) const ROUTE_NETWORKS: &str = "route_networks.txt";
pub(crate) const AREAS: &str = "areas.txt";
pub(crate) const STOP_AREAS: &str = "stop_areas.txt";
pub(crate) const LOCATION_GROUPS: &str = "location_groups.txt";
pub(crate) const LOCATION_GROUP_STOPS: &str = "location_group_stops.txt";
pub(crate) const CALENDAR: &str = "calendar.txt";
pub(crate) const CALENDAR_DATES: &str = "calendar_dates.txt";
pub(crate) const TIMEFRAMES: &str = "timeframes.txt";
pub(crate) const RIDER_CATEGORIES: &str = "rider_categories.txt";
pub(crate) const FARE_MEDIA: &str = "fare_media.txt";
pub(crate) const FARE_PRODUCTS: &str = "fare_products.txt";
pub(crate) const FARE_LEG_RULES: &str = "fare_leg_rules.txt";
pub(crate) const FARE_LEG_JOIN_RULES: &str = "fare_leg_join_rules.txt";
pub(crate) const FARE_TRANSFER_RULES: &str = "fare_transfer_rules.txt";
pub(crate) const FARE_ATTRIBUTES: &str = "fare_attributes.txt";
pub(crate) const FARE_RULES: &str = "fare_rules.txt";

/// Reads the fare-relevant files of the GTFS feed in `dir`.
pub fn load_dir(dir: &Path) -> Result<Feed> {
    load::load_with(|file| csv::CsvFile::read(dir, file))
}

/// [`load_dir`] then [`compile`].
pub fn load_and_compile(dir: &Path) -> Result<Table> {
    compile(&load_dir(dir)?)
}

/// Whether `path` is a feed: a directory or a `.zip` file.
pub fn is_feed(path: &Path) -> bool {
    path.is_dir()
        || path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("zip"))
}

/// A feed directory or `.zip` file, loaded and compiled.
pub fn load_path(path: &Path) -> Result<Table> {
    if path.is_dir() {
        load_and_compile(path)
    } else {
        compile(&load_zip(path)?)
    }
}

#[cfg(test)]
mod tests {
    use super::csv::*;
    use super::load::load_with;
    use super::*;
    use crate::table::{code24, Idx};
    use std::collections::HashMap;

    /// Loads and compiles a feed given as (file name, contents) pairs.
    fn compile_files(files: &[(&'static str, &str)]) -> Result<Table> {
        let feed = load_with(|name| {
            files
                .iter()
                .find(|(f, _)| *f == name)
                .map(|(f, text)| CsvFile::parse(f, text.as_bytes()))
                .transpose()
        })?;
        compile(&feed)
    }

    const PRODUCTS: &str = "fare_product_id,amount,currency\np,1.00,USD\n";
    const LEG_RULES: &str = "fare_product_id\np\n";

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_amount("2.75", 2), Ok(275));
        assert_eq!(parse_amount("2.7", 2), Ok(270));
        assert_eq!(parse_amount("2", 2), Ok(200));
        assert_eq!(parse_amount("0.05", 2), Ok(5));
        assert_eq!(parse_amount(".5", 2), Ok(50));
        assert_eq!(parse_amount("1350", 0), Ok(1350));
        assert_eq!(parse_amount("1.250", 3), Ok(1250));
        assert_eq!(parse_amount("0", 2), Ok(0));
        assert_eq!(parse_amount("-0.00", 2), Ok(0));
        assert_eq!(parse_amount("21474836.47", 2), Ok(i32::MAX));
        assert_eq!(parse_amount("21474836.48", 2), Err(AmountError::TooLarge));
        assert_eq!(
            parse_amount("99999999999999999999999", 0),
            Err(AmountError::TooLarge)
        );
        assert_eq!(parse_amount("2.755", 2), Err(AmountError::TooPrecise(3)));
        assert_eq!(parse_amount("1.5", 0), Err(AmountError::TooPrecise(1)));
        assert_eq!(parse_amount("-1.00", 2), Ok(-100));
        for bad in [
            "", ".", "2.", "2,75", "1e3", "+2", "2.7.5", " 2", "--1", "-", "١٢",
        ] {
            assert_eq!(parse_amount(bad, 2), Err(AmountError::Syntax), "{bad:?}");
        }
    }

    #[test]
    fn times_and_dates_parse() {
        assert_eq!(parse_time("00:00:00"), Some(0));
        assert_eq!(parse_time("6:30:00"), Some(23_400));
        assert_eq!(parse_time("24:00:00"), Some(86_400));
        for bad in [
            "24:00:01",
            "25:00:00",
            "12:60:00",
            "12:00:60",
            "12:00",
            "1200:00:00",
            "a:00:00",
            "12:0:00",
        ] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        assert_eq!(parse_date("19700101"), Some(0));
        assert_eq!(parse_date("19700102"), Some(1));
        assert_eq!(parse_date("19691231"), Some(-1));
        assert_eq!(parse_date("20240229"), Some(19_782));
        for bad in [
            "20230229",
            "2024-02-29",
            "20241301",
            "2024011",
            "+2024011",
            "２０２４０１０１",
        ] {
            assert_eq!(parse_date(bad), None, "{bad}");
        }
    }

    #[test]
    fn quoted_multiline_values_keep_line_numbers() {
        let products = "fare_product_id,fare_product_name,amount,currency\r\n\
                        a,\"Two\r\nlines\",1.00,USD\r\n\
                        \r\n\
                        b,B,1.234,USD\r\n";
        let e = compile_files(&[(FARE_PRODUCTS, products), (FARE_LEG_RULES, LEG_RULES)])
            .expect_err("too many decimals");
        assert_eq!(
            e.to_string(),
            "fare_products.txt line 5, field amount: \"1.234\" has 3 decimals but USD has 2"
        );
    }

    #[test]
    fn line_numbers_with_cr_line_ends_and_csv_errors_after_blank_lines() {
        let products = "fare_product_id,amount,currency\rp,1.00,USD\r\rq,x,USD\r";
        let e = compile_files(&[(FARE_PRODUCTS, products), (FARE_LEG_RULES, LEG_RULES)])
            .expect_err("bad amount");
        assert!(
            e.to_string()
                .starts_with("fare_products.txt line 4, field amount"),
            "{e}"
        );
        let bytes = b"fare_product_id,amount,currency\np,1.00,USD\n\n\nq,\xff,USD\n";
        let e = CsvFile::parse(FARE_PRODUCTS, bytes)
            .err()
            .expect("not UTF-8");
        assert_eq!(
            e.to_string(),
            "fare_products.txt line 5: malformed CSV: not valid UTF-8"
        );
    }

    #[test]
    fn missing_column_and_empty_value_are_named() {
        let e = compile_files(&[
            (FARE_PRODUCTS, "fare_product_id,amount\np,1\n"),
            (FARE_LEG_RULES, LEG_RULES),
        ])
        .expect_err("no currency column");
        assert_eq!(
            e.to_string(),
            "fare_products.txt line 1, field currency: required column is missing from the header"
        );
        let e = compile_files(&[
            (FARE_PRODUCTS, "fare_product_id,amount,currency\np,,USD\n"),
            (FARE_LEG_RULES, LEG_RULES),
        ])
        .expect_err("empty amount");
        assert_eq!(
            e.to_string(),
            "fare_products.txt line 2, field amount: required value is empty"
        );
    }

    #[test]
    fn invalid_utf8_is_a_csv_error() {
        let e = CsvFile::parse(
            FARE_PRODUCTS,
            b"fare_product_id,amount,currency\np,1\xff,USD\n",
        )
        .and_then(|f| f.rows().try_for_each(|r| r.req("amount").map(drop)))
        .expect_err("not UTF-8");
        assert!(
            e.to_string()
                .starts_with("fare_products.txt line 2: malformed CSV"),
            "{e}"
        );
    }

    #[test]
    fn transfer_rule_fields_are_checked() {
        let cases = [
            (
                "fare_transfer_type,transfer_count,from_leg_group_id,to_leg_group_id\n0,0,g,g\n",
                "field transfer_count: \"0\" is not -1",
            ),
            (
                "fare_transfer_type,transfer_count,from_leg_group_id,to_leg_group_id\n0,-2,g,g\n",
                "field transfer_count",
            ),
            (
                "fare_transfer_type,duration_limit\n0,600\n",
                "field duration_limit_type: required because duration_limit is set",
            ),
            (
                "fare_transfer_type,duration_limit_type\n0,1\n",
                "field duration_limit_type: forbidden",
            ),
            (
                "fare_transfer_type,duration_limit,duration_limit_type\n0,600,4\n",
                "field duration_limit_type: \"4\"",
            ),
            ("fare_transfer_type\n3\n", "field fare_transfer_type: \"3\""),
            ("fare_transfer_type\n\n0\n,\n", "compiles"),
            (
                "fare_transfer_type,from_leg_group_id\n0,gg\n",
                "unknown leg group \"gg\" (fare_leg_rules.txt has: g); did you mean \"g\"?",
            ),
        ];
        for (rules, want) in cases {
            let got = compile_files(&[
                (FARE_PRODUCTS, PRODUCTS),
                (FARE_LEG_RULES, "leg_group_id,fare_product_id\ng,p\n"),
                (FARE_TRANSFER_RULES, rules),
            ]);
            match got {
                Ok(t) => assert_eq!(want, "compiles", "{rules}: {t:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(e.starts_with("fare_transfer_rules.txt line "), "{e}");
                    assert!(e.contains(want), "{rules}: {e}");
                }
            }
        }
    }

    #[test]
    fn stops_come_from_stop_areas_without_stops_txt() {
        let t = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, "from_area_id,fare_product_id\nz,p\n"),
            (STOP_AREAS, "stop_id,area_id\ns1,z\ns2,z\ns1,y\n"),
        ])
        .expect("compiles");
        let stops: Vec<(&str, &[Idx])> = t
            .stops
            .iter()
            .map(|s| (s.id.as_str(), s.areas.as_slice()))
            .collect();
        // Area order: z (first seen), y.
        assert_eq!(stops, [("s1", &[0u16, 1][..]), ("s2", &[0u16][..])]);
        assert!(t.areas[0].explicit && !t.areas[1].explicit);
        assert_eq!(t.meta.name, "GTFS feed");
    }

    #[test]
    fn one_default_rider_category_at_most() {
        let e = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, LEG_RULES),
            (
                RIDER_CATEGORIES,
                "rider_category_id,is_default_fare_category\na,1\nb,0\nc,1\n",
            ),
        ])
        .expect_err("two defaults");
        assert_eq!(
            e.to_string(),
            "rider_categories.txt line 4, field is_default_fare_category: a second default rider category (the first is on line 2)"
        );
    }

    #[test]
    fn unknown_stop_in_stop_areas_is_named() {
        let e = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, LEG_RULES),
            (STOPS, "stop_id\nalpha\nbeta\n"),
            (STOP_AREAS, "area_id,stop_id\nz,alpah\n"),
        ])
        .expect_err("unknown stop");
        assert_eq!(
            e.to_string(),
            "stop_areas.txt line 2, field stop_id: unknown stop \"alpah\" (stops.txt has: alpha, beta); did you mean \"alpha\"?"
        );
    }

    #[test]
    fn colliding_stop_codes_name_both_ids() {
        let mut seen = HashMap::new();
        let (a, b) = (0..100_000)
            .map(|i| format!("s{i}"))
            .find_map(|id| {
                seen.insert(code24(&id), id.clone())
                    .map(|other| (other, id))
            })
            .expect("a 24-bit collision among 100k ids");
        let stops = format!("stop_id\n{a}\n{b}\n");
        let e = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, LEG_RULES),
            (STOPS, &stops),
        ])
        .expect_err("collision");
        let e = e.to_string();
        assert!(e.starts_with("stops.txt line 3, field stop_id: "), "{e}");
        assert!(
            e.contains(&format!("\"{a}\"")) && e.contains(&format!("\"{b}\"")),
            "{e}"
        );
    }

    #[test]
    fn location_groups_are_checked_as_the_reference_defines_them() {
        let stops = "stop_id\na\nb\n";
        let err = |files: &[(&'static str, &str)]| {
            let mut all = vec![(FARE_PRODUCTS, PRODUCTS), (FARE_LEG_RULES, LEG_RULES)];
            all.extend_from_slice(files);
            compile_files(&all).unwrap_err().to_string()
        };
        // Loaded and priced nowhere.
        let ok = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, LEG_RULES),
            (STOPS, stops),
            (LOCATION_GROUPS, "location_group_id\ng\n"),
            (
                LOCATION_GROUP_STOPS,
                "location_group_id,stop_id\ng,a\ng,b\n",
            ),
        ]);
        assert!(ok.is_ok(), "{ok:?}");
        let group_g = (LOCATION_GROUPS, "location_group_id\ng\n");
        let refused: [(&[(&'static str, &str)], &str); 8] = [
            // A location group id must not be a stop_id.
            (
                &[(STOPS, stops), (LOCATION_GROUPS, "location_group_id\nb\n")],
                "location_groups.txt line 2, field location_group_id: \"b\" is also a stop_id (stops.txt line 3)",
            ),
            // Nor one of the stops the fare files name when there is no stops.txt.
            (
                &[(STOP_AREAS, "area_id,stop_id\nz,g\n"), group_g],
                "\"g\" is a location group, but stop_areas.txt",
            ),
            // stop_areas.txt assigns stops, not location groups, to areas.
            (
                &[(STOPS, stops), (STOP_AREAS, "area_id,stop_id\nz,g\n"), group_g],
                "stop_areas.txt line 2, field stop_id: \"g\" is a location group",
            ),
            // Ids unique; references resolve; a row once.
            (
                &[(LOCATION_GROUPS, "location_group_id\ng\ng\n")],
                "duplicate location group id \"g\"",
            ),
            (
                &[group_g, (LOCATION_GROUP_STOPS, "location_group_id,stop_id\nh,a\n")],
                "location_group_stops.txt line 2, field location_group_id: unknown location group \"h\"",
            ),
            (
                &[(STOPS, stops), group_g, (LOCATION_GROUP_STOPS, "location_group_id,stop_id\ng,c\n")],
                "location_group_stops.txt line 2, field stop_id: unknown stop \"c\"",
            ),
            (
                &[(STOPS, stops), group_g, (LOCATION_GROUP_STOPS, "location_group_id,stop_id\ng,a\ng,a\n")],
                "line 3, field stop_id: stop \"a\" is already in location group \"g\" (line 2)",
            ),
            (
                &[(LOCATION_GROUP_STOPS, "location_group_id\ng\n")],
                "location_group_stops.txt line 1, field stop_id: required column",
            ),
        ];
        for (files, want) in refused {
            let e = err(files);
            assert!(e.contains(want), "{want}: {e}");
        }
    }

    #[test]
    fn route_network_conflicts_and_duplicates_are_refused() {
        let e = compile_files(&[
            (FARE_PRODUCTS, PRODUCTS),
            (FARE_LEG_RULES, LEG_RULES),
            (ROUTES, "route_id,network_id\nr1,bus\n"),
            (ROUTE_NETWORKS, "route_id,network_id\nr1,rail\n"),
        ])
        .expect_err("two networks");
        assert!(e.to_string().starts_with("route_networks.txt line 2, field network_id: route \"r1\" is already in network \"bus\""), "{e}");
        let e = compile_files(&[
            (
                FARE_PRODUCTS,
                "fare_product_id,amount,currency\np,1.00,USD\np,2.00,USD\n",
            ),
            (FARE_LEG_RULES, LEG_RULES),
        ])
        .expect_err("duplicate price");
        assert!(
            e.to_string()
                .starts_with("fare_products.txt line 3, field fare_product_id: "),
            "{e}"
        );
    }

    proptest::proptest! {
        /// Whatever the files hold, loading and compiling return instead of panicking.
        #[test]
        fn arbitrary_feeds_do_not_panic(
            products in "[a-z_,.0-9\"\n -]{0,80}",
            legs in "[a-z_,.0-9\"\n -]{0,80}",
            transfers in "[a-z_,.0-9\"\n -]{0,80}",
            times in "[a-z_,:0-9\n]{0,60}",
            pick in 0usize..4,
        ) {
            let headers = [
                "fare_product_id,amount,currency,rider_category_id\n",
                "leg_group_id,network_id,from_area_id,fare_product_id,rule_priority,from_timeframe_group_id\n",
                "from_leg_group_id,to_leg_group_id,transfer_count,duration_limit,duration_limit_type,fare_transfer_type,fare_product_id\n",
                "timeframe_group_id,start_time,end_time,service_id\n",
            ];
            let with_header = |i: usize, body: &str| if i == pick { body.to_string() } else { format!("{}{body}", headers[i]) };
            let (p, l, t, f) = (with_header(0, &products), with_header(1, &legs), with_header(2, &transfers), with_header(3, &times));
            let _ = compile_files(&[
                (FARE_PRODUCTS, &p),
                (FARE_LEG_RULES, &l),
                (FARE_TRANSFER_RULES, &t),
                (TIMEFRAMES, &f),
                (STOP_AREAS, "stop_id,area_id\ns,a\n"),
                (CALENDAR_DATES, "service_id,date,exception_type\nx,20250101,1\n"),
            ]);
        }
    }
}
