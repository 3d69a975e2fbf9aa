//! The validator's quote at a tap: the journey rebuilt from the card's trip records,
//! tap-in and tap-out, repeats, penalties, passes and caps.

use super::*;
use crate::record::{flags, TapKind, TripRecord, U24_MAX};

impl Engine {
    pub(super) fn service_day(&self, t: u32) -> i32 {
        day_of(i64::from(t) - i64::from(self.table.meta.day_start_s))
    }

    /// Quotes a tap at a validator from what the card holds.
    pub fn quote_tap(&self, card: &CardView<'_>, tap: &Tap) -> Result<TapQuote, QuoteError> {
        if !self.in_effect(i64::from(tap.time_s)) {
            return Err(QuoteError::NotEffective);
        }
        let rider = self.resolve(card.rider);
        let net = self.check_leg(
            &Leg {
                route: tap.route,
                from_stop: tap.stop,
                to_stop: tap.stop,
                ..Leg::default()
            },
            0,
        )?;
        let tap_out = self.tap_out_of(net);
        if tap.kind == TapKind::Out && tap_out.is_none() {
            return Err(QuoteError::TapOutNotUsed);
        }
        let newest = newest_record(card.history);
        let stop_code = self.table.stops[tap.stop as usize].code;
        let route_code = self.table.routes[tap.route as usize].code;
        // A validator clock behind the card's newest record: the tap is taken as happening
        // right after it, so journeys, windows and caps stay consistent.
        let (time_s, elapsed_s) = if newest.is_empty() {
            (tap.time_s, 0)
        } else {
            let t = tap.time_s.max(newest.time_s);
            (t, t - newest.time_s)
        };

        // The same tap again (a passenger tapping twice): nothing more.
        let repeat = !newest.is_empty()
            && newest.kind == Some(tap.kind)
            && (newest.stop_code, newest.route_code) == (stop_code, route_code)
            && tap.time_s >= newest.time_s
            && elapsed_s <= REPEAT_WINDOW_S;
        if repeat {
            return Ok(TapQuote::repeat_of(newest));
        }

        let (day_paid, week_paid, day_trips) = self.accumulators(&newest, time_s);
        let mut record = TripRecord {
            kind: Some(tap.kind),
            flags: 0,
            transfers: 0,
            time_s,
            route_code,
            stop_code,
            entry_stop_code: stop_code,
            journey_offset_s: 0,
            fare_minor: 0,
            journey_paid_minor: 0,
            day_paid_minor: day_paid,
            week_paid_minor: week_paid,
            day_trips,
        };
        // The newest record's trip: a tap-in not closed yet, on a network that taps out.
        let newest_net = self
            .route_by_code(newest.route_code)
            .map_or(NONE, |r| self.table.routes[r as usize].network);
        let open_in = newest.kind == Some(TapKind::In) && self.tap_out_of(newest_net).is_some();
        let open_by_pass = open_in && newest.flags & flags::PASS != 0;

        // A pass covers the tap; a tap-out closes a trip a pass covered at entry.
        let covering = self.covering_pass(card.passes, rider, net, time_s);
        let closes_pass_trip = tap.kind == TapKind::Out
            && open_by_pass
            && newest_net == net
            && tap_out.is_some_and(|o| elapsed_s <= o.max_trip_s);
        if covering.is_some() || closes_pass_trip {
            record.flags |= flags::PASS;
            if tap.kind == TapKind::Out {
                record.entry_stop_code = newest.stop_code;
            }
            return Ok(TapQuote {
                pass: covering.unwrap_or(NONE),
                repeat: false,
                ..TapQuote::repeat_of(record)
            });
        }

        // The current journey from the card's records (oldest first).
        let mut legs = [Leg::default(); MAX_LEGS];
        let (nlegs, open) = self.journey_on_card(card.history, &newest, time_s, &mut legs);

        let at = At {
            rider,
            tap,
            net,
            tap_out,
            newest: &newest,
            newest_net,
            open_in,
            open_by_pass,
            elapsed_s,
            time_s,
            stop_code,
        };
        let step = if tap.kind == TapKind::Out {
            self.tap_out_step(&at, &mut legs[..nlegs], open)?
        } else {
            self.tap_in_step(&at, &mut legs, if open_in { 0 } else { nlegs })?
        };
        let (mut base, penalty, transfer) = (step.base, step.penalty, step.transfer);
        let continue_journey = step.continue_journey;
        if step.penalised {
            record.flags |= flags::PENALTY;
        }

        // A leg priced as a new fare is a new trip, even inside a journey kept on the card.
        let new_trip = !continue_journey || (tap.kind != TapKind::Out && !transfer);
        let before_caps = base;
        let (room, cap) = self.cap_room(rider, (day_paid, week_paid, day_trips), new_trip, &newest);
        let cap_idx = if room < base {
            base = room;
            record.flags |= flags::CAPPED;
            cap
        } else {
            NONE
        };
        let fare = base.saturating_add(penalty).min(U24_MAX);

        journey_fields(
            &mut record,
            &newest,
            tap.kind,
            (continue_journey, transfer, new_trip),
            (base, penalty, fare),
            day_trips,
        );
        record.entry_stop_code = step.entry_stop_code;
        record.fare_minor = fare;
        record.day_paid_minor = day_paid.saturating_add(fare).min(U24_MAX);
        record.week_paid_minor = week_paid.saturating_add(fare).min(U24_MAX);
        Ok(TapQuote {
            fare_minor: fare,
            record,
            before_caps_minor: before_caps,
            penalty_minor: penalty,
            cap: cap_idx,
            pass: NONE,
            journey: step.priced,
            repeat: false,
        })
    }

