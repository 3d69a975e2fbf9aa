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
//! `calendar.txt`, `calendar_dates.txt`, `timeframes.txt`, `rider_categories.txt`,
//! `fare_media.txt`, `fare_products.txt`, `fare_leg_rules.txt`, `fare_leg_join_rules.txt` and
//! `fare_transfer_rules.txt`. Only `fare_products.txt` and `fare_leg_rules.txt` are required.
//! Columns may come in any order, unknown columns are ignored, values are trimmed and a UTF-8
//! byte-order mark is tolerated.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use crate::table::{
    code24, currency_exponent, Category, DurationFrom, Idx, JoinRule, LegRule, Meta, Named,
    Network, Price, Pricing, Product, Route, Service, Stop, Table, Timeframe, TimeframeGroup,
    TransferKind, TransferRule, NONE,
};

/// Why a feed could not be loaded or compiled. Every message names the file and, where there is
/// one, the line and field.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GtfsError {
    /// A required file is absent.
    #[error(
        "{file}: missing (a GTFS-Fares v2 feed needs fare_products.txt and fare_leg_rules.txt)"
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

// ---------------------------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------------------------

/// `agency.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgencyRow {
    pub line: u64,
    pub agency_id: String,
    pub agency_name: String,
    pub agency_timezone: String,
}

/// `feed_info.txt` (dates as days since 1970-01-01).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FeedInfoRow {
    pub line: u64,
    pub feed_start_date: Option<i32>,
    pub feed_end_date: Option<i32>,
}

/// `stops.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopRow {
    pub line: u64,
    pub stop_id: String,
    pub parent_station: String,
}

/// `routes.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteRow {
    pub line: u64,
    pub route_id: String,
    pub network_id: String,
}

/// `networks.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NetworkRow {
    pub line: u64,
    pub network_id: String,
    pub network_name: String,
}

/// `route_networks.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouteNetworkRow {
    pub line: u64,
    pub route_id: String,
    pub network_id: String,
}

/// `areas.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AreaRow {
    pub line: u64,
    pub area_id: String,
    pub area_name: String,
}

/// `stop_areas.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StopAreaRow {
    pub line: u64,
    pub area_id: String,
    pub stop_id: String,
}

/// `calendar.txt` (weekday bit 0 = Monday; dates as days since 1970-01-01).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalendarRow {
    pub line: u64,
    pub service_id: String,
    pub weekdays: u8,
    pub start_day: i32,
    pub end_day: i32,
}

/// `calendar_dates.txt` (`exception_type` 1 added, 2 removed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CalendarDateRow {
    pub line: u64,
    pub service_id: String,
    pub day: i32,
    pub exception_type: u8,
}

/// `timeframes.txt` (seconds after midnight, `[start_s, end_s)`; empty times = whole day).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TimeframeRow {
    pub line: u64,
    pub timeframe_group_id: String,
    pub start_s: u32,
    pub end_s: u32,
    pub service_id: String,
}

/// `rider_categories.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RiderCategoryRow {
    pub line: u64,
    pub rider_category_id: String,
    pub rider_category_name: String,
    pub is_default_fare_category: bool,
}

/// `fare_media.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareMediaRow {
    pub line: u64,
    pub fare_media_id: String,
    pub fare_media_name: String,
    pub fare_media_type: u8,
}

/// `fare_products.txt` (`amount` exactly in minor units of `currency`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareProductRow {
    pub line: u64,
    pub fare_product_id: String,
    pub fare_product_name: String,
    pub rider_category_id: String,
    pub fare_media_id: String,
    pub amount_minor: i32,
    pub currency: String,
}

/// `fare_leg_rules.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareLegRuleRow {
    pub line: u64,
    pub leg_group_id: String,
    pub network_id: String,
    pub from_area_id: String,
    pub to_area_id: String,
    pub from_timeframe_group_id: String,
    pub to_timeframe_group_id: String,
    pub fare_product_id: String,
    pub rule_priority: Option<i32>,
}

/// `fare_leg_join_rules.txt`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareLegJoinRuleRow {
    pub line: u64,
    pub from_network_id: String,
    pub to_network_id: String,
    pub from_stop_id: String,
    pub to_stop_id: String,
}

/// `fare_transfer_rules.txt` (`transfer_count` as written: -1 or ≥ 1).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FareTransferRuleRow {
    pub line: u64,
    pub from_leg_group_id: String,
    pub to_leg_group_id: String,
    pub transfer_count: Option<i32>,
    pub duration_limit: Option<u32>,
    pub duration_limit_type: Option<u8>,
    pub fare_transfer_type: u8,
    pub fare_product_id: String,
}

/// The fare-relevant rows of a GTFS feed. Absent optional files are empty (`None` for
/// `stops.txt` and `routes.txt`, whose absence changes how stops and routes are collected).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Feed {
    pub agencies: Vec<AgencyRow>,
    pub feed_info: Option<FeedInfoRow>,
    pub stops: Option<Vec<StopRow>>,
    pub routes: Option<Vec<RouteRow>>,
    pub networks: Vec<NetworkRow>,
    pub route_networks: Vec<RouteNetworkRow>,
    pub areas: Vec<AreaRow>,
    pub stop_areas: Vec<StopAreaRow>,
    pub calendar: Vec<CalendarRow>,
    pub calendar_dates: Vec<CalendarDateRow>,
    pub timeframes: Vec<TimeframeRow>,
    pub rider_categories: Vec<RiderCategoryRow>,
    pub fare_media: Vec<FareMediaRow>,
    pub fare_products: Vec<FareProductRow>,
    pub fare_leg_rules: Vec<FareLegRuleRow>,
    /// The `fare_leg_rules.txt` header has a `rule_priority` column.
    pub has_rule_priority: bool,
    pub fare_leg_join_rules: Vec<FareLegJoinRuleRow>,
    pub fare_transfer_rules: Vec<FareTransferRuleRow>,
}

