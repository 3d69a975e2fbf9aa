//! Small fixtures: bearer tokens, personalised cards, value transactions, signed taps.

use purse::batch::ClearingTap;
use purse::card::{Card, Personalisation};
use purse::keys::{KeyKind, KeySet};
use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Authenticator, SoftwareHsm, SoftwareSam};
use purse::tap::{TapMeta, TapRecord};
use purse::txn::{self, Decision, EmulatedReader, Outcome, TxError};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_http::auth::{Auth, Role, TokenEntry};

/// A configured bearer token: `name` with `role`, whose secret is `secret`.
pub fn token(name: &str, role: Role, secret: &str) -> TokenEntry {
    TokenEntry {
        name: name.into(),
        role,
        sha256: Auth::hash_token(secret),
    }
}

/// A transit card with `uid` and `balance_minor`, its keys (version 1) from `hsm`.
pub fn transit_card(hsm: &SoftwareHsm, uid: [u8; 7], balance_minor: i32) -> Card {
    Card::personalise(
        &Personalisation::transit(uid, balance_minor),
        hsm.card_keys(&uid, 1).expect("card keys"),
    )
}

/// A debit of `amount_minor` (no trip record) from the emulated `card` by the validator SAM
/// `sam`, the reader's random numbers from `reader_seed` and the dialogue's from `txn_seed`:
/// the committed debit's receipt (a refusal panics).
pub fn debit(
    sam: &mut SoftwareSam,
    card: &mut Card,
    amount_minor: i32,
    reader_seed: u64,
    txn_seed: u64,
) -> CommitReceipt {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(reader_seed),
    };
    let decide = |_: &_| Decision::Apply {
        amount_minor,
        record: None,
    };
    match txn::debit(
        &mut reader,
        sam,
        &mut StdRng::seed_from_u64(txn_seed),
        decide,
    ) {
        Ok(Outcome::Committed { receipt, .. }) => receipt,
        other => panic!("the debit did not commit: {other:?}"),
    }
}

/// One value transaction on an emulated `card`, as a terminal authenticated by `auth` with
/// `key` would run it: value command `code` (debit, credit, limited credit…) of `amount`,
/// with no record. The card's answer is the test's subject, so the card's refusals come back
/// as errors; the terminal's decision never refuses (a refusal panics).
pub fn value_tx(
    auth: &mut dyn Authenticator,
    card: &mut Card,
    key: KeyKind,
    code: u8,
    amount: i32,
) -> Result<CommitReceipt, TxError> {
    value_tx_with_record(auth, card, key, code, amount, None)
}

/// [`value_tx`] that also writes trip `record` (a validator's fare) in the same transaction.
pub fn value_tx_with_record(
    auth: &mut dyn Authenticator,
    card: &mut Card,
    key: KeyKind,
    code: u8,
    amount: i32,
    record: Option<Vec<u8>>,
) -> Result<CommitReceipt, TxError> {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(7),
    };
    let outcome = txn::run(
        &mut reader,
        auth,
        key,
        code,
        &mut StdRng::seed_from_u64(8),
        |_| Decision::Apply {
            amount_minor: amount,
            record,
        },
    )?;
    match outcome {
        Outcome::Committed { receipt, .. } => Ok(receipt),
        Outcome::Refused { .. } => panic!("the terminal refused its own transaction"),
    }
}

/// Asserts that the card refused a value transaction with a boundary error (a limit, an
/// allowance, a value that would wrap): the answer the attack tests expect.
pub fn assert_boundary(r: &Result<CommitReceipt, TxError>) {
    assert!(
        matches!(
            r,
            Err(TxError::Card {
                status: purse::apdu::Status::BoundaryError,
                ..
            })
        ),
        "expected a boundary error, got {r:?}"
    );
}

/// The clearing entry of fare `r` as validator 1001 of `metro` forwards it, its `seq`-th tap:
/// a debit of the receipt's amount (what a clearing batch carries, `purse::batch`).
pub fn clearing_tap(r: &CommitReceipt, seq: u64) -> ClearingTap {
    ClearingTap {
        device_id: 1001,
        device_seq: seq,
        card_uid: hex::encode_upper(r.uid()),
        tmc: r.tmc(),
        kind: "debit".into(),
        amount_minor: r.amount_minor(),
        balance_after_minor: r.balance_after_minor(),
        tmv: hex::encode_upper(r.tmv()),
        key_version: r.key_version(),
        operator: Some("metro".into()),
        device_time_ms: 0,
        ..Default::default()
    }
}

/// A gateway's key set (device keys, no masters) drawn from a fixed seed: the keys the store's
/// tests check taps with.
pub fn gateway_keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(1))
        .for_role(purse::keys::Role::Gateway, 0)
        .expect("a generated key set serves the gateway role")
}

/// A tap record of `operator`'s `device` with sequence number `seq`, signed with the device's
/// key from `keys` (the card: `04 05 05 05 05 05 <seq>`, 1.00 debited, 10.00 left).
pub fn signed_tap(keys: &KeySet, operator: &str, device: u32, seq: u64) -> Vec<u8> {
    let r = CommitReceipt::for_tests(
        [4, 5, 5, 5, 5, 5, seq as u8],
        seq as u32,
        [1; 8],
        TxKind::Debit,
        100,
        1_000,
    );
    TapRecord::accepted(
        &r,
        TapMeta {
            device_id: device,
            device_seq: seq,
            ..Default::default()
        },
    )
    .sign(operator, &keys.device_key(device).expect("device key"))
    .to_vec()
}
