//! Cryptographic primitives of the card protocol, built on RustCrypto.
//!
//! - [`cmac()`]: AES-128 CMAC (RFC 4493 / NIST SP 800-38B).
//! - [`diversify_an10922`]: NXP AN10922 AES-128 key diversification, including its rule that the
//!   diversification input is always padded to 32 bytes (so for inputs shorter than 32 bytes it
//!   differs from plain RFC 4493 CMAC whenever the input is ≤ 16 bytes).
//! - [`ev2_session_keys`]: SesAuthENC / SesAuthMAC from RndA and RndB (AN12196 §"Session key
//!   generation", NIST SP 800-108 counter mode with CMAC as PRF).
//! - [`truncate_mac`]: the EV2 8-byte MAC made of the odd-indexed bytes of the CMAC.
//! - [`tm_session_mac_key`]: the transaction-MAC session key SesTMMACKey.
//! - [`cbc_encrypt`] / [`cbc_decrypt`]: AES-128-CBC without padding (callers pad, see
//!   [`pad_iso9797_m2`]).
//!
//! Keys live in [`AesKey`], which zeroizes on drop and never prints its bytes.

use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use cmac::{Cmac, Mac};
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// AES block size in bytes.
pub const BLOCK: usize = 16;

/// An AES-128 key. Zeroized on drop; `Debug` never shows the bytes; not `Serialize`.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct AesKey([u8; 16]);

impl AesKey {
    /// Wraps raw key bytes (the caller should zeroize its own copy).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        AesKey(bytes)
    }

    /// Builds a key from a slice, which must be exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, CryptoError> {
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| CryptoError::KeyLength { got: bytes.len() })?;
        Ok(AesKey(arr))
    }

    /// The raw key bytes. Only for sealing into a key set, for diversification CLIs that exist
    /// to print a derived test key, and for handing the key to the emulated card's secure
    /// element. Never log these.
    pub fn expose_secret(&self) -> &[u8; 16] {
        &self.0
    }

    pub(crate) fn cipher(&self) -> Aes128 {
        Aes128::new(&self.0.into())
    }
}

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(<secret>)")
    }
}

impl PartialEq for AesKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}
impl Eq for AesKey {}

/// Errors from the primitives.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CryptoError {
    /// A key was not 16 bytes long.
    #[error("AES-128 key must be 16 bytes, got {got}")]
    KeyLength {
        /// bytes given
        got: usize,
    },
    /// AN10922 diversification input (0x01 ‖ UID ‖ AID ‖ system id) is longer than 32 bytes.
    #[error("diversification input is {got} bytes; AN10922 allows at most 32 (1 + UID + AID + system id)")]
    DiversificationInputTooLong {
        /// bytes in M
        got: usize,
    },
    /// AN10922 needs at least one byte of UID/AID/system identifier.
    #[error("diversification input is empty: give at least a UID")]
    DiversificationInputEmpty,
    /// CBC data is not a whole number of blocks.
    #[error("CBC data length {got} is not a multiple of 16")]
    NotBlockAligned {
        /// bytes given
        got: usize,
    },
    /// ISO/IEC 9797-1 method 2 padding is missing or malformed.
    #[error("bad ISO/IEC 9797-1 method 2 padding")]
    BadPadding,
}

