//! Rotating the back office's list-signing key and the device-MAC master (docs/key-rotation.md).
//!
//! [`TrustedKeys`]: the Ed25519 public keys a device or gateway accepts signed lists under
//! (blocklists, action lists, fare tables), each with its version: every non-retired version
//! verifies; a retired one is recognised only to name the refusal. No wire change: a list is
//! tried under the newest key first, so a list signed by the current key costs one check.
//!
//! [`DeviceKeyRing`]: the device-MAC keys a gateway verifies one device's taps under: the
//! device key of the current KM_DEVICE version and, during the window, the previous one; keys
//! of retired versions only name the quarantine reason. The tap record does not carry the
//! version (no tap wire change), so the gateway tries the accepted keys in turn.

use crate::crypto::AesKey;
use std::borrow::Cow;
use std::fmt;

/// The versioned Ed25519 public keys signed lists are accepted under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKeys {
    /// (version, public key), newest first: a signature under any of them is accepted.
    accepted: Vec<(u8, [u8; 32])>,
    /// (version, public key) of retired versions: recognised only to name the refusal.
    retired: Vec<(u8, [u8; 32])>,
}

/// A signed list refused: the check's own error, or a signature under a retired key.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal<E> {
    /// The list's own check refused it (a forged signature, a malformed list, …).
    Check(E),
    /// The signature verifies, but under a signing-key version the operator retired.
    RetiredKey(u8),
}

impl<E: fmt::Display> fmt::Display for Refusal<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Check(e) => e.fmt(f),
            Refusal::RetiredKey(v) => write!(
                f,
                "{RETIRED_KEY_TEXT} version {v} (the back office signs with its current key)"
            ),
        }
    }
}

impl<E: fmt::Display + fmt::Debug> std::error::Error for Refusal<E> {}

/// What a refusal for a retired signing key says (metrics count it apart).
pub const RETIRED_KEY_TEXT: &str = "signed by retired signing key";

/// A `signing.pub` text that cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("signing public keys, line {line}: {why}")]
pub struct TrustedKeysError {
    /// 1-based line number (0: the text as a whole).
    pub line: usize,
    /// What is wrong.
    pub why: &'static str,
}

fn hex32(s: &str) -> Option<[u8; 32]> {
    hex::decode(s).ok()?.try_into().ok()
}

impl TrustedKeys {
    /// One key, version 1 (a device provisioned before any rotation).
    pub fn single(key: [u8; 32]) -> TrustedKeys {
        TrustedKeys {
            accepted: vec![(1, key)],
            retired: Vec::new(),
        }
    }

    /// The accepted and retired keys; `accepted` must not be empty and versions must not repeat.
    pub fn new(
        mut accepted: Vec<(u8, [u8; 32])>,
        mut retired: Vec<(u8, [u8; 32])>,
    ) -> Result<TrustedKeys, TrustedKeysError> {
        let err = |why| TrustedKeysError { line: 0, why };
        if accepted.is_empty() {
            return Err(err("no accepted (non-retired) key"));
        }
        accepted.sort_unstable_by_key(|k| std::cmp::Reverse(k.0));
        retired.sort_unstable_by_key(|k| std::cmp::Reverse(k.0));
        let mut versions: Vec<u8> = accepted.iter().chain(&retired).map(|k| k.0).collect();
        versions.sort_unstable();
        let n = versions.len();
        versions.dedup();
        if versions.len() != n {
            return Err(err("a key version appears twice"));
        }
        Ok(TrustedKeys { accepted, retired })
    }

