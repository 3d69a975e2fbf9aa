//! The emulated card: an APDU-in, APDU-out state machine for a DESFire-EV2-style value
//! application, with transactional non-volatile memory and tear injection.
//!
//! ## Files of the application (AID [`crate::keys::DEFAULT_AID`])
//! - `0x01` value file: balance with lower/upper limits and limited credit.
//! - `0x02` cyclic record file of recent trips ([`RECORD_SIZE`] bytes × `max_records`).
//! - `0x03` profile file ([`PROFILE_SIZE`] bytes, read with ReadData): what the issuer wrote
//!   about the holder at personalisation — the rider category the fares are priced for
//!   ([`encode_profile`]). No command writes it: only personalisation (the issuer) sets it, and a
//!   terminal reads it under the session MAC like the balance.
//! - `0x0F` transaction MAC file: TMC (u32 LE) ‖ TMV (8 bytes), read with ReadData.
//!
//! ## Keys and access rights
//! Key 0 application master (issuer), key 1 debit (GetValue, ReadRecords, WriteRecord, Debit,
//! LimitedCredit, ReadData), key 2 credit (GetValue, ReadRecords, WriteRecord, Credit, Debit,
//! ReadData), key 3 TMAC (never used to authenticate; it keys the transaction MAC). Key 0 may
//! do everything keys 1 and 2 may.
//!
//! ## Limited credit
//! Only a Debit under the debit key (key 1, a validator's fare) arms LimitedCredit, with its
//! amount; any other committed value change — a Credit, a LimitedCredit, or a Debit under the
//! credit or master key (the back office's reversal of a load) — disarms it. So a terminal
//! holding the debit key can give back only its own last fare, never a reversal.
//!
//! ## Reader id
//! CommitReaderID (`C8`, MAC mode, 16 bytes) stages a transaction MAC reader id (TMRI) that
//! the commit appends to the transaction MAC input: the TMV then proves which reader's SAM
//! made the change (a franchise terminal's report is checked against it).
//!
//! ## Transactions
//! Debit, Credit, LimitedCredit and WriteRecord are staged in RAM and take effect atomically at
//! CommitTransaction; AbortTransaction, a new authentication, a new selection, any error
//! response or a tear discards them. At most one value operation is staged per transaction.
//! Every commit that changes anything consumes exactly one TMC value and computes
//! `TMV = MACt(SesTMMACKey, tm_input)` (see [`crate::receipt::tm_input`]).
//!
//! ## Tearing
//! NVM is written in steps (journal, commit flag, value, records, TM file, journal clear).
//! [`Card::tear_after_writes`] makes the card lose power right after the n-th NVM write of the
//! following commits; [`Card::power_on`] then runs recovery, which rolls the journal forward if
//! the commit flag was set and discards it otherwise: a torn card is in the old or the new state,
//! never between.
//!
//! Card keys are not part of the serialised image: the emulated secure element re-derives them
//! from the issuer masters at power-on ([`CardKeys::derive`], [`CardKeys::derive_each`] at the
//! version each key reports), so no image holds a key.
//!
//! ## Key versions and ChangeKey
//! Each key carries a version byte (GetKeyVersion `64`, per key number). ChangeKey (`C4`,
//! FULL mode, only in a session of key 0: [`crate::rekey`]) replaces one key and its version in
//! one NVM write; a ChangeKey of key 0 ends the session. The image keeps one `key_version` while
//! all four agree and `key_versions` while a rotation is part way (a card torn between two
//! ChangeKeys). The emulated card uses the key it was sent until power-off and re-derives the
//! same key from its version at power-on (a genuine HSM sends exactly that key).

use crate::apdu::{self, ins, Status};
use crate::crypto::{self, AesKey};
use crate::keys::{KeyError, KeyKind, KeySet};
use crate::receipt::{tm_input_with_reader, TxKind};
use crate::sm::{Channel, CommMode};
use rand_core::RngCore;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// The value file number.
pub const FILE_VALUE: u8 = 0x01;
/// The cyclic trip-record file number.
pub const FILE_RECORDS: u8 = 0x02;
/// The profile file number (the holder's rider category).
pub const FILE_PROFILE: u8 = 0x03;
/// The transaction MAC file number.
pub const FILE_TMAC: u8 = 0x0F;
/// Size of the profile file: format (1 byte, [`PROFILE_FORMAT`]) ‖ length of the rider
/// category id (1 byte, 0 = none: the fare table's default) ‖ the id (UTF-8) ‖ zeros.
pub const PROFILE_SIZE: usize = 32;
/// The profile file's format byte.
pub const PROFILE_FORMAT: u8 = 1;
/// The longest rider category id the profile file holds, in bytes.
pub const MAX_RIDER_CATEGORY_LEN: usize = PROFILE_SIZE - 2;

/// Why a rider category cannot be personalised, or a profile file read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// The id is longer than [`MAX_RIDER_CATEGORY_LEN`] bytes.
    #[error("a rider category id is at most {MAX_RIDER_CATEGORY_LEN} bytes")]
    TooLong,
    /// The id has a control character or a space (a GTFS id is printable).
    #[error("a rider category id has no spaces or control characters")]
    NotPrintable,
    /// The profile file is not a format-1 profile.
    #[error("the profile file is not a format-{PROFILE_FORMAT} profile of {PROFILE_SIZE} bytes")]
    Format,
}

