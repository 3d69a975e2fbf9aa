//! Key rotation on the card: DESFire EV2 ChangeKey in CommMode.FULL, and [`Rekey`], the
//! sans-IO dialogue with which the back office's HSM moves a card's four application keys to a
//! new master version (the operator's side: docs/key-rotation.md).
//!
//! ## ChangeKey (`C4`), as NXP AN12196 §5.16 documents it
//! CmdHeader = the key number; CmdData, encrypted under SesAuthENC and MAC'd like any FULL
//! command ([`crate::sm`]), is
//! - for a key other than the one the session is authenticated with (case 1):
//!   `(NewKey ⊕ OldKey) ‖ KeyVer ‖ CRC32(NewKey)`, answered with a MAC'd `91 00`;
//! - for the authenticated key itself (case 2, key 0 here): `NewKey ‖ KeyVer`, answered with a
//!   plain `91 00` — the session ends, the old key no longer exists.
//!
//! The CRC is NXP's CRC32 ([`crc32_nk`]: the IEEE 802.3 polynomial, preset all ones, no final
//! inversion, least significant byte first). Each ChangeKey is atomic on the card: the key and
//! its version byte change together in one NVM write, so a card torn between two ChangeKeys has
//! every key at the old or the new version, each usable, and GetKeyVersion says which.
//!
//! ## The dialogue
//! `[SelectApplication, GetKeyVersion 0, 1, 2, 3]` → (nothing to do if every key is at the
//! target) → AuthenticateEV2First with key 0 (the application master, HSM only) at the version
//! the card reports → `[ChangeKey 0]` (its change ends the session) → AuthenticateEV2First with
//! the new key 0 → `[ChangeKey 1, 3, 2]` for each key not yet at the target → [`RekeyOutcome`].
//! The credit key changes last, so a card whose credit key — the one every online load reads
//! the version of — is at the target has every key there: a load that finds the credit key
//! old runs a rotation. A dialogue torn anywhere is resumed by the next one, which reads the
//! versions again and changes only what is still old. If key 0 refuses the version it reports,
//! the target version is tried, then the others.

use crate::apdu::{self, ins, Status};
use crate::card::INS_GET_KEY_VERSION;
use crate::crypto::AesKey;
use crate::keys::{KeyKind, CARD_MASTERS, DEFAULT_AID};
use crate::sam::{Hsm, PendingAuth, SamError};
use crate::sm::{Channel, CommMode};
use crate::txn::{Transport, TxError};
use rand_core::RngCore;
use std::collections::VecDeque;
use zeroize::Zeroizing;

/// The ChangeKey command code.
pub const INS_CHANGE_KEY: u8 = 0xC4;
/// The key whose session may change keys: the application master.
pub const CHANGE_KEY_AUTH_KEY_NO: u8 = 0;

/// NXP's CRC32 of `data` as the card transmits it (ChangeKey's CRC32NK): polynomial
/// 0xEDB88320, preset 0xFFFFFFFF, no final inversion, least significant byte first.
pub fn crc32_nk(data: &[u8]) -> [u8; 4] {
    let mut crc: u32 = 0xFFFF_FFFF;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    crc.to_le_bytes()
}

/// ChangeKey's plaintext CmdData (before padding and encryption): `NewKey ‖ KeyVer` for the
/// authenticated key itself (`old` is `None`), `(NewKey ⊕ OldKey) ‖ KeyVer ‖ CRC32(NewKey)`
/// for another key.
pub fn change_key_data(new: &AesKey, old: Option<&AesKey>, version: u8) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(21));
    let n = new.expose_secret();
    match old {
        None => {
            out.extend_from_slice(n);
            out.push(version);
        }
        Some(old) => {
            out.extend(n.iter().zip(old.expose_secret()).map(|(a, b)| a ^ b));
            out.push(version);
            out.extend_from_slice(&crc32_nk(n));
        }
    }
    out
}