    /// Reads a `signing.pub` text: either one key in hex (version 1), or one line per version,
    /// `v<N> <64 hex digits>` with ` retired` after a retired one; `#` starts a comment.
    pub fn parse(text: &str) -> Result<TrustedKeys, TrustedKeysError> {
        let lines: Vec<(usize, &str)> = text
            .lines()
            .enumerate()
            .map(|(i, l)| (i + 1, l.split('#').next().unwrap_or("").trim()))
            .filter(|(_, l)| !l.is_empty())
            .collect();
        if let [(line, only)] = lines.as_slice() {
            if !only.starts_with('v') {
                let key = hex32(only).ok_or(TrustedKeysError {
                    line: *line,
                    why: "a key must be 64 hex digits",
                })?;
                return Ok(TrustedKeys::single(key));
            }
        }
        let (mut accepted, mut retired) = (Vec::new(), Vec::new());
        for (line, l) in lines {
            let err = |why| TrustedKeysError { line, why };
            let mut words = l.split_whitespace();
            let version = words
                .next()
                .and_then(|w| w.strip_prefix('v'))
                .and_then(|v| v.parse::<u8>().ok())
                .ok_or(err("expected `v<version> <key hex>`"))?;
            let key = words
                .next()
                .and_then(hex32)
                .ok_or(err("a key must be 64 hex digits"))?;
            match (words.next(), words.next()) {
                (None, _) => accepted.push((version, key)),
                (Some("retired"), None) => retired.push((version, key)),
                _ => return Err(err("only `retired` may follow the key")),
            }
        }
        TrustedKeys::new(accepted, retired)
    }

    /// The text [`TrustedKeys::parse`] reads back: the bare key in hex while there is only
    /// version 1 (as `keys init` writes it), else one line per version, newest first.
    pub fn render(&self) -> String {
        if let ([(1, key)], []) = (self.accepted.as_slice(), self.retired.as_slice()) {
            return format!("{}\n", hex::encode(key));
        }
        let mut out = String::new();
        for (v, k) in &self.accepted {
            out.push_str(&format!("v{v} {}\n", hex::encode(k)));
        }
        for (v, k) in &self.retired {
            out.push_str(&format!("v{v} {} retired\n", hex::encode(k)));
        }
        out
    }

    /// The newest accepted version and key.
    pub fn current(&self) -> (u8, [u8; 32]) {
        self.accepted[0]
    }

    /// The accepted versions, newest first.
    pub fn accepted_versions(&self) -> Vec<u8> {
        self.accepted.iter().map(|k| k.0).collect()
    }

    /// The same keys with the retired ones accepted too: for lists this device already verified
    /// and journalled before the retirement reached it (a restart must not lose its blocklist).
    pub fn with_retired_accepted(&self) -> TrustedKeys {
        let mut accepted = self.accepted.clone();
        accepted.extend_from_slice(&self.retired);
        TrustedKeys {
            accepted,
            retired: Vec::new(),
        }
    }

    /// Runs `check` (a pure signature check: it must change nothing) under each accepted key,
    /// newest first, until one passes; `bad_signature` tells a wrong key from any other
    /// refusal, which is final. When no accepted key verifies, a retired key that does makes
    /// the refusal [`Refusal::RetiredKey`]. Returns the check's value and the key that passed.
    pub fn verify_with<T, E>(
        &self,
        check: impl FnMut(&[u8; 32]) -> Result<T, E>,
        bad_signature: impl Fn(&E) -> bool,
    ) -> Result<(T, [u8; 32]), Refusal<E>> {
        first_verifying(&self.accepted, &self.retired, check, bad_signature)
            .map(|(t, (_, key))| (t, *key))
            .map_err(|e| e.expect("at least one accepted key"))
    }
}

/// A message signed with the back office's Ed25519 list-signing key (a blocklist update or
/// snapshot chunk, an action list): its own strict check under one key, and that check under
/// each trusted version.
pub trait SignedMessage: Sized {
    /// What the check refuses a message with.
    type Error;

    /// The message decoded strictly, its signature verified under `public_key`.
    fn verify(bytes: &[u8], public_key: &[u8; 32]) -> Result<Self, Self::Error>;

    /// Whether `e` is a signature that does not verify (another key may pass), not a final
    /// refusal.
    fn is_bad_signature(e: &Self::Error) -> bool;

