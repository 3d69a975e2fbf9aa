//! # charging — the issuer's back office
//!
//! Online loads driven through the HSM over an APDU relay ([`load`], and its client side,
//! [`client`]), funding sources ([`funding`]), clearing of the gateways' tap batches
//! ([`clearing`]), franchise loads ([`franchise`]), partner vouchers ([`partner`]), the HTTP
//! API ([`api`], [`server`]) and the cardholder pages ([`pages`]), reconciliation ([`reconcile`]) and settlement files
//! ([`settlement`]).
//!
//! Everything that keeps money reaches the double-entry [`ledger`] through its interface:
//! [`ledger::Ledger::read`] (a snapshot, [`ledger::LedgerRead`]) and
//! [`ledger::Ledger::transact`] (one transaction of the ledger's own operations —
//! post, book a counter, complete or void an intent, record an anomaly —,
//! [`ledger::LedgerWrite`]). LMDB is its first backend; no service names a storage type.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod clearing;
pub mod client;
pub mod fares;
pub mod franchise;
pub mod funding;
pub mod ledger;
pub mod load;
pub mod notify;
pub mod pages;
pub mod partner;
pub mod reconcile;
pub mod server;
pub mod settlement;