/// The card's side of [`change_key_data`]: the new key and its version, or the status the card
/// answers (a wrong length, or a CRC that does not match: an integrity error).
pub(crate) fn open_change_key_data(
    plain: &[u8],
    old: Option<&AesKey>,
) -> Result<(AesKey, u8), Status> {
    match old {
        None => {
            let [key @ .., version] = plain else {
                return Err(Status::LengthError);
            };
            let key = AesKey::from_slice(key).map_err(|_| Status::LengthError)?;
            Ok((key, *version))
        }
        Some(old) => {
            if plain.len() != 21 {
                return Err(Status::LengthError);
            }
            let mut key = Zeroizing::new([0u8; 16]);
            for (k, (x, o)) in key
                .iter_mut()
                .zip(plain[..16].iter().zip(old.expose_secret()))
            {
                *k = x ^ o;
            }
            if !crate::crypto::mac_eq(&crc32_nk(key.as_ref()), &plain[17..21]) {
                return Err(Status::IntegrityError);
            }
            Ok((AesKey::from_bytes(*key), plain[16]))
        }
    }
}

/// The ChangeKey command APDU for key `key_no` with the plaintext `data` ([`change_key_data`]),
/// `ahead` commands after the ones already wrapped in this session (pipelining).
pub fn change_key_apdu(
    ch: &mut Channel,
    ahead: u16,
    key_no: u8,
    data: &[u8],
) -> Result<Vec<u8>, crate::sm::SmError> {
    ch.command_apdu_ahead(ahead, INS_CHANGE_KEY, &[key_no], data, CommMode::Full)
}

/// How a rotation of one card ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RekeyOutcome {
    /// The card.
    pub uid: [u8; 7],
    /// Each key's version before (key numbers 0..=3), as the card reported them.
    pub before: [u8; 4],
    /// The version every key holds now.
    pub after: u8,
    /// The key numbers changed in this dialogue, in order (empty: the card was current).
    pub changed: Vec<u8>,
}

/// What a [`Rekey`] wants next.
#[derive(Debug)]
pub enum RekeyStep {
    /// Send these APDUs in order and feed each answer to [`Rekey::on_response`].
    Transmit(Vec<Vec<u8>>),
    /// More answers of the current batch are expected.
    Continue,
    /// Every key of the card is at the target version.
    Done(RekeyOutcome),
}

/// What a rotation has seen and done so far.
struct Progress {
    /// Each key's version as the card reported it.
    before: [u8; 4],
    /// Each key's version now (as reported, then as changed).
    now: [u8; 4],
    /// Keys changed so far, in order.
    changed: Vec<u8>,
}

enum Stage {
    Select,
    Versions(Vec<u8>),
    /// Part 1's answer, authenticating key 0 at `candidates[0]`.
    Auth1 {
        progress: Progress,
        candidates: Vec<u8>,
    },
    Auth2 {
        progress: Progress,
        candidates: Vec<u8>,
        pending: PendingAuth,
    },
    /// A ChangeKey batch is out; the answers of `outstanding` are expected.
    Changing {
        ch: Channel,
        progress: Progress,
        outstanding: VecDeque<u8>,
    },
    Ended,
}

/// The HSM's rotation of one card to `target` (see the module documentation).
pub struct Rekey {
    uid: [u8; 7],
    target: u8,
    stage: Stage,
}

impl std::fmt::Debug for Rekey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rekey")
            .field("uid", &hex::encode_upper(self.uid))
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

fn protocol(what: &'static str) -> TxError {
    TxError::Protocol {
        step: "change key",
        what,
    }
}

fn status_of<'a>(resp: &'a [u8], step: &'static str) -> Result<(&'a [u8], Status), TxError> {
    apdu::parse_response(resp).ok_or(TxError::Protocol {
        step,
        what: "response shorter than a status word",
    })
}

fn card_error(step: &'static str, status: Status) -> TxError {
    TxError::Card { step, status }
}