/// Checks a rider category id for the profile file (empty: none).
pub fn check_rider_category(id: &str) -> Result<(), ProfileError> {
    if id.len() > MAX_RIDER_CATEGORY_LEN {
        return Err(ProfileError::TooLong);
    }
    if id.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(ProfileError::NotPrintable);
    }
    Ok(())
}

/// The profile file's bytes for a rider category id (empty: none).
pub fn encode_profile(rider_category: &str) -> Result<[u8; PROFILE_SIZE], ProfileError> {
    check_rider_category(rider_category)?;
    let mut file = [0u8; PROFILE_SIZE];
    file[0] = PROFILE_FORMAT;
    file[1] = rider_category.len() as u8;
    file[2..2 + rider_category.len()].copy_from_slice(rider_category.as_bytes());
    Ok(file)
}

/// The rider category a profile file holds (`None`: none, priced as the table's default).
pub fn decode_profile(file: &[u8]) -> Result<Option<&str>, ProfileError> {
    let [PROFILE_FORMAT, len, rest @ ..] = file else {
        return Err(ProfileError::Format);
    };
    let len = usize::from(*len);
    if file.len() != PROFILE_SIZE || len > MAX_RIDER_CATEGORY_LEN {
        return Err(ProfileError::Format);
    }
    let (id, pad) = rest.split_at(len);
    if pad.iter().any(|&b| b != 0) {
        return Err(ProfileError::Format);
    }
    let id = std::str::from_utf8(id).map_err(|_| ProfileError::Format)?;
    check_rider_category(id).map_err(|_| ProfileError::Format)?;
    Ok((!id.is_empty()).then_some(id))
}
/// GetKeyVersion command code.
pub const INS_GET_KEY_VERSION: u8 = 0x64;
/// Trip-record size in bytes (fixed, as the fare engine's record layout).
pub const RECORD_SIZE: usize = 32;
/// One trip record as stored on the card.
pub type TripRecord = [u8; RECORD_SIZE];
/// Default number of records the cyclic file keeps: 7 × 32 bytes plus the 8-byte MAC fit one
/// short-APDU response (256 bytes), so all recent trips are read in one command.
pub const DEFAULT_MAX_RECORDS: u8 = 7;
/// The most data (with its MAC) one response carries: a short APDU's 256 bytes.
pub const MAX_RESPONSE_DATA: usize = 256;

/// What the issuer writes at personalisation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Personalisation {
    /// Card UID (7 bytes).
    pub uid: [u8; 7],
    /// Version of the masters the card keys were diversified from.
    pub key_version: u8,
    /// Initial balance, minor units.
    pub balance_minor: i32,
    /// Lowest balance allowed (0 for no overdraft).
    pub lower_limit_minor: i32,
    /// Highest balance allowed.
    pub upper_limit_minor: i32,
    /// Whether LimitedCredit is enabled.
    pub limited_credit_enabled: bool,
    /// Number of records kept.
    pub max_records: u8,
    /// The holder's rider category id (child, senior, student …; empty: none, priced as the
    /// fare table's default), written to the profile file.
    pub rider_category: String,
}

impl Personalisation {
    /// Defaults for a transit purse: no overdraft, 500 000 minor units ceiling, limited credit
    /// on, 7 records of 32 bytes.
    pub fn transit(uid: [u8; 7], balance_minor: i32) -> Self {
        Personalisation {
            uid,
            key_version: 1,
            balance_minor,
            lower_limit_minor: 0,
            upper_limit_minor: 500_000,
            limited_credit_enabled: true,
            max_records: DEFAULT_MAX_RECORDS,
            rider_category: String::new(),
        }
    }
}

/// The card's persistent application state (no keys).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardState {
    /// Card UID.
    pub uid: [u8; 7],
    /// Application identifier.
    pub aid: [u8; 3],
    /// Version of the card's application keys (all four, unless `key_versions` says otherwise).
    pub key_version: u8,
    /// Each key's version (key numbers 0..=3) while they differ — a rotation part way; absent
    /// when all four are at `key_version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_versions: Option<[u8; 4]>,
    /// Current balance, minor units.
    pub balance_minor: i32,
    /// Lower limit, minor units.
    pub lower_limit_minor: i32,
    /// Upper limit, minor units.
    pub upper_limit_minor: i32,
    /// LimitedCredit enabled.
    pub limited_credit_enabled: bool,
    /// What LimitedCredit may still give back: the debit of the last committed transaction.
    pub limited_credit_minor: i32,
    /// Number of records kept.
    pub max_records: u8,
    /// Records, oldest first (at most `max_records`).
    pub records: Vec<TripRecord>,
    /// Transaction MAC counter: committed transactions so far.
    pub tmc: u32,
    /// Transaction MAC value of the last committed transaction.
    pub tmv: [u8; 8],
    /// The profile file's rider category id (empty: none). Absent from images of cards issued
    /// before the profile file (they read as none); left out of an image when empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rider_category: String,
}

impl CardState {
    /// Each key's version, key numbers 0..=3 (what GetKeyVersion reports).
    pub fn key_versions(&self) -> [u8; 4] {
        self.key_versions.unwrap_or([self.key_version; 4])
    }

