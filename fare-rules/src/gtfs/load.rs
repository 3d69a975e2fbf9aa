//! Loading a feed: one function per file, each reading its rows into the [`Feed`].

use super::csv::{parse_amount, AmountError, CsvFile, Row};
use super::*;
use crate::table::currency_exponent;

/// Loads a feed whose files `open` returns (`None`: absent): the required files first, then
/// each file in the order the reference lists them. A feed with Fares v2 files is read as v2
/// (its `fare_attributes.txt` and `fare_rules.txt` are ignored, as the reference says);
/// without them, `fare_attributes.txt` makes it a Fares v1 feed.
pub(super) fn load_with(open: impl Fn(&'static str) -> Result<Option<CsvFile>>) -> Result<Feed> {
    let mut feed = Feed::default();
    let required = |file: &'static str| -> Result<CsvFile> {
        open(file)?.ok_or(GtfsError::MissingFile { file })
    };
    let Some(products) = open(FARE_PRODUCTS)? else {
        if let Some(attributes) = open(FARE_ATTRIBUTES)? {
            if open(FARE_LEG_RULES)?.is_none() {
                return load_v1(&open, &attributes);
            }
        }
        return Err(GtfsError::MissingFile {
            file: FARE_PRODUCTS,
        });
    };
    let leg_rules = required(FARE_LEG_RULES)?;
    read_present(&open, &BEFORE_PRODUCTS, &mut feed)?;
    fare_products(&products, &mut feed)?;
    fare_leg_rules(&leg_rules, &mut feed)?;
    read_present(&open, &AFTER_LEG_RULES, &mut feed)?;
    Ok(feed)
}