/// AuthenticateEV2First part 1 with key 0.
fn auth_key0() -> Vec<u8> {
    apdu::wrap(ins::AUTH_EV2_FIRST, &[CHANGE_KEY_AUTH_KEY_NO, 0x00])
}

impl Rekey {
    /// Starts rotating card `uid` to version `target`: the first batch reads the version of
    /// every key.
    pub fn start(uid: [u8; 7], target: u8) -> (Rekey, Vec<Vec<u8>>) {
        let mut batch = vec![apdu::wrap(ins::SELECT_APPLICATION, &DEFAULT_AID)];
        batch.extend((0..4u8).map(|k| apdu::wrap(INS_GET_KEY_VERSION, &[k])));
        let r = Rekey {
            uid,
            target,
            stage: Stage::Select,
        };
        (r, batch)
    }

    /// The version this dialogue moves the card to.
    pub fn target(&self) -> u8 {
        self.target
    }

    /// Feeds the card's answer to the oldest outstanding command. Any error ends the dialogue;
    /// the card is left with every key at the old or the new version (run another).
    pub fn on_response(
        &mut self,
        hsm: &mut dyn Hsm,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<RekeyStep, TxError> {
        let stage = std::mem::replace(&mut self.stage, Stage::Ended);
        let (next, step) = self.advance(stage, hsm, rng, resp)?;
        self.stage = next;
        Ok(step)
    }

    fn advance(
        &self,
        stage: Stage,
        hsm: &mut dyn Hsm,
        rng: &mut dyn RngCore,
        resp: &[u8],
    ) -> Result<(Stage, RekeyStep), TxError> {
        match stage {
            Stage::Select => {
                let (_, status) = status_of(resp, "select")?;
                if status != Status::Ok {
                    return Err(card_error("select", status));
                }
                Ok((Stage::Versions(Vec::with_capacity(4)), RekeyStep::Continue))
            }
            Stage::Versions(got) => self.on_version(got, resp),
            Stage::Auth1 {
                progress,
                candidates,
            } => {
                let (ek_rnd_b, status) = status_of(resp, "authenticate")?;
                if status != Status::AdditionalFrame {
                    return Err(card_error("authenticate", status));
                }
                let (pending, frame) =
                    hsm.auth_part1(KeyKind::App, candidates[0], &self.uid, ek_rnd_b, rng)?;
                let next = Stage::Auth2 {
                    progress,
                    candidates,
                    pending,
                };
                let cmd = apdu::wrap(ins::ADDITIONAL_FRAME, &frame);
                Ok((next, RekeyStep::Transmit(vec![cmd])))
            }
            Stage::Auth2 {
                progress,
                candidates,
                pending,
            } => self.on_auth2(progress, candidates, pending, hsm, resp),
            Stage::Changing {
                ch,
                progress,
                outstanding,
            } => self.on_changed(ch, progress, outstanding, resp),
            Stage::Ended => Err(protocol("no command is outstanding")),
        }
    }

    /// A GetKeyVersion answer; after the fourth, authentication with key 0 (or done).
    fn on_version(&self, mut got: Vec<u8>, resp: &[u8]) -> Result<(Stage, RekeyStep), TxError> {
        let (data, status) = status_of(resp, "get key version")?;
        if status != Status::Ok {
            return Err(card_error("get key version", status));
        }
        let [v] = data else {
            return Err(protocol("a key version is not one byte"));
        };
        got.push(*v);
        let Ok(versions) = <[u8; 4]>::try_from(got.as_slice()) else {
            return Ok((Stage::Versions(got), RekeyStep::Continue));
        };
        if versions.iter().any(|&v| v > self.target) {
            return Err(protocol(
                "the card holds a key newer than the target version",
            ));
        }
        let progress = Progress {
            before: versions,
            now: versions,
            changed: Vec::with_capacity(4),
        };
        if versions.iter().all(|&v| v == self.target) {
            return Ok((Stage::Ended, RekeyStep::Done(self.outcome(progress))));
        }
        // The version key 0 reports first; then the target, then any other key's version.
        let mut candidates = vec![versions[0]];
        for v in std::iter::once(self.target).chain(versions) {
            if !candidates.contains(&v) {
                candidates.push(v);
            }
        }
        let next = Stage::Auth1 {
            progress,
            candidates,
        };
        Ok((next, RekeyStep::Transmit(vec![auth_key0()])))
    }

    fn outcome(&self, progress: Progress) -> RekeyOutcome {
        RekeyOutcome {
            uid: self.uid,
            before: progress.before,
            after: self.target,
            changed: progress.changed,
        }
    }

    /// Part 2's answer: the next ChangeKey batch, or the next candidate version of key 0 when
    /// the card refused this one. Key 0 changes first, alone (its change ends the session);
    /// the others follow in a session of the new key 0, the credit key last — so a card whose
    /// credit key (what every load reads) is at the target has all its keys there.
    fn on_auth2(
        &self,
        progress: Progress,
        mut candidates: Vec<u8>,
        pending: PendingAuth,
        hsm: &mut dyn Hsm,
        resp: &[u8],
    ) -> Result<(Stage, RekeyStep), TxError> {
        let (answer, status) = status_of(resp, "authenticate")?;
        if status == Status::AuthenticationError && candidates.len() > 1 {
            candidates.remove(0);
            let next = Stage::Auth1 {
                progress,
                candidates,
            };
            return Ok((next, RekeyStep::Transmit(vec![auth_key0()])));
        }
        if status != Status::Ok {
            return Err(card_error("authenticate", status));
        }
        let mut ch = hsm.auth_part2(pending, answer)?;
        // Key 0 is changed whenever its version byte is not the target, even when it
        // authenticated at the target: that puts its version byte right.
        let order: Vec<u8> = if progress.now[0] != self.target {
            vec![CHANGE_KEY_AUTH_KEY_NO]
        } else {
            [1u8, 3, 2]
                .into_iter()
                .filter(|&k| progress.now[usize::from(k)] != self.target)
                .collect()
        };
        if order.is_empty() {
            return Ok((Stage::Ended, RekeyStep::Done(self.outcome(progress))));
        }
        let mut batch = Vec::with_capacity(order.len());
        for (ahead, &k) in order.iter().enumerate() {
            let old = progress.now[usize::from(k)];
            let kind = CARD_MASTERS[usize::from(k)];
            let change = KeyChange {
                kind,
                from: old,
                to: self.target,
                uid: self.uid,
            };
            let data = hsm.change_key_data(&change)?;
            let cmd =
                change_key_apdu(&mut ch, ahead as u16, k, &data).map_err(|source| TxError::Sm {
                    step: "change key",
                    source,
                })?;
            batch.push(cmd);
        }
        let next = Stage::Changing {
            ch,
            progress,
            outstanding: order.into(),
        };
        Ok((next, RekeyStep::Transmit(batch)))
    }

    /// A ChangeKey answer: MAC'd for keys 1..=3, plain for key 0 (its session is gone, and a
    /// new one under the new key 0 changes the others).
    fn on_changed(
        &self,
        mut ch: Channel,
        mut progress: Progress,
        mut outstanding: VecDeque<u8>,
        resp: &[u8],
    ) -> Result<(Stage, RekeyStep), TxError> {
        let k = outstanding
            .pop_front()
            .ok_or(protocol("no command is outstanding"))?;
        let (data, status) = status_of(resp, "change key")?;
        if status != Status::Ok {
            return Err(card_error("change key", status));
        }
        if k == CHANGE_KEY_AUTH_KEY_NO {
            if !data.is_empty() {
                return Err(protocol("ChangeKey of key 0 answered with data"));
            }
        } else {
            let body = ch
                .open_response(data, CommMode::Mac)
                .map_err(|source| TxError::Sm {
                    step: "change key",
                    source,
                })?;
            if !body.is_empty() {
                return Err(protocol("ChangeKey answered with data"));
            }
        }
        progress.now[usize::from(k)] = self.target;
        progress.changed.push(k);
        if !outstanding.is_empty() {
            let next = Stage::Changing {
                ch,
                progress,
                outstanding,
            };
            return Ok((next, RekeyStep::Continue));
        }
        if progress.now.iter().all(|&v| v == self.target) {
            return Ok((Stage::Ended, RekeyStep::Done(self.outcome(progress))));
        }
        let next = Stage::Auth1 {
            progress,
            candidates: vec![self.target],
        };
        Ok((next, RekeyStep::Transmit(vec![auth_key0()])))
    }
}

/// Rotates the card on `t` to `target` with the keys in `hsm` (in process: the charging
/// server relays the same [`Rekey`] over HTTP).
pub fn run(
    t: &mut dyn Transport,
    hsm: &mut dyn Hsm,
    target: u8,
    rng: &mut dyn RngCore,
) -> Result<RekeyOutcome, TxError> {
    let uid = t.card_uid()?;
    let (mut r, mut batch) = Rekey::start(uid, target);
    loop {
        let mut step = RekeyStep::Continue;
        for cmd in batch {
            let resp = t.transmit(&cmd)?;
            step = r.on_response(hsm, rng, &resp)?;
        }
        match step {
            RekeyStep::Transmit(next) => batch = next,
            RekeyStep::Done(outcome) => return Ok(outcome),
            RekeyStep::Continue => return Err(protocol("a batch ended without a step")),
        }
    }
}

/// One ChangeKey of a card key: key `kind` of card `uid` moved from version `from` to version
/// `to` — what [`crate::sam::Hsm::change_key_data`] is asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyChange {
    /// the card key changed
    pub kind: KeyKind,
    /// the version the card holds now
    pub from: u8,
    /// the version the card is moved to
    pub to: u8,
    /// the card
    pub uid: [u8; 7],
}

