//! The rail ticket office: an internet merchant (account `merchant:rail-tickets`, its own
//! merchant token) selling train tickets online during the day. Its customers are riders who
//! pay from their cards through the typed relay client (`charging::client::Client::pay`),
//! exactly as the day's online top-ups are relayed: the server debits the card inside the HSM
//! and books card → merchant once.
//!
//! Some clients vanish mid-relay (the loads' fault injection, [`crate::faults::pick_vanish`]).
//! The rider pays the same payment again at the card's next contact (before its next tap, or
//! at the day's end), and that contact settles the torn one first: paid by the torn dialogue
//! (`already_paid`), or voided and paid now — never twice. Some tickets are cancelled: the
//! office refunds them wholly or keeping a fee, and the card that paid collects the refund
//! online (a Credit by the HSM), torn the same way and collected again at the next contact.

use crate::back_office::{BackOffice, RAIL_SHOP};
use crate::faults::pick_vanish;
use crate::riders::{self, Rider};
use crate::tally::MerchantTally;
use crate::SimError;
use charging::client::{Client, Ending, Relayed, Vanish};
use charging::load::Reply;
use purse::sam::SoftwareHsm;
use purse::txn::EmulatedReader;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The ticket office's merchant name (its token's name and its account `merchant:<name>`).
pub const MERCHANT: &str = "rail-tickets";

/// One sale every this many taps.
pub const SALE_EVERY_TAPS: u32 = 50;

/// Tickets on sale: the trip and its fare in currency units of the card scheme (KRW).
const TICKETS: [(&str, i64); 4] = [
    ("Seoul → Incheon Airport, AREX", 4_450),
    ("Seoul → Suwon, ITX-Saemaeul", 4_800),
    ("Yongsan → Gwangmyeong, KTX", 8_400),
    ("Seoul → Cheonan-Asan, KTX", 14_000),
];

/// The refusal of a card that holds too little.
const INSUFFICIENT: &str = "insufficient_value";

/// One ticket in five is cancelled and refunded; half of those keep a 10 % fee.
const REFUND_ONE_IN: u32 = 5;

/// A payment refused because the card holds too little: the rider tops up online and pays
/// it again ([`Shop::pay_after_top_up`]).
#[derive(Debug)]
pub struct Short {
    /// The payment's id.
    pub payment: String,
    /// Its amount, minor units.
    pub amount: i32,
    /// A tag of its own for the top-up's keys (`shop-<n>`).
    pub tag: String,
}

/// The ticket office and its day.
pub struct Shop {
    rng: StdRng,
    /// Per mille of the office's relays (payments, collections) whose client vanishes.
    tear_per_mille: u32,
    orders: u32,
    keys: u32,
    /// What the office's customers paid and were refunded.
    pub tally: MerchantTally,
}

impl Shop {
    /// The office of a day with `seed`, selling in `currency` (minor-unit `exponent`); its
    /// customers' phones lose the relay five times as often as a card is torn at a gate
    /// (`tear_per_mille`), at most 40 %.
    pub fn new(seed: u64, tear_per_mille: u32, currency: &str, exponent: u8) -> Shop {
        Shop {
            rng: StdRng::seed_from_u64(seed ^ 0x7a11),
            tear_per_mille: tear_per_mille.saturating_mul(5).min(400),
            orders: 0,
            keys: 0,
            tally: MerchantTally {
                currency: currency.to_string(),
                exponent,
                ..MerchantTally::default()
            },
        }
    }

    /// The customer of the sale at this point of the day: a rider other than the first (whose
    /// card is reported lost), whose card is not waiting at a gate that tore it.
    pub fn customer(&mut self, riders: &[Rider]) -> Option<usize> {
        if riders.len() < 2 {
            return None;
        }
        let ri = self.rng.gen_range(1..riders.len());
        riders[ri].torn_at.is_none().then_some(ri)
    }

