//! # charging — the issuer's back office
//!
//! Online loads driven through the HSM over an APDU relay, funding sources, the double-entry
//! ledger in LMDB, and (later) clearing of tap batches.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod clearing;
pub mod client;
pub mod franchise;
pub mod funding;
pub mod ledger;
pub mod load;
pub mod partner;
pub mod reconcile;
pub mod server;
pub mod settlement;
