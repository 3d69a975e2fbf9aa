//! EV2 secure messaging: CommMode.MAC and CommMode.FULL framing bound to the transaction
//! identifier (TI) and the command counter (CmdCtr).
//!
//! After AuthenticateEV2First both sides hold a [`Channel`] with CmdCtr = 0.
//!
//! - Command MAC: `MACt(SesAuthMAC, Cmd ‖ CmdCtr(LE16) ‖ TI ‖ CmdHeader ‖ CmdData')` where
//!   CmdData' is the plain data (MAC mode) or its encryption (FULL mode).
//! - FULL-mode command data: AES-CBC under SesAuthENC with
//!   IV = E(SesAuthENC, A5 5A ‖ TI ‖ CmdCtr ‖ 00×8), data padded ISO/IEC 9797-1 method 2.
//! - The card increments CmdCtr once per command, then answers
//!   `RespData' ‖ MACt(SesAuthMAC, RC ‖ CmdCtr ‖ TI ‖ RespData')` with
//!   IV = E(SesAuthENC, 5A A5 ‖ TI ‖ CmdCtr ‖ 00×8) for FULL-mode response data.
//!
//! A wrong MAC, counter or length is an [`SmError`], and the card ends the session on it.
//! Error responses carry no MAC (as on DESFire EV2) and also end the session.

use crate::crypto::{self, AesKey, SessionKeys};
use aes::cipher::{BlockEncrypt, KeyInit};
use aes::Aes128;
use cmac::{Cmac, Mac};
use zeroize::Zeroize;

/// How a command's data and its response are protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommMode {
    /// MAC on command and response; data in clear.
    Mac,
    /// Data encrypted, then MAC'd.
    Full,
}

/// Secure-messaging failures. Each one ends the session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SmError {
    /// The frame is shorter than its 8-byte MAC (or its fixed header).
    #[error("secure-messaging frame too short: {got} bytes, need at least {need}")]
    TooShort {
        /// bytes present
        got: usize,
        /// bytes needed
        need: usize,
    },
    /// The MAC does not verify (altered frame, wrong key, replayed or reordered counter).
    #[error("MAC does not verify (altered, replayed or reordered frame)")]
    BadMac,
    /// Encrypted data is not whole blocks, or its padding is wrong.
    #[error("encrypted data is malformed (length or padding)")]
    BadCiphertext,
    /// The protected command does not fit a short APDU.
    #[error("secure-messaging command of {got} bytes does not fit a short APDU (255)")]
    TooLong {
        /// bytes
        got: usize,
    },
    /// The command counter would wrap.
    #[error("command counter exhausted; authenticate again")]
    CounterExhausted,
}

/// One side of an authenticated EV2 session.
///
/// The session keys are held only as expanded cipher states (AES round keys and a CMAC state
/// with its subkeys precomputed), which zeroize themselves on drop (the `zeroize` features of
/// `aes` and `cmac`); expanding them once per session keeps a whole debit within a few µs.
/// They sit in one box (≈ 1.5 KB), so a channel moves as a pointer.
pub struct Channel {
    keys: Box<ChannelKeys>,
    ti: [u8; 4],
    cmd_ctr: u16,
}

/// A channel's expanded session keys.
struct ChannelKeys {
    enc: Aes128,
    mac: Cmac<Aes128>,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("ti", &hex::encode_upper(self.ti))
            .field("cmd_ctr", &self.cmd_ctr)
            .finish_non_exhaustive()
    }
}

/// MAC length on the wire.
pub const MAC_LEN: usize = 8;

impl Channel {
    /// A fresh channel after authentication (CmdCtr = 0).
    pub fn new(keys: SessionKeys, ti: [u8; 4]) -> Self {
        Self::with_counter(keys, ti, 0)
    }

    /// A channel at a given counter (for known-answer tests and resumption).
    pub fn with_counter(keys: SessionKeys, ti: [u8; 4], cmd_ctr: u16) -> Self {
        Channel {
            keys: Box::new(ChannelKeys {
                enc: Aes128::new(keys.enc.expose_secret().into()),
                mac: <Cmac<Aes128> as KeyInit>::new(keys.mac.expose_secret().into()),
            }),
            ti,
            cmd_ctr,
        }
    }

    /// The transaction identifier chosen by the card.
    pub fn ti(&self) -> [u8; 4] {
        self.ti
    }