    /// A tap-out: the rest of the open leg's fare (the journey priced with the leg closed here
    /// less without), or the penalty fare when the trip ran out of time or never began.
    fn tap_out_step(&self, at: &At<'_>, legs: &mut [Leg], open: bool) -> Result<Step, QuoteError> {
        let mut step = Step {
            entry_stop_code: at.stop_code,
            ..Step::default()
        };
        let same_trip = at.open_in && at.newest_net == at.net;
        let in_time = same_trip && at.tap_out.is_some_and(|o| at.elapsed_s <= o.max_trip_s);
        let n = legs.len();
        if in_time && open && n > 0 {
            let before = self.price_journey(at.rider, legs)?;
            step.entry_stop_code = self.table.stops[legs[n - 1].from_stop as usize].code;
            legs[n - 1].to_stop = at.tap.stop;
            legs[n - 1].arrival_s = i64::from(at.time_s);
            let after = self.price_journey(at.rider, legs)?;
            step.base = after.total_minor.saturating_sub(before.total_minor) as u32;
            step.transfer = n > 1;
            step.continue_journey = true;
            step.priced = Some(after);
        } else if same_trip {
            // Tapped out after the trip's time ran out: the penalty fare, less what the
            // tap-in paid; the journey ends here.
            step.penalty = at
                .tap_out
                .map_or(0, |o| o.penalty_minor)
                .saturating_sub(at.newest.fare_minor);
            step.entry_stop_code = at.newest.stop_code;
            step.penalised = true;
        } else {
            // A tap-out with no tap-in: the penalty fare, as a journey of its own.
            step.penalty = at.tap_out.map_or(0, |o| o.penalty_minor);
            step.penalised = true;
        }
        Ok(step)
    }

    /// A tap-in: what the new leg adds to the journey's lowest total (the journey goes on), or
    /// a new fare (a new journey); plus the penalty of a trip left open before it.
    fn tap_in_step(
        &self,
        at: &At<'_>,
        legs: &mut [Leg; MAX_LEGS],
        nlegs: usize,
    ) -> Result<Step, QuoteError> {
        let mut step = Step {
            entry_stop_code: at.stop_code,
            ..Step::default()
        };
        if at.open_in && !at.open_by_pass {
            // The previous trip was never closed: its penalty, less what its tap-in paid.
            if let Some(o) = self.tap_out_of(at.newest_net) {
                step.penalty = o.penalty_minor.saturating_sub(at.newest.fare_minor);
                step.penalised = true;
            }
        }
        let t = i64::from(at.time_s);
        let leg = Leg {
            route: at.tap.route,
            from_stop: at.tap.stop,
            to_stop: at.tap.stop,
            departure_s: t,
            arrival_s: t,
        };
        let single = self.price_journey(at.rider, &[leg])?;
        step.base = single.total_minor as u32;
        step.priced = Some(single);
        if nlegs == 0 || nlegs >= MAX_LEGS {
            return Ok(step);
        }
        let Ok(before) = self.price_journey(at.rider, &legs[..nlegs]) else {
            return Ok(step);
        };
        legs[nlegs] = leg;
        let Ok(after) = self.price_journey(at.rider, &legs[..=nlegs]) else {
            return Ok(step);
        };
        let e = after.legs()[after.n as usize - 1];
        let joined = e.transfer != NONE || usize::from(e.first_leg) < nlegs;
        // The journey goes on when the leg joins it, and also when it is cheapest as a new
        // fare but a transfer rule could still take it into a chain with the earlier legs: a
        // later leg may make that chain the cheaper one, and charging the difference of the
        // journey's price keeps the taps adding up to it.
        if joined || after.last_may_transfer {
            step.base = after.total_minor.saturating_sub(before.total_minor) as u32;
            step.transfer = joined;
            step.continue_journey = true;
            step.priced = Some(after);
        }
        Ok(step)
    }

