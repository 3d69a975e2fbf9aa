//! purse