    /// The current command counter.
    pub fn cmd_ctr(&self) -> u16 {
        self.cmd_ctr
    }

    fn iv(&self, label: [u8; 2], ctr: u16) -> [u8; 16] {
        let mut block = [0u8; 16];
        block[0..2].copy_from_slice(&label);
        block[2..6].copy_from_slice(&self.ti);
        block[6..8].copy_from_slice(&ctr.to_le_bytes());
        self.keys.enc.encrypt_block((&mut block).into());
        block
    }

    fn mac(&mut self, first: u8, ctr: u16, header: &[u8], data: &[u8]) -> [u8; 8] {
        let c = ctr.to_le_bytes();
        let mac = &mut self.keys.mac;
        mac.update(&[first, c[0], c[1]]);
        mac.update(&self.ti);
        mac.update(header);
        mac.update(data);
        // finalize_reset keeps the expanded key and subkeys: no re-keying per frame.
        crypto::truncate_mac(&mac.finalize_reset().into_bytes().into())
    }

    fn cbc(&self, iv: &[u8; 16], data: &mut [u8], encrypt: bool) -> Result<(), SmError> {
        if encrypt {
            crypto::cbc_encrypt_with(&self.keys.enc, iv, data)
        } else {
            crypto::cbc_decrypt_with(&self.keys.enc, iv, data)
        }
        .map_err(|_| SmError::BadCiphertext)
    }

    fn next_ctr(&self) -> Result<u16, SmError> {
        self.cmd_ctr.checked_add(1).ok_or(SmError::CounterExhausted)
    }

    /// Appends `data` protected for `mode`: as is (MAC), or padded and encrypted in place
    /// under the IV for (`label`, `ctr`) (FULL).
    fn append_protected(
        &self,
        out: &mut Vec<u8>,
        data: &[u8],
        mode: CommMode,
        label: [u8; 2],
        ctr: u16,
    ) -> Result<(), SmError> {
        match mode {
            CommMode::Mac => out.extend_from_slice(data),
            CommMode::Full if data.is_empty() => {}
            CommMode::Full => {
                let start = out.len();
                out.extend_from_slice(data);
                out.push(0x80);
                while !(out.len() - start).is_multiple_of(crypto::BLOCK) {
                    out.push(0);
                }
                let iv = self.iv(label, ctr);
                self.cbc(&iv, &mut out[start..], true)?;
            }
        }
        Ok(())
    }

    /// Decrypts `buf[start..]` in place and strips its padding (FULL mode).
    fn decrypt_tail(
        &self,
        buf: &mut Vec<u8>,
        start: usize,
        label: [u8; 2],
        ctr: u16,
    ) -> Result<(), SmError> {
        if buf.len() == start {
            return Ok(());
        }
        let iv = self.iv(label, ctr);
        self.cbc(&iv, &mut buf[start..], false)?;
        let plain_len = match crypto::unpad_iso9797_m2(&buf[start..]) {
            Ok(p) => p.len(),
            Err(_) => {
                buf[start..].zeroize();
                return Err(SmError::BadCiphertext);
            }
        };
        buf[start + plain_len..].zeroize();
        buf.truncate(start + plain_len);
        Ok(())
    }

    /// Terminal side: the command body `header ‖ data' ‖ MACt` to send for `cmd`.
    pub fn wrap_command(
        &mut self,
        cmd: u8,
        header: &[u8],
        data: &[u8],
        mode: CommMode,
    ) -> Result<Vec<u8>, SmError> {
        let mut out = Vec::with_capacity(header.len() + data.len() + 2 * crypto::BLOCK);
        self.write_command(&mut out, cmd, header, data, mode, 0)?;
        Ok(out)
    }

    /// Terminal side: the whole ISO-wrapped command APDU `90 cmd 00 00 Lc body 00` in one
    /// buffer (the hot path of a debit), for the command that will be the `ahead`-th after the
    /// current one (0: the next; more for pipelining: a terminal sends several commands before
    /// reading any answer; the answers are then verified in order with
    /// [`Channel::open_response`]).
    pub fn command_apdu_ahead(
        &mut self,
        ahead: u16,
        cmd: u8,
        header: &[u8],
        data: &[u8],
        mode: CommMode,
    ) -> Result<Vec<u8>, SmError> {
        let mut out = Vec::with_capacity(6 + header.len() + data.len() + 2 * crypto::BLOCK);
        out.extend_from_slice(&[0x90, cmd, 0x00, 0x00, 0x00]);
        self.write_command(&mut out, cmd, header, data, mode, ahead)?;
        let lc = out.len() - 5;
        if lc > 255 {
            return Err(SmError::TooLong { got: lc });
        }
        out[4] = lc as u8;
        out.push(0x00);
        Ok(out)
    }