    /// Sets key `key_no`'s version; one `key_version` again once all four agree.
    fn set_key_version(&mut self, key_no: u8, version: u8) {
        let mut all = self.key_versions();
        all[usize::from(key_no) & 3] = version;
        if all.iter().all(|&v| v == version) {
            self.key_version = version;
            self.key_versions = None;
        } else {
            self.key_versions = Some(all);
        }
    }

    /// The profile file as the card serves it.
    pub fn profile(&self) -> [u8; PROFILE_SIZE] {
        // validate() keeps the id encodable; an image that was not validated reads as none.
        encode_profile(&self.rider_category).unwrap_or_else(|_| {
            let mut none = [0u8; PROFILE_SIZE];
            none[0] = PROFILE_FORMAT;
            none
        })
    }
}

/// The card's non-volatile memory: the state plus the commit journal used for atomicity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nvm {
    /// The committed state.
    pub main: CardState,
    /// The state being committed, if a commit is in progress.
    pub journal: Option<CardState>,
    /// Set once the journal is complete: recovery rolls it forward.
    pub commit_flag: bool,
}

impl Nvm {
    /// Recovery at power-on: roll a flagged journal forward, discard an unflagged one.
    pub fn recover(&mut self) {
        if self.commit_flag {
            if let Some(j) = self.journal.take() {
                self.main = j;
            }
        }
        self.journal = None;
        self.commit_flag = false;
    }

    /// Checks the structural invariants of a card image read from storage: of the committed
    /// state, and of the journal's (which recovery may roll forward into the committed one).
    pub fn validate(&self) -> Result<(), &'static str> {
        Self::validate_state(&self.main)?;
        if let Some(j) = &self.journal {
            Self::validate_state(j)
                .map_err(|_| "the journal holds a state that is not a valid card state")?;
        }
        if self.commit_flag && self.journal.is_none() {
            return Err("commit flag without a journal");
        }
        Ok(())
    }

    fn validate_state(s: &CardState) -> Result<(), &'static str> {
        if s.lower_limit_minor > s.upper_limit_minor {
            return Err("lower limit above upper limit");
        }
        if s.balance_minor < s.lower_limit_minor || s.balance_minor > s.upper_limit_minor {
            return Err("balance outside its limits");
        }
        if s.records.len() > s.max_records as usize {
            return Err("more records than the file holds");
        }
        if s.limited_credit_minor < 0 {
            return Err("negative limited credit");
        }
        if check_rider_category(&s.rider_category).is_err() {
            return Err("rider category is not a printable id of at most 30 bytes");
        }
        Ok(())
    }
}

/// The card's four application keys (zeroized on drop).
#[derive(Clone)]
pub struct CardKeys {
    keys: [AesKey; 4],
    /// Keys 0..=2 expanded once (the secure element's key schedule); zeroized on drop.
    ciphers: [aes::Aes128; 3],
    /// K_TM's CMAC state expanded once.
    tm: cmac::Cmac<aes::Aes128>,
}

impl std::fmt::Debug for CardKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CardKeys(<secret>)")
    }
}

impl CardKeys {
    /// Diversifies the four card keys from an issuer key set (personalisation).
    pub fn derive(issuer: &KeySet, uid: &[u8; 7], version: u8) -> Result<CardKeys, KeyError> {
        Self::derive_each(issuer, uid, [version; 4])
    }

    /// Diversifies each card key at its own version (key numbers 0..=3): a card part way
    /// through a rotation ([`CardState::key_versions`]).
    pub fn derive_each(
        issuer: &KeySet,
        uid: &[u8; 7],
        versions: [u8; 4],
    ) -> Result<CardKeys, KeyError> {
        let [v0, v1, v2, v3] = versions;
        Ok(CardKeys::from_keys([
            issuer.card_key(KeyKind::App, v0, uid)?,
            issuer.card_key(KeyKind::Debit, v1, uid)?,
            issuer.card_key(KeyKind::Credit, v2, uid)?,
            issuer.card_key(KeyKind::Tmac, v3, uid)?,
        ]))
    }

    /// Replaces key `key_no` (ChangeKey), with its expanded state.
    fn replace(&mut self, key_no: u8, key: AesKey) {
        let i = usize::from(key_no);
        match i {
            0..=2 => self.ciphers[i] = key.cipher(),
            _ => self.tm = crypto::cmac_state(&key),
        }
        self.keys[i & 3] = key;
    }

    /// From four explicit keys (app, debit, credit, tmac).
    pub fn from_keys(keys: [AesKey; 4]) -> CardKeys {
        CardKeys {
            ciphers: [keys[0].cipher(), keys[1].cipher(), keys[2].cipher()],
            tm: crypto::cmac_state(&keys[3]),
            keys,
        }
    }
}

/// The card lost power (tear injected); it answers nothing until [`Card::power_on`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("card torn: no answer (power lost)")]
pub struct Torn;

#[derive(Default)]
struct Staged {
    value: Option<(TxKind, i32)>,
    /// The key the value command was authenticated with.
    value_key: u8,
    /// The reader id committed in this transaction (CommitReaderID).
    reader_id: Option<[u8; 16]>,
    records: Vec<TripRecord>,
}

struct PendingAuth {
    key_no: u8,
    rnd_b: [u8; 16],
}