    /// [`SignedMessage::verify`] under each of `keys` (a retired version refused): the message
    /// and the key that verified it.
    fn verify_trusted(
        bytes: &[u8],
        keys: &TrustedKeys,
    ) -> Result<(Self, [u8; 32]), Refusal<Self::Error>> {
        keys.verify_with(|k| Self::verify(bytes, k), Self::is_bad_signature)
    }
}

/// What [`first_verifying`] found: the check's value and the `(version, key)` that passed, or
/// the refusal (`None`: no accepted key at all).
type Found<'a, K, T, E> = Result<(T, &'a (u8, K)), Option<Refusal<E>>>;

/// `check` under each accepted `(version, key)` in turn until one passes (a refusal other than
/// a wrong key, `bad_key`, is final); when none does, a retired key that passes names the
/// refusal. `None`: no accepted key at all.
fn first_verifying<'a, K, T, E>(
    accepted: &'a [(u8, K)],
    retired: &[(u8, K)],
    mut check: impl FnMut(&K) -> Result<T, E>,
    bad_key: impl Fn(&E) -> bool,
) -> Found<'a, K, T, E> {
    let mut first = None;
    for entry in accepted {
        match check(&entry.1) {
            Ok(t) => return Ok((t, entry)),
            Err(e) if bad_key(&e) => {
                first.get_or_insert(e);
            }
            Err(e) => return Err(Some(Refusal::Check(e))),
        }
    }
    for (v, key) in retired {
        if check(key).is_ok() {
            return Err(Some(Refusal::RetiredKey(*v)));
        }
    }
    Err(first.map(Refusal::Check))
}

/// Anything that names the keys signed lists are accepted under: one public key (version 1),
/// or a [`TrustedKeys`].
pub trait SignerKeys {
    /// The keys, versioned.
    fn trusted(&self) -> Cow<'_, TrustedKeys>;
}

impl SignerKeys for [u8; 32] {
    fn trusted(&self) -> Cow<'_, TrustedKeys> {
        Cow::Owned(TrustedKeys::single(*self))
    }
}

impl SignerKeys for TrustedKeys {
    fn trusted(&self) -> Cow<'_, TrustedKeys> {
        Cow::Borrowed(self)
    }
}

/// The device-MAC keys one device's taps are verified under (zeroized on drop).
#[derive(Clone, Debug, Default)]
pub struct DeviceKeyRing {
    /// (KM_DEVICE version, device key), newest first: a tap MAC'd under any is accepted.
    pub accepted: Vec<(u8, AesKey)>,
    /// (version, device key) under retired KM_DEVICE versions: only to name the refusal.
    pub retired: Vec<(u8, AesKey)>,
}

impl DeviceKeyRing {
    /// One key, accepted (a gateway that knows a single version).
    pub fn single(version: u8, key: AesKey) -> DeviceKeyRing {
        DeviceKeyRing {
            accepted: vec![(version, key)],
            retired: Vec::new(),
        }
    }

