//! Non-transit charges (pay-TV, with a day cap) and coupons.

use super::tap::newest_record;
use super::*;
use crate::record::{flags, TapKind, TripRecord, U24_MAX};

/// The row of `rows` (charges, coupons) whose code is `code`, with its index.
fn by_code<T>(
    rows: &[T],
    code: u16,
    code_of: impl Fn(&T) -> u16,
) -> Result<(usize, &T), QuoteError> {
    rows.iter()
        .enumerate()
        .find(|(_, r)| code_of(r) == code)
        .ok_or(QuoteError::UnknownCode(code))
}

impl Engine {
    /// Quotes a non-transit charge (pay-TV): `items` items and `minutes` of viewing at local time
    /// `time_s`, with the service day's cap from the card's accumulators.
    pub fn quote_charge(
        &self,
        card: &CardView<'_>,
        code: u16,
        items: u32,
        minutes: u32,
        time_s: u32,
    ) -> Result<TapQuote, QuoteError> {
        let (ci, c) = by_code(&self.table.charges, code, |c| c.code)?;
        let newest = newest_record(card.history);
        let today = self.service_day(time_s);
        // What this charge has cost today: the running total in the newest record of the same
        // charge (records of charges keep it in the journey-paid field).
        let charge_paid = card
            .history
            .iter()
            .find(|r| r.kind == Some(TapKind::Charge) && r.route_code == u32::from(code))
            .filter(|r| self.service_day(r.time_s) >= today)
            .map_or(0, |r| r.journey_paid_minor);
        let mut amount = u64::from(c.per_item_minor.unwrap_or(0)) * u64::from(items)
            + u64::from(c.per_hour_minor.unwrap_or(0)) * u64::from(minutes.div_ceil(60));
        let before = amount.min(u64::from(U24_MAX)) as u32;
        let mut cap = NONE;
        if let Some(dc) = c.day_cap_minor {
            let room = u64::from(dc.saturating_sub(charge_paid));
            if room < amount {
                amount = room;
                cap = ci as Idx;
            }
        }
        let fare = amount.min(u64::from(U24_MAX)) as u32;
        let acc = self.accumulators(&newest, time_s);
        // A charge does not count towards transit caps: the record carries the transit
        // accumulators forward unchanged (and the charge's own day total in journey-paid).
        let record = TripRecord {
            kind: Some(TapKind::Charge),
            flags: if cap != NONE { flags::CAPPED } else { 0 },
            time_s: if newest.is_empty() {
                time_s
            } else {
                time_s.max(newest.time_s)
            },
            route_code: u32::from(code),
            fare_minor: fare,
            journey_paid_minor: charge_paid.saturating_add(fare).min(U24_MAX),
            day_paid_minor: acc.0,
            week_paid_minor: acc.1,
            day_trips: acc.2,
            ..TripRecord::default()
        };
        Ok(TapQuote {
            fare_minor: fare,
            record,
            before_caps_minor: before,
            penalty_minor: 0,
            cap,
            pass: NONE,
            journey: None,
            repeat: false,
        })
    }

    /// The discount a coupon gives on `amount_minor` on local day `day`.
    pub fn coupon_discount(
        &self,
        code: u16,
        amount_minor: u32,
        day: i32,
        already_used: bool,
    ) -> Result<u32, QuoteError> {
        let (_, c) = by_code(&self.table.coupons, code, |c| c.code)?;
        if c.expires_day.is_some_and(|e| day > e) {
            return Err(QuoteError::CouponExpired);
        }
        if c.single_use && already_used {
            return Err(QuoteError::CouponUsed);
        }
        let off = match (c.value_minor, c.percent) {
            (Some(v), _) => v,
            (None, Some(p)) => (u64::from(amount_minor) * u64::from(p) / 100) as u32,
            (None, None) => 0,
        };
        Ok(off.min(amount_minor))
    }
}
