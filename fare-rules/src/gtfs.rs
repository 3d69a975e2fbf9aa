//! GTFS-Fares v2: load a feed directory and compile it into a [`crate::table::Table`].