/// AES-128 CMAC of `msg` (RFC 4493).
pub fn cmac(key: &AesKey, msg: &[u8]) -> [u8; 16] {
    let mut mac = <Cmac<Aes128> as KeyInit>::new(&key.0.into());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// An expanded CMAC state for `key` (clone it per message to avoid re-keying).
pub fn cmac_state(key: &AesKey) -> Cmac<Aes128> {
    <Cmac<Aes128> as KeyInit>::new(&key.0.into())
}

/// The EV2 MAC: the 8 odd-indexed bytes (1, 3, …, 15) of a full CMAC.
pub fn truncate_mac(full: &[u8; 16]) -> [u8; 8] {
    let mut out = [0u8; 8];
    for (i, o) in out.iter_mut().enumerate() {
        *o = full[2 * i + 1];
    }
    out
}

/// CMAC of `msg`, truncated EV2-style to 8 bytes.
pub fn mac8(key: &AesKey, msg: &[u8]) -> [u8; 8] {
    truncate_mac(&cmac(key, msg))
}

/// Constant-time comparison of two MACs (any length; unequal lengths are unequal).
pub fn mac_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// The CMAC subkeys K1 and K2 (RFC 4493 §2.3) from `L = E(K, 0¹²⁸)`: K1 = dbl(L), K2 =
/// dbl(K1). The one copy of the derivation: the software path ([`diversify_an10922`]) and an
/// HSM that can only hand out `L` (`tapgate-pkcs11`) both use it. The caller zeroizes them.
pub fn cmac_subkeys(l: &[u8; 16]) -> ([u8; 16], [u8; 16]) {
    fn dbl(x: &[u8; 16]) -> [u8; 16] {
        let mut out = [0u8; 16];
        let mut carry = 0u8;
        for i in (0..16).rev() {
            out[i] = (x[i] << 1) | carry;
            carry = x[i] >> 7;
        }
        if x[0] & 0x80 != 0 {
            out[15] ^= 0x87;
        }
        out
    }
    let k1 = dbl(l);
    let k2 = dbl(&k1);
    (k1, k2)
}

/// The CMAC subkeys of a key in this process, needed for AN10922's fixed 32-byte padding.
fn subkeys(cipher: &Aes128) -> ([u8; 16], [u8; 16]) {
    let mut l = [0u8; 16];
    cipher.encrypt_block((&mut l).into());
    let keys = cmac_subkeys(&l);
    l.zeroize();
    keys
}

/// Maximum length of the AN10922 diversification input M (including the 0x01 constant).
pub const AN10922_MAX_INPUT: usize = 32;

/// AN10922's diversification input, ready for AES-CBC: M = 0x01 ‖ `parts` (1 to 32 bytes in
/// all) padded with 0x80 00… to **32 bytes**, its last block XORed with K1 when M was a full
/// 32 bytes, with K2 otherwise. The one copy of the padding rule: [`diversify_an10922`] runs
/// CBC over it here, `tapgate-pkcs11` block by block in the token. The caller zeroizes it.
pub fn an10922_input(
    parts: [&[u8]; 3],
    k1: &[u8; 16],
    k2: &[u8; 16],
) -> Result<[u8; 32], CryptoError> {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len == 1 {
        return Err(CryptoError::DiversificationInputEmpty);
    }
    if len > AN10922_MAX_INPUT {
        return Err(CryptoError::DiversificationInputTooLong { got: len });
    }
    let mut m = [0u8; 32];
    m[0] = 0x01;
    let mut at = 1;
    for p in parts {
        m[at..at + p.len()].copy_from_slice(p);
        at += p.len();
    }
    let sub = if len == 32 {
        k1
    } else {
        m[len] = 0x80;
        k2
    };
    for i in 0..16 {
        m[16 + i] ^= sub[i];
    }
    Ok(m)
}

/// NXP AN10922 §2.2 AES-128 key diversification.
///
/// M = 0x01 ‖ UID ‖ AID ‖ system identifier (1 to 32 bytes). If M is 32 bytes it is CMAC'd with
/// K1 as RFC 4493 does for a complete last block; otherwise it is padded with 0x80 00… to
/// **32 bytes** (not to the next block) and the last block is XORed with K2 ([`an10922_input`]).
/// The diversified key is the last block of AES-CBC (zero IV) over the result.
pub fn diversify_an10922(
    master: &AesKey,
    uid: &[u8],
    aid: &[u8],
    system_id: &[u8],
) -> Result<AesKey, CryptoError> {
    let cipher = master.cipher();
    let (mut k1, mut k2) = subkeys(&cipher);
    let m = an10922_input([uid, aid, system_id], &k1, &k2);
    k1.zeroize();
    k2.zeroize();
    let mut m = m?;
    let mut state = [0u8; 16];
    for block in m.chunks_exact(16) {
        for i in 0..16 {
            state[i] ^= block[i];
        }
        cipher.encrypt_block((&mut state).into());
    }
    m.zeroize();
    Ok(AesKey(state))
}

/// The EV2 session keys derived at the end of AuthenticateEV2First.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct SessionKeys {
    /// SesAuthENC: encrypts CommMode.FULL data.
    pub enc: AesKey,
    /// SesAuthMAC: MACs every command and response after authentication.
    pub mac: AesKey,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(<secret>)")
    }
}