    fn write_command(
        &mut self,
        out: &mut Vec<u8>,
        cmd: u8,
        header: &[u8],
        data: &[u8],
        mode: CommMode,
        ahead: u16,
    ) -> Result<(), SmError> {
        let ctr = self
            .cmd_ctr
            .checked_add(ahead)
            .filter(|c| c.checked_add(1).is_some())
            .ok_or(SmError::CounterExhausted)?;
        let start = out.len();
        out.extend_from_slice(header);
        self.append_protected(out, data, mode, [0xA5, 0x5A], ctr)?;
        let body_start = start + header.len();
        let mac = self.mac(cmd, ctr, header, &out[body_start..]);
        out.extend_from_slice(&mac);
        Ok(())
    }

    /// Card side: verifies a command body and returns `header ‖ plain data`.
    /// On success the counter is NOT yet advanced; [`Channel::seal_response`] advances it.
    pub fn open_command(
        &mut self,
        cmd: u8,
        header_len: usize,
        body: &[u8],
        mode: CommMode,
    ) -> Result<Vec<u8>, SmError> {
        let need = header_len + MAC_LEN;
        if body.len() < need {
            return Err(SmError::TooShort {
                got: body.len(),
                need,
            });
        }
        self.next_ctr()?;
        let (rest, mac) = body.split_at(body.len() - MAC_LEN);
        let (header, data) = rest.split_at(header_len);
        let want = self.mac(cmd, self.cmd_ctr, header, data);
        if !crypto::mac_eq(&want, mac) {
            return Err(SmError::BadMac);
        }
        let mut out = rest.to_vec();
        if mode == CommMode::Full {
            self.decrypt_tail(&mut out, header_len, [0xA5, 0x5A], self.cmd_ctr)?;
        }
        Ok(out)
    }

    /// Card side: advances CmdCtr and builds the success response data `RespData' ‖ MACt`.
    pub fn seal_response(&mut self, data: &[u8], mode: CommMode) -> Result<Vec<u8>, SmError> {
        let mut out = Vec::with_capacity(data.len() + 2 * crypto::BLOCK + 2);
        self.write_response(&mut out, data, mode)?;
        Ok(out)
    }

    /// Card side: the whole success response APDU `RespData' ‖ MACt ‖ 91 00`.
    pub fn response_apdu(&mut self, data: &[u8], mode: CommMode) -> Result<Vec<u8>, SmError> {
        let mut out = Vec::with_capacity(data.len() + 2 * crypto::BLOCK + 2);
        self.write_response(&mut out, data, mode)?;
        out.extend_from_slice(&[0x91, 0x00]);
        Ok(out)
    }

    fn write_response(
        &mut self,
        out: &mut Vec<u8>,
        data: &[u8],
        mode: CommMode,
    ) -> Result<(), SmError> {
        self.cmd_ctr = self.next_ctr()?;
        let start = out.len();
        self.append_protected(out, data, mode, [0x5A, 0xA5], self.cmd_ctr)?;
        let mac = self.mac(0x00, self.cmd_ctr, &[], &out[start..]);
        out.extend_from_slice(&mac);
        Ok(())
    }

    /// Terminal side: advances CmdCtr and verifies a success response, returning its data.
    pub fn open_response(&mut self, resp: &[u8], mode: CommMode) -> Result<Vec<u8>, SmError> {
        if resp.len() < MAC_LEN {
            return Err(SmError::TooShort {
                got: resp.len(),
                need: MAC_LEN,
            });
        }
        let ctr = self.next_ctr()?;
        let (data, mac) = resp.split_at(resp.len() - MAC_LEN);
        let want = self.mac(0x00, ctr, &[], data);
        if !crypto::mac_eq(&want, mac) {
            return Err(SmError::BadMac);
        }
        self.cmd_ctr = ctr;
        let mut out = data.to_vec();
        if mode == CommMode::Full {
            self.decrypt_tail(&mut out, 0, [0x5A, 0xA5], ctr)?;
        }
        Ok(out)
    }
}