    /// Runs `check` under each accepted key, newest first, like [`TrustedKeys::verify_with`]:
    /// the value and the version that verified, or the refusal (a retired version that
    /// verifies is [`Refusal::RetiredKey`]). No key at all is `Refusal::Check(no_key)`.
    pub fn verify_with<T, E>(
        &self,
        check: impl FnMut(&AesKey) -> Result<T, E>,
        bad_mac: impl Fn(&E) -> bool,
        no_key: E,
    ) -> Result<(T, u8), Refusal<E>> {
        first_verifying(&self.accepted, &self.retired, check, bad_mac)
            .map(|(t, (v, _))| (t, *v))
            .map_err(|e| e.unwrap_or(Refusal::Check(no_key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(b: u8) -> [u8; 32] {
        [b; 32]
    }

    #[test]
    fn signing_pub_text_roundtrips_and_a_bare_key_is_version_1() {
        let bare = format!("{}\n", hex::encode(pk(7)));
        let t = TrustedKeys::parse(&bare).unwrap();
        assert_eq!(t.current(), (1, pk(7)));
        assert_eq!(t.render(), bare);
        let t = TrustedKeys::new(vec![(1, pk(1)), (2, pk(2))], vec![(0, pk(9))]).unwrap();
        assert_eq!(t.current(), (2, pk(2)));
        let back = TrustedKeys::parse(&t.render()).unwrap();
        assert_eq!(back, t);
        assert_eq!(back.accepted_versions(), vec![2, 1]);
    }

    #[test]
    fn bad_signing_pub_text_is_refused_with_its_line() {
        for (text, line) in [
            ("", 0),
            ("zz", 1),
            ("v1 00\n", 1),
            (
                &format!("v1 {}\nv1 {}\n", hex::encode(pk(1)), hex::encode(pk(2)))[..],
                0,
            ),
            (&format!("v1 {} gone\n", hex::encode(pk(1)))[..], 1),
            (&format!("v1 {} retired\n", hex::encode(pk(1)))[..], 0),
        ] {
            let e = TrustedKeys::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
        }
    }

    /// A stand-in check: passes only under key `good`; `other` is a refusal that is not about
    /// the key.
    fn check(good: [u8; 32], other: bool) -> impl Fn(&[u8; 32]) -> Result<u8, &'static str> {
        move |k| match (other, *k == good) {
            (true, _) => Err("malformed"),
            (false, true) => Ok(k[0]),
            (false, false) => Err("bad signature"),
        }
    }

    #[test]
    fn every_accepted_version_verifies_and_a_retired_one_is_named() {
        let t = TrustedKeys::new(vec![(2, pk(2)), (3, pk(3))], vec![(1, pk(1))]).unwrap();
        let bad = |e: &&str| *e == "bad signature";
        assert_eq!(t.verify_with(check(pk(3), false), bad), Ok((3, pk(3))));
        assert_eq!(t.verify_with(check(pk(2), false), bad), Ok((2, pk(2))));
        assert_eq!(
            t.verify_with(check(pk(1), false), bad),
            Err(Refusal::RetiredKey(1))
        );
        assert!(t
            .verify_with(check(pk(1), false), bad)
            .unwrap_err()
            .to_string()
            .contains("retired signing key version 1"));
        assert_eq!(
            t.verify_with(check(pk(8), false), bad),
            Err(Refusal::Check("bad signature"))
        );
        assert_eq!(
            t.verify_with(check(pk(3), true), bad),
            Err(Refusal::Check("malformed"))
        );
        // A journalled list signed before the retirement still restores.
        let all = t.with_retired_accepted();
        assert_eq!(all.verify_with(check(pk(1), false), bad), Ok((1, pk(1))));
    }

    #[test]
    fn a_device_ring_accepts_both_versions_and_names_a_retired_one() {
        let k = |b: u8| AesKey::from_bytes([b; 16]);
        let ring = DeviceKeyRing {
            accepted: vec![(3, k(3)), (2, k(2))],
            retired: vec![(1, k(1))],
        };
        let under = |good: u8| {
            move |key: &AesKey| {
                if key.expose_secret()[0] == good {
                    Ok(())
                } else {
                    Err("bad mac")
                }
            }
        };
        let bad = |e: &&str| *e == "bad mac";
        assert_eq!(ring.verify_with(under(3), bad, "none"), Ok(((), 3)));
        assert_eq!(ring.verify_with(under(2), bad, "none"), Ok(((), 2)));
        assert_eq!(
            ring.verify_with(under(1), bad, "none"),
            Err(Refusal::RetiredKey(1))
        );
        assert_eq!(
            ring.verify_with(under(9), bad, "none"),
            Err(Refusal::Check("bad mac"))
        );
        assert_eq!(
            DeviceKeyRing::default().verify_with(under(3), bad, "none"),
            Err(Refusal::Check("none"))
        );
    }
}
