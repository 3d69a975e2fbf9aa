//! Proof values: a [`CommitReceipt`] exists only after the terminal verified the card's
//! CommitTransaction response under the session MAC, so no code path can journal or sign an
//! unverified value change. Its fields are readable; it can only be built inside this crate.

wire_code! {
    /// What kind of value change a committed transaction made.
    pub enum TxKind {
        /// No value change (e.g. a capped or free transfer tap that only wrote a trip record).
        RecordOnly = 0,
        /// A debit.
        Debit = 1,
        /// A credit (load).
        Credit = 2,
        /// A limited credit (undo of the last debit).
        LimitedCredit = 3,
    }
}

/// The transaction-MAC input the card MACs at commit and the HSM checks in clearing:
/// `kind(1) ‖ amount_minor(i32 LE) ‖ balance_after_minor(i32 LE) ‖ TMC(u32 LE) ‖ UID(7)`.
pub fn tm_input(
    kind: TxKind,
    amount_minor: i32,
    balance_after_minor: i32,
    tmc: u32,
    uid: &[u8; 7],
) -> [u8; 20] {
    let mut m = [0u8; 20];
    m[0] = kind as u8;
    m[1..5].copy_from_slice(&amount_minor.to_le_bytes());
    m[5..9].copy_from_slice(&balance_after_minor.to_le_bytes());
    m[9..13].copy_from_slice(&tmc.to_le_bytes());
    m[13..20].copy_from_slice(uid);
    m
}

/// The transaction-MAC input of a transaction whose terminal committed a reader id (TMRI,
/// CommitReaderID): [`tm_input`] followed by the 16-byte reader id, so the transaction MAC also
/// proves which reader's SAM made the change. Without a reader id it is exactly [`tm_input`].
pub fn tm_input_with_reader(
    kind: TxKind,
    amount_minor: i32,
    balance_after_minor: i32,
    tmc: u32,
    uid: &[u8; 7],
    reader_id: Option<&[u8; 16]>,
) -> Vec<u8> {
    let mut m = tm_input(kind, amount_minor, balance_after_minor, tmc, uid).to_vec();
    if let Some(r) = reader_id {
        m.extend_from_slice(r);
    }
    m
}

/// A committed value change, proved by the card's MAC'd CommitTransaction response. Its
/// fields are read through getters; only the transaction drivers in this crate build one (and
/// the HSM's check of a claim, [`crate::sam::Hsm::verify_claim`]), so another crate cannot:
///
/// ```compile_fail
/// use purse::receipt::{CommitReceipt, TxClaim, TxKind};
/// let claim = TxClaim {
///     uid: [4; 7], tmc: 1, tmv: [0; 8], kind: TxKind::Credit, amount_minor: 100_000,
///     balance_after_minor: 100_000, key_version: 1, reader_id: None,
/// };
/// let forged = CommitReceipt { claim };
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitReceipt {
    /// The change as the card committed it (the receipt is its claim, proved).
    claim: TxClaim,
    _proof: Verified,
}

/// Zero-sized witness that a MAC verification happened; private to this crate.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Verified;

impl CommitReceipt {
    /// Built only by the transaction drivers after the commit response verified (and by
    /// [`TxClaim::into_verified`] once the HSM checked the claim's transaction MAC).
    pub(crate) fn verified(claim: TxClaim) -> Self {
        debug_assert!(claim.amount_minor >= 0);
        CommitReceipt {
            claim,
            _proof: Verified,
        }
    }

    /// Card UID.
    pub fn uid(&self) -> [u8; 7] {
        self.claim.uid
    }

    /// The transaction counter value this change consumed (TMC after commit).
    pub fn tmc(&self) -> u32 {
        self.claim.tmc
    }

    /// The card's transaction MAC (verifiable only by the HSM).
    pub fn tmv(&self) -> [u8; 8] {
        self.claim.tmv
    }

    /// The kind of change.
    pub fn kind(&self) -> TxKind {
        self.claim.kind
    }

    /// The amount moved, minor units, ≥ 0.
    pub fn amount_minor(&self) -> i32 {
        self.claim.amount_minor
    }

    /// The purse balance after the change, minor units.
    pub fn balance_after_minor(&self) -> i32 {
        self.claim.balance_after_minor
    }

    /// The key version of the card's application keys.
    pub fn key_version(&self) -> u8 {
        self.claim.key_version
    }

    /// The reader id (TMRI) the terminal committed in the transaction, if any: part of the
    /// transaction MAC's input ([`tm_input_with_reader`]).
    pub fn reader_id(&self) -> Option<[u8; 16]> {
        self.claim.reader_id
    }

    /// The change as a claim (plain data), e.g. to send it on or to have the HSM check the
    /// card's transaction MAC on it.
    pub fn to_claim(&self) -> TxClaim {
        self.claim.clone()
    }

    /// The bytes the card's transaction MAC covers for this change.
    pub fn tm_input(&self) -> Vec<u8> {
        self.claim.tm_input()
    }

    /// For tests of code downstream of verification (other crates' unit tests): only with
    /// the `test-support` feature, never in production builds.
    #[cfg(any(test, feature = "test-support"))]
    pub fn for_tests(
        uid: [u8; 7],
        tmc: u32,
        tmv: [u8; 8],
        kind: TxKind,
        amount_minor: i32,
        balance_after_minor: i32,
    ) -> Self {
        Self::verified(TxClaim {
            uid,
            tmc,
            tmv,
            kind,
            amount_minor,
            balance_after_minor,
            key_version: 1,
            reader_id: None,
        })
    }
}

/// A value change as someone claims it happened (a reported franchise load, a tap record):
/// plain data until the HSM checks its transaction MAC ([`crate::sam::Hsm::verify_claim`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxClaim {
    /// Card UID.
    pub uid: [u8; 7],
    /// The counter the change consumed.
    pub tmc: u32,
    /// The card's transaction MAC.
    pub tmv: [u8; 8],
    /// The kind of change.
    pub kind: TxKind,
    /// The amount, minor units, ≥ 0.
    pub amount_minor: i32,
    /// The balance after, minor units.
    pub balance_after_minor: i32,
    /// The card key version.
    pub key_version: u8,
    /// The reader id the change must have been committed under (a franchise report: the
    /// reporting franchise SAM's id, set by the server, never taken from the report); `None`
    /// for a transaction without one (validator taps, online loads).
    pub reader_id: Option<[u8; 16]>,
}

impl TxClaim {
    /// The bytes the card's transaction MAC covers, if the claim is true.
    pub fn tm_input(&self) -> Vec<u8> {
        tm_input_with_reader(
            self.kind,
            self.amount_minor,
            self.balance_after_minor,
            self.tmc,
            &self.uid,
            self.reader_id.as_ref(),
        )
    }

    /// The receipt a claim is once the HSM verified its transaction MAC (only
    /// [`crate::sam::Hsm::verify_claim`] calls it).
    pub(crate) fn into_verified(self) -> CommitReceipt {
        CommitReceipt::verified(self)
    }
}