// ---------------------------------------------------------------------------------------------
// CSV reading
// ---------------------------------------------------------------------------------------------

const AGENCY: &str = "agency.txt";
const FEED_INFO: &str = "feed_info.txt";
const STOPS: &str = "stops.txt";
const ROUTES: &str = "routes.txt";
const NETWORKS: &str = "networks.txt";
const ROUTE_NETWORKS: &str = "route_networks.txt";
const AREAS: &str = "areas.txt";
const STOP_AREAS: &str = "stop_areas.txt";
const CALENDAR: &str = "calendar.txt";
const CALENDAR_DATES: &str = "calendar_dates.txt";
const TIMEFRAMES: &str = "timeframes.txt";
const RIDER_CATEGORIES: &str = "rider_categories.txt";
const FARE_MEDIA: &str = "fare_media.txt";
const FARE_PRODUCTS: &str = "fare_products.txt";
const FARE_LEG_RULES: &str = "fare_leg_rules.txt";
const FARE_LEG_JOIN_RULES: &str = "fare_leg_join_rules.txt";
const FARE_TRANSFER_RULES: &str = "fare_transfer_rules.txt";

/// One CSV file: its header's column positions and its records with their line numbers.
struct CsvFile {
    file: &'static str,
    cols: HashMap<String, usize>,
    rows: Vec<(u64, csv::StringRecord)>,
}

impl CsvFile {
    fn read(dir: &Path, file: &'static str) -> Result<Option<CsvFile>> {
        let bytes = match std::fs::read(dir.join(file)) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(GtfsError::Io {
                    file,
                    message: e.to_string(),
                })
            }
        };
        Self::parse(file, &bytes).map(Some)
    }

    fn parse(file: &'static str, bytes: &[u8]) -> Result<CsvFile> {
        let data = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        // Where the record the reader was at starts: its position is where the reader started
        // looking for it, before the blank lines it skipped (its own line count skips those).
        let record_start = |pos: Option<&csv::Position>, floor: usize| -> usize {
            let byte = pos.map_or(floor, |p| usize::try_from(p.byte()).unwrap_or(floor));
            let skipped = data.get(byte..).map_or(0, |rest| {
                rest.iter()
                    .take_while(|b| matches!(b, b'\r' | b'\n'))
                    .count()
            });
            byte.saturating_add(skipped).max(floor)
        };
        let csv_err = |e: csv::Error| {
            let start = record_start(e.position(), 0);
            GtfsError::Csv {
                file,
                line: 1 + data.get(..start).map_or(0, line_breaks),
                message: match e.kind() {
                    csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
                    _ => e.to_string(),
                },
            }
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(csv::Trim::All)
            .from_reader(data);
        let mut cols = HashMap::new();
        for (i, name) in reader.headers().map_err(csv_err)?.iter().enumerate() {
            cols.entry(name.trim().to_string()).or_insert(i);
        }
        let mut rows = Vec::new();
        let (mut counted, mut line) = (0usize, 1u64);
        for record in reader.records() {
            let record = record.map_err(csv_err)?;
            if record.iter().all(str::is_empty) {
                continue;
            }
            let start = record_start(record.position(), counted);
            if let Some(between) = data.get(counted..start) {
                line += line_breaks(between);
                counted = start;
            }
            rows.push((line, record));
        }
        Ok(CsvFile { file, cols, rows })
    }

    fn has(&self, field: &str) -> bool {
        self.cols.contains_key(field)
    }

    fn require(&self, fields: &[&'static str]) -> Result<()> {
        match fields.iter().find(|f| !self.has(f)) {
            Some(field) => Err(GtfsError::MissingColumn {
                file: self.file,
                field,
            }),
            None => Ok(()),
        }
    }

    fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(move |(line, rec)| Row {
            file: self.file,
            line: *line,
            rec,
            cols: &self.cols,
        })
    }
}

/// Line breaks in `bytes` (`\n`, `\r\n` or a lone `\r`).
fn line_breaks(bytes: &[u8]) -> u64 {
    let mut n = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')) {
            n += 1;
        }
    }
    n
}

/// One record, its fields looked up by column name.
struct Row<'a> {
    file: &'static str,
    line: u64,
    rec: &'a csv::StringRecord,
    cols: &'a HashMap<String, usize>,
}

