//! Partner shops (an online mall): signed server-to-server requests that sell gift certificates
//! or prepaid loads, and the voucher funding source that redeems them into a purse.
//!
//! A partner signs every request with its Ed25519 key; we hold only its public key. The signed
//! message is `METHOD \n PATH \n TIMESTAMP_MS \n hex(SHA-256(body))`, sent as headers
//! `X-Tapgate-Partner`, `X-Tapgate-Timestamp` and `X-Tapgate-Signature` (hex). A timestamp more
//! than [`MAX_SKEW_MS`] away from ours is refused; a repeated order id returns the voucher
//! already issued for it, so a replayed or retried request never sells twice.
//!
//! Ledger: issuing posts `partner:<id>` → `vouchers:outstanding` (the partner owes us the value;
//! we owe the holder); a completed load posts `funding:voucher` → `card:<UID>` like any source,
//! and the capture posts `vouchers:outstanding` → `funding:voucher`.
//!
//! A voucher code is a bearer secret: it is kept only in the voucher table. Postings, load
//! intents, authorisation ids and log lines carry [`voucher_id`] (a SHA-256 of the code) or
//! [`code_hint`] (its last four characters), and the API takes codes in request bodies only.

use crate::funding::{FundingError, FundingRequest, FundingSource};
use crate::ledger::{Ledger, LedgerError, Voucher};
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Arc;
use tapgate_http::auth::hex_array;

/// Largest clock difference accepted on a signed request.
pub const MAX_SKEW_MS: u64 = 300_000;
/// Longest validity a voucher may be issued with (3 years).
pub const MAX_VALIDITY_MS: u64 = 3 * 366 * 86_400_000;

/// A configured partner.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartnerConfig {
    /// Partner id.
    pub name: String,
    /// Its Ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// Most value it may sell per voucher, minor units.
    #[serde(default = "default_max_voucher")]
    pub max_voucher_minor: i64,
}

fn default_max_voucher() -> i64 {
    100_000
}

/// Why a partner request was refused.
#[derive(Debug, thiserror::Error)]
pub enum PartnerError {
    /// Unknown partner, bad or missing signature, stale timestamp.
    #[error("partner request not authenticated: {0}")]
    Unauthenticated(String),
    /// A malformed request.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// The partners we know.
#[derive(Clone, Default)]
pub struct Partners {
    keys: HashMap<String, (VerifyingKey, i64)>,
}

impl Partners {
    /// From configuration; a malformed key is an error naming the partner.
    pub fn new(cfg: &[PartnerConfig]) -> Result<Partners, String> {
        let mut keys = HashMap::new();
        for p in cfg {
            let bytes: [u8; 32] = hex_array(&p.public_key).ok_or_else(|| {
                format!(
                    "partner {:?}: public_key must be 64 hex digits (an Ed25519 public key)",
                    p.name
                )
            })?;
            let vk = VerifyingKey::from_bytes(&bytes)
                .map_err(|e| format!("partner {:?}: public_key: {e}", p.name))?;
            keys.insert(p.name.clone(), (vk, p.max_voucher_minor));
        }
        Ok(Partners { keys })
    }

    /// The message a partner signs.
    pub fn signed_message(method: &str, path: &str, timestamp_ms: u64, body: &[u8]) -> Vec<u8> {
        format!(
            "{method}\n{path}\n{timestamp_ms}\n{}",
            hex::encode(Sha256::digest(body))
        )
        .into_bytes()
    }

    /// Verifies a signed request; returns the partner's name and voucher limit.
    #[allow(clippy::too_many_arguments)]
    pub fn verify(
        &self,
        partner: &str,
        timestamp: &str,
        signature_hex: &str,
        method: &str,
        path: &str,
        body: &[u8],
        now_ms: u64,
    ) -> Result<(String, i64), PartnerError> {
        let (vk, max) = self
            .keys
            .get(partner)
            .ok_or_else(|| PartnerError::Unauthenticated(format!("unknown partner {partner:?}")))?;
        let ts: u64 = timestamp.parse().map_err(|_| {
            PartnerError::Unauthenticated("X-Tapgate-Timestamp must be unix milliseconds".into())
        })?;
        if ts.abs_diff(now_ms) > MAX_SKEW_MS {
            return Err(PartnerError::Unauthenticated(format!(
                "timestamp {ts} is more than {MAX_SKEW_MS} ms from the server's clock {now_ms}"
            )));
        }
        let sig: [u8; 64] = hex_array(signature_hex).ok_or_else(|| {
            PartnerError::Unauthenticated("X-Tapgate-Signature must be 128 hex digits".into())
        })?;
        vk.verify(
            &Self::signed_message(method, path, ts, body),
            &Signature::from_bytes(&sig),
        )
        .map_err(|_| PartnerError::Unauthenticated("signature does not verify".into()))?;
        Ok((partner.to_string(), *max))
    }
}

/// A voucher purchase from a partner.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoucherOrder {
    /// The partner's order id (idempotency key).
    pub order_id: String,
    /// `gift` (redeemable onto any card) or `load` (bound to `card_uid`).
    pub kind: String,
    /// Value, minor units.
    pub amount_minor: i64,
    /// For `load`: the card it is for (14 hex digits).
    pub card_uid: Option<String>,
    /// Validity from now, in days (default 365).
    pub valid_days: Option<u64>,
}

