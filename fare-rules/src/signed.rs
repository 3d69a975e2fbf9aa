//! The signed, versioned fare-table file validators receive (`TGFT`).
//!
//! | bytes      | field                                                        |
//! |------------|--------------------------------------------------------------|
//! | 0..4       | magic `TGFT`                                                 |
//! | 4          | format (1)                                                   |
//! | 5..9       | table version (u32 BE)                                       |
//! | 9..13      | effective from, days since 1970-01-01 (i32 BE)               |
//! | 13..17     | effective until (exclusive; i32::MAX: open)                  |
//! | 17..21     | body length (u32 BE)                                         |
//! | 21..       | body: the [`Table`] in postcard encoding                     |
//! | last 64    | Ed25519 signature over everything before it                 |
//!
//! The header repeats the version and dates so a validator can order updates (refuse an older
//! version) before it decodes anything; a body whose meta disagrees with the header is refused.

use crate::engine::{Engine, TableError};
use crate::table::Table;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

/// File magic.
pub const MAGIC: &[u8; 4] = b"TGFT";
/// The format this crate writes.
pub const FORMAT: u8 = 1;
const HEADER_LEN: usize = 21;
const SIG_LEN: usize = 64;
/// Largest body accepted (a city table is a few hundred kilobytes).
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Why a signed table was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SignedError {
    #[error("not a tapgate fare table (bad magic or too short)")]
    NotATable,
    #[error("fare table format {0} is not one this build reads (expected 1)")]
    Format(u8),
    #[error("fare table length {got} does not match its header ({want})")]
    Length { got: usize, want: usize },
    #[error("fare table signature does not verify under the operator's key")]
    Signature,
    #[error("fare table body is malformed: {0}")]
    Body(String),
    #[error("fare table cannot be encoded: {0}")]
    Encode(String),
    #[error("fare table header (version {header}) disagrees with its body (version {body})")]
    Mismatch { header: u32, body: u32 },
    #[error(transparent)]
    Table(#[from] TableError),
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub effective_from_day: i32,
    pub effective_until_day: Option<i32>,
    pub body_len: usize,
}

/// Encodes `table` and signs it with `sign` (the back office's Ed25519 key, in its HSM).
pub fn encode(table: &Table, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Result<Vec<u8>, SignedError> {
    let body = postcard::to_stdvec(table).map_err(|e| SignedError::Encode(e.to_string()))?;
    if body.len() > MAX_BODY_BYTES {
        return Err(SignedError::Encode(format!(
            "the table is {} bytes; at most {MAX_BODY_BYTES} are accepted",
            body.len()
        )));
    }
    let mut b = Vec::with_capacity(HEADER_LEN + body.len() + SIG_LEN);
    b.extend_from_slice(MAGIC);
    b.push(FORMAT);
    b.extend_from_slice(&table.meta.version.to_be_bytes());
    b.extend_from_slice(&table.meta.effective_from_day.to_be_bytes());
    b.extend_from_slice(
        &table
            .meta
            .effective_until_day
            .unwrap_or(i32::MAX)
            .to_be_bytes(),
    );
    b.extend_from_slice(&(body.len() as u32).to_be_bytes());
    b.extend_from_slice(&body);
    let sig = sign(&b);
    b.extend_from_slice(&sig);
    Ok(b)
}

/// Reads the header without verifying anything.
pub fn peek(bytes: &[u8]) -> Result<Header, SignedError> {
    if bytes.len() < HEADER_LEN + SIG_LEN || &bytes[..4] != MAGIC {
        return Err(SignedError::NotATable);
    }
    if bytes[4] != FORMAT {
        return Err(SignedError::Format(bytes[4]));
    }
    let be32 = |i: usize| [bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]];
    let until = i32::from_be_bytes(be32(13));
    let body_len = u32::from_be_bytes(be32(17)) as usize;
    if body_len > MAX_BODY_BYTES || bytes.len() != HEADER_LEN + body_len + SIG_LEN {
        return Err(SignedError::Length {
            got: bytes.len(),
            want: HEADER_LEN + body_len.min(MAX_BODY_BYTES) + SIG_LEN,
        });
    }
    Ok(Header {
        version: u32::from_be_bytes(be32(5)),
        effective_from_day: i32::from_be_bytes(be32(9)),
        effective_until_day: (until != i32::MAX).then_some(until),
        body_len,
    })
}

/// Verifies the signature under `public_key`, decodes strictly and validates the table.
pub fn verify(bytes: &[u8], public_key: &[u8; 32]) -> Result<Engine, SignedError> {
    let h = peek(bytes)?;
    let (signed, sig) = bytes.split_at(bytes.len() - SIG_LEN);
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| SignedError::Signature)?;
    let sig = Signature::from_slice(sig).map_err(|_| SignedError::Signature)?;
    key.verify(signed, &sig)
        .map_err(|_| SignedError::Signature)?;
    decode_body(bytes, &h)
}

/// Decodes without verifying the signature: for inspection tools only, never on a device.
pub fn decode_unverified(bytes: &[u8]) -> Result<Engine, SignedError> {
    let h = peek(bytes)?;
    decode_body(bytes, &h)
}

fn decode_body(bytes: &[u8], h: &Header) -> Result<Engine, SignedError> {
    let body = &bytes[HEADER_LEN..HEADER_LEN + h.body_len];
    let table: Table = postcard::from_bytes(body).map_err(|e| SignedError::Body(e.to_string()))?;
    if table.meta.version != h.version
        || table.meta.effective_from_day != h.effective_from_day
        || table.meta.effective_until_day != h.effective_until_day
    {
        return Err(SignedError::Mismatch {
            header: h.version,
            body: table.meta.version,
        });
    }
    Ok(Engine::new(table)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signer, SigningKey};

    fn sample() -> Table {
        let src = include_str!("../samples/metro-city/rules.toml");
        crate::source::compile("rules.toml", src).unwrap()
    }

    #[test]
    fn signed_table_round_trips_and_forgeries_are_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let t = sample();
        let bytes = encode(&t, |m| key.sign(m).to_bytes()).unwrap();
        let pk = key.verifying_key().to_bytes();
        let e = verify(&bytes, &pk).unwrap();
        assert_eq!(e.table(), &t);
        assert_eq!(peek(&bytes).unwrap().version, 1);

        // Any flipped byte is refused: in the body, the header or the signature.
        for i in [0, 4, 6, 30, bytes.len() / 2, bytes.len() - 1] {
            let mut b = bytes.clone();
            b[i] ^= 1;
            assert!(verify(&b, &pk).is_err(), "byte {i}");
        }
        // Another key's signature.
        let forger = SigningKey::from_bytes(&[8; 32]);
        let forged = encode(&t, |m| forger.sign(m).to_bytes()).unwrap();
        assert_eq!(verify(&forged, &pk).unwrap_err(), SignedError::Signature);
        // Truncated.
        assert!(matches!(
            verify(&bytes[..bytes.len() - 1], &pk),
            Err(SignedError::Length { .. })
        ));
        assert_eq!(verify(b"TGBL", &pk).unwrap_err(), SignedError::NotATable);
    }

    #[test]
    fn a_signed_but_inconsistent_table_is_refused() {
        let key = SigningKey::from_bytes(&[7; 32]);
        let mut t = sample();
        t.leg_rules[0].product = 999;
        let bytes = encode(&t, |m| key.sign(m).to_bytes()).unwrap();
        assert!(matches!(
            verify(&bytes, &key.verifying_key().to_bytes()),
            Err(SignedError::Table(_))
        ));
    }
}