impl Row<'_> {
    /// The value of `field` (empty when the column or the value is absent).
    fn get(&self, field: &str) -> &str {
        self.cols
            .get(field)
            .and_then(|&i| self.rec.get(i))
            .unwrap_or("")
    }

    fn s(&self, field: &str) -> String {
        self.get(field).to_string()
    }

    fn req(&self, field: &'static str) -> Result<String> {
        let v = self.get(field);
        if v.is_empty() {
            Err(GtfsError::Empty {
                file: self.file,
                line: self.line,
                field,
            })
        } else {
            Ok(v.to_string())
        }
    }

    fn bad(&self, field: &'static str, expected: &'static str) -> GtfsError {
        GtfsError::BadValue {
            file: self.file,
            line: self.line,
            field,
            value: self.get(field).to_string(),
            expected,
        }
    }

    fn invalid(&self, field: &'static str, message: String) -> GtfsError {
        GtfsError::Invalid {
            file: self.file,
            line: self.line,
            field,
            message,
        }
    }

    /// An optional integer field.
    fn int<T: std::str::FromStr>(
        &self,
        field: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>> {
        let v = self.get(field);
        if v.is_empty() {
            return Ok(None);
        }
        v.parse().map(Some).map_err(|_| self.bad(field, expected))
    }

    /// An enum field with values `0..=max`; `default` when empty (`None`: required).
    fn enumeration(
        &self,
        field: &'static str,
        max: u8,
        default: Option<u8>,
        expected: &'static str,
    ) -> Result<u8> {
        match self.int::<u8>(field, expected)? {
            Some(v) if v <= max => Ok(v),
            Some(_) => Err(self.bad(field, expected)),
            None => default.ok_or(GtfsError::Empty {
                file: self.file,
                line: self.line,
                field,
            }),
        }
    }

    /// A `YYYYMMDD` date as days since 1970-01-01 (`None` when empty).
    fn date(&self, field: &'static str) -> Result<Option<i32>> {
        let v = self.get(field);
        if v.is_empty() {
            return Ok(None);
        }
        parse_date(v)
            .map(Some)
            .ok_or_else(|| self.bad(field, "a date as YYYYMMDD, e.g. \"20250131\""))
    }

    /// An `H:MM:SS` time of at most 24:00:00 as seconds after midnight (`None` when empty).
    fn time(&self, field: &'static str) -> Result<Option<u32>> {
        let v = self.get(field);
        if v.is_empty() {
            return Ok(None);
        }
        parse_time(v)
            .map(Some)
            .ok_or_else(|| self.bad(field, "a time from 00:00:00 to 24:00:00 as HH:MM:SS"))
    }
}

fn parse_date(v: &str) -> Option<i32> {
    if v.len() != 8 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i32 = v.get(0..4)?.parse().ok()?;
    let m: u32 = v.get(4..6)?.parse().ok()?;
    let d: u32 = v.get(6..8)?.parse().ok()?;
    let date = chrono::NaiveDate::from_ymd_opt(y, m, d)?;
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(date.signed_duration_since(epoch).num_days()).ok()
}

fn parse_time(v: &str) -> Option<u32> {
    let mut parts = v.split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some()
        || !(1..=2).contains(&h.len())
        || m.len() != 2
        || s.len() != 2
        || ![h, m, s]
            .iter()
            .all(|p| p.bytes().all(|b| b.is_ascii_digit()))
    {
        return None;
    }
    let (h, m, s): (u32, u32, u32) = (h.parse().ok()?, m.parse().ok()?, s.parse().ok()?);
    let total = h * 3600 + m * 60 + s;
    (m < 60 && s < 60 && total <= 86_400).then_some(total)
}

/// Why an amount string is not an exact amount in minor units.
#[derive(Debug, PartialEq, Eq)]
enum AmountError {
    /// Not a plain decimal number.
    Syntax,
    /// More decimals than the currency has.
    TooPrecise(usize),
    TooLarge,
}

/// Parses a decimal amount string exactly into minor units with `exponent` decimals.
fn parse_amount(v: &str, exponent: u8) -> std::result::Result<i32, AmountError> {
    let (negative, digits) = match v.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (int, frac) = match digits.split_once('.') {
        Some((i, f)) if !f.is_empty() => (i, f),
        Some(_) => return Err(AmountError::Syntax),
        None => (digits, ""),
    };
    if int.is_empty() && frac.is_empty()
        || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit())
    {
        return Err(AmountError::Syntax);
    }
    if frac.len() > usize::from(exponent) {
        return Err(AmountError::TooPrecise(frac.len()));
    }
    let mut minor: u64 = 0;
    let padding = usize::from(exponent) - frac.len();
    for b in int
        .bytes()
        .chain(frac.bytes())
        .chain(std::iter::repeat_n(b'0', padding))
    {
        minor = minor
            .checked_mul(10)
            .and_then(|m| m.checked_add(u64::from(b - b'0')))
            .filter(|&m| m <= u64::from(u32::MAX))
            .ok_or(AmountError::TooLarge)?;
    }
    // Negative amounts are GTFS transfer discounts; the engine refuses them for leg fares.
    let minor = i32::try_from(minor).map_err(|_| AmountError::TooLarge)?;
    Ok(if negative { -minor } else { minor })
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Reads the fare-relevant files of the GTFS feed in `dir`.
pub fn load_dir(dir: &Path) -> Result<Feed> {
    load_with(|file| CsvFile::read(dir, file))
}