impl Drop for PendingAuth {
    fn drop(&mut self) {
        self.rnd_b.zeroize();
    }
}

struct Session {
    key_no: u8,
    channel: Channel,
}

/// An emulated card.
pub struct Card {
    nvm: Nvm,
    keys: CardKeys,
    selected: bool,
    pending_auth: Option<PendingAuth>,
    session: Option<Session>,
    staged: Staged,
    tear_after: Option<u32>,
    torn: bool,
}

impl std::fmt::Debug for Card {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Card")
            .field("nvm", &self.nvm)
            .field("torn", &self.torn)
            .finish_non_exhaustive()
    }
}

type Reply = Result<Vec<u8>, Status>;

impl Card {
    /// Personalises a new card.
    pub fn personalise(p: &Personalisation, keys: CardKeys) -> Card {
        debug_assert!(p.lower_limit_minor <= p.balance_minor);
        debug_assert!(p.balance_minor <= p.upper_limit_minor);
        let state = CardState {
            uid: p.uid,
            aid: crate::keys::DEFAULT_AID,
            key_version: p.key_version,
            key_versions: None,
            balance_minor: p.balance_minor,
            lower_limit_minor: p.lower_limit_minor,
            upper_limit_minor: p.upper_limit_minor,
            limited_credit_enabled: p.limited_credit_enabled,
            limited_credit_minor: 0,
            max_records: p.max_records,
            records: Vec::new(),
            tmc: 0,
            tmv: [0; 8],
            rider_category: p.rider_category.clone(),
        };
        Card::power_on(
            Nvm {
                main: state,
                journal: None,
                commit_flag: false,
            },
            keys,
        )
    }

    /// Powers a card on from its NVM image (after a tear, a reload, a new tap): runs recovery.
    pub fn power_on(mut nvm: Nvm, keys: CardKeys) -> Card {
        nvm.recover();
        Card {
            nvm,
            keys,
            selected: false,
            pending_auth: None,
            session: None,
            staged: Staged::default(),
            tear_after: None,
            torn: false,
        }
    }

    /// The committed state.
    pub fn state(&self) -> &CardState {
        &self.nvm.main
    }

    /// The NVM image as it is now (for saving, or for power-on after a tear).
    pub fn nvm(&self) -> &Nvm {
        &self.nvm
    }

    /// Consumes the card, returning its NVM image.
    pub fn into_nvm(self) -> Nvm {
        self.nvm
    }

    /// Whether a tear has happened.
    pub fn is_torn(&self) -> bool {
        self.torn
    }

    /// Injects a tear right after the `n`-th NVM write from now (1 = after the first write).
    /// `None` disarms.
    pub fn tear_after_writes(&mut self, n: Option<u32>) {
        self.tear_after = n;
    }

    /// Removes the card from the field: volatile state (session, staged changes) is lost.
    pub fn remove_from_field(&mut self) {
        self.reset_volatile();
        self.selected = false;
    }

    fn reset_volatile(&mut self) {
        self.pending_auth = None;
        self.session = None;
        self.staged = Staged::default();
    }

    /// Processes one command APDU and returns the response APDU (`data ‖ SW1 SW2`).
    /// Randomness (RndB, TI) comes from `rng`. A torn card returns `Err(Torn)`.
    pub fn process(&mut self, command: &[u8], rng: &mut dyn RngCore) -> Result<Vec<u8>, Torn> {
        if self.torn {
            return Err(Torn);
        }
        let (code, data) = match apdu::parse_command(command) {
            Ok(x) => x,
            Err(apdu::ApduError::Cla(_)) => return Ok(Status::ClaNotSupported.sw().to_vec()),
            Err(_) => return Ok(Status::WrongLength.sw().to_vec()),
        };
        let result = self.dispatch(code, data, rng);
        if self.torn {
            return Err(Torn);
        }
        Ok(match result {
            Ok(resp) => resp,
            Err(status) => {
                // Any error ends the authentication and discards the transaction, except the
                // additional-frame flow which dispatch handles itself.
                if code != ins::ADDITIONAL_FRAME || status != Status::AdditionalFrame {
                    self.reset_volatile();
                }
                status.sw().to_vec()
            }
        })
    }

    fn dispatch(&mut self, code: u8, data: &[u8], rng: &mut dyn RngCore) -> Reply {
        if code != ins::ADDITIONAL_FRAME {
            // An unexpected command in the middle of authentication aborts it.
            if self.pending_auth.is_some() {
                self.pending_auth = None;
                if code != ins::AUTH_EV2_FIRST && code != ins::SELECT_APPLICATION {
                    return Err(Status::CommandAborted);
                }
            }
        }
        match code {
            ins::SELECT_APPLICATION => self.select(data),
            INS_GET_KEY_VERSION => self.get_key_version(data),
            ins::AUTH_EV2_FIRST => self.auth_first(data, rng),
            ins::ADDITIONAL_FRAME => self.auth_second(data, rng),
            ins::GET_VALUE => self.get_value(data),
            ins::DEBIT | ins::CREDIT | ins::LIMITED_CREDIT => self.value_op(code, data),
            ins::WRITE_RECORD => self.write_record(data),
            ins::READ_RECORDS => self.read_records(data),
            ins::READ_DATA => self.read_data(data),
            ins::COMMIT_TRANSACTION => self.commit(data),
            ins::ABORT_TRANSACTION => self.abort(data),
            ins::GET_CARD_UID => self.get_uid(data),
            ins::COMMIT_READER_ID => self.commit_reader_id(data),
            crate::rekey::INS_CHANGE_KEY => self.change_key(data),
            _ => Err(Status::IllegalCommand),
        }
    }

