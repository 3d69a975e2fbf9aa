//! Fare rules: authored by planners (TOML) or imported (GTFS-Fares v2), compiled to a compact
//! signed table, evaluated on-device at every tap.
//!
//! - [`table`]: the compiled model both sources produce.
//! - [`source`]: the planners' TOML format and its compiler.
//! - [`gtfs`]: GTFS feeds (Fares v2 and v1, directories and zips) loaded and compiled.
//! - [`load`]: [`load_any`], rules from a path whatever its kind (feed, signed table, TOML).
//! - [`engine`]: the validated, indexed table and its quotes (journey, tap, charge).
//! - [`oracle`]: the brute-force lowest total the property tests compare the engine with.
//! - [`record`]: the trip record on the card; [`signed`]: the signed table file.
//! - [`check`], [`cases`], [`journey`], [`simulate`]: `tapgate fare check`, `test`/`explain`,
//!   `quote` and `simulate`; [`publish`]: the check's review and the checked, signed and
//!   verified table (`fare compile`, `fare publish`, the console); [`synth`]: a synthetic city
//!   for benches and tests.
#![forbid(unsafe_code)]

pub mod cases;
pub mod check;
pub mod engine;
pub mod gtfs;
pub mod journey;
pub mod load;
pub mod oracle;
pub mod publish;
pub mod record;
pub mod signed;
pub mod simulate;
pub mod source;
pub mod synth;
pub mod table;

pub use load::{load_any, load_bytes, LoadError};