/// Loads a feed whose files `open` returns (`None`: absent).
fn load_with(open: impl Fn(&'static str) -> Result<Option<CsvFile>>) -> Result<Feed> {
    let mut feed = Feed::default();
    let required = |file: &'static str| -> Result<CsvFile> {
        open(file)?.ok_or(GtfsError::MissingFile { file })
    };
    let products = required(FARE_PRODUCTS)?;
    let leg_rules = required(FARE_LEG_RULES)?;

    if let Some(f) = open(AGENCY)? {
        for r in f.rows() {
            feed.agencies.push(AgencyRow {
                line: r.line,
                agency_id: r.s("agency_id"),
                agency_name: r.s("agency_name"),
                agency_timezone: r.s("agency_timezone"),
            });
        }
    }
    if let Some(f) = open(FEED_INFO)? {
        if let Some(r) = f.rows().next() {
            feed.feed_info = Some(FeedInfoRow {
                line: r.line,
                feed_start_date: r.date("feed_start_date")?,
                feed_end_date: r.date("feed_end_date")?,
            });
        }
    }
    if let Some(f) = open(STOPS)? {
        f.require(&["stop_id"])?;
        let mut rows = Vec::new();
        for r in f.rows() {
            rows.push(StopRow {
                line: r.line,
                stop_id: r.req("stop_id")?,
                parent_station: r.s("parent_station"),
            });
        }
        feed.stops = Some(rows);
    }
    if let Some(f) = open(ROUTES)? {
        f.require(&["route_id"])?;
        let mut rows = Vec::new();
        for r in f.rows() {
            rows.push(RouteRow {
                line: r.line,
                route_id: r.req("route_id")?,
                network_id: r.s("network_id"),
            });
        }
        feed.routes = Some(rows);
    }
    if let Some(f) = open(NETWORKS)? {
        f.require(&["network_id"])?;
        for r in f.rows() {
            feed.networks.push(NetworkRow {
                line: r.line,
                network_id: r.req("network_id")?,
                network_name: r.s("network_name"),
            });
        }
    }
    if let Some(f) = open(ROUTE_NETWORKS)? {
        f.require(&["network_id", "route_id"])?;
        for r in f.rows() {
            feed.route_networks.push(RouteNetworkRow {
                line: r.line,
                route_id: r.req("route_id")?,
                network_id: r.req("network_id")?,
            });
        }
    }
    if let Some(f) = open(AREAS)? {
        f.require(&["area_id"])?;
        for r in f.rows() {
            feed.areas.push(AreaRow {
                line: r.line,
                area_id: r.req("area_id")?,
                area_name: r.s("area_name"),
            });
        }
    }
    if let Some(f) = open(STOP_AREAS)? {
        f.require(&["area_id", "stop_id"])?;
        for r in f.rows() {
            feed.stop_areas.push(StopAreaRow {
                line: r.line,
                area_id: r.req("area_id")?,
                stop_id: r.req("stop_id")?,
            });
        }
    }
    if let Some(f) = open(CALENDAR)? {
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
                if r.enumeration(day, 1, None, "0 or 1")? == 1 {
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
    }
    if let Some(f) = open(CALENDAR_DATES)? {
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
    }
    if let Some(f) = open(TIMEFRAMES)? {
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
    }
    if let Some(f) = open(RIDER_CATEGORIES)? {
        f.require(&["rider_category_id"])?;
        for r in f.rows() {
            feed.rider_categories.push(RiderCategoryRow {
                line: r.line,
                rider_category_id: r.req("rider_category_id")?,
                rider_category_name: r.s("rider_category_name"),
                is_default_fare_category: r.enumeration(
                    "is_default_fare_category",
                    1,
                    Some(0),
                    "0 or 1",
                )? == 1,
            });
        }
    }
    if let Some(f) = open(FARE_MEDIA)? {
        f.require(&["fare_media_id"])?;
        for r in f.rows() {
            feed.fare_media.push(FareMediaRow {
                line: r.line,
                fare_media_id: r.req("fare_media_id")?,
                fare_media_name: r.s("fare_media_name"),
                fare_media_type: r.enumeration(
                    "fare_media_type",
                    4,
                    Some(0),
                    "a fare media type 0 to 4",
                )?,
            });
        }
    }

    products.require(&["fare_product_id", "amount", "currency"])?;
    for r in products.rows() {
        let currency = r.req("currency")?;
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(r.bad("currency", "an ISO 4217 currency code, e.g. \"USD\""));
        }
        let exponent = currency_exponent(&currency);
        let amount = r.req("amount")?;
        let amount_minor = parse_amount(&amount, exponent).map_err(|e| match e {
            AmountError::Syntax => r.bad("amount", "a decimal amount, e.g. \"2.75\""),
            AmountError::TooPrecise(n) => r.invalid(
                "amount",
                format!("\"{amount}\" has {n} decimals but {currency} has {exponent}"),
            ),
            AmountError::TooLarge => r.invalid("amount", format!("\"{amount}\" is too large")),
        })?;
        feed.fare_products.push(FareProductRow {
            line: r.line,
            fare_product_id: r.req("fare_product_id")?,
            fare_product_name: r.s("fare_product_name"),
            rider_category_id: r.s("rider_category_id"),
            fare_media_id: r.s("fare_media_id"),
            amount_minor,
            currency,
        });
    }

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

    if let Some(f) = open(FARE_LEG_JOIN_RULES)? {
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
    }

    if let Some(f) = open(FARE_TRANSFER_RULES)? {
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
    }
    Ok(feed)
}

// ---------------------------------------------------------------------------------------------
// Compiling
// ---------------------------------------------------------------------------------------------

/// Ids of one kind, in order of definition, with their table index.
struct Ids {
    what: &'static str,
    source: &'static str,
    order: Vec<String>,
    index: HashMap<String, Idx>,
}

impl Ids {
    fn new(what: &'static str, source: &'static str) -> Ids {
        Ids {
            what,
            source,
            order: Vec::new(),
            index: HashMap::new(),
        }
    }