fn voucher_code() -> String {
    use rand::RngCore;
    let mut b = [0u8; 10];
    rand::rngs::OsRng.fill_bytes(&mut b);
    // Crockford-style base32 without ambiguous letters, grouped for humans.
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut bits = 0u32;
    let mut acc = 0u32;
    let mut out = String::new();
    for byte in b {
        acc = (acc << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((acc >> bits) & 31) as usize] as char);
        }
    }
    out.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join("-")
}

/// The id a voucher goes by outside the voucher table (authorisations, intents, postings,
/// logs): `vch_` and 32 hex digits of the SHA-256 of its code. The code cannot be recovered
/// from it.
pub fn voucher_id(code: &str) -> String {
    let h = Sha256::digest(code.as_bytes());
    format!("vch_{}", hex::encode(&h[..16]))
}

/// What a log line or an error may show of a code: its last four characters.
pub fn code_hint(code: &str) -> String {
    let tail: String = code
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("…{tail}")
}

fn auth_index_key(id: &str) -> String {
    format!("voucher-auth:{id}")
}

/// Issues (or returns the already issued) voucher for a partner's order.
pub fn issue_voucher(
    ledger: &Ledger,
    partner: &str,
    max_minor: i64,
    order: VoucherOrder,
    now_ms: u64,
) -> Result<Voucher, PartnerError> {
    if order.order_id.is_empty() || order.order_id.len() > 128 {
        return Err(PartnerError::BadRequest(
            "order_id must be 1 to 128 characters".into(),
        ));
    }
    if order.amount_minor <= 0 || order.amount_minor > max_minor {
        return Err(PartnerError::BadRequest(format!(
            "amount_minor must be within 1..={max_minor}, got {}",
            order.amount_minor
        )));
    }
    let card_uid = match (order.kind.as_str(), &order.card_uid) {
        ("gift", None) => None,
        ("load", Some(u)) => {
            let bytes = hex::decode(u)
                .ok()
                .filter(|b| b.len() == 7)
                .ok_or_else(|| {
                    PartnerError::BadRequest(format!("card_uid {u:?} must be 14 hex digits"))
                })?;
            Some(hex::encode_upper(bytes))
        }
        ("gift", Some(_)) => {
            return Err(PartnerError::BadRequest(
                "a gift voucher is not bound to a card; use kind \"load\"".into(),
            ))
        }
        ("load", None) => {
            return Err(PartnerError::BadRequest(
                "kind \"load\" needs card_uid".into(),
            ))
        }
        (k, _) => {
            return Err(PartnerError::BadRequest(format!(
                "kind {k:?} is not one of \"gift\", \"load\""
            )))
        }
    };
    let valid_ms = order.valid_days.unwrap_or(365).saturating_mul(86_400_000);
    if valid_ms == 0 || valid_ms > MAX_VALIDITY_MS {
        return Err(PartnerError::BadRequest(
            "valid_days must be 1 to 1098".into(),
        ));
    }
    let order_key = format!("partner-order:{partner}:{}", order.order_id);
    let partner = partner.to_string();
    Ok(ledger.transact(move |t| {
        if let Some(existing) = t.idempotent(&order_key)? {
            let code = existing.as_str().unwrap_or_default().to_string();
            if let Some(v) = t.voucher(&code)? {
                return Ok(v);
            }
        }
        let v = Voucher {
            code: voucher_code(),
            partner: partner.clone(),
            order_id: order.order_id.clone(),
            kind: order.kind.clone(),
            amount_minor: order.amount_minor,
            card_uid: card_uid.clone(),
            expires_ms: now_ms + valid_ms,
            state: "issued".into(),
            held_by: None,
            issued_ms: now_ms,
        };
        t.put_voucher(&v)?;
        t.post(
            now_ms,
            &format!("partner:{partner}"),
            "vouchers:outstanding",
            v.amount_minor,
            &format!("voucher:{}", voucher_id(&v.code)),
        )?;
        t.put_idempotent(&order_key, &serde_json::Value::String(v.code.clone()))?;
        Ok(v)
    })?)
}