    /// One sale: the office makes a payment for a ticket; the rider pays it from the card
    /// (call [`Shop::next_contact`] first: a torn payment or collection is settled before).
    /// A card short of value comes back as [`Short`].
    pub fn sell(
        &mut self,
        office: &BackOffice,
        rider: &mut Rider,
        hsm: &SoftwareHsm,
    ) -> Result<Option<Short>, SimError> {
        self.orders += 1;
        let (trip, units) = TICKETS[self.rng.gen_range(0..TICKETS.len())];
        let amount = i32::try_from(units * 10i64.pow(u32::from(self.tally.exponent)))
            .map_err(|_| SimError::Setup(format!("a ticket of {units} units overflows")))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_err(|e| SimError::Setup(e.to_string()))?
            .as_millis() as u64;
        let made = office.post(
            "/v1/merchant/payments",
            RAIL_SHOP,
            serde_json::json!({
                "amount_minor": amount,
                "currency": self.tally.currency,
                "order_id": format!("T-{:05}", self.orders),
                "description": trip,
                "expires": charging::api::rfc3339(now_ms + 3_600_000),
            }),
        )?;
        let id = made["id"]
            .as_str()
            .ok_or_else(|| SimError::Shop(format!("a payment without an id: {made}")))?
            .to_string();
        self.tally.payments_made += 1;
        let vanish = self.vanish();
        let out = self.relay(office, rider, hsm, Relay::Pay(&id), vanish)?;
        match out.ending {
            Ending::Answered(Reply::Completed { .. }) => {
                self.paid(office, rider, hsm, &id, amount)?;
            }
            Ending::Answered(Reply::Refused { reason, .. }) if reason == INSUFFICIENT => {
                return Ok(Some(self.short(id, amount)))
            }
            Ending::Answered(Reply::Refused { reason, .. }) => {
                *self.tally.payments_refused.entry(reason).or_default() += 1;
            }
            Ending::Answered(Reply::Pending { .. } | Reply::Command { .. })
            | Ending::Vanished { .. } => {
                self.tally.payments_torn += 1;
                rider.pending_payment = Some((id, amount));
            }
        }
        Ok(None)
    }

    /// The rider topped up after `short`: pays that payment again (not torn).
    pub fn pay_after_top_up(
        &mut self,
        office: &BackOffice,
        rider: &mut Rider,
        hsm: &SoftwareHsm,
        short: Short,
    ) -> Result<(), SimError> {
        self.tally.payments_after_top_up += 1;
        let (id, amount) = (short.payment, short.amount);
        match self
            .relay(office, rider, hsm, Relay::Pay(&id), None)?
            .ending
        {
            Ending::Answered(Reply::Completed { .. }) => self.paid(office, rider, hsm, &id, amount),
            Ending::Answered(Reply::Refused { reason, .. }) => {
                *self.tally.payments_refused.entry(reason).or_default() += 1;
                Ok(())
            }
            other => Err(SimError::Shop(format!(
                "payment {id} paid after a top-up without a final answer: {other:?}"
            ))),
        }
    }

    /// The card's next contact with the office: a torn payment paid again (which settles the
    /// torn one first), a torn collection collected again. A torn payment the card had not
    /// made and cannot cover comes back as [`Short`].
    pub fn next_contact(
        &mut self,
        office: &BackOffice,
        rider: &mut Rider,
        hsm: &SoftwareHsm,
    ) -> Result<Option<Short>, SimError> {
        let (payment, refund) = (rider.pending_payment.take(), rider.pending_refund.take());
        let mut short = None;
        if let Some((id, amount)) = payment {
            match self
                .relay(office, rider, hsm, Relay::Pay(&id), None)?
                .ending
            {
                Ending::Answered(Reply::Completed { .. }) => {
                    self.tally.payments_torn_paid_on_retry += 1;
                    self.paid(office, rider, hsm, &id, amount)?;
                }
                // Refused: paid by the torn dialogue (`already_paid`; a card left holding less
                // than the amount is answered `insufficient_value` even then, so the payment's
                // state decides), or not made and refused now.
                Ending::Answered(Reply::Refused { reason, .. }) => {
                    if self.state(office, rider, &id)? == "completed" {
                        self.tally.payments_torn_paid_before += 1;
                        self.paid(office, rider, hsm, &id, amount)?;
                    } else if reason == INSUFFICIENT {
                        self.tally.payments_torn_refused_on_retry += 1;
                        short = Some(self.short(id, amount));
                    } else {
                        self.tally.payments_torn_refused_on_retry += 1;
                        *self.tally.payments_refused.entry(reason).or_default() += 1;
                    }
                }
                other => {
                    return Err(SimError::Shop(format!(
                        "payment {id} paid again without a final answer: {other:?}"
                    )))
                }
            }
        }
        if let Some((refund, amount)) = refund {
            match self
                .relay(office, rider, hsm, Relay::Collect(&refund), None)?
                .ending
            {
                Ending::Answered(Reply::Completed { .. }) => {
                    self.tally.collections_torn_credited_on_retry += 1;
                }
                Ending::Answered(Reply::Refused { reason, .. })
                    if reason == "refund_not_collectable" =>
                {
                    self.tally.collections_torn_credited_before += 1;
                }
                other => {
                    return Err(SimError::Shop(format!(
                        "refund {refund} collected again: {other:?}"
                    )))
                }
            }
            self.collected(amount);
        }
        Ok(short)
    }