    fn ok(data: &[u8]) -> Reply {
        Ok(apdu::response(data, Status::Ok))
    }

    fn select(&mut self, data: &[u8]) -> Reply {
        self.reset_volatile();
        self.selected = false;
        if data.len() != 3 {
            return Err(Status::LengthError);
        }
        if data != self.nvm.main.aid {
            return Err(Status::ApplicationNotFound);
        }
        self.selected = true;
        Self::ok(&[])
    }

    fn get_key_version(&mut self, data: &[u8]) -> Reply {
        if !self.selected {
            return Err(Status::ApplicationNotFound);
        }
        if data.len() != 1 {
            return Err(Status::LengthError);
        }
        if data[0] > 3 {
            return Err(Status::NoSuchKey);
        }
        let version = self.nvm.main.key_versions()[usize::from(data[0])];
        match &mut self.session {
            // Inside a session the answer is MAC'd (and the counter advances).
            Some(s) => {
                let body = s
                    .channel
                    .seal_response(&[version], CommMode::Mac)
                    .map_err(|_| Status::IntegrityError)?;
                Self::ok(&body)
            }
            None => Self::ok(&[version]),
        }
    }

    /// ChangeKey in FULL mode, only in a session of key 0 and outside a transaction: the key
    /// and its version change in one NVM write. Key 0's change ends the session and is answered
    /// without a MAC; another key's is MAC'd.
    fn change_key(&mut self, data: &[u8]) -> Reply {
        let &key_no = data.first().ok_or(Status::LengthError)?;
        if key_no > 3 {
            return Err(Status::NoSuchKey);
        }
        let own = crate::rekey::CHANGE_KEY_AUTH_KEY_NO;
        let msg = zeroize::Zeroizing::new(self.open(
            crate::rekey::INS_CHANGE_KEY,
            1,
            data,
            CommMode::Full,
            &[own],
        )?);
        if self.staged.value.is_some() || !self.staged.records.is_empty() {
            return Err(Status::PermissionDenied);
        }
        let old = (key_no != own).then(|| &self.keys.keys[usize::from(key_no)]);
        let (key, version) = crate::rekey::open_change_key_data(&msg[1..], old)?;
        self.keys.replace(key_no, key);
        if self.nvm_write(|n| n.main.set_key_version(key_no, version)) {
            return Ok(Vec::new());
        }
        if key_no == own {
            self.session = None;
            return Self::ok(&[]);
        }
        self.seal(&[], CommMode::Mac)
    }

    fn auth_first(&mut self, data: &[u8], rng: &mut dyn RngCore) -> Reply {
        self.reset_volatile();
        if !self.selected {
            return Err(Status::ApplicationNotFound);
        }
        if data.len() < 2 || data.len() != 2 + data[1] as usize {
            return Err(Status::LengthError);
        }
        let key_no = data[0];
        if key_no > 3 {
            return Err(Status::NoSuchKey);
        }
        if key_no == 3 {
            return Err(Status::PermissionDenied);
        }
        let mut rnd_b = [0u8; 16];
        rng.fill_bytes(&mut rnd_b);
        let mut enc = rnd_b;
        crypto::cbc_encrypt_with(&self.keys.ciphers[key_no as usize], &[0; 16], &mut enc)
            .map_err(|_| Status::IntegrityError)?;
        self.pending_auth = Some(PendingAuth { key_no, rnd_b });
        rnd_b.zeroize();
        Ok(apdu::response(&enc, Status::AdditionalFrame))
    }

    fn auth_second(&mut self, data: &[u8], rng: &mut dyn RngCore) -> Reply {
        let pending = self.pending_auth.take().ok_or(Status::CommandAborted)?;
        if data.len() != 32 {
            return Err(Status::LengthError);
        }
        let key = &self.keys.keys[pending.key_no as usize];
        let mut buf: [u8; 32] = data.try_into().expect("32 bytes");
        let cipher = &self.keys.ciphers[pending.key_no as usize];
        crypto::cbc_decrypt_with(cipher, &[0; 16], &mut buf).map_err(|_| Status::IntegrityError)?;
        let rnd_a: [u8; 16] = buf[..16].try_into().expect("16");
        let expect_b = crypto::rotate_left_1(&pending.rnd_b);
        if !crypto::mac_eq(&buf[16..], &expect_b) {
            buf.zeroize();
            return Err(Status::AuthenticationError);
        }
        buf.zeroize();
        let mut ti = [0u8; 4];
        rng.fill_bytes(&mut ti);
        let mut resp = [0u8; 32];
        resp[..4].copy_from_slice(&ti);
        resp[4..20].copy_from_slice(&crypto::rotate_left_1(&rnd_a));
        // PDcap2 and PCDcap2: zeros (no extended capabilities).
        crypto::cbc_encrypt_with(cipher, &[0; 16], &mut resp)
            .map_err(|_| Status::IntegrityError)?;
        let keys = crypto::ev2_session_keys(key, &rnd_a, &pending.rnd_b);
        self.session = Some(Session {
            key_no: pending.key_no,
            channel: Channel::new(keys, ti),
        });
        Self::ok(&resp)
    }