    /// The journey the card's records show (oldest leg first) into `legs`: how many legs, and
    /// whether the last is an open tap-in. No journey (0 legs) when the newest record ends
    /// one (a pass, a charge, a penalty), when it began more than 18 hours ago, or when a
    /// record of it names a stop or route this table does not know.
    fn journey_on_card(
        &self,
        history: &[TripRecord],
        newest: &TripRecord,
        time_s: u32,
        legs: &mut [Leg; MAX_LEGS],
    ) -> (usize, bool) {
        let continues = !newest.is_empty()
            && newest.flags & flags::PASS == 0
            && newest.kind != Some(TapKind::Charge)
            && !(newest.kind == Some(TapKind::Out) && newest.flags & flags::PENALTY != 0)
            && time_s - newest.journey_start_s() <= u32::from(u16::MAX);
        if !continues {
            return (0, false);
        }
        let start = newest.journey_start_s();
        let count = history
            .iter()
            .take_while(|r| !r.is_empty() && r.journey_start_s() == start)
            .count();
        let mut nlegs = 0usize;
        let mut open = false; // the last leg is an open tap-in
        for r in history[..count].iter().rev() {
            if r.flags & flags::PASS != 0 || r.kind == Some(TapKind::Charge) {
                return (0, false);
            }
            let (Some(route), Some(stop)) = (
                self.route_by_code(r.route_code),
                self.stop_by_code(r.stop_code),
            ) else {
                return (0, false);
            };
            let t = i64::from(r.time_s);
            match r.kind {
                Some(TapKind::Out) if open && nlegs > 0 => {
                    let l = &mut legs[nlegs - 1];
                    l.to_stop = stop;
                    l.arrival_s = t;
                    open = false;
                }
                Some(kind) => {
                    let from = if kind == TapKind::Out {
                        self.stop_by_code(r.entry_stop_code).unwrap_or(stop)
                    } else {
                        stop
                    };
                    if nlegs == MAX_LEGS {
                        return (0, false);
                    }
                    legs[nlegs] = Leg {
                        route,
                        from_stop: from,
                        to_stop: stop,
                        departure_s: t,
                        arrival_s: t,
                    };
                    nlegs += 1;
                    open = kind == TapKind::In;
                }
                None => {}
            }
        }
        (nlegs, open)
    }

    /// The most the caps leave to pay (`u32::MAX`: no cap limits it) and the cap that sets it
    /// (`NONE`: none), from the accumulators (paid today, this week, paid trips today).
    fn cap_room(
        &self,
        rider: Rider,
        (day_paid, week_paid, day_trips): (u32, u32, u8),
        new_trip: bool,
        newest: &TripRecord,
    ) -> (u32, Idx) {
        let mut best = (u32::MAX, NONE);
        for (i, cap) in self.table.caps.iter().enumerate() {
            if cap.category != NONE && cap.category != rider.category {
                continue;
            }
            let room = match cap.period {
                CapPeriod::Day => cap.amount_minor.saturating_sub(day_paid),
                CapPeriod::Week => cap.amount_minor.saturating_sub(week_paid),
                CapPeriod::DayTrips(n) => {
                    // Free after n paid trips, including the rest of a journey begun free.
                    if day_trips >= n && (new_trip || newest.journey_paid_minor == 0) {
                        0
                    } else {
                        u32::MAX
                    }
                }
            };
            if room < best.0 {
                best = (room, i as Idx);
            }
        }
        best
    }