/// SV1 (or SV2 when `label` is `[0x5A, 0xA5]`) as AN12196 defines it:
/// label ‖ 00 01 00 80 ‖ RndA[0..2] ‖ (RndA[2..8] ⊕ RndB[0..6]) ‖ RndB[6..16] ‖ RndA[8..16].
pub(crate) fn session_vector(label: [u8; 2], rnd_a: &[u8; 16], rnd_b: &[u8; 16]) -> [u8; 32] {
    let mut sv = [0u8; 32];
    sv[0..2].copy_from_slice(&label);
    sv[2..6].copy_from_slice(&[0x00, 0x01, 0x00, 0x80]);
    sv[6..8].copy_from_slice(&rnd_a[0..2]);
    for i in 0..6 {
        sv[8 + i] = rnd_a[2 + i] ^ rnd_b[i];
    }
    sv[14..24].copy_from_slice(&rnd_b[6..16]);
    sv[24..32].copy_from_slice(&rnd_a[8..16]);
    sv
}

/// SesAuthENC = CMAC(K, SV1) and SesAuthMAC = CMAC(K, SV2).
pub fn ev2_session_keys(key: &AesKey, rnd_a: &[u8; 16], rnd_b: &[u8; 16]) -> SessionKeys {
    let mut sv1 = session_vector([0xA5, 0x5A], rnd_a, rnd_b);
    let mut sv2 = session_vector([0x5A, 0xA5], rnd_a, rnd_b);
    // One CMAC state for both derivations: the key is expanded once.
    let mut mac = <Cmac<Aes128> as KeyInit>::new(&key.0.into());
    mac.update(&sv1);
    let enc = AesKey(mac.finalize_reset().into_bytes().into());
    mac.update(&sv2);
    let keys = SessionKeys {
        enc,
        mac: AesKey(mac.finalize().into_bytes().into()),
    };
    sv1.zeroize();
    sv2.zeroize();
    keys
}

/// The transaction-MAC session vector `5A 00 01 00 80 ‖ (TMC+1) as 4 bytes LE ‖ UID (7 bytes)`
/// that SesTMMACKey is the CMAC of (the one copy: software and token HSMs both use it).
pub fn tm_session_vector(tmc_next: u32, uid: &[u8; 7]) -> [u8; 16] {
    let mut sv = [0u8; 16];
    sv[0..5].copy_from_slice(&[0x5A, 0x00, 0x01, 0x00, 0x80]);
    sv[5..9].copy_from_slice(&tmc_next.to_le_bytes());
    sv[9..16].copy_from_slice(uid);
    sv
}

/// SesTMMACKey = CMAC(K_TM, [`tm_session_vector`]).
///
/// `tmc_next` is the counter value the transaction consumes (TMC+1).
pub fn tm_session_mac_key(k_tm: &AesKey, tmc_next: u32, uid: &[u8; 7]) -> AesKey {
    AesKey(cmac(k_tm, &tm_session_vector(tmc_next, uid)))
}

/// [`tm_session_mac_key`] from K_TM's expanded CMAC state.
pub fn tm_session_mac_key_with(k_tm: &Cmac<Aes128>, tmc_next: u32, uid: &[u8; 7]) -> AesKey {
    let mut m = k_tm.clone();
    m.update(&tm_session_vector(tmc_next, uid));
    AesKey(m.finalize().into_bytes().into())
}

/// [`tm_session_mac_key`] from K_TM's expanded CMAC state, which is reset for the next use
/// (the card's path: no copy of the state, unlike [`tm_session_mac_key_with`]).
pub fn tm_session_mac_key_reset(k_tm: &mut Cmac<Aes128>, tmc_next: u32, uid: &[u8; 7]) -> AesKey {
    k_tm.update(&tm_session_vector(tmc_next, uid));
    AesKey(k_tm.finalize_reset().into_bytes().into())
}

/// AES-128-CBC encryption in place; `data` must be whole blocks.
pub fn cbc_encrypt(key: &AesKey, iv: &[u8; 16], data: &mut [u8]) -> Result<(), CryptoError> {
    cbc(&key.cipher(), iv, data, Direction::Encrypt)
}

/// AES-128-CBC decryption in place; `data` must be whole blocks.
pub fn cbc_decrypt(key: &AesKey, iv: &[u8; 16], data: &mut [u8]) -> Result<(), CryptoError> {
    cbc(&key.cipher(), iv, data, Direction::Decrypt)
}

/// A signed downlink message (blocklist, snapshot chunk, action list): `body`, then the back
/// office's Ed25519 signature over it, made by `sign` (the HSM).
pub(crate) fn ed25519_signed(mut body: Vec<u8>, sign: impl FnOnce(&[u8]) -> [u8; 64]) -> Vec<u8> {
    let sig = sign(&body);
    body.extend_from_slice(&sig);
    body
}

