//! tapgate's test kit: what the tests of every crate, the root end-to-end tests and the
//! benchmarks share, written once (dev-only, never published).
//!
//! - [`net`]: loopback ports no other test of the process gets, waiting for a listener;
//! - [`wait`]: waiting on a condition with a deadline (never a fixed sleep);
//! - [`process`]: a guard that kills and reaps a child process, a daemon spawned until it
//!   announces its address;
//! - [`mosquitto`]: Mosquitto with a password file and the shipped ACL or configuration;
//! - [`nats`]: a throwaway three-node NATS cluster (JetStream, MQTT) whose nodes can be killed
//!   and restarted;
//! - [`metrics`]: samples read from the Prometheus text of `/metrics`;
//! - [`postgres`]: a throwaway PostgreSQL cluster and a database per test;
//! - [`refusing_front`]: a front to an MQTT broker that refuses subscriptions until told not to;
//! - [`fixtures`]: bearer tokens, personalised cards, value transactions, signed taps;
//! - `http` (feature `http`): the JSON calls with a bearer token the tests make;
//! - `broker` (feature `gateway`): the gateway's embedded broker on a free port;
//! - `mqtt` (feature `mqtt`, with `gateway`): a device's session collecting confirmations;
//! - `softhsm` (feature `softhsm`): SoftHSM2 tokens in temporary directories;
//! - `charging` (feature `charging`): the charging server in process, with either HSM;
//! - `browser` (feature `browser`): chromium through chromedriver, the pages over plain HTTP.
//!
//! Each part a crate may not depend on is behind a feature: the gateway's tests take the kit
//! without `charging`, so the gateway never depends on the charging server, even for tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod fixtures;
pub mod metrics;
pub mod mosquitto;
pub mod nats;
pub mod net;
pub mod postgres;
pub mod process;
pub mod refusing_front;
pub mod wait;

#[cfg(feature = "gateway")]
pub mod broker;
#[cfg(feature = "browser")]
pub mod browser;
#[cfg(feature = "charging")]
pub mod charging;
#[cfg(feature = "http")]
pub mod http;
#[cfg(feature = "mqtt")]
pub mod mqtt;
#[cfg(feature = "softhsm")]
pub mod softhsm;

pub use net::{free_port, wait_for_port, wait_for_port_async};
pub use process::{spawn_charging, Kill};
pub use wait::{wait_until, wait_until_async};
