//! The riders: each with a card registered to its account, a card token at the processor and a
//! mileage membership the airline credits.

use crate::back_office::{rider_token, BackOffice, AIRLINE, OPS};
use crate::SimError;
use purse::card::{Card, Personalisation};
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::Rng;

/// One rider and its card.
pub struct Rider {
    /// The rider's card.
    pub card: Card,
    /// The rider's cardholder token (its account is `rider-<i>`).
    pub token: String,
    /// The rider's card token at the processor, registered to the rider's account.
    pub card_token: String,
    /// The rider's mileage member id, linked to the rider's account by the airline.
    pub member: String,
    /// The validator where the card was last torn: the rider taps there again, and its journal
    /// settles the debit from the card's counter.
    pub torn_at: Option<usize>,
    /// The network of a trip tapped in and not yet out.
    pub trip_network: Option<u16>,
    /// A load whose client vanished (settled by the server at the next load or by clearing).
    pub pending_load: bool,
    /// A payment to the ticket office whose client vanished: the rider pays it again at the
    /// card's next contact, which settles the torn one first (see [`crate::shop`]): its id and amount.
    pub pending_payment: Option<(String, i32)>,
    /// A refund whose collection was torn: collected again at the card's next contact.
    pub pending_refund: Option<(String, i32)>,
}

/// Rider `i`'s card UID.
pub fn uid_of(i: u32) -> [u8; 7] {
    let mut uid = [0x04, 0, 0, 0, 0, 0x1D, 0x80];
    uid[1..5].copy_from_slice(&i.to_be_bytes());
    uid
}

/// Issues `n` cards with a random balance, registered with the back office to their riders;
/// each rider registers a card token, and the airline credits some miles to the rider's
/// membership (partner API).
pub fn issue(
    n: u32,
    office: &BackOffice,
    hsm: &SoftwareHsm,
    rng: &mut StdRng,
) -> Result<Vec<Rider>, SimError> {
    let mut riders = Vec::with_capacity(n as usize);
    for i in 0..n {
        let uid = uid_of(i);
        let balance: i32 = rng.gen_range(0..30_000);
        let name = format!("rider-{i}");
        office.post(
            "/v1/cards",
            OPS,
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": balance, "owner": name}),
        )?;
        let (token, card_token, member) =
            (rider_token(i), format!("tok_visa_{i}"), format!("M{i:06}"));
        office.post(
            "/v1/instruments",
            &token,
            serde_json::json!({"source": "card", "instrument": card_token}),
        )?;
        office.post(
            "/v1/partner/points",
            AIRLINE,
            serde_json::json!({"program": "mileage", "member_id": member, "account": name, "points": 50_000, "reference": format!("welcome-flight-{i}")}),
        )?;
        riders.push(Rider {
            token,
            card_token,
            member,
            card: Card::personalise(
                &Personalisation::transit(uid, balance),
                hsm.card_keys(&uid, 1)?,
            ),
            torn_at: None,
            trip_network: None,
            pending_load: false,
            pending_payment: None,
            pending_refund: None,
        });
    }
    Ok(riders)
}

/// Takes a card out of the field; a torn one is powered on again first (its recovery).
pub fn repower(card: &mut Card, hsm: &SoftwareHsm) -> Result<(), SimError> {
    if card.is_torn() {
        let uid = card.state().uid;
        let nvm = card.nvm().clone();
        *card = Card::power_on(nvm, hsm.card_keys(&uid, 1)?);
    }
    card.remove_from_field();
    Ok(())
}
