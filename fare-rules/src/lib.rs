//! Fare rules: authored by planners, compiled to a compact signed table, evaluated on-device.
//! (Being built under issue 3.)
#![forbid(unsafe_code)]