    fn get(&self, id: &str) -> Option<Idx> {
        self.index.get(id).copied()
    }

    /// Adds `id` if new; its index either way.
    fn add(&mut self, id: &str, file: &'static str, line: u64, field: &'static str) -> Result<Idx> {
        if let Some(i) = self.get(id) {
            return Ok(i);
        }
        let i = Idx::try_from(self.order.len())
            .ok()
            .filter(|&i| i != NONE)
            .ok_or_else(|| GtfsError::Invalid {
                file,
                line,
                field,
                message: format!("too many {}s (at most {})", self.what, NONE),
            })?;
        self.order.push(id.to_string());
        self.index.insert(id.to_string(), i);
        Ok(i)
    }

    /// Adds `id`, refusing a duplicate.
    fn add_new(
        &mut self,
        id: &str,
        file: &'static str,
        line: u64,
        field: &'static str,
    ) -> Result<Idx> {
        if self.get(id).is_some() {
            return Err(GtfsError::Invalid {
                file,
                line,
                field,
                message: format!("duplicate {} id \"{id}\"", self.what),
            });
        }
        self.add(id, file, line, field)
    }

    /// The index of `id`, [`NONE`] when empty; an unknown id is an error naming the known ones.
    fn resolve(&self, id: &str, file: &'static str, line: u64, field: &'static str) -> Result<Idx> {
        if id.is_empty() {
            return Ok(NONE);
        }
        self.get(id).ok_or_else(|| GtfsError::Unknown {
            file,
            line,
            field,
            what: self.what,
            value: id.to_string(),
            hint: self.hint(id),
        })
    }

    fn hint(&self, id: &str) -> String {
        const SHOWN: usize = 10;
        let mut hint = if self.order.is_empty() {
            format!("({} has none)", self.source)
        } else if self.order.len() <= SHOWN {
            format!("({} has: {})", self.source, self.order.join(", "))
        } else {
            format!(
                "({} has: {}, ... {} in all)",
                self.source,
                self.order[..SHOWN].join(", "),
                self.order.len()
            )
        };
        let closest = self
            .order
            .iter()
            .map(|known| (edit_distance(id, known), known))
            .min_by_key(|(d, _)| *d);
        if let Some((d, known)) = closest {
            if d <= id.chars().count().max(known.chars().count()) / 2 {
                hint.push_str(&format!("; did you mean \"{known}\"?"));
            }
        }
        hint
    }
}

