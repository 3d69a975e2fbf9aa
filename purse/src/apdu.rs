//! ISO 7816-4 APDU framing of DESFire native commands, and the status words the card answers.
//!
//! Commands are ISO-wrapped native commands: `90 INS 00 00 [Lc data] 00`; responses are
//! `data ‖ 91 SW2` (or an ISO status such as `67 00` for a malformed frame).

use std::fmt;

/// Native command codes (INS byte), DESFire EV2 numbering.
pub mod ins {
    /// AuthenticateEV2First, part 1.
    pub const AUTH_EV2_FIRST: u8 = 0x71;
    /// Additional frame (second part of authentication).
    pub const ADDITIONAL_FRAME: u8 = 0xAF;
    /// SelectApplication.
    pub const SELECT_APPLICATION: u8 = 0x5A;
    /// GetValue.
    pub const GET_VALUE: u8 = 0x6C;
    /// Credit.
    pub const CREDIT: u8 = 0x0C;
    /// Debit.
    pub const DEBIT: u8 = 0xDC;
    /// LimitedCredit.
    pub const LIMITED_CREDIT: u8 = 0x1C;
    /// WriteRecord.
    pub const WRITE_RECORD: u8 = 0x8B;
    /// ReadRecords.
    pub const READ_RECORDS: u8 = 0xAB;
    /// ReadData (here: the transaction MAC file only).
    pub const READ_DATA: u8 = 0xAD;
    /// CommitTransaction.
    pub const COMMIT_TRANSACTION: u8 = 0xC7;
    /// AbortTransaction.
    pub const ABORT_TRANSACTION: u8 = 0xA7;
    /// GetCardUID.
    pub const GET_CARD_UID: u8 = 0x51;
    /// CommitReaderID: the transaction MAC reader id (TMRI) the commit binds.
    pub const COMMIT_READER_ID: u8 = 0xC8;
}

/// A card status: the second status byte after `91`, or a plain ISO 7816 status word.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 91 00 — success.
    Ok,
    /// 91 AF — additional frame expected.
    AdditionalFrame,
    /// 91 0C — no changes.
    NoChanges,
    /// 91 1C — command code not supported.
    IllegalCommand,
    /// 91 1E — integrity error: wrong MAC, wrong counter, bad padding.
    IntegrityError,
    /// 91 40 — no such key.
    NoSuchKey,
    /// 91 7E — length error.
    LengthError,
    /// 91 9D — permission denied (the authenticated key may not do this).
    PermissionDenied,
    /// 91 9E — parameter error.
    ParameterError,
    /// 91 A0 — application not found.
    ApplicationNotFound,
    /// 91 AE — authentication error (no authentication, or it failed).
    AuthenticationError,
    /// 91 BE — boundary error: a value limit would be exceeded.
    BoundaryError,
    /// 91 CA — command aborted (chained command not completed).
    CommandAborted,
    /// 91 F0 — file not found.
    FileNotFound,
    /// 67 00 — ISO: wrong length of the APDU itself.
    WrongLength,
    /// 6E 00 — ISO: class not supported.
    ClaNotSupported,
    /// Any other status word the card sent (a terminal-side decoding of an unknown code).
    Other(u8, u8),
}

impl Status {
    /// The two status bytes.
    pub fn sw(self) -> [u8; 2] {
        match self {
            Status::Ok => [0x91, 0x00],
            Status::AdditionalFrame => [0x91, 0xAF],
            Status::NoChanges => [0x91, 0x0C],
            Status::IllegalCommand => [0x91, 0x1C],
            Status::IntegrityError => [0x91, 0x1E],
            Status::NoSuchKey => [0x91, 0x40],
            Status::LengthError => [0x91, 0x7E],
            Status::PermissionDenied => [0x91, 0x9D],
            Status::ParameterError => [0x91, 0x9E],
            Status::ApplicationNotFound => [0x91, 0xA0],
            Status::AuthenticationError => [0x91, 0xAE],
            Status::BoundaryError => [0x91, 0xBE],
            Status::CommandAborted => [0x91, 0xCA],
            Status::FileNotFound => [0x91, 0xF0],
            Status::WrongLength => [0x67, 0x00],
            Status::ClaNotSupported => [0x6E, 0x00],
            Status::Other(a, b) => [a, b],
        }
    }

    /// Decodes two status bytes.
    pub fn from_sw(sw1: u8, sw2: u8) -> Status {
        match (sw1, sw2) {
            (0x91, 0x00) | (0x90, 0x00) => Status::Ok,
            (0x91, 0xAF) => Status::AdditionalFrame,
            (0x91, 0x0C) => Status::NoChanges,
            (0x91, 0x1C) => Status::IllegalCommand,
            (0x91, 0x1E) => Status::IntegrityError,
            (0x91, 0x40) => Status::NoSuchKey,
            (0x91, 0x7E) => Status::LengthError,
            (0x91, 0x9D) => Status::PermissionDenied,
            (0x91, 0x9E) => Status::ParameterError,
            (0x91, 0xA0) => Status::ApplicationNotFound,
            (0x91, 0xAE) => Status::AuthenticationError,
            (0x91, 0xBE) => Status::BoundaryError,
            (0x91, 0xCA) => Status::CommandAborted,
            (0x91, 0xF0) => Status::FileNotFound,
            (0x67, 0x00) => Status::WrongLength,
            (0x6E, 0x00) => Status::ClaNotSupported,
            (a, b) => Status::Other(a, b),
        }
    }