/// The body of a signed downlink message ([`ed25519_signed`]) when its last 64 bytes are an
/// Ed25519 signature over it under `public_key`; `None` when they are not (or `bytes` is
/// shorter, or the key is not a curve point). Checked with `verify_strict`: a weak (small-order)
/// key and a non-canonical or small-order `R` are refused too, for every signed downlink message
/// alike (the blocklist's were checked with the laxer `verify` until 2026-12-07).
pub(crate) fn ed25519_body<'a>(bytes: &'a [u8], public_key: &[u8; 32]) -> Option<&'a [u8]> {
    use ed25519_dalek::{Signature, VerifyingKey};
    let (body, sig) = bytes.split_at(bytes.len().checked_sub(64)?);
    let vk = VerifyingKey::from_bytes(public_key).ok()?;
    let sig = Signature::from_bytes(sig.try_into().ok()?);
    vk.verify_strict(body, &sig).ok().map(|()| body)
}

/// AES-128-CBC encryption in place with an already expanded cipher (whole blocks).
pub fn cbc_encrypt_with(
    cipher: &Aes128,
    iv: &[u8; 16],
    data: &mut [u8],
) -> Result<(), CryptoError> {
    cbc(cipher, iv, data, Direction::Encrypt)
}

/// AES-128-CBC decryption in place with an already expanded cipher (whole blocks).
pub fn cbc_decrypt_with(
    cipher: &Aes128,
    iv: &[u8; 16],
    data: &mut [u8],
) -> Result<(), CryptoError> {
    cbc(cipher, iv, data, Direction::Decrypt)
}

/// Which way [`cbc`] runs.
#[derive(Clone, Copy)]
enum Direction {
    Encrypt,
    Decrypt,
}

/// AES-128-CBC without padding, in place over whole blocks: the one copy behind the four
/// public helpers. It borrows the expanded key (the `cbc` crate's mode owns its cipher, which
/// cost a copy of the ~700-byte key schedule per call); the chaining blocks are zeroized.
#[inline]
fn cbc(cipher: &Aes128, iv: &[u8; 16], data: &mut [u8], dir: Direction) -> Result<(), CryptoError> {
    let len = data.len();
    if !len.is_multiple_of(BLOCK) {
        return Err(CryptoError::NotBlockAligned { got: len });
    }
    let mut chain = *iv;
    let mut tmp = [0u8; 16];
    for block in data.chunks_exact_mut(BLOCK) {
        match dir {
            Direction::Encrypt => {
                for (c, b) in chain.iter_mut().zip(block.iter()) {
                    *c ^= b;
                }
                cipher.encrypt_block((&mut chain).into());
                block.copy_from_slice(&chain);
            }
            Direction::Decrypt => {
                tmp.copy_from_slice(block);
                cipher.decrypt_block(block.into());
                for (b, c) in block.iter_mut().zip(chain.iter()) {
                    *b ^= c;
                }
                chain = tmp;
            }
        }
    }
    chain.zeroize();
    tmp.zeroize();
    Ok(())
}

/// AES-128 ECB encryption of one block (used to derive the EV2 IVs).
pub fn encrypt_block(key: &AesKey, block: &[u8; 16]) -> [u8; 16] {
    let mut b = *block;
    key.cipher().encrypt_block((&mut b).into());
    b
}

/// ISO/IEC 9797-1 padding method 2: append 0x80, then zeros to a whole block (always pads).
pub fn pad_iso9797_m2(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity((data.len() / BLOCK + 1) * BLOCK);
    out.extend_from_slice(data);
    out.push(0x80);
    while out.len() % BLOCK != 0 {
        out.push(0);
    }
    out
}

/// Removes ISO/IEC 9797-1 method 2 padding; refuses anything else.
pub fn unpad_iso9797_m2(data: &[u8]) -> Result<&[u8], CryptoError> {
    if data.is_empty() || !data.len().is_multiple_of(BLOCK) {
        return Err(CryptoError::BadPadding);
    }
    let last_nonzero = data
        .iter()
        .rposition(|&b| b != 0)
        .ok_or(CryptoError::BadPadding)?;
    if data[last_nonzero] != 0x80 || data.len() - last_nonzero > BLOCK {
        return Err(CryptoError::BadPadding);
    }
    Ok(&data[..last_nonzero])
}