    /// Verifies a secure-messaging command and checks the key may run it.
    fn open(
        &mut self,
        code: u8,
        header_len: usize,
        data: &[u8],
        mode: CommMode,
        allowed: &[u8],
    ) -> Result<Vec<u8>, Status> {
        let s = self.session.as_mut().ok_or(Status::AuthenticationError)?;
        let msg = s
            .channel
            .open_command(code, header_len, data, mode)
            .map_err(|e| match e {
                crate::sm::SmError::TooShort { .. } => Status::LengthError,
                _ => Status::IntegrityError,
            })?;
        if !allowed.contains(&s.key_no) {
            return Err(Status::PermissionDenied);
        }
        Ok(msg)
    }

    fn seal(&mut self, data: &[u8], mode: CommMode) -> Reply {
        let s = self.session.as_mut().ok_or(Status::AuthenticationError)?;
        s.channel
            .response_apdu(data, mode)
            .map_err(|_| Status::IntegrityError)
    }

    #[cfg(test)]
    fn staged_balance(&self) -> i32 {
        let b = self.nvm.main.balance_minor;
        match self.staged.value {
            Some((TxKind::Debit, a)) => b - a,
            Some((_, a)) => b + a,
            None => b,
        }
    }

    /// A file command under MAC (the debit, read and credit keys may): the message, whose
    /// header is `file(1)`, then for a 7-byte header two 3-byte LE numbers (offset or record
    /// number, length or count), returned beside it (0 for a 1-byte header). A read is the
    /// header alone; a write (`then_data`) carries its data after it.
    fn open_file(
        &mut self,
        code: u8,
        file: u8,
        header_len: usize,
        then_data: bool,
        data: &[u8],
    ) -> Result<(Vec<u8>, [usize; 2]), Status> {
        let msg = self.open(code, header_len, data, CommMode::Mac, &[0, 1, 2])?;
        if !then_data && msg.len() != header_len {
            return Err(Status::LengthError);
        }
        if msg.first() != Some(&file) {
            return Err(Status::FileNotFound);
        }
        let le24 = |i: usize| {
            msg.get(i..i + 3)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], 0]) as usize)
        };
        let numbers = [le24(1), le24(4)];
        Ok((msg, numbers))
    }

    fn get_value(&mut self, data: &[u8]) -> Reply {
        self.open_file(ins::GET_VALUE, FILE_VALUE, 1, false, data)?;
        let v = self.nvm.main.balance_minor.to_le_bytes();
        self.seal(&v, CommMode::Mac)
    }

    fn value_op(&mut self, code: u8, data: &[u8]) -> Reply {
        let allowed: &[u8] = match code {
            // The credit key may debit (the back office's reversal), as on a DESFire value
            // file whose read-write key may; such a debit does not arm LimitedCredit.
            ins::DEBIT => &[0, 1, 2],
            ins::LIMITED_CREDIT => &[0, 1],
            _ => &[0, 2],
        };
        let msg = self.open(code, 1, data, CommMode::Full, allowed)?;
        if msg.len() != 5 {
            return Err(Status::LengthError);
        }
        if msg[0] != FILE_VALUE {
            return Err(Status::FileNotFound);
        }
        let amount = i32::from_le_bytes(msg[1..5].try_into().expect("4"));
        if amount <= 0 {
            return Err(Status::ParameterError);
        }
        if self.staged.value.is_some() {
            // One value operation per transaction.
            return Err(Status::ParameterError);
        }
        let s = &self.nvm.main;
        let kind = match code {
            ins::DEBIT => {
                let after = s.balance_minor.checked_sub(amount);
                if after.is_none_or(|a| a < s.lower_limit_minor) {
                    return Err(Status::BoundaryError);
                }
                TxKind::Debit
            }
            ins::CREDIT => {
                let after = s.balance_minor.checked_add(amount);
                if after.is_none_or(|a| a > s.upper_limit_minor) {
                    return Err(Status::BoundaryError);
                }
                TxKind::Credit
            }
            _ => {
                if !s.limited_credit_enabled {
                    return Err(Status::PermissionDenied);
                }
                let after = s.balance_minor.checked_add(amount);
                if amount > s.limited_credit_minor || after.is_none_or(|a| a > s.upper_limit_minor)
                {
                    return Err(Status::BoundaryError);
                }
                TxKind::LimitedCredit
            }
        };
        self.staged.value = Some((kind, amount));
        self.staged.value_key = self.session.as_ref().map_or(0, |s| s.key_no);
        self.seal(&[], CommMode::Mac)
    }

    fn commit_reader_id(&mut self, data: &[u8]) -> Reply {
        let msg = self.open(ins::COMMIT_READER_ID, 0, data, CommMode::Mac, &[0, 1, 2])?;
        let Ok(rid) = <[u8; 16]>::try_from(msg.as_slice()) else {
            return Err(Status::LengthError);
        };
        if self.staged.reader_id.is_some() {
            // One reader id per transaction.
            return Err(Status::ParameterError);
        }
        self.staged.reader_id = Some(rid);
        self.seal(&[], CommMode::Mac)
    }

    fn write_record(&mut self, data: &[u8]) -> Reply {
        let (msg, [offset, len]) =
            self.open_file(ins::WRITE_RECORD, FILE_RECORDS, 7, true, data)?;
        let body = &msg[7..];
        let size = RECORD_SIZE;
        if len != body.len() || len == 0 {
            return Err(Status::LengthError);
        }
        if offset + len > size {
            return Err(Status::BoundaryError);
        }
        if self.staged.records.len() >= self.nvm.main.max_records as usize {
            return Err(Status::BoundaryError);
        }
        let mut rec = [0u8; RECORD_SIZE];
        rec[offset..offset + len].copy_from_slice(body);
        self.staged.records.push(rec);
        self.seal(&[], CommMode::Mac)
    }

    fn read_records(&mut self, data: &[u8]) -> Reply {
        let (_, [rec_no, count]) =
            self.open_file(ins::READ_RECORDS, FILE_RECORDS, 7, false, data)?;
        let recs = &self.nvm.main.records;
        let available = recs.len().saturating_sub(rec_no);
        let count = if count == 0 { available } else { count };
        if rec_no > recs.len() || count > available {
            return Err(Status::BoundaryError);
        }
        if count * RECORD_SIZE + crate::sm::MAC_LEN > MAX_RESPONSE_DATA {
            // A real card would chain with 91 AF; this one asks the terminal to read in parts.
            return Err(Status::LengthError);
        }
        // Newest first: record 0 is the most recent.
        let mut out = Vec::with_capacity(count * RECORD_SIZE);
        for r in recs.iter().rev().skip(rec_no).take(count) {
            out.extend_from_slice(r);
        }
        self.seal(&out, CommMode::Mac)
    }

    fn read_data(&mut self, data: &[u8]) -> Reply {
        // The file number only says which file to expect; open_file checks it under the MAC.
        let file_no = match data.first() {
            Some(&FILE_PROFILE) => FILE_PROFILE,
            _ => FILE_TMAC,
        };
        let (_, [offset, len]) = self.open_file(ins::READ_DATA, file_no, 7, false, data)?;
        let mut file = [0u8; PROFILE_SIZE];
        let size = if file_no == FILE_PROFILE {
            file = self.nvm.main.profile();
            PROFILE_SIZE
        } else {
            file[..4].copy_from_slice(&self.nvm.main.tmc.to_le_bytes());
            file[4..12].copy_from_slice(&self.nvm.main.tmv);
            12
        };
        let end = if len == 0 { size } else { offset + len };
        if offset > size || end > size || end < offset {
            return Err(Status::BoundaryError);
        }
        self.seal(&file[offset..end], CommMode::Mac)
    }

    fn abort(&mut self, data: &[u8]) -> Reply {
        self.open(ins::ABORT_TRANSACTION, 0, data, CommMode::Mac, &[0, 1, 2])?;
        self.staged = Staged::default();
        self.seal(&[], CommMode::Mac)
    }

    fn get_uid(&mut self, data: &[u8]) -> Reply {
        self.open(ins::GET_CARD_UID, 0, data, CommMode::Mac, &[0, 1, 2])?;
        let uid = self.nvm.main.uid;
        self.seal(&uid, CommMode::Full)
    }

    /// One NVM write step; returns `true` if the card tore right after it.
    fn nvm_write(&mut self, f: impl FnOnce(&mut Nvm)) -> bool {
        f(&mut self.nvm);
        if let Some(n) = self.tear_after.as_mut() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.tear_after = None;
                self.torn = true;
                self.reset_volatile();
                self.selected = false;
                return true;
            }
        }
        false
    }

    fn commit(&mut self, data: &[u8]) -> Reply {
        let msg = self.open(ins::COMMIT_TRANSACTION, 0, data, CommMode::Mac, &[0, 1, 2])?;
        let return_tm = match msg.as_slice() {
            [] => false,
            [0x00] => false,
            [0x01] => true,
            _ => return Err(Status::ParameterError),
        };
        let staged = std::mem::take(&mut self.staged);
        if staged.value.is_none() && staged.records.is_empty() {
            let mut out = Vec::new();
            if return_tm {
                out.extend_from_slice(&self.nvm.main.tmc.to_le_bytes());
                out.extend_from_slice(&self.nvm.main.tmv);
            }
            return self.seal(&out, CommMode::Mac);
        }
        let old = &self.nvm.main;
        let mut new = old.clone();
        let (kind, amount) = staged.value.unwrap_or((TxKind::RecordOnly, 0));
        new.balance_minor = self.staged_balance_of(old.balance_minor, kind, amount);
        // Only a fare debit under the debit key arms LimitedCredit; a reversal (a debit under
        // the credit or master key), a credit or a limited credit disarms it.
        new.limited_credit_minor = match kind {
            TxKind::Debit if staged.value_key == 1 => amount,
            TxKind::RecordOnly => old.limited_credit_minor,
            _ => 0,
        };
        for r in staged.records {
            if new.records.len() == new.max_records as usize {
                new.records.remove(0);
            }
            new.records.push(r);
        }
        let Some(tmc) = old.tmc.checked_add(1) else {
            return Err(Status::BoundaryError);
        };
        new.tmc = tmc;
        let tm_key = crypto::tm_session_mac_key_reset(&mut self.keys.tm, tmc, &new.uid);
        new.tmv = crypto::mac8(
            &tm_key,
            &tm_input_with_reader(
                kind,
                amount,
                new.balance_minor,
                tmc,
                &new.uid,
                staged.reader_id.as_ref(),
            ),
        );
        debug_assert!(new.balance_minor >= new.lower_limit_minor);
        debug_assert!(new.balance_minor <= new.upper_limit_minor);
        debug_assert_eq!(new.tmc, old.tmc + 1);

        // The write sequence. A tear after any step is recovered by `Nvm::recover`.
        #[cfg(debug_assertions)]
        let expect = new.clone();
        let (tmc, tmv) = (new.tmc, new.tmv);
        let mut journal = Some(new);
        for step in 0..COMMIT_WRITES {
            if self.nvm_write(|n| commit_write(n, step, &mut journal)) {
                return Ok(Vec::new());
            }
        }
        #[cfg(debug_assertions)]
        debug_assert_eq!(self.nvm.main, expect);
        let mut out = Vec::new();
        if return_tm {
            out.extend_from_slice(&tmc.to_le_bytes());
            out.extend_from_slice(&tmv);
        }
        self.seal(&out, CommMode::Mac)
    }

    fn staged_balance_of(&self, balance: i32, kind: TxKind, amount: i32) -> i32 {
        match kind {
            TxKind::Debit => balance - amount,
            TxKind::Credit | TxKind::LimitedCredit => balance + amount,
            TxKind::RecordOnly => balance,
        }
    }

    /// The balance including staged changes (for tests).
    #[cfg(test)]
    fn pending_balance(&self) -> i32 {
        self.staged_balance()
    }
}

