//! What tapgate's HTTP APIs (charging, gateway) share: bearer-token roles ([`auth`]) and the
//! HTTP/HTTPS listener ([`serve`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod serve;
