//! The validator: what a passenger meets at a bus or rail gate, a hotel pay-TV box, a ticket
//! machine. Offline purse debits against a local SAM, quoted by the fare engine from the card's
//! trip records, journalled durably in LMDB, and forwarded over MQTT until the gateway confirms.
//!
//! - [`card_image`]: atomic, durable writes of an emulated card's image (and the CLI's files).
//! - [`config`]: the configuration file and the start-up choices it decides (placement,
//!   MQTT, crowd, which fare table).
//! - [`gate`]: one tap, start to end, exactly once across tears and crashes.
//! - [`image_lock`]: one holder at a time for an emulated card's image file.
//! - [`journal`]: the LMDB outbox, pending debits and applied downlink messages.
//! - [`reader`]: the `Reader` trait and the emulated crowd; `pcsc_reader` (feature `pcsc`):
//!   PC/SC readers through pcsc-lite; [`vpcd`]: an emulated card served to pcscd through
//!   vsmartcard's vpcd (tests, `tapgate card serve`).
#![deny(unsafe_code)]

pub mod card_image;
pub mod config;
pub mod daemon;
pub mod gate;
pub mod image_lock;
pub mod journal;
#[cfg(feature = "pcsc")]
pub mod pcsc_reader;
pub mod reader;
pub mod vpcd;
