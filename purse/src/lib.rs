//! # purse — the sans-IO core of tapgate
//!
//! Cards, SAMs, HSMs, keys, APDUs and wire formats as pure functions and state machines over
//! bytes. This crate never reads a clock (time is a parameter), never draws randomness it was
//! not handed (an `RngCore` parameter), never opens a file or a socket, and knows no tokio.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod apdu;
pub mod batch;
pub mod blocklist;
pub mod card;
pub mod confirm;
pub mod crypto;
pub mod keys;
pub mod receipt;
pub mod sam;
pub mod sm;
pub mod tap;
pub mod txn;
