//! # gateway — between the validators and the charging server
//!
//! Verified, de-duplicated, durable tap ingestion ([`store`]), forwarding to clearing in
//! idempotent batches ([`forward`]). (The MQTT daemon, aggregates and blocklist distribution
//! come with the rest of the gateway issue.)
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod broker;
pub mod config;
pub mod console;
pub mod daemon;
pub mod forward;
pub mod metrics;
pub mod mqtt_acl;
pub mod propagation;
pub mod report;
pub mod store;