/// Redeems vouchers into purses: the `voucher` funding source (instrument: the code).
pub struct VoucherSource {
    ledger: Ledger,
    clock: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl VoucherSource {
    /// Over the ledger, with the daemon's clock for expiry.
    pub fn new(ledger: Ledger, clock: Arc<dyn Fn() -> u64 + Send + Sync>) -> Self {
        VoucherSource { ledger, clock }
    }

    /// The code behind an authorisation id (a [`voucher_id`]; an authorisation made before
    /// codes were hashed is the code itself).
    fn code_of(&self, auth_id: &str) -> Result<String, FundingError> {
        if !auth_id.starts_with("vch_") {
            return Ok(auth_id.to_string());
        }
        let r = self.ledger.read()?;
        match r.idempotent(&auth_index_key(auth_id))? {
            Some(serde_json::Value::String(code)) => Ok(code),
            _ => Err(FundingError::UnknownAuthorisation(auth_id.to_string())),
        }
    }

    fn update(
        &self,
        code: &str,
        mut f: impl FnMut(&mut Voucher) -> Result<bool, FundingError> + Send + 'static,
    ) -> Result<Voucher, FundingError> {
        let code = code.to_string();
        self.ledger.transact(move |t| {
            let mut v = match t.voucher(&code)? {
                Some(v) => v,
                None => return Ok(Err(FundingError::UnknownAuthorisation(code_hint(&code)))),
            };
            match f(&mut v) {
                Ok(changed) => {
                    if changed {
                        t.put_voucher(&v)?;
                    }
                    Ok(Ok(v))
                }
                Err(e) => Ok(Err(e)),
            }
        })?
    }
}

impl FundingSource for VoucherSource {
    fn name(&self) -> &str {
        "voucher"
    }

    fn holding(&self) -> crate::funding::Holding {
        crate::funding::Holding::Bearer
    }

    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError> {
        let now = (self.clock)();
        let amount = req.amount_minor;
        let reference = req.reference.to_string();
        // The load reference is `load:<UID>:<TMC>:<session>`.
        let card = req
            .reference
            .split(':')
            .nth(1)
            .unwrap_or_default()
            .to_string();
        let v = self.update(req.instrument, move |v| {
            if v.state == "held" && v.held_by.as_deref() == Some(reference.as_str()) {
                return Ok(false); // the same request again
            }
            if v.state != "issued" {
                return Err(FundingError::Declined(format!("voucher is {}", v.state)));
            }
            if now > v.expires_ms {
                return Err(FundingError::Declined("voucher has expired".into()));
            }
            if v.amount_minor != amount {
                return Err(FundingError::Declined(format!(
                    "the voucher is worth {}: load exactly that amount",
                    v.amount_minor
                )));
            }
            if let Some(bound) = &v.card_uid {
                if *bound != card {
                    return Err(FundingError::Declined("voucher is for another card".into()));
                }
            }
            v.state = "held".into();
            v.held_by = Some(reference.clone());
            Ok(true)
        })?;
        // The authorisation goes by the code's hash (it is stored in the intent and logged);
        // the index leads back to the voucher.
        let id = voucher_id(&v.code);
        let (key, code) = (auth_index_key(&id), v.code);
        self.ledger
            .transact(move |t| t.put_idempotent(&key, &serde_json::Value::String(code.clone())))?;
        Ok(id)
    }

    fn capture(&self, auth_id: &str) -> Result<(), FundingError> {
        let code = self.code_of(auth_id)?;
        let v = self.update(&code, |v| match v.state.as_str() {
            "redeemed" => Ok(false),
            "held" => {
                v.state = "redeemed".into();
                Ok(true)
            }
            s => Err(FundingError::WrongState {
                id: voucher_id(&v.code),
                state: s.into(),
                op: "capture",
            }),
        })?;
        let code = v.code.clone();
        let amount = v.amount_minor;
        self.ledger
            .transact(move |t| {
                // Vouchers captured before codes were hashed are marked under the code itself.
                let old_mark = format!("voucher-redeemed:{code}");
                let reference = format!("voucher-redeemed:{}", voucher_id(&code));
                if t.idempotent(&reference)?.is_some() || t.idempotent(&old_mark)?.is_some() {
                    return Ok(());
                }
                t.post(
                    0,
                    "vouchers:outstanding",
                    "funding:voucher",
                    amount,
                    &reference,
                )?;
                t.put_idempotent(&reference, &serde_json::Value::Bool(true))
            })
            .map_err(FundingError::from)
    }

    fn void(&self, auth_id: &str) -> Result<(), FundingError> {
        let code = self.code_of(auth_id)?;
        self.update(&code, |v| match v.state.as_str() {
            "issued" => Ok(false),
            "held" => {
                v.state = "issued".into();
                v.held_by = None;
                Ok(true)
            }
            s => Err(FundingError::WrongState {
                id: voucher_id(&v.code),
                state: s.into(),
                op: "void",
            }),
        })
        .map(|_| ())
    }

    fn refundable(&self) -> bool {
        false
    }

    fn refund(&self, _auth_id: &str, _amount_minor: i64) -> Result<(), FundingError> {
        Err(FundingError::Declined(
            "vouchers are not refunded to the partner; reverse the load instead".into(),
        ))
    }
}