/// Builds session keys from raw bytes (known-answer tests, HSM adapters).
pub fn session_keys_from_bytes(enc: [u8; 16], mac: [u8; 16]) -> SessionKeys {
    SessionKeys {
        enc: AesKey::from_bytes(enc),
        mac: AesKey::from_bytes(mac),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s).unwrap()
    }
    fn a16(s: &str) -> [u8; 16] {
        h(s).try_into().unwrap()
    }

    /// NXP AN12196 Table 18 (ChangeFileSettings in CommMode.FULL): the encrypted command data
    /// and the truncated MAC over Cmd ‖ CmdCtr ‖ TI ‖ header ‖ E(data).
    #[test]
    fn an12196_table18_full_mode_command() {
        let keys = session_keys_from_bytes(
            a16("1309C877509E5A215007FF0ED19CA564"),
            a16("4C6626F5E72EA694202139295C7A7FC7"),
        );
        let mut ch = Channel::with_counter(keys, h("9D00C4DF").try_into().unwrap(), 1);
        let body = ch
            .wrap_command(
                0x5F,
                &[0x02],
                &h("4000E0C1F121200000430000430000"),
                CommMode::Full,
            )
            .unwrap();
        assert_eq!(body[0], 0x02);
        assert_eq!(body[1..17].to_vec(), h("61B6D97903566E84C3AE5274467E89EA"));
        assert_eq!(body[17..].to_vec(), h("D799B7C1A0EF7A04"));
    }

    fn pair() -> (Channel, Channel) {
        let k = || session_keys_from_bytes([1; 16], [2; 16]);
        (
            Channel::new(k(), [9, 8, 7, 6]),
            Channel::new(k(), [9, 8, 7, 6]),
        )
    }

    #[test]
    fn full_mode_roundtrip_advances_both_counters() {
        let (mut pcd, mut picc) = pair();
        for i in 0..5u8 {
            let body = pcd
                .wrap_command(0xDC, &[0x01], &[i, 0, 0, 0], CommMode::Full)
                .unwrap();
            let plain = picc.open_command(0xDC, 1, &body, CommMode::Full).unwrap();
            assert_eq!(plain, vec![0x01, i, 0, 0, 0]);
            let resp = picc.seal_response(&[i; 5], CommMode::Full).unwrap();
            assert_eq!(
                pcd.open_response(&resp, CommMode::Full).unwrap(),
                vec![i; 5]
            );
        }
        assert_eq!(pcd.cmd_ctr(), 5);
        assert_eq!(picc.cmd_ctr(), 5);
    }

    #[test]
    fn replayed_altered_and_reordered_frames_are_refused() {
        let (mut pcd, mut picc) = pair();
        let first = pcd.wrap_command(0x6C, &[0x01], &[], CommMode::Mac).unwrap();
        picc.open_command(0x6C, 1, &first, CommMode::Mac).unwrap();
        let resp = picc.seal_response(&[1, 2, 3, 4], CommMode::Mac).unwrap();
        pcd.open_response(&resp, CommMode::Mac).unwrap();
        // Replay of the first command at counter 1.
        assert_eq!(
            picc.open_command(0x6C, 1, &first, CommMode::Mac),
            Err(SmError::BadMac)
        );
        // Altered header.
        let mut second = pcd.wrap_command(0x6C, &[0x01], &[], CommMode::Mac).unwrap();
        second[0] ^= 1;
        assert_eq!(
            picc.open_command(0x6C, 1, &second, CommMode::Mac),
            Err(SmError::BadMac)
        );
        // Different command code under the same MAC.
        let second = pcd.wrap_command(0x6C, &[0x01], &[], CommMode::Mac).unwrap();
        assert_eq!(
            picc.open_command(0xDC, 1, &second, CommMode::Mac),
            Err(SmError::BadMac)
        );
        // A replayed response is refused by the terminal.
        assert_eq!(
            pcd.open_response(&resp, CommMode::Mac),
            Err(SmError::BadMac)
        );
        assert!(matches!(
            picc.open_command(0x6C, 1, &[0; 3], CommMode::Mac),
            Err(SmError::TooShort { .. })
        ));
    }
}
