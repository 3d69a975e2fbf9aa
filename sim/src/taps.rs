//! Signed tap records as a validator publishes them.

use purse::receipt::{CommitReceipt, TxKind};
use purse::sam::{Sam, SoftwareSam};
use purse::tap::{TapMeta, TapRecord, TAP_LEN};

/// The accepted tap of `receipt`, signed by the validator's SAM with its device key (wire
/// format v2: the MAC covers `operator`).
pub fn signed_accepted(
    sam: &SoftwareSam,
    receipt: &CommitReceipt,
    operator: &str,
    device_id: u32,
    seq: u64,
    now_ms: u64,
) -> [u8; TAP_LEN] {
    let record = TapRecord::accepted(
        receipt,
        TapMeta {
            device_id,
            device_seq: seq,
            device_time_ms: now_ms,
            ..Default::default()
        },
    );
    record.sign_with(operator, |body| sam.device_mac(body))
}

/// The amount a signed tap debits (0 for refusals and other kinds).
pub fn debited_minor(wire: &[u8]) -> i64 {
    if wire.len() >= 19 && wire[1] == 0 && wire[2] == TxKind::Debit as u8 {
        i64::from(i32::from_be_bytes([wire[15], wire[16], wire[17], wire[18]]))
    } else {
        0
    }
}
