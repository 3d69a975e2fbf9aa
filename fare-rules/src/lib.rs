//! Fare rules: authored by planners (TOML) or imported (GTFS-Fares v2), compiled to a compact
//! signed table, evaluated on-device at every tap.
//!
//! - [`table`]: the compiled model both sources produce.
//! - [`gtfs`]: GTFS-Fares v2 feed loading and compilation.
#![forbid(unsafe_code)]

pub mod cases;
pub mod check;
pub mod engine;
pub mod gtfs;
pub mod journey;
pub mod oracle;
pub mod record;
pub mod signed;
pub mod simulate;
pub mod source;
pub mod synth;
pub mod table;
