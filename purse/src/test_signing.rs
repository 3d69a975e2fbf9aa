//! The back office's Ed25519 signatures in purse's own tests of the signed downlink messages
//! (action list, blocklist, snapshot chunk): one key per seed byte.

use ed25519_dalek::{Signer, SigningKey};

/// The test key whose 32-byte seed is `seed` repeated.
pub(crate) fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The public key of [`key`]`(seed)`, as a device holds it.
pub(crate) fn public(seed: u8) -> [u8; 32] {
    key(seed).verifying_key().to_bytes()
}

/// A `sign_with` signer: the Ed25519 signature under [`key`]`(seed)`.
pub(crate) fn signer(seed: u8) -> impl FnOnce(&[u8]) -> [u8; 64] {
    let k = key(seed);
    move |body| k.sign(body).to_bytes()
}