/// Reads each of `files` the feed has, in order, into `feed` (an absent one is skipped).
fn read_present(
    open: &impl Fn(&'static str) -> Result<Option<CsvFile>>,
    files: &[(&'static str, Reader)],
    feed: &mut Feed,
) -> Result<()> {
    for (file, read) in files {
        if let Some(f) = open(file)? {
            read(&f, feed)?;
        }
    }
    Ok(())
}

/// A Fares v1 feed: agency, feed info, stops (with their zones), routes and the two v1 files.
fn load_v1(
    open: &impl Fn(&'static str) -> Result<Option<CsvFile>>,
    attributes: &CsvFile,
) -> Result<Feed> {
    let mut feed = Feed::default();
    read_present(open, &BEFORE_PRODUCTS[..4], &mut feed)?;
    fare_attributes(attributes, &mut feed)?;
    read_present(open, &[(FARE_RULES, fare_rules)], &mut feed)?;
    Ok(feed)
}

/// `fare_attributes.txt` (Fares v1).
fn fare_attributes(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    feed.fare_attributes = f.read_rows(&["fare_id", "price", "currency_type"], |r| {
        let (amount_minor, currency) = amount(r, "price", "currency_type")?;
        r.enumeration(
            "payment_method",
            1,
            Some(0),
            "0 (on board) or 1 (before boarding)",
        )?;
        let transfers = match r.get("transfers") {
            "" => None,
            _ => Some(r.enumeration("transfers", 2, None, "0, 1, 2 or empty (unlimited)")?),
        };
        Ok(FareAttributeRow {
            line: r.line,
            fare_id: r.req("fare_id")?,
            amount_minor,
            currency,
            transfers,
            transfer_duration: r.int::<u32>("transfer_duration", "a number of seconds")?,
        })
    })?;
    Ok(())
}

/// An exact amount in the minor units of its ISO 4217 currency, with the currency.
fn amount(
    r: &Row,
    amount_field: &'static str,
    currency_field: &'static str,
) -> Result<(i32, String)> {
    let currency = r.req(currency_field)?;
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(r.bad(currency_field, "an ISO 4217 currency code, e.g. \"USD\""));
    }
    let exponent = currency_exponent(&currency);
    let amount = r.req(amount_field)?;
    let minor = parse_amount(&amount, exponent).map_err(|e| match e {
        AmountError::Syntax => r.bad(amount_field, "a decimal amount, e.g. \"2.75\""),
        AmountError::TooPrecise(n) => r.invalid(
            amount_field,
            format!("\"{amount}\" has {n} decimals but {currency} has {exponent}"),
        ),
        AmountError::TooLarge => r.invalid(amount_field, format!("\"{amount}\" is too large")),
    })?;
    Ok((minor, currency))
}

/// Reads one file's rows into the feed.
type Reader = fn(&CsvFile, &mut Feed) -> Result<()>;

const BEFORE_PRODUCTS: [(&str, Reader); 15] = [
    (AGENCY, agency),
    (FEED_INFO, feed_info),
    (STOPS, stops),
    (ROUTES, routes),
    (NETWORKS, networks),
    (ROUTE_NETWORKS, route_networks),
    (AREAS, areas),
    (STOP_AREAS, stop_areas),
    (LOCATION_GROUPS, location_groups),
    (LOCATION_GROUP_STOPS, location_group_stops),
    (CALENDAR, calendar),
    (CALENDAR_DATES, calendar_dates),
    (TIMEFRAMES, timeframes),
    (RIDER_CATEGORIES, rider_categories),
    (FARE_MEDIA, fare_media),
];

const AFTER_LEG_RULES: [(&str, Reader); 2] = [
    (FARE_LEG_JOIN_RULES, fare_leg_join_rules),
    (FARE_TRANSFER_RULES, fare_transfer_rules),
];

/// `feed_info.txt`.
fn feed_info(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    if let Some(r) = f.rows().next() {
        feed.feed_info = Some(FeedInfoRow {
            line: r.line,
            feed_start_date: r.date("feed_start_date")?,
            feed_end_date: r.date("feed_end_date")?,
        });
    }
    Ok(())
}

/// `stops.txt`.
fn stops(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    let rows = f.read_rows(&["stop_id"], |r| {
        Ok(StopRow {
            line: r.line,
            stop_id: r.req("stop_id")?,
            parent_station: r.s("parent_station"),
            zone_id: r.s("zone_id"),
        })
    })?;
    feed.stops = Some(rows);
    Ok(())
}

/// `routes.txt`.
fn routes(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    let rows = f.read_rows(&["route_id"], |r| {
        Ok(RouteRow {
            line: r.line,
            route_id: r.req("route_id")?,
            network_id: r.s("network_id"),
        })
    })?;
    feed.routes = Some(rows);
    Ok(())
}

/// Loaders of files whose rows are only text, one a file: `reader => field: Row [required
/// columns] { row field: req (must not be empty) or s (may be), … }`, the fields read in the
/// order given; each loader reads its file's rows into `feed.field`.
macro_rules! text_files {
    ($($(#[$doc:meta])* $fn:ident => $into:ident: $row:ident [$($col:literal),*]
        { $($field:ident: $how:ident),* })*) => {$(
        $(#[$doc])*
        fn $fn(f: &CsvFile, feed: &mut Feed) -> Result<()> {
            feed.$into = f.read_rows(&[$($col),*], |r| {
                Ok($row { line: r.line, $($field: text_files!(@get r, $how, $field)),* })
            })?;
            Ok(())
        }
    )*};
    (@get $r:ident, req, $field:ident) => { $r.req(stringify!($field))? };
    (@get $r:ident, s, $field:ident) => { $r.s(stringify!($field)) };
}

text_files! {
    /// `fare_rules.txt` (Fares v1).
    fare_rules => fare_rules: FareRuleRow ["fare_id"] {
        fare_id: req, route_id: s, origin_id: s, destination_id: s, contains_id: s
    }
    /// `agency.txt`.
    agency => agencies: AgencyRow [] { agency_id: s, agency_name: s, agency_timezone: s }
    /// `networks.txt`.
    networks => networks: NetworkRow ["network_id"] { network_id: req, network_name: s }
    /// `route_networks.txt`.
    route_networks => route_networks: RouteNetworkRow ["network_id", "route_id"]
        { route_id: req, network_id: req }
    /// `areas.txt`.
    areas => areas: AreaRow ["area_id"] { area_id: req, area_name: s }
    /// `stop_areas.txt`.
    stop_areas => stop_areas: StopAreaRow ["area_id", "stop_id"] { area_id: req, stop_id: req }
    /// `location_groups.txt`.
    location_groups => location_groups: LocationGroupRow ["location_group_id"]
        { location_group_id: req, location_group_name: s }
    /// `location_group_stops.txt`.
    location_group_stops => location_group_stops: LocationGroupStopRow
        ["location_group_id", "stop_id"] { location_group_id: req, stop_id: req }
}

/// `calendar.txt`.
fn calendar(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    const DAYS: [&str; 7] = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    f.require(&["service_id", "start_date", "end_date"])?;
    f.require(&DAYS)?;
    for r in f.rows() {
        let mut weekdays = 0u8;
        for (bit, day) in DAYS.iter().enumerate() {
            if r.flag(day, None)? {
                weekdays |= 1 << bit;
            }
        }
        let start_day = r.date("start_date")?;
        let end_day = r.date("end_date")?;
        let (Some(start_day), Some(end_day)) = (start_day, end_day) else {
            let field = if start_day.is_none() {
                "start_date"
            } else {
                "end_date"
            };
            return Err(GtfsError::Empty {
                file: CALENDAR,
                line: r.line,
                field,
            });
        };
        if end_day < start_day {
            return Err(r.invalid("end_date", "end_date is before start_date".to_string()));
        }
        feed.calendar.push(CalendarRow {
            line: r.line,
            service_id: r.req("service_id")?,
            weekdays,
            start_day,
            end_day,
        });
    }
    Ok(())
}

/// `calendar_dates.txt`.
fn calendar_dates(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    f.require(&["service_id", "date", "exception_type"])?;
    for r in f.rows() {
        let exception_type =
            r.enumeration("exception_type", 2, None, "1 (added) or 2 (removed)")?;
        if exception_type == 0 {
            return Err(r.bad("exception_type", "1 (added) or 2 (removed)"));
        }
        feed.calendar_dates.push(CalendarDateRow {
            line: r.line,
            service_id: r.req("service_id")?,
            day: r.date("date")?.ok_or(GtfsError::Empty {
                file: CALENDAR_DATES,
                line: r.line,
                field: "date",
            })?,
            exception_type,
        });
    }
    Ok(())
}

/// `timeframes.txt`.
fn timeframes(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    f.require(&["timeframe_group_id", "service_id"])?;
    for r in f.rows() {
        let (start_s, end_s) = match (r.time("start_time")?, r.time("end_time")?) {
            (None, None) => (0, 86_400),
            (Some(s), Some(e)) => (s, e),
            (None, Some(_)) => {
                return Err(r.invalid(
                    "start_time",
                    "start_time is empty but end_time is set".to_string(),
                ))
            }
            (Some(_), None) => {
                return Err(r.invalid(
                    "end_time",
                    "end_time is empty but start_time is set".to_string(),
                ))
            }
        };
        if end_s <= start_s {
            return Err(r.invalid(
                "end_time",
                format!(
                    "end_time {} is not after start_time {}",
                    r.get("end_time"),
                    r.get("start_time")
                ),
            ));
        }
        feed.timeframes.push(TimeframeRow {
            line: r.line,
            timeframe_group_id: r.req("timeframe_group_id")?,
            start_s,
            end_s,
            service_id: r.s("service_id"),
        });
    }
    Ok(())
}

/// `rider_categories.txt`.
fn rider_categories(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    feed.rider_categories = f.read_rows(&["rider_category_id"], |r| {
        Ok(RiderCategoryRow {
            line: r.line,
            rider_category_id: r.req("rider_category_id")?,
            rider_category_name: r.s("rider_category_name"),
            is_default_fare_category: r.flag("is_default_fare_category", Some(false))?,
        })
    })?;
    Ok(())
}

/// `fare_media.txt`.
fn fare_media(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    feed.fare_media = f.read_rows(&["fare_media_id"], |r| {
        Ok(FareMediaRow {
            line: r.line,
            fare_media_id: r.req("fare_media_id")?,
            fare_media_name: r.s("fare_media_name"),
            fare_media_type: r.enumeration(
                "fare_media_type",
                4,
                Some(0),
                "a fare media type 0 to 4",
            )?,
        })
    })?;
    Ok(())
}

/// `fare_leg_join_rules.txt`.
fn fare_leg_join_rules(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    f.require(&["from_network_id", "to_network_id"])?;
    for r in f.rows() {
        let row = FareLegJoinRuleRow {
            line: r.line,
            from_network_id: r.req("from_network_id")?,
            to_network_id: r.req("to_network_id")?,
            from_stop_id: r.s("from_stop_id"),
            to_stop_id: r.s("to_stop_id"),
        };
        if row.from_stop_id.is_empty() != row.to_stop_id.is_empty() {
            let field = if row.from_stop_id.is_empty() {
                "from_stop_id"
            } else {
                "to_stop_id"
            };
            return Err(r.invalid(
                field,
                "from_stop_id and to_stop_id must be both set or both empty".to_string(),
            ));
        }
        feed.fare_leg_join_rules.push(row);
    }
    Ok(())
}

/// `fare_transfer_rules.txt`.
fn fare_transfer_rules(f: &CsvFile, feed: &mut Feed) -> Result<()> {
    f.require(&["fare_transfer_type"])?;
    for r in f.rows() {
        let from_leg_group_id = r.s("from_leg_group_id");
        let to_leg_group_id = r.s("to_leg_group_id");
        const COUNT: &str = "-1 (no limit) or a positive integer";
        let transfer_count = r.int::<i32>("transfer_count", COUNT)?;
        match transfer_count {
            Some(n) if n == 0 || n < -1 => return Err(r.bad("transfer_count", COUNT)),
            Some(_) if from_leg_group_id != to_leg_group_id => {
                return Err(r.invalid(
                    "transfer_count",
                    format!(
                        "transfer_count is forbidden when from_leg_group_id (\"{from_leg_group_id}\") differs from to_leg_group_id (\"{to_leg_group_id}\")"
                    ),
                ))
            }
            _ => {}
        }
        let duration_limit = r.int::<u32>("duration_limit", "a positive number of seconds")?;
        if duration_limit == Some(0) {
            return Err(r.bad("duration_limit", "a positive number of seconds"));
        }
        const LIMIT_TYPE: &str = "a duration limit type 0 to 3";
        let duration_limit_type = match r.int::<u8>("duration_limit_type", LIMIT_TYPE)? {
            Some(t) if t > 3 => return Err(r.bad("duration_limit_type", LIMIT_TYPE)),
            t => t,
        };
        match (duration_limit, duration_limit_type) {
            (Some(_), None) => {
                return Err(r.invalid(
                    "duration_limit_type",
                    "required because duration_limit is set".to_string(),
                ))
            }
            (None, Some(_)) => {
                return Err(r.invalid(
                    "duration_limit_type",
                    "forbidden because duration_limit is empty".to_string(),
                ))
            }
            _ => {}
        }
        feed.fare_transfer_rules.push(FareTransferRuleRow {
            line: r.line,
            from_leg_group_id,
            to_leg_group_id,
            transfer_count,
            duration_limit,
            duration_limit_type,
            fare_transfer_type: r.enumeration(
                "fare_transfer_type",
                2,
                None,
                "a fare transfer type 0, 1 or 2",
            )?,
            fare_product_id: r.s("fare_product_id"),
        });
    }
    Ok(())
}

/// `fare_products.txt`.
fn fare_products(products: &CsvFile, feed: &mut Feed) -> Result<()> {
    feed.fare_products = products.read_rows(&["fare_product_id", "amount", "currency"], |r| {
        let (amount_minor, currency) = amount(r, "amount", "currency")?;
        Ok(FareProductRow {
            line: r.line,
            fare_product_id: r.req("fare_product_id")?,
            fare_product_name: r.s("fare_product_name"),
            rider_category_id: r.s("rider_category_id"),
            fare_media_id: r.s("fare_media_id"),
            amount_minor,
            currency,
        })
    })?;
    Ok(())
}

/// `fare_leg_rules.txt`.
fn fare_leg_rules(leg_rules: &CsvFile, feed: &mut Feed) -> Result<()> {
    leg_rules.require(&["fare_product_id"])?;
    feed.has_rule_priority = leg_rules.has("rule_priority");
    for r in leg_rules.rows() {
        let rule_priority = r.int::<i32>("rule_priority", "a non-negative integer")?;
        if rule_priority.is_some_and(|p| p < 0) {
            return Err(r.bad("rule_priority", "a non-negative integer"));
        }
        feed.fare_leg_rules.push(FareLegRuleRow {
            line: r.line,
            leg_group_id: r.s("leg_group_id"),
            network_id: r.s("network_id"),
            from_area_id: r.s("from_area_id"),
            to_area_id: r.s("to_area_id"),
            from_timeframe_group_id: r.s("from_timeframe_group_id"),
            to_timeframe_group_id: r.s("to_timeframe_group_id"),
            fare_product_id: r.req("fare_product_id")?,
            rule_priority,
        });
    }
    Ok(())
}
