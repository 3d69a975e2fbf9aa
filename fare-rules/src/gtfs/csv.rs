//! Strict CSV reading: header columns by name, records with their line numbers, and the
//! value parsers (dates, times, exact amounts) whose errors name the file, line and field.

use std::collections::HashMap;
use std::path::Path;

use super::{GtfsError, Result};

/// One CSV file: its header's column positions and its records with their line numbers.
pub(super) struct CsvFile {
    pub(super) file: &'static str,
    cols: HashMap<String, usize>,
    rows: Vec<(u64, ::csv::StringRecord)>,
}

impl CsvFile {
    pub(super) fn read(dir: &Path, file: &'static str) -> Result<Option<CsvFile>> {
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

    pub(super) fn parse(file: &'static str, bytes: &[u8]) -> Result<CsvFile> {
        let data = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        // Where the record the reader was at starts: its position is where the reader started
        // looking for it, before the blank lines it skipped (its own line count skips those).
        let record_start = |pos: Option<&::csv::Position>, floor: usize| -> usize {
            let byte = pos.map_or(floor, |p| usize::try_from(p.byte()).unwrap_or(floor));
            let skipped = data.get(byte..).map_or(0, |rest| {
                rest.iter()
                    .take_while(|b| matches!(b, b'\r' | b'\n'))
                    .count()
            });
            byte.saturating_add(skipped).max(floor)
        };
        let csv_err = |e: ::csv::Error| {
            let start = record_start(e.position(), 0);
            GtfsError::Csv {
                file,
                line: 1 + data.get(..start).map_or(0, line_breaks),
                message: match e.kind() {
                    ::csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".to_string(),
                    _ => e.to_string(),
                },
            }
        };
        let mut reader = ::csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(true)
            .trim(::csv::Trim::All)
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

    pub(super) fn has(&self, field: &str) -> bool {
        self.cols.contains_key(field)
    }

    pub(super) fn require(&self, fields: &[&'static str]) -> Result<()> {
        match fields.iter().find(|f| !self.has(f)) {
            Some(field) => Err(GtfsError::MissingColumn {
                file: self.file,
                field,
            }),
            None => Ok(()),
        }
    }

    /// Every row as `row` reads it, once the header has the `required` columns; the first
    /// row `row` refuses is the error.
    pub(super) fn read_rows<T>(
        &self,
        required: &[&'static str],
        row: impl Fn(&Row<'_>) -> Result<T>,
    ) -> Result<Vec<T>> {
        self.require(required)?;
        self.rows().map(|r| row(&r)).collect()
    }

    pub(super) fn rows(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(move |(line, rec)| Row {
            file: self.file,
            line: *line,
            rec,
            cols: &self.cols,
        })
    }
}

/// Line breaks in `bytes` (`\n`, `\r\n` or a lone `\r`).
pub(super) fn line_breaks(bytes: &[u8]) -> u64 {
    let mut n = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\n' || (b == b'\r' && bytes.get(i + 1) != Some(&b'\n')) {
            n += 1;
        }
    }
    n
}

/// One record, its fields looked up by column name.
pub(super) struct Row<'a> {
    pub(super) file: &'static str,
    pub(super) line: u64,
    rec: &'a ::csv::StringRecord,
    cols: &'a HashMap<String, usize>,
}

impl Row<'_> {
    /// The value of `field` (empty when the column or the value is absent).
    pub(super) fn get(&self, field: &str) -> &str {
        self.cols
            .get(field)
            .and_then(|&i| self.rec.get(i))
            .unwrap_or("")
    }

    pub(super) fn s(&self, field: &str) -> String {
        self.get(field).to_string()
    }

    pub(super) fn req(&self, field: &'static str) -> Result<String> {
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

    pub(super) fn bad(&self, field: &'static str, expected: &'static str) -> GtfsError {
        GtfsError::BadValue {
            file: self.file,
            line: self.line,
            field,
            value: self.get(field).to_string(),
            expected,
        }
    }

    pub(super) fn invalid(&self, field: &'static str, message: String) -> GtfsError {
        GtfsError::Invalid {
            file: self.file,
            line: self.line,
            field,
            message,
        }
    }

    /// An optional integer field.
    pub(super) fn int<T: std::str::FromStr>(
        &self,
        field: &'static str,
        expected: &'static str,
    ) -> Result<Option<T>> {
        self.optional(field, |v| v.parse().ok(), expected)
    }

    /// An optional field `parse` reads (`None` when empty; what it refuses is not `expected`).
    fn optional<T>(
        &self,
        field: &'static str,
        parse: impl FnOnce(&str) -> Option<T>,
        expected: &'static str,
    ) -> Result<Option<T>> {
        let v = self.get(field);
        if v.is_empty() {
            return Ok(None);
        }
        parse(v).map(Some).ok_or_else(|| self.bad(field, expected))
    }

    /// An enum field with values `0..=max`; `default` when empty (`None`: required).
    pub(super) fn enumeration(
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

    /// A GTFS boolean, `0` or `1` (`default` when empty; without one an empty field is an
    /// error).
    pub(super) fn flag(&self, field: &'static str, default: Option<bool>) -> Result<bool> {
        Ok(self.enumeration(field, 1, default.map(u8::from), "0 or 1")? == 1)
    }

    /// A `YYYYMMDD` date as days since 1970-01-01 (`None` when empty).
    pub(super) fn date(&self, field: &'static str) -> Result<Option<i32>> {
        self.optional(field, parse_date, "a date as YYYYMMDD, e.g. \"20250131\"")
    }

    /// An `H:MM:SS` time of at most 24:00:00 as seconds after midnight (`None` when empty).
    pub(super) fn time(&self, field: &'static str) -> Result<Option<u32>> {
        let expected = "a time from 00:00:00 to 24:00:00 as HH:MM:SS";
        self.optional(field, parse_time, expected)
    }
}

pub(super) fn parse_date(v: &str) -> Option<i32> {
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

pub(super) fn parse_time(v: &str) -> Option<u32> {
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
pub(super) enum AmountError {
    /// Not a plain decimal number.
    Syntax,
    /// More decimals than the currency has.
    TooPrecise(usize),
    TooLarge,
}

/// Parses a decimal amount string exactly into minor units with `exponent` decimals.
pub(super) fn parse_amount(v: &str, exponent: u8) -> std::result::Result<i32, AmountError> {
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