    /// Paid this service day, paid this week and paid trips today, from the newest record
    /// (a newest record in the future counts: a clock behind never resets a cap).
    pub(super) fn accumulators(&self, newest: &TripRecord, time_s: u32) -> (u32, u32, u8) {
        if newest.is_empty() {
            return (0, 0, 0);
        }
        let today = self.service_day(time_s);
        let nd = self.service_day(newest.time_s);
        let (mut day_paid, mut week_paid, mut day_trips) = (0, 0, 0);
        if nd >= today {
            day_paid = newest.day_paid_minor;
            day_trips = newest.day_trips;
        }
        if (nd + 3).div_euclid(7) >= (today + 3).div_euclid(7) {
            week_paid = newest.week_paid_minor;
        }
        (day_paid, week_paid, day_trips)
    }

    fn tap_out_of(&self, net: Idx) -> Option<&TapOut> {
        if net == NONE {
            return None;
        }
        self.table.networks[net as usize].tap_out.as_ref()
    }

    fn covering_pass(&self, held: &[HeldPass], rider: Rider, net: Idx, t: u32) -> Option<Idx> {
        held.iter().find_map(|h| {
            if t < h.valid_from_s || t >= h.valid_until_s {
                return None;
            }
            let i = self.table.passes.iter().position(|p| p.code == h.code)?;
            let p = &self.table.passes[i];
            let net_ok = p.networks.is_empty() || p.networks.contains(&net);
            let cat_ok = p.category == NONE || p.category == rider.category;
            (net_ok && cat_ok).then_some(i as Idx)
        })
    }
}

/// The card's newest trip record (an empty one when it has none).
pub(super) fn newest_record(history: &[TripRecord]) -> TripRecord {
    history
        .iter()
        .find(|r| !r.is_empty())
        .copied()
        .unwrap_or_default()
}

/// What the tap quote knows once the card is read: the tap, its network, the newest record
/// and the trip it left open.
struct At<'a> {
    rider: Rider,
    tap: &'a Tap,
    net: Idx,
    tap_out: Option<&'a TapOut>,
    newest: &'a TripRecord,
    newest_net: Idx,
    open_in: bool,
    open_by_pass: bool,
    elapsed_s: u32,
    time_s: u32,
    stop_code: u32,
}

/// What a tap adds to the journey, before caps.
#[derive(Default)]
struct Step {
    base: u32,
    penalty: u32,
    penalised: bool,
    /// The leg continues a transfer chain (or closes a leg of a journey of several).
    transfer: bool,
    continue_journey: bool,
    entry_stop_code: u32,
    priced: Option<Priced>,
}

/// The record's journey fields: a journey that goes on keeps its start and adds to what it
/// paid; a new one starts here. A new paid trip counts towards today's paid trips.
fn journey_fields(
    record: &mut TripRecord,
    newest: &TripRecord,
    kind: TapKind,
    (continue_journey, transfer, new_trip): (bool, bool, bool),
    (base, penalty, fare): (u32, u32, u32),
    day_trips: u8,
) {
    let time_s = record.time_s;
    if continue_journey {
        record.flags |= if transfer { flags::TRANSFER } else { 0 };
        let start = newest.journey_start_s();
        record.journey_offset_s = (time_s - start) as u16;
        record.transfers = if kind == TapKind::Out {
            newest.transfers
        } else {
            newest.transfers.saturating_add(1)
        };
        record.journey_paid_minor = newest.journey_paid_minor.saturating_add(fare);
        if new_trip {
            record.day_trips = day_trips.saturating_add(u8::from(base > 0));
        }
    } else {
        record.journey_paid_minor = fare;
        if kind != TapKind::Out || penalty > 0 {
            record.day_trips = day_trips.saturating_add(u8::from(base > 0 || penalty > 0));
        }
    }
}

impl TapQuote {
    /// A repeated tap: nothing charged, the card's newest record as it is (`record`).
    fn repeat_of(newest: TripRecord) -> TapQuote {
        TapQuote {
            fare_minor: 0,
            record: newest,
            before_caps_minor: 0,
            penalty_minor: 0,
            cap: NONE,
            pass: NONE,
            journey: None,
            repeat: true,
        }
    }
}
