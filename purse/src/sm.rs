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
    /// The command counter would wrap.
    #[error("command counter exhausted; authenticate again")]
    CounterExhausted,
}

/// One side of an authenticated EV2 session.
///
/// The session keys are held only as expanded cipher states (AES round keys and a CMAC state
/// with its subkeys precomputed), which zeroize themselves on drop (the `zeroize` features of
/// `aes` and `cmac`); expanding them once per session keeps a whole debit within a few µs.
pub struct Channel {
    enc: Aes128,
    mac: Cmac<Aes128>,
    ti: [u8; 4],
    cmd_ctr: u16,
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
            enc: Aes128::new(keys.enc.expose_secret().into()),
            mac: <Cmac<Aes128> as KeyInit>::new(keys.mac.expose_secret().into()),
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
        self.enc.encrypt_block((&mut block).into());
        block
    }

    fn mac(&mut self, first: u8, ctr: u16, header: &[u8], data: &[u8]) -> [u8; 8] {
        let c = ctr.to_le_bytes();
        self.mac.update(&[first, c[0], c[1]]);
        self.mac.update(&self.ti);
        self.mac.update(header);
        self.mac.update(data);
        // finalize_reset keeps the expanded key and subkeys: no re-keying per frame.
        crypto::truncate_mac(&self.mac.finalize_reset().into_bytes().into())
    }

    fn cbc(&self, iv: &[u8; 16], data: &mut [u8], encrypt: bool) -> Result<(), SmError> {
        if encrypt {
            crypto::cbc_encrypt_with(&self.enc, iv, data)
        } else {
            crypto::cbc_decrypt_with(&self.enc, iv, data)
        }
        .map_err(|_| SmError::BadCiphertext)
    }

    fn next_ctr(&self) -> Result<u16, SmError> {
        self.cmd_ctr.checked_add(1).ok_or(SmError::CounterExhausted)
    }

    /// Terminal side: the command body `header ‖ data' ‖ MACt` to send for `cmd`.
    pub fn wrap_command(
        &mut self,
        cmd: u8,
        header: &[u8],
        data: &[u8],
        mode: CommMode,
    ) -> Result<Vec<u8>, SmError> {
        self.next_ctr()?;
        let body = match mode {
            CommMode::Mac => data.to_vec(),
            CommMode::Full if data.is_empty() => Vec::new(),
            CommMode::Full => {
                let mut padded = crypto::pad_iso9797_m2(data);
                let iv = self.iv([0xA5, 0x5A], self.cmd_ctr);
                self.cbc(&iv, &mut padded, true)?;
                padded
            }
        };
        let mac = self.mac(cmd, self.cmd_ctr, header, &body);
        let mut out = Vec::with_capacity(header.len() + body.len() + MAC_LEN);
        out.extend_from_slice(header);
        out.extend_from_slice(&body);
        out.extend_from_slice(&mac);
        Ok(out)
    }

    /// Card side: verifies a command body and returns its plain data (header excluded).
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
        match mode {
            CommMode::Mac => Ok(data.to_vec()),
            CommMode::Full if data.is_empty() => Ok(Vec::new()),
            CommMode::Full => {
                let mut buf = data.to_vec();
                let iv = self.iv([0xA5, 0x5A], self.cmd_ctr);
                self.cbc(&iv, &mut buf, false)?;
                let plain = crypto::unpad_iso9797_m2(&buf)
                    .map_err(|_| SmError::BadCiphertext)?
                    .to_vec();
                buf.zeroize();
                Ok(plain)
            }
        }
    }

    /// Card side: advances CmdCtr and builds the success response data `RespData' ‖ MACt`.
    pub fn seal_response(&mut self, data: &[u8], mode: CommMode) -> Result<Vec<u8>, SmError> {
        self.cmd_ctr = self.next_ctr()?;
        let body = match mode {
            CommMode::Mac => data.to_vec(),
            CommMode::Full if data.is_empty() => Vec::new(),
            CommMode::Full => {
                let mut padded = crypto::pad_iso9797_m2(data);
                let iv = self.iv([0x5A, 0xA5], self.cmd_ctr);
                self.cbc(&iv, &mut padded, true)?;
                padded
            }
        };
        let mac = self.mac(0x00, self.cmd_ctr, &[], &body);
        let mut out = body;
        out.extend_from_slice(&mac);
        Ok(out)
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
        match mode {
            CommMode::Mac => Ok(data.to_vec()),
            CommMode::Full if data.is_empty() => Ok(Vec::new()),
            CommMode::Full => {
                let mut buf = data.to_vec();
                let iv = self.iv([0x5A, 0xA5], ctr);
                self.cbc(&iv, &mut buf, false)?;
                let plain = crypto::unpad_iso9797_m2(&buf)
                    .map_err(|_| SmError::BadCiphertext)?
                    .to_vec();
                buf.zeroize();
                Ok(plain)
            }
        }
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
            assert_eq!(plain, vec![i, 0, 0, 0]);
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