    /// Payment `id`'s state as the rider's client reads it (`GET /v1/payments/{id}`).
    fn state(&self, office: &BackOffice, rider: &Rider, id: &str) -> Result<String, SimError> {
        let client = Client::with_agent(office.agent.clone(), &office.base, &rider.token);
        let p = client.payment(id)?;
        Ok(p["state"].as_str().unwrap_or_default().to_string())
    }

    /// Payment `id` of `amount` is paid; one ticket in [`REFUND_ONE_IN`] is cancelled: the
    /// office refunds it (wholly, or keeping a 10 % fee) and the card collects it at once.
    fn paid(
        &mut self,
        office: &BackOffice,
        rider: &mut Rider,
        hsm: &SoftwareHsm,
        id: &str,
        amount: i32,
    ) -> Result<(), SimError> {
        self.tally.payments_completed += 1;
        self.tally.paid_minor += i64::from(amount);
        if !self.rng.gen_ratio(1, REFUND_ONE_IN) {
            return Ok(());
        }
        let unit = 10i32.pow(u32::from(self.tally.exponent));
        let fee = amount / unit / 10 * unit;
        let whole = self.rng.gen_bool(0.5) || fee == 0;
        let refund_minor = if whole { amount } else { amount - fee };
        let key = self.next_key("refund");
        let made = office.post_keyed(
            &format!("/v1/merchant/payments/{id}/refunds"),
            RAIL_SHOP,
            Some(&key),
            serde_json::json!({ "amount_minor": refund_minor }),
        )?;
        let refund = made["id"]
            .as_str()
            .ok_or_else(|| SimError::Shop(format!("a refund without an id: {made}")))?
            .to_string();
        self.tally.refunds += 1;
        self.tally.refunds_whole += u64::from(whole);
        self.tally.refunds_partial += u64::from(!whole);
        self.tally.refunded_minor += i64::from(refund_minor);
        let vanish = self.vanish();
        match self
            .relay(office, rider, hsm, Relay::Collect(&refund), vanish)?
            .ending
        {
            Ending::Answered(Reply::Completed { .. }) => self.collected(refund_minor),
            Ending::Answered(Reply::Pending { .. }) | Ending::Vanished { .. } => {
                self.tally.collections_torn += 1;
                rider.pending_refund = Some((refund, refund_minor));
            }
            other => {
                return Err(SimError::Shop(format!(
                    "refund {refund} not collected: {other:?}"
                )))
            }
        }
        Ok(())
    }

    /// Whether and where the client vanishes: as the top-ups' clients do, or (half of the
    /// tears) right after the card received CommitTransaction — the card made the change and
    /// the server never heard.
    fn vanish(&mut self) -> Option<Vanish> {
        let v = pick_vanish(&mut self.rng, self.tear_per_mille)?;
        Some(if self.rng.gen_bool(0.5) {
            Vanish::AfterIns(purse::apdu::ins::COMMIT_TRANSACTION)
        } else {
            v
        })
    }

    fn short(&mut self, payment: String, amount: i32) -> Short {
        self.keys += 1;
        Short {
            payment,
            amount,
            tag: format!("shop-{}", self.keys),
        }
    }

    fn collected(&mut self, amount: i32) {
        self.tally.refunds_collected += 1;
        self.tally.refunds_collected_minor += i64::from(amount);
    }

    fn next_key(&mut self, what: &str) -> String {
        self.keys += 1;
        format!("demo-shop-{what}-{}", self.keys)
    }

    /// Relays paying a payment from the rider's card, or collecting a refund onto it, under a
    /// fresh idempotency key (`vanish`: the client goes away mid-relay); then powers the card up
    /// again.
    fn relay(
        &mut self,
        office: &BackOffice,
        rider: &mut Rider,
        hsm: &SoftwareHsm,
        what: Relay<'_>,
        vanish: Option<Vanish>,
    ) -> Result<Relayed, SimError> {
        let key = self.next_key(match what {
            Relay::Pay(_) => "pay",
            Relay::Collect(_) => "collect",
        });
        let client = Client::with_agent(office.agent.clone(), &office.base, &rider.token);
        let mut reader = EmulatedReader {
            card: &mut rider.card,
            rng: rand::rngs::OsRng,
        };
        let out = match what {
            Relay::Pay(id) => client.pay(&mut reader, id, &key, vanish),
            Relay::Collect(refund) => client.collect_refund(&mut reader, refund, &key, vanish),
        }?;
        riders::repower(&mut rider.card, hsm)?;
        Ok(out)
    }
}

/// What a card relay of the ticket office does: pay a payment (its id) or collect a refund (its
/// id).
#[derive(Clone, Copy)]
enum Relay<'a> {
    Pay(&'a str),
    Collect(&'a str),
}