/// The number of NVM writes one commit makes (tear points 1..=COMMIT_WRITES).
pub const COMMIT_WRITES: u32 = 6;

/// Write `step` (0..COMMIT_WRITES) of a commit's sequence; a tear may come after any. `journal`
/// holds the new state until step 0 moves it into the NVM journal, from which the later steps
/// copy it to the main state. (One function over the step number, not a closure per step: the
/// commit allocates nothing.)
fn commit_write(n: &mut Nvm, step: u32, journal: &mut Option<CardState>) {
    let Nvm {
        main,
        journal: nvm_journal,
        commit_flag,
    } = n;
    match (step, nvm_journal.as_ref()) {
        (0, _) => *nvm_journal = journal.take(),
        (1, _) => *commit_flag = true,
        (2, Some(j)) => {
            main.balance_minor = j.balance_minor;
            main.limited_credit_minor = j.limited_credit_minor;
        }
        (3, Some(j)) => main.records.clone_from(&j.records),
        (4, Some(j)) => {
            main.tmc = j.tmc;
            main.tmv = j.tmv;
        }
        (5, _) => {
            *nvm_journal = None;
            *commit_flag = false;
        }
        // Steps 2 to 4 always find the journal step 0 wrote (a tear ends the sequence).
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_rolls_forward_only_flagged_journals() {
        let p = Personalisation::transit([1; 7], 100);
        let keys = CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])));
        let card = Card::personalise(&p, keys);
        let mut nvm = card.into_nvm();
        let mut newer = nvm.main.clone();
        newer.balance_minor = 50;
        newer.tmc = 1;
        nvm.journal = Some(newer.clone());
        let mut unflagged = nvm.clone();
        unflagged.main.balance_minor = 50; // half-applied
        unflagged.recover();
        assert_eq!(unflagged.main.tmc, 0);
        nvm.commit_flag = true;
        nvm.main.balance_minor = 50; // half-applied
        nvm.recover();
        assert_eq!(nvm.main, newer);
        assert!(nvm.validate().is_ok());
    }

    #[test]
    fn unauthenticated_value_commands_are_refused() {
        let p = Personalisation::transit([1; 7], 100);
        let keys = CardKeys::from_keys(core::array::from_fn(|i| AesKey::from_bytes([i as u8; 16])));
        let mut card = Card::personalise(&p, keys);
        let mut rng = rand::rngs::mock::StepRng::new(1, 1);
        let sel = card
            .process(
                &apdu::wrap(ins::SELECT_APPLICATION, &card.state().aid.clone()),
                &mut rng,
            )
            .unwrap();
        assert_eq!(sel, vec![0x91, 0x00]);
        for code in [
            ins::DEBIT,
            ins::CREDIT,
            ins::GET_VALUE,
            ins::COMMIT_TRANSACTION,
        ] {
            let r = card.process(&apdu::wrap(code, &[1; 13]), &mut rng).unwrap();
            assert_eq!(r, vec![0x91, 0xAE], "command {code:#x}");
        }
        assert_eq!(card.pending_balance(), 100);
        // Malformed APDUs get ISO errors and the card keeps working.
        assert_eq!(card.process(&[0x90], &mut rng).unwrap(), vec![0x67, 0x00]);
        assert_eq!(
            card.process(&[0x00, 0x5A, 0, 0], &mut rng).unwrap(),
            vec![0x6E, 0x00]
        );
        assert_eq!(
            card.process(&apdu::wrap(0x42, &[]), &mut rng).unwrap(),
            vec![0x91, 0x1C]
        );
    }
}