    /// The DESFire status code byte for the response MAC (00 for success).
    pub fn code(self) -> u8 {
        self.sw()[1]
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b] = self.sw();
        let name = match self {
            Status::Ok => "OK",
            Status::AdditionalFrame => "ADDITIONAL_FRAME",
            Status::NoChanges => "NO_CHANGES",
            Status::IllegalCommand => "ILLEGAL_COMMAND_CODE",
            Status::IntegrityError => "INTEGRITY_ERROR",
            Status::NoSuchKey => "NO_SUCH_KEY",
            Status::LengthError => "LENGTH_ERROR",
            Status::PermissionDenied => "PERMISSION_DENIED",
            Status::ParameterError => "PARAMETER_ERROR",
            Status::ApplicationNotFound => "APPLICATION_NOT_FOUND",
            Status::AuthenticationError => "AUTHENTICATION_ERROR",
            Status::BoundaryError => "BOUNDARY_ERROR",
            Status::CommandAborted => "COMMAND_ABORTED",
            Status::FileNotFound => "FILE_NOT_FOUND",
            Status::WrongLength => "WRONG_LENGTH",
            Status::ClaNotSupported => "CLA_NOT_SUPPORTED",
            Status::Other(..) => "UNKNOWN",
        };
        write!(f, "{a:02X}{b:02X} {name}")
    }
}

/// A malformed command APDU.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApduError {
    /// Fewer than the 4 header bytes, or Lc disagrees with the bytes present.
    #[error("APDU length is inconsistent: {0}")]
    Length(&'static str),
    /// CLA is not 0x90 (ISO-wrapped native command).
    #[error("CLA {0:#04x} not supported (expected 0x90)")]
    Cla(u8),
    /// P1/P2 must be zero for wrapped native commands.
    #[error("P1/P2 must be 00 00 for a wrapped native command")]
    P1P2,
}

/// Builds an ISO-wrapped native command: `90 INS 00 00 [Lc data] 00`.
pub fn wrap(ins: u8, data: &[u8]) -> Vec<u8> {
    debug_assert!(data.len() <= 255, "short APDUs only");
    let mut out = Vec::with_capacity(6 + data.len());
    out.extend_from_slice(&[0x90, ins, 0x00, 0x00]);
    if !data.is_empty() {
        out.push(data.len() as u8);
        out.extend_from_slice(data);
    }
    out.push(0x00);
    out
}

/// Parses an ISO-wrapped native command into (INS, data).
pub fn parse_command(apdu: &[u8]) -> Result<(u8, &[u8]), ApduError> {
    if apdu.len() < 4 {
        return Err(ApduError::Length("shorter than the 4-byte header"));
    }
    if apdu[0] != 0x90 {
        return Err(ApduError::Cla(apdu[0]));
    }
    if apdu[2] != 0 || apdu[3] != 0 {
        return Err(ApduError::P1P2);
    }
    let ins = apdu[1];
    let body = &apdu[4..];
    match body.len() {
        // Case 1 (no Le) or case 2 (Le only).
        0 | 1 => Ok((ins, &[])),
        n => {
            let lc = body[0] as usize;
            if lc == 0 {
                return Err(ApduError::Length("Lc of zero with data following"));
            }
            if n == 1 + lc {
                Ok((ins, &body[1..]))
            } else if n == 2 + lc {
                Ok((ins, &body[1..1 + lc]))
            } else {
                Err(ApduError::Length("Lc does not match the data length"))
            }
        }
    }
}

/// Builds a response: `data ‖ SW1 SW2`.
pub fn response(data: &[u8], status: Status) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 2);
    out.extend_from_slice(data);
    out.extend_from_slice(&status.sw());
    out
}

/// Splits a response into (data, status). A response shorter than 2 bytes is malformed.
pub fn parse_response(resp: &[u8]) -> Option<(&[u8], Status)> {
    if resp.len() < 2 {
        return None;
    }
    let (data, sw) = resp.split_at(resp.len() - 2);
    Some((data, Status::from_sw(sw[0], sw[1])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_and_parse_roundtrip() {
        for n in [0usize, 1, 16, 200, 255] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let apdu = wrap(0x6C, &data);
            let (ins, d) = parse_command(&apdu).unwrap();
            assert_eq!(ins, 0x6C);
            assert_eq!(d, &data[..]);
        }
    }

    #[test]
    fn malformed_commands_are_refused() {
        assert!(parse_command(&[0x90, 0x6C]).is_err());
        assert_eq!(
            parse_command(&[0x00, 0x6C, 0, 0, 0]),
            Err(ApduError::Cla(0))
        );
        assert_eq!(parse_command(&[0x90, 0x6C, 1, 0, 0]), Err(ApduError::P1P2));
        assert!(parse_command(&[0x90, 0x6C, 0, 0, 5, 1, 2]).is_err());
    }

    #[test]
    fn status_words_roundtrip() {
        for s in [
            Status::Ok,
            Status::IntegrityError,
            Status::BoundaryError,
            Status::PermissionDenied,
            Status::WrongLength,
        ] {
            let [a, b] = s.sw();
            assert_eq!(Status::from_sw(a, b), s);
        }
    }
}