/// Rotate a 16-byte random left by one byte (RndB' / RndA' in the EV2 authentication).
pub fn rotate_left_1(x: &[u8; 16]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..15].copy_from_slice(&x[1..]);
    out[15] = x[0];
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.replace(' ', "")).unwrap()
    }
    fn k(s: &str) -> AesKey {
        AesKey::from_slice(&h(s)).unwrap()
    }

    const RFC4493_KEY: &str = "2b7e151628aed2a6abf7158809cf4f3c";
    const RFC4493_MSG: &str = "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51 \
                               30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710";

    /// RFC 4493 §4 (also NIST SP 800-38B D.1): subkeys.
    #[test]
    fn rfc4493_subkeys() {
        let (k1, k2) = subkeys(&k(RFC4493_KEY).cipher());
        assert_eq!(k1.to_vec(), h("fbeed618357133667c85e08f7236a8de"));
        assert_eq!(k2.to_vec(), h("f7ddac306ae266ccf90bc11ee46d513b"));
    }

    /// RFC 4493 §4 examples 1–4 (= NIST SP 800-38B D.1 examples 1–4).
    #[test]
    fn rfc4493_cmac_examples() {
        let key = k(RFC4493_KEY);
        let msg = h(RFC4493_MSG);
        let cases = [
            (0, "bb1d6929e95937287fa37d129b756746"),
            (16, "070a16b46b4d4144f79bdd9dd04a287c"),
            (40, "dfa66747de9ae63030ca32611497c827"),
            (64, "51f0bebf7e3b9d92fc49741779363cfe"),
        ];
        for (len, want) in cases {
            assert_eq!(cmac(&key, &msg[..len]).to_vec(), h(want), "len {len}");
        }
    }

    /// NXP AN10922 §2.2.1 worked example: AES-128 diversification with UID, AID and system
    /// identifier "NXP Abu" (18-byte input, padded to 32 bytes and XORed with K2).
    #[test]
    fn an10922_aes128_worked_example() {
        let master = k("00112233445566778899AABBCCDDEEFF");
        let div = diversify_an10922(
            &master,
            &h("04782E21801D80"),
            &h("3042F5"),
            &h("4E585020416275"),
        )
        .unwrap();
        assert_eq!(
            div.expose_secret().to_vec(),
            h("A8DD63A3B89D54B37CA802473FDA9175")
        );
    }

    /// AN10922's rule for short inputs: an input of ≤ 16 bytes is still padded to 32 bytes,
    /// so the result is NOT RFC 4493 CMAC of the input; a 32-byte input IS plain CMAC.
    #[test]
    fn an10922_short_input_pads_to_32_bytes() {
        let master = k("00112233445566778899AABBCCDDEEFF");
        let uid = h("04782E21801D80");
        let div = diversify_an10922(&master, &uid, &[], &[]).unwrap();
        let mut m = vec![0x01];
        m.extend_from_slice(&uid);
        assert_ne!(div.expose_secret().to_vec(), cmac(&master, &m).to_vec());
        // Equivalent construction: CMAC over the 32-byte padded input uses K1 for a complete
        // block, so pad manually and xor (K1 ^ K2) into the last block to turn K1 into K2.
        let (k1, k2) = subkeys(&master.cipher());
        let mut padded = m.clone();
        padded.push(0x80);
        padded.resize(32, 0);
        for i in 0..16 {
            padded[16 + i] ^= k1[i] ^ k2[i];
        }
        assert_eq!(
            div.expose_secret().to_vec(),
            cmac(&master, &padded).to_vec()
        );
        // 32-byte input: plain CMAC.
        let sys = [0x55u8; 21];
        let div32 = diversify_an10922(&master, &uid, &h("3042F5"), &sys).unwrap();
        let mut m32 = m.clone();
        m32.extend_from_slice(&h("3042F5"));
        m32.extend_from_slice(&sys);
        assert_eq!(m32.len(), 32);
        assert_eq!(div32.expose_secret().to_vec(), cmac(&master, &m32).to_vec());
    }

    #[test]
    fn an10922_refuses_bad_lengths() {
        let master = k("00112233445566778899AABBCCDDEEFF");
        assert_eq!(
            diversify_an10922(&master, &[], &[], &[]).unwrap_err(),
            CryptoError::DiversificationInputEmpty
        );
        assert_eq!(
            diversify_an10922(&master, &[0; 7], &[0; 3], &[0; 22]).unwrap_err(),
            CryptoError::DiversificationInputTooLong { got: 33 }
        );
    }

    /// NXP AN12196 §"AuthenticateEV2First" example (NTAG 424 DNA, key 00…00): session keys.
    #[test]
    fn an12196_session_keys() {
        let key = k("00000000000000000000000000000000");
        let rnd_a: [u8; 16] = h("13C5DB8A5930439FC3DEF9A4C675360F").try_into().unwrap();
        let rnd_b: [u8; 16] = h("B9E2FC789B64BF237CCCAA20EC7E6E48").try_into().unwrap();
        let sv1 = session_vector([0xA5, 0x5A], &rnd_a, &rnd_b);
        assert_eq!(
            sv1.to_vec(),
            h("A55A0001008013C56268A548D8FBBF237CCCAA20EC7E6E48C3DEF9A4C675360F")
        );
        let keys = ev2_session_keys(&key, &rnd_a, &rnd_b);
        assert_eq!(
            keys.enc.expose_secret().to_vec(),
            h("1309C877509E5A215007FF0ED19CA564")
        );
        assert_eq!(
            keys.mac.expose_secret().to_vec(),
            h("4C6626F5E72EA694202139295C7A7FC7")
        );
    }

    #[test]
    fn tm_session_key_from_an_expanded_state_matches() {
        let k = k(RFC4493_KEY);
        let uid = [4, 1, 2, 3, 4, 5, 6];
        assert_eq!(
            tm_session_mac_key(&k, 7, &uid),
            tm_session_mac_key_with(&cmac_state(&k), 7, &uid)
        );
        // The resetting form leaves the state ready for the next counter value.
        let mut state = cmac_state(&k);
        for tmc in [7, 8] {
            assert_eq!(
                tm_session_mac_key(&k, tmc, &uid),
                tm_session_mac_key_reset(&mut state, tmc, &uid)
            );
        }
    }

    #[test]
    fn truncation_takes_odd_bytes() {
        let full: [u8; 16] = core::array::from_fn(|i| i as u8);
        assert_eq!(truncate_mac(&full), [1, 3, 5, 7, 9, 11, 13, 15]);
    }

    #[test]
    fn padding_roundtrip_and_refusals() {
        for n in 0..40 {
            let d: Vec<u8> = (0..n as u8).map(|x| x | 1).collect();
            let p = pad_iso9797_m2(&d);
            assert_eq!(p.len() % 16, 0);
            assert!(p.len() > d.len());
            assert_eq!(unpad_iso9797_m2(&p).unwrap(), &d[..]);
        }
        assert!(unpad_iso9797_m2(&[0u8; 16]).is_err());
        assert!(unpad_iso9797_m2(&[1u8; 16]).is_err());
        let mut two = [0u8; 32];
        two[0] = 0x80; // padding longer than a block
        assert!(unpad_iso9797_m2(&two).is_err());
    }

    #[test]
    fn cbc_roundtrip() {
        let key = k(RFC4493_KEY);
        let iv = [7u8; 16];
        let mut data = h(RFC4493_MSG);
        let orig = data.clone();
        cbc_encrypt(&key, &iv, &mut data).unwrap();
        assert_ne!(data, orig);
        cbc_decrypt(&key, &iv, &mut data).unwrap();
        assert_eq!(data, orig);
        assert!(cbc_encrypt(&key, &iv, &mut [0u8; 15]).is_err());
    }

    /// NIST SP 800-38A F.2.1 / F.2.2 (CBC-AES128), with the borrowed cipher too.
    #[test]
    fn cbc_sp800_38a() {
        let key = k(RFC4493_KEY);
        let iv: [u8; 16] = h("000102030405060708090a0b0c0d0e0f").try_into().unwrap();
        let plain = h(RFC4493_MSG);
        let want = h(
            "7649abac8119b246cee98e9b12e9197d 5086cb9b507219ee95db113a917678b2 \
                      73bed6b8e3c1743b7116e69e22229516 3ff1caa1681fac09120eca307586e1a7",
        );
        let mut data = plain.clone();
        cbc_encrypt(&key, &iv, &mut data).unwrap();
        assert_eq!(data, want);
        cbc_decrypt_with(&key.cipher(), &iv, &mut data).unwrap();
        assert_eq!(data, plain);
        cbc_encrypt_with(&key.cipher(), &iv, &mut data).unwrap();
        assert_eq!(data, want);
        cbc_decrypt(&key, &iv, &mut data).unwrap();
        assert_eq!(data, plain);
    }

    #[test]
    fn key_debug_hides_bytes() {
        let key = k(RFC4493_KEY);
        let s = format!("{key:?}");
        assert!(!s.to_lowercase().contains("2b7e"));
    }
}