/// Levenshtein distance, case-insensitive (ids longer than 100 characters are just "far").
fn edit_distance(a: &str, b: &str) -> usize {
    if a.len() > 100 || b.len() > 100 {
        return usize::MAX;
    }
    let a: Vec<char> = a.chars().flat_map(char::to_lowercase).collect();
    let b: Vec<char> = b.chars().flat_map(char::to_lowercase).collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur[j + 1] = substitute.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Sorted (code, index) pairs; two ids with one code are an error naming both.
fn codes(
    ids: &[(String, u64)],
    file: &'static str,
    field: &'static str,
    what: &str,
) -> Result<Vec<(u32, Idx)>> {
    let mut seen: HashMap<u32, &str> = HashMap::new();
    let mut out = Vec::with_capacity(ids.len());
    for (i, (id, line)) in ids.iter().enumerate() {
        let code = code24(id);
        if let Some(other) = seen.insert(code, id) {
            return Err(GtfsError::Invalid {
                file,
                line: *line,
                field,
                message: format!(
                    "{what} ids \"{other}\" and \"{id}\" share the 24-bit card code {code:#08x}; rename one"
                ),
            });
        }
        let i = Idx::try_from(i).unwrap_or(NONE);
        out.push((code, i));
    }
    out.sort_unstable();
    Ok(out)
}

/// Compiles a loaded feed into a fare table.
pub fn compile(feed: &Feed) -> Result<Table> {
    let mut table = Table::default();

    // --- meta --------------------------------------------------------------------------------
    let mut currency: Option<&FareProductRow> = None;
    for p in &feed.fare_products {
        match currency {
            None => currency = Some(p),
            Some(first) if first.currency != p.currency => {
                return Err(GtfsError::Invalid {
                    file: FARE_PRODUCTS,
                    line: p.line,
                    field: "currency",
                    message: format!(
                        "currency {} differs from {} on line {}; a table has a single currency",
                        p.currency, first.currency, first.line
                    ),
                });
            }
            Some(_) => {}
        }
    }
    let currency = currency
        .map(|p| p.currency.clone())
        .ok_or(GtfsError::Invalid {
            file: FARE_PRODUCTS,
            line: 1,
            field: "fare_product_id",
            message: "the file has no fare products".to_string(),
        })?;
    table.meta = Meta {
        name: feed
            .agencies
            .iter()
            .map(|a| a.agency_name.as_str())
            .find(|n| !n.is_empty())
            .unwrap_or("GTFS feed")
            .to_string(),
        version: 1,
        currency_exponent: currency_exponent(&currency),
        currency,
        effective_from_day: feed
            .feed_info
            .as_ref()
            .and_then(|f| f.feed_start_date)
            .unwrap_or(i32::MIN / 2),
        effective_until_day: feed
            .feed_info
            .as_ref()
            .and_then(|f| f.feed_end_date)
            .map(|d| d.saturating_add(1)),
        day_start_s: 0,
        max_transfers: 255,
        priority_mode: feed.has_rule_priority,
    };

    // --- networks ------------------------------------------------------------------------------
    let mut networks = Ids::new("network", "networks.txt/routes.txt");
    for n in &feed.networks {
        networks.add_new(&n.network_id, NETWORKS, n.line, "network_id")?;
    }
    for r in feed.routes.iter().flatten() {
        if !r.network_id.is_empty() {
            networks.add(&r.network_id, ROUTES, r.line, "network_id")?;
        }
    }
    for rn in &feed.route_networks {
        networks.add(&rn.network_id, ROUTE_NETWORKS, rn.line, "network_id")?;
    }

    // --- areas ---------------------------------------------------------------------------------
    let mut areas = Ids::new("area", AREAS);
    for a in &feed.areas {
        areas.add_new(&a.area_id, AREAS, a.line, "area_id")?;
    }
    for sa in &feed.stop_areas {
        areas.add(&sa.area_id, STOP_AREAS, sa.line, "area_id")?;
    }

    // --- stops ---------------------------------------------------------------------------------
    let mut stops = Ids::new("stop", STOPS);
    let mut stop_lines: Vec<(String, u64)> = Vec::new();
    let mut parents: Vec<Idx> = Vec::new();
    match &feed.stops {
        Some(rows) => {
            for s in rows {
                stops.add_new(&s.stop_id, STOPS, s.line, "stop_id")?;
                stop_lines.push((s.stop_id.clone(), s.line));
            }
            for s in rows {
                parents.push(stops.resolve(&s.parent_station, STOPS, s.line, "parent_station")?);
            }
        }
        None => {
            let named = feed
                .stop_areas
                .iter()
                .map(|sa| (&sa.stop_id, STOP_AREAS, sa.line, "stop_id"))
                .chain(feed.fare_leg_join_rules.iter().flat_map(|j| {
                    [
                        (&j.from_stop_id, FARE_LEG_JOIN_RULES, j.line, "from_stop_id"),
                        (&j.to_stop_id, FARE_LEG_JOIN_RULES, j.line, "to_stop_id"),
                    ]
                }));
            for (id, file, line, field) in named {
                if !id.is_empty() && stops.get(id).is_none() {
                    stops.add(id, file, line, field)?;
                    stop_lines.push((id.clone(), line));
                    parents.push(NONE);
                }
            }
        }
    }
    let mut direct_areas: Vec<BTreeSet<Idx>> = vec![BTreeSet::new(); stops.order.len()];
    for sa in &feed.stop_areas {
        let stop = stops.resolve(&sa.stop_id, STOP_AREAS, sa.line, "stop_id")?;
        let area = areas.resolve(&sa.area_id, STOP_AREAS, sa.line, "area_id")?;
        if let Some(set) = direct_areas.get_mut(usize::from(stop)) {
            set.insert(area);
        }
    }
    for (i, (id, _)) in stop_lines.iter().enumerate() {
        // The stop's own areas and those of its parent station(s), guarding against cycles.
        let mut set = direct_areas.get(i).cloned().unwrap_or_default();
        let mut parent = parents.get(i).copied().unwrap_or(NONE);
        let mut hops = 0;
        while parent != NONE && hops < 8 {
            if let Some(p) = direct_areas.get(usize::from(parent)) {
                set.extend(p.iter().copied());
            }
            parent = parents.get(usize::from(parent)).copied().unwrap_or(NONE);
            hops += 1;
        }
        table.stops.push(Stop {
            id: id.clone(),
            code: code24(id),
            areas: set.into_iter().collect(),
        });
    }
    table.stop_codes = codes(&stop_lines, STOPS, "stop_id", "stop")?;

    // --- routes --------------------------------------------------------------------------------
    let mut routes = Ids::new("route", ROUTES);
    let mut route_lines: Vec<(String, u64)> = Vec::new();
    let mut route_network: Vec<(Idx, u64, &'static str)> = Vec::new();
    match &feed.routes {
        Some(rows) => {
            for r in rows {
                routes.add_new(&r.route_id, ROUTES, r.line, "route_id")?;
                route_lines.push((r.route_id.clone(), r.line));
                let n = networks.resolve(&r.network_id, ROUTES, r.line, "network_id")?;
                route_network.push((n, r.line, ROUTES));
            }
        }
        None => {
            for rn in &feed.route_networks {
                if routes.get(&rn.route_id).is_none() {
                    routes.add(&rn.route_id, ROUTE_NETWORKS, rn.line, "route_id")?;
                    route_lines.push((rn.route_id.clone(), rn.line));
                    route_network.push((NONE, rn.line, ROUTE_NETWORKS));
                }
            }
        }
    }
    for rn in &feed.route_networks {
        let r = routes.resolve(&rn.route_id, ROUTE_NETWORKS, rn.line, "route_id")?;
        let n = networks.resolve(&rn.network_id, ROUTE_NETWORKS, rn.line, "network_id")?;
        if let Some(slot) = route_network.get_mut(usize::from(r)) {
            if slot.0 != NONE && slot.0 != n {
                let other = networks
                    .order
                    .get(usize::from(slot.0))
                    .cloned()
                    .unwrap_or_default();
                return Err(GtfsError::Invalid {
                    file: ROUTE_NETWORKS,
                    line: rn.line,
                    field: "network_id",
                    message: format!(
                        "route \"{}\" is already in network \"{other}\" ({} line {}); a route has one network",
                        rn.route_id, slot.2, slot.1
                    ),
                });
            }
            *slot = (n, rn.line, ROUTE_NETWORKS);
        }
    }
    for (i, (id, _)) in route_lines.iter().enumerate() {
        table.routes.push(Route {
            id: id.clone(),
            code: code24(id),
            network: route_network.get(i).map_or(NONE, |n| n.0),
            chainage: Vec::new(),
        });
    }
    table.route_codes = codes(&route_lines, ROUTES, "route_id", "route")?;

    // --- services and timeframes ---------------------------------------------------------------
    let mut services = Ids::new("service", "calendar.txt/calendar_dates.txt");
    for c in &feed.calendar {
        services.add_new(&c.service_id, CALENDAR, c.line, "service_id")?;
        table.services.push(Service {
            id: c.service_id.clone(),
            weekdays: c.weekdays,
            start_day: Some(c.start_day),
            end_day: Some(c.end_day),
            added: Vec::new(),
            removed: Vec::new(),
        });
    }
    for d in &feed.calendar_dates {
        let i = services.add(&d.service_id, CALENDAR_DATES, d.line, "service_id")?;
        if usize::from(i) == table.services.len() {
            table.services.push(Service {
                id: d.service_id.clone(),
                ..Service::default()
            });
        }
        if let Some(s) = table.services.get_mut(usize::from(i)) {
            let (list, other) = if d.exception_type == 1 {
                (&mut s.added, &s.removed)
            } else {
                (&mut s.removed, &s.added)
            };
            if other.contains(&d.day) {
                return Err(GtfsError::Invalid {
                    file: CALENDAR_DATES,
                    line: d.line,
                    field: "date",
                    message: format!(
                        "service \"{}\" both adds and removes this date",
                        d.service_id
                    ),
                });
            }
            list.push(d.day);
        }
    }
    for s in &mut table.services {
        s.added.sort_unstable();
        s.added.dedup();
        s.removed.sort_unstable();
        s.removed.dedup();
    }

    let mut timeframes = Ids::new("timeframe group", TIMEFRAMES);
    for t in &feed.timeframes {
        let g = timeframes.add(
            &t.timeframe_group_id,
            TIMEFRAMES,
            t.line,
            "timeframe_group_id",
        )?;
        if usize::from(g) == table.timeframes.len() {
            table.timeframes.push(TimeframeGroup {
                id: t.timeframe_group_id.clone(),
                spans: Vec::new(),
            });
        }
        let service = services.resolve(&t.service_id, TIMEFRAMES, t.line, "service_id")?;
        if let Some(group) = table.timeframes.get_mut(usize::from(g)) {
            group.spans.push(Timeframe {
                start_s: t.start_s,
                end_s: t.end_s,
                service,
            });
        }
    }

    // --- rider categories and media ------------------------------------------------------------
    let mut categories = Ids::new("rider category", RIDER_CATEGORIES);
    let mut default_line: Option<u64> = None;
    for c in &feed.rider_categories {
        if c.is_default_fare_category {
            if let Some(first) = default_line {
                return Err(GtfsError::Invalid {
                    file: RIDER_CATEGORIES,
                    line: c.line,
                    field: "is_default_fare_category",
                    message: format!(
                        "a second default rider category (the first is on line {first})"
                    ),
                });
            }
            default_line = Some(c.line);
        }
        categories.add_new(
            &c.rider_category_id,
            RIDER_CATEGORIES,
            c.line,
            "rider_category_id",
        )?;
        table.categories.push(Category {
            id: c.rider_category_id.clone(),
            default: c.is_default_fare_category,
            surcharge_percent: 100,
        });
    }
    let mut media = Ids::new("fare medium", FARE_MEDIA);
    for m in &feed.fare_media {
        media.add_new(&m.fare_media_id, FARE_MEDIA, m.line, "fare_media_id")?;
        table.media.push(Named {
            id: m.fare_media_id.clone(),
            explicit: feed
                .fare_products
                .iter()
                .any(|p| p.fare_media_id == m.fare_media_id),
            explicit_to: false,
        });
    }

    // --- products ------------------------------------------------------------------------------
    let mut products = Ids::new("fare product", FARE_PRODUCTS);
    let mut price_lines: HashMap<(Idx, Idx, Idx), u64> = HashMap::new();
    for p in &feed.fare_products {
        let i = products.add(&p.fare_product_id, FARE_PRODUCTS, p.line, "fare_product_id")?;
        if usize::from(i) == table.products.len() {
            table.products.push(Product {
                id: p.fare_product_id.clone(),
                name: String::new(),
                prices: Vec::new(),
            });
        }
        let category = categories.resolve(
            &p.rider_category_id,
            FARE_PRODUCTS,
            p.line,
            "rider_category_id",
        )?;
        let medium = media.resolve(&p.fare_media_id, FARE_PRODUCTS, p.line, "fare_media_id")?;
        if let Some(first) = price_lines.insert((i, category, medium), p.line) {
            return Err(GtfsError::Invalid {
                file: FARE_PRODUCTS,
                line: p.line,
                field: "fare_product_id",
                message: format!(
                    "product \"{}\" already has a price for this rider category and fare medium (line {first})",
                    p.fare_product_id
                ),
            });
        }
        if let Some(product) = table.products.get_mut(usize::from(i)) {
            if product.name.is_empty() {
                product.name.clone_from(&p.fare_product_name);
            }
            product.prices.push(Price {
                category,
                medium,
                amount_minor: p.amount_minor,
            });
        }
    }

    // --- leg groups and leg rules --------------------------------------------------------------
    let mut leg_groups = Ids::new("leg group", FARE_LEG_RULES);
    for r in &feed.fare_leg_rules {
        if !r.leg_group_id.is_empty() {
            leg_groups.add(&r.leg_group_id, FARE_LEG_RULES, r.line, "leg_group_id")?;
        }
    }
    for id in &leg_groups.order {
        table.leg_groups.push(Named {
            id: id.clone(),
            // Per column: an empty from (to) group matches the groups no rule names as from (to).
            explicit: feed
                .fare_transfer_rules
                .iter()
                .any(|t| &t.from_leg_group_id == id),
            explicit_to: feed
                .fare_transfer_rules
                .iter()
                .any(|t| &t.to_leg_group_id == id),
        });
    }
    let mut network_explicit = vec![false; networks.order.len()];
    let mut area_explicit = vec![false; areas.order.len()];
    let mut area_explicit_to = vec![false; areas.order.len()];
    for r in &feed.fare_leg_rules {
        let f = FARE_LEG_RULES;
        let network = networks.resolve(&r.network_id, f, r.line, "network_id")?;
        let from_area = areas.resolve(&r.from_area_id, f, r.line, "from_area_id")?;
        let to_area = areas.resolve(&r.to_area_id, f, r.line, "to_area_id")?;
        let from_timeframe = timeframes.resolve(
            &r.from_timeframe_group_id,
            f,
            r.line,
            "from_timeframe_group_id",
        )?;
        let to_timeframe =
            timeframes.resolve(&r.to_timeframe_group_id, f, r.line, "to_timeframe_group_id")?;
        let product = products.resolve(&r.fare_product_id, f, r.line, "fare_product_id")?;
        mark(&mut network_explicit, network);
        mark(&mut area_explicit, from_area);
        mark(&mut area_explicit_to, to_area);
        table.leg_rules.push(LegRule {
            origin: format!("{f}:{}", r.line),
            leg_group: leg_groups.resolve(&r.leg_group_id, f, r.line, "leg_group_id")?,
            network,
            from_area,
            to_area,
            from_timeframe,
            to_timeframe,
            product,
            pricing: Pricing::Product,
            priority: r.rule_priority.unwrap_or(0),
        });
    }
    table.networks = networks
        .order
        .iter()
        .zip(&network_explicit)
        .map(|(id, &explicit)| Network {
            id: id.clone(),
            explicit,
            tap_out: None,
        })
        .collect();
    table.areas = areas
        .order
        .iter()
        .zip(area_explicit.iter().zip(&area_explicit_to))
        .map(|(id, (&explicit, &explicit_to))| Named {
            id: id.clone(),
            explicit,
            explicit_to,
        })
        .collect();

    // --- join rules ----------------------------------------------------------------------------
    for j in &feed.fare_leg_join_rules {
        let f = FARE_LEG_JOIN_RULES;
        table.join_rules.push(JoinRule {
            from_network: networks.resolve(&j.from_network_id, f, j.line, "from_network_id")?,
            to_network: networks.resolve(&j.to_network_id, f, j.line, "to_network_id")?,
            from_stop: stops.resolve(&j.from_stop_id, f, j.line, "from_stop_id")?,
            to_stop: stops.resolve(&j.to_stop_id, f, j.line, "to_stop_id")?,
        });
    }

    // --- transfer rules ------------------------------------------------------------------------
    for t in &feed.fare_transfer_rules {
        let f = FARE_TRANSFER_RULES;
        let transfer_count = match t.transfer_count {
            Some(n) if n >= 1 => Some(u16::try_from(n).map_err(|_| GtfsError::Invalid {
                file: f,
                line: t.line,
                field: "transfer_count",
                message: format!(
                    "{n} is more transfers than supported (at most {})",
                    u16::MAX
                ),
            })?),
            _ => None,
        };
        let duration_from = match t.duration_limit_type {
            Some(1) => DurationFrom::DepartureToDeparture,
            Some(2) => DurationFrom::ArrivalToDeparture,
            Some(3) => DurationFrom::ArrivalToArrival,
            _ => DurationFrom::DepartureToArrival,
        };
        let kind = match t.fare_transfer_type {
            0 => TransferKind::FromLegPlusTransfer,
            1 => TransferKind::FromLegPlusTransferPlusToLeg,
            _ => TransferKind::TransferOnly,
        };
        table.transfer_rules.push(TransferRule {
            origin: format!("{f}:{}", t.line),
            from_group: leg_groups.resolve(&t.from_leg_group_id, f, t.line, "from_leg_group_id")?,
            to_group: leg_groups.resolve(&t.to_leg_group_id, f, t.line, "to_leg_group_id")?,
            transfer_count,
            duration_limit_s: t.duration_limit,
            duration_from,
            kind,
            product: products.resolve(&t.fare_product_id, f, t.line, "fare_product_id")?,
            at_timeframe: NONE,
        });
    }
    Ok(table)
}

fn mark(flags: &mut [bool], i: Idx) {
    if let Some(flag) = flags.get_mut(usize::from(i)) {
        *flag = true;
    }
}

/// [`load_dir`] then [`compile`].
pub fn load_and_compile(dir: &Path) -> Result<Table> {
    compile(&load_dir(dir)?)
}

#[cfg(test)]
mod tests {
    use super::*;

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
