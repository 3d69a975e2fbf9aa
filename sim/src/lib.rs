//! tapgate's simulated world, over the real crates: what `tapgate demo` runs and what
//! `bench system` drives the running daemons with.
//!
//! A day ([`day::run`]): the charging server in process ([`back_office`]: software HSM, LMDB
//! ledger, sandbox card processor, a mileage programme, a partner mall selling vouchers);
//! [`riders`] with their cards, tokens and memberships; the metro's validators and a hotel's
//! pay-TV box ([`gates`]: the validator crate's `Gate` with a SAM, a signed fare table and an
//! LMDB journal each); the embedded broker and two gateways ([`operators`]); the validators'
//! MQTT side ([`fleet`]: store-and-forward, confirmations, blocklists); torn dialogues
//! ([`faults`]); a rail ticket office selling tickets online, paid from the riders' cards
//! through the relay, some torn, some refunded ([`shop`]); at the end the ledger checked
//! against every card and the merchant's books ([`check`]). The day is
//! deterministic for a seed and its sizes, but for timings.
//!
//! This crate prints nothing: it reports [`day::Event`]s and a [`tally::DayReport`], and the
//! caller decides what to show.
#![forbid(unsafe_code)]

pub mod back_office;
pub mod check;
pub mod day;
mod error;
pub mod faults;
pub mod fleet;
pub mod gates;
pub mod operators;
pub mod riders;
pub mod shop;
pub mod tally;
pub mod taps;

pub use error::SimError;
