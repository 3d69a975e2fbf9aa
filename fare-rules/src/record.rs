//! The 32-byte trip record validators write to the card's cyclic record file at every tap.
//!
//! The newest record carries the rider's running accumulators (paid today, paid this week, paid
//! trips today) and the state of the current journey (when it started, how much it has cost,
//! how many transfers), so a validator with no network quotes the next tap from the card alone.
//! Ids are stored as the table's 24-bit codes ([`crate::table::code24`]), which survive a new
//! table version.
//!
//! | bytes  | field                                        |
//! |--------|----------------------------------------------|
//! | 0      | record format (1)                            |
//! | 1      | kind: 1 entry, 2 tap-in, 3 tap-out, 4 charge |
//! | 2      | flags: 1 transfer, 2 capped, 4 penalty, 8 pass |
//! | 3      | transfers in the journey so far              |
//! | 4..8   | time, local seconds since 1970 (u32 BE)      |
//! | 8..11  | route code                                   |
//! | 11..14 | stop code (where this tap happened)          |
//! | 14..17 | entry stop code (tap-out: where it began)    |
//! | 17..19 | seconds since the journey began (u16)        |
//! | 19..22 | fare charged at this tap (minor units, u24)  |
//! | 22..25 | paid in this journey so far                  |
//! | 25..28 | paid this service day                        |
//! | 28..31 | paid this week                               |
//! | 31     | paid trips this service day                  |

/// Size of a trip record (the card's record size).
pub const RECORD_LEN: usize = 32;
/// The record format this crate writes.
pub const RECORD_FORMAT: u8 = 1;
/// Largest amount a u24 field holds.
pub const U24_MAX: u32 = 0x00ff_ffff;

/// What a tap was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TapKind {
    /// A single tap that pays the whole leg (a bus boarding, a flat-fare gate).
    Entry,
    /// Tap-in where the network needs a tap-out.
    In,
    /// Tap-out.
    Out,
    /// A non-transit charge (pay-TV) or a sale.
    Charge,
}

impl TapKind {
    fn code(self) -> u8 {
        match self {
            TapKind::Entry => 1,
            TapKind::In => 2,
            TapKind::Out => 3,
            TapKind::Charge => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => TapKind::Entry,
            2 => TapKind::In,
            3 => TapKind::Out,
            4 => TapKind::Charge,
            _ => return None,
        })
    }
}

/// Record flags.
pub mod flags {
    /// The tap continued a journey under a transfer rule.
    pub const TRANSFER: u8 = 1;
    /// A cap reduced the fare.
    pub const CAPPED: u8 = 2;
    /// A missing tap-out penalty was charged.
    pub const PENALTY: u8 = 4;
    /// A pass covered the tap.
    pub const PASS: u8 = 8;
}

/// A decoded trip record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TripRecord {
    pub kind: Option<TapKind>,
    pub flags: u8,
    pub transfers: u8,
    pub time_s: u32,
    pub route_code: u32,
    pub stop_code: u32,
    pub entry_stop_code: u32,
    pub journey_offset_s: u16,
    pub fare_minor: u32,
    pub journey_paid_minor: u32,
    pub day_paid_minor: u32,
    pub week_paid_minor: u32,
    pub day_trips: u8,
}

/// Why a record could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("trip record format {0} is not one this validator reads (expected 1)")]
    Format(u8),
    #[error("trip record kind {0} is unknown")]
    Kind(u8),
}

fn put24(b: &mut [u8], v: u32) {
    let v = v.min(U24_MAX);
    b[0] = (v >> 16) as u8;
    b[1] = (v >> 8) as u8;
    b[2] = v as u8;
}

fn get24(b: &[u8]) -> u32 {
    u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2])
}

impl TripRecord {
    /// Whether this is an empty (all-zero) slot.
    pub fn is_empty(&self) -> bool {
        self.kind.is_none()
    }

    /// When the journey this tap belongs to began.
    pub fn journey_start_s(&self) -> u32 {
        self.time_s.saturating_sub(u32::from(self.journey_offset_s))
    }

    /// Encodes into the card's 32 bytes (amounts above 16,777,215 minor units saturate).
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        let Some(kind) = self.kind else { return b };
        b[0] = RECORD_FORMAT;
        b[1] = kind.code();
        b[2] = self.flags;
        b[3] = self.transfers;
        b[4..8].copy_from_slice(&self.time_s.to_be_bytes());
        put24(&mut b[8..11], self.route_code);
        put24(&mut b[11..14], self.stop_code);
        put24(&mut b[14..17], self.entry_stop_code);
        b[17..19].copy_from_slice(&self.journey_offset_s.to_be_bytes());
        put24(&mut b[19..22], self.fare_minor);
        put24(&mut b[22..25], self.journey_paid_minor);
        put24(&mut b[25..28], self.day_paid_minor);
        put24(&mut b[28..31], self.week_paid_minor);
        b[31] = self.day_trips;
        b
    }

    /// Decodes 32 bytes; an all-zero slot is an empty record.
    pub fn decode(b: &[u8; RECORD_LEN]) -> Result<Self, RecordError> {
        if b.iter().all(|&x| x == 0) {
            return Ok(Self::default());
        }
        if b[0] != RECORD_FORMAT {
            return Err(RecordError::Format(b[0]));
        }
        let kind = TapKind::from_code(b[1]).ok_or(RecordError::Kind(b[1]))?;
        Ok(Self {
            kind: Some(kind),
            flags: b[2],
            transfers: b[3],
            time_s: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            route_code: get24(&b[8..11]),
            stop_code: get24(&b[11..14]),
            entry_stop_code: get24(&b[14..17]),
            journey_offset_s: u16::from_be_bytes([b[17], b[18]]),
            fare_minor: get24(&b[19..22]),
            journey_paid_minor: get24(&b[22..25]),
            day_paid_minor: get24(&b[25..28]),
            week_paid_minor: get24(&b[28..31]),
            day_trips: b[31],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_slot_is_empty() {
        assert!(TripRecord::decode(&[0; 32]).unwrap().is_empty());
        assert_eq!(TripRecord::default().encode(), [0; 32]);
    }

    #[test]
    fn unknown_format_and_kind_are_refused() {
        let mut b = [0u8; 32];
        b[0] = 9;
        assert_eq!(TripRecord::decode(&b), Err(RecordError::Format(9)));
        b[0] = 1;
        b[1] = 7;
        assert_eq!(TripRecord::decode(&b), Err(RecordError::Kind(7)));
    }

    proptest! {
        #[test]
        fn round_trips(kind in 1u8..=4, flags: u8, transfers: u8, time_s: u32,
                       route in 0u32..=U24_MAX, stop in 0u32..=U24_MAX, entry in 0u32..=U24_MAX,
                       off: u16, fare in 0u32..=U24_MAX, jp in 0u32..=U24_MAX,
                       dp in 0u32..=U24_MAX, wp in 0u32..=U24_MAX, trips: u8) {
            let r = TripRecord {
                kind: TapKind::from_code(kind), flags, transfers, time_s, route_code: route,
                stop_code: stop, entry_stop_code: entry, journey_offset_s: off, fare_minor: fare,
                journey_paid_minor: jp, day_paid_minor: dp, week_paid_minor: wp, day_trips: trips,
            };
            prop_assert_eq!(TripRecord::decode(&r.encode()).unwrap(), r);
        }
    }
}
