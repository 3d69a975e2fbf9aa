//! What tapgate's HTTP APIs (charging, gateway) share: bearer-token roles ([`auth`]) and the
//! HTTP/HTTPS listener ([`serve`]), which gives every request an id ([`request_id`]); and the
//! pages' sign-in, sessions, CSRF tokens, templates and charts ([`pages`]); and how times and
//! amounts are shown to people ([`show`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod pages;
pub mod request_id;
pub mod serve;
pub mod show;