impl KeyChange {
    /// What an HSM computes for ChangeKey from the card keys it derives where its masters are
    /// (`card_key(version)`: the card's key `kind` at that version, the new one asked first):
    /// the plaintext for the card moving from the key at `from` to the one at `to`.
    pub fn plaintext(
        &self,
        mut card_key: impl FnMut(u8) -> Result<AesKey, SamError>,
    ) -> Result<Zeroizing<Vec<u8>>, SamError> {
        let new = card_key(self.to)?;
        let old = card_key(self.from)?;
        match self.kind.card_key_no() {
            Some(CHANGE_KEY_AUTH_KEY_NO) => Ok(change_key_data(&new, None, self.to)),
            Some(_) => Ok(change_key_data(&new, Some(&old), self.to)),
            None => Err(SamError::NotAllowed(
                "ChangeKey of a key that is not on cards",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sm::session_keys_from_bytes;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }
    fn k(s: &str) -> AesKey {
        AesKey::from_slice(&h(s)).unwrap()
    }
    fn an12196_channel(cmd_ctr: u16) -> Channel {
        let keys = session_keys_from_bytes(
            h("4CF3CB41A22583A61E89B158D252FC53").try_into().unwrap(),
            h("5529860B2FC5FB6154B7F28361D30BF9").try_into().unwrap(),
        );
        Channel::with_counter(keys, h("7614281A").try_into().unwrap(), cmd_ctr)
    }

    /// NXP AN12196 Table 26: ChangeKey case 1 (key 2 changed in a session of key 0):
    /// CRC32NK, the C-APDU, and the card's MAC'd answer.
    #[test]
    fn an12196_change_key_case1() {
        let new = k("F3847D627727ED3BC9C4CC050489B966");
        let old = AesKey::from_bytes([0; 16]);
        assert_eq!(crc32_nk(new.expose_secret()).to_vec(), h("789DFADC"));
        let data = change_key_data(&new, Some(&old), 0x01);
        assert_eq!(
            data.to_vec(),
            h("F3847D627727ED3BC9C4CC050489B96601789DFADC")
        );
        let mut ch = an12196_channel(2);
        let apdu = change_key_apdu(&mut ch, 0, 0x02, &data).unwrap();
        assert_eq!(
            apdu,
            h("90C4000029022CF362B7BF4311FF3BE1DAA295E8C68DE09050560D19B9E16C2393AE9CD1FAC75D0CE20BCD1D06E600")
        );
        ch.open_response(&h("203BB55D1089D587"), CommMode::Mac)
            .unwrap();
        assert_eq!(ch.cmd_ctr(), 3);
        // The card's side: the same plaintext gives back the new key and version.
        let (got, v) = open_change_key_data(&data, Some(&old)).unwrap();
        assert_eq!((got, v), (new, 1));
    }

    /// NXP AN12196 Table 27: ChangeKey case 2 (key 0 changed in its own session).
    #[test]
    fn an12196_change_key_case2() {
        let new = k("5004BF991F408672B1EF00F08F9E8647");
        let data = change_key_data(&new, None, 0x01);
        assert_eq!(data.to_vec(), h("5004BF991F408672B1EF00F08F9E864701"));
        let mut ch = an12196_channel(3);
        let apdu = change_key_apdu(&mut ch, 0, 0x00, &data).unwrap();
        assert_eq!(
            apdu,
            h("90C400002900C0EB4DEEFEDDF0B513A03A95A75491818580503190D4D05053FF75668A01D6FDA6610234BDED643200")
        );
        let (got, v) = open_change_key_data(&data, None).unwrap();
        assert_eq!((got, v), (new, 1));
    }

    #[test]
    fn crc32_nk_is_the_unreflected_complement_of_crc32() {
        // CRC-32 ("123456789") = CBF43926; NXP's omits the final inversion.
        let c = u32::from_le_bytes(crc32_nk(b"123456789"));
        assert_eq!(!c, 0xCBF4_3926);
    }

    #[test]
    fn a_wrong_crc_or_length_is_refused_by_the_card() {
        let new = AesKey::from_bytes([7; 16]);
        let old = AesKey::from_bytes([3; 16]);
        let mut data = change_key_data(&new, Some(&old), 2);
        data[20] ^= 1;
        assert_eq!(
            open_change_key_data(&data, Some(&old)).err(),
            Some(Status::IntegrityError)
        );
        // The right data under the wrong old key is a CRC mismatch too.
        let data = change_key_data(&new, Some(&old), 2);
        let other = AesKey::from_bytes([4; 16]);
        assert_eq!(
            open_change_key_data(&data, Some(&other)).err(),
            Some(Status::IntegrityError)
        );
        assert_eq!(
            open_change_key_data(&data[..20], Some(&old)).err(),
            Some(Status::LengthError)
        );
        assert_eq!(
            open_change_key_data(&data[..16], None).err(),
            Some(Status::LengthError)
        );
    }

    #[test]
    fn a_key_version_under_an_error_status_or_of_two_bytes_ends_the_rotation() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let keys = crate::keys::KeySet::generate(&mut rng);
        let mut hsm = crate::sam::SoftwareHsm::new(&keys).unwrap();
        for bad in [&[0x01, 0x91, 0x40][..], &[0x01, 0x01, 0x91, 0x00], &[0x91]] {
            let (mut r, _) = Rekey::start([4; 7], 2);
            assert!(matches!(
                r.on_response(&mut hsm, &mut rng, &[0x91, 0x00]),
                Ok(RekeyStep::Continue)
            ));
            assert!(
                r.on_response(&mut hsm, &mut rng, bad).is_err(),
                "{bad:02X?}"
            );
            // The dialogue has ended: nothing more is taken.
            assert!(r
                .on_response(&mut hsm, &mut rng, &[0x01, 0x91, 0x00])
                .is_err());
        }
    }
}
