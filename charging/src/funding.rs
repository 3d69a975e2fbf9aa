//! Funding sources: what pays for a load.
//!
//! A load is authorised before the card is touched, captured once the card proved the credit,
//! and voided if the card never applied it. Every call carries the load's reference
//! (`load:<UID>:<TMC>`), and sources treat a repeated reference as the same request, so a retry
//! after a timeout never authorises twice.

use crate::ledger::{Ledger, LedgerError};
use heed::types::{SerdeJson, Str};
use heed::{Database, Env, WithoutTls};
use serde::{Deserialize, Serialize};
use std::path::Path;
use tapgate_lmdb::{Durability, EnvConfig};

/// A funding request.
#[derive(Clone, Debug)]
pub struct FundingRequest<'a> {
    /// Amount in minor units.
    pub amount_minor: i64,
    /// The load's reference; the idempotency key towards the source.
    pub reference: &'a str,
    /// The instrument: a card token, a points holder id, a voucher code.
    pub instrument: &'a str,
}

/// Why a funding call failed.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FundingError {
    /// The source said no (insufficient funds, card blocked, not enough points).
    #[error("declined: {0}")]
    Declined(String),
    /// No answer in time; the outcome is unknown — retry with the same reference.
    #[error("the funding source did not answer in time")]
    Timeout,
    /// The authorisation is unknown to the source.
    #[error("authorisation {0} unknown")]
    UnknownAuthorisation(String),
    /// The operation does not fit the authorisation's state (capture after void, …).
    #[error("authorisation {id} is {state}: cannot {op}")]
    WrongState {
        /// authorisation id
        id: String,
        /// its state
        state: String,
        /// what was attempted
        op: &'static str,
    },
    /// The source's storage failed.
    #[error("funding storage: {0}")]
    Storage(String),
}

impl From<heed::Error> for FundingError {
    fn from(e: heed::Error) -> Self {
        FundingError::Storage(e.to_string())
    }
}
impl From<LedgerError> for FundingError {
    fn from(e: LedgerError) -> Self {
        FundingError::Storage(e.to_string())
    }
}

/// Longest instrument id (a card token, a member id, a voucher code).
pub const MAX_INSTRUMENT_ID_LEN: usize = 64;

/// Whether `id` may name a funding instrument: 1 to [`MAX_INSTRUMENT_ID_LEN`] ASCII letters,
/// digits, `-`, `_` or `.`, not starting with `.`. No `:`, `/`, `|`, spaces or control
/// characters, so an id can never reach into another namespace when a source keeps it in an
/// account name.
pub fn valid_instrument_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_INSTRUMENT_ID_LEN
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `name` may be an account (an API caller's token name): the same alphabet as an
/// instrument id.
pub fn valid_account_name(name: &str) -> bool {
    valid_instrument_id(name)
}

/// Who may fund a load from an instrument of a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holding {
    /// The holder registers the instrument to its own account (`POST /v1/instruments`), e.g. a
    /// card-processor token; only that account may use it.
    SelfRegistered,
    /// The programme links the membership to an account (`POST /v1/partner/points`); only that
    /// account may use it.
    LinkedByProgramme,
    /// The instrument is a bearer secret (a voucher code): whoever presents it may redeem it.
    Bearer,
}

/// A source of funds for loads.
pub trait FundingSource: Send + Sync {
    /// The source's name (`card`, `mileage`, `points`, …).
    fn name(&self) -> &str;
    /// How an instrument of this source comes to belong to an account.
    fn holding(&self) -> Holding {
        Holding::SelfRegistered
    }
    /// Checks the form of an instrument id before it is registered (beyond
    /// [`valid_instrument_id`], which the load service checks for every source).
    fn check_instrument(&self, _id: &str) -> Result<(), FundingError> {
        Ok(())
    }
    /// This source as a points programme (to credit points through the partner API).
    fn as_points(&self) -> Option<&PointsProgram> {
        None
    }
    /// Reserves funds; returns an authorisation id. The same reference returns the same id.
    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError>;
    /// Takes the reserved funds (idempotent).
    fn capture(&self, auth_id: &str) -> Result<(), FundingError>;
    /// Releases the reserved funds (idempotent).
    fn void(&self, auth_id: &str) -> Result<(), FundingError>;
    /// Returns captured funds (up to what was captured).
    fn refund(&self, auth_id: &str, amount_minor: i64) -> Result<(), FundingError>;
    /// Whether loads funded here can be reversed and refunded.
    fn refundable(&self) -> bool {
        true
    }
    /// The ledger account that owes the value of loads funded here.
    fn ledger_account(&self) -> String {
        format!("funding:{}", self.name())
    }
    /// Whether a call to this source waits for another system (a processor's answer over the
    /// network): a request handler then hands its worker's other tasks over while it waits
    /// ([`crate::ledger::may_block`]). A source whose calls are the ledger's own transactions
    /// (they hand over by themselves) or local memory-mapped writes answers `false`.
    fn waits(&self) -> bool {
        true
    }
}

/// The state of one authorisation at the sandbox processor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessorAuth {
    /// Authorisation id.
    pub id: String,
    /// Amount authorised.
    pub amount_minor: i64,
    /// Amount refunded so far.
    pub refunded_minor: i64,
    /// `authorised`, `captured`, `voided`.
    pub state: String,
    /// The instrument token.
    pub token: String,
}

/// The sandbox processor's map size: 64 MiB (it keeps one small record per authorisation).
pub const SANDBOX_MAP_SIZE_BYTES: usize = 64 << 20;

/// A card-payment processor sandbox that behaves like a real one, with persistent state:
///
/// | token | behaviour |
/// |---|---|
/// | `tok_decline…` | declined: insufficient funds |
/// | `tok_timeout…` | the first authorise times out *after* authorising; a retry with the same reference returns the same authorisation |
/// | `tok_limit_<N>…` | approves up to N minor units per authorisation, declines above |
/// | any other `tok_…` | approved |
pub struct SandboxProcessor {
    env: Env<WithoutTls>,
    by_ref: Database<Str, SerdeJson<ProcessorAuth>>,
    by_id: Database<Str, Str>,
}

impl SandboxProcessor {
    /// Opens the sandbox's own store in `dir` (it stands for a remote system: it keeps its
    /// state across our restarts).
    pub fn open(dir: &Path) -> Result<Self, FundingError> {
        // NO_SYNC: the sandbox stands in for a processor on another machine, whose
        // durability is its own; committed pages are written to the file (they survive our
        // process being killed, which the crash tests do) but not fsynced, so a load does not
        // pay two fsyncs for a simulated remote system. Our own ledger keeps fsync on every
        // commit.
        let cfg = EnvConfig {
            map_size_bytes: SANDBOX_MAP_SIZE_BYTES,
            durability: Durability::NoSync,
        };
        let (env, [by_ref, by_id]) = tapgate_lmdb::open(dir, ["by_ref", "by_id"], &cfg)
            .map_err(|e| FundingError::Storage(e.to_string()))?;
        let (by_ref, by_id) = (by_ref.remap_types(), by_id.remap_types());
        Ok(SandboxProcessor { env, by_ref, by_id })
    }

    fn get(&self, id: &str) -> Result<(String, ProcessorAuth), FundingError> {
        let r = self.env.read_txn()?;
        let reference = self
            .by_id
            .get(&r, id)?
            .ok_or_else(|| FundingError::UnknownAuthorisation(id.to_string()))?
            .to_string();
        let a = self
            .by_ref
            .get(&r, &reference)?
            .ok_or_else(|| FundingError::UnknownAuthorisation(id.to_string()))?;
        Ok((reference, a))
    }

    /// Stores `a` under `reference` unless the reference is taken: then the authorisation
    /// already there (looked at and written in one transaction, so two racing requests with
    /// one reference get one authorisation, as a processor's idempotency key gives).
    fn put_first(&self, reference: &str, a: &ProcessorAuth) -> Result<ProcessorAuth, FundingError> {
        let mut t = self.env.write_txn()?;
        if let Some(existing) = self.by_ref.get(&t, reference)? {
            return Ok(existing);
        }
        self.by_ref.put(&mut t, reference, a)?;
        self.by_id.put(&mut t, &a.id, reference)?;
        t.commit()?;
        Ok(a.clone())
    }

    /// Captures or voids an authorisation: `authorised` becomes `to`; already `to` is done
    /// (a retry); any other state refuses `op`.
    fn finish_authorisation(
        &self,
        auth_id: &str,
        to: &str,
        op: &'static str,
    ) -> Result<(), FundingError> {
        self.change(auth_id, |a| match a.state.as_str() {
            s if s == to => Ok(false),
            "authorised" => {
                a.state = to.into();
                Ok(true)
            }
            s => Err(FundingError::WrongState {
                id: auth_id.into(),
                state: s.into(),
                op,
            }),
        })
    }

    /// Reads authorisation `auth_id` and, when `f` says so, writes it back changed, in one
    /// transaction: a capture, a void or a refund racing on one authorisation see each
    /// other's outcome (two refunds cannot together pass what was captured).
    fn change(
        &self,
        auth_id: &str,
        f: impl FnOnce(&mut ProcessorAuth) -> Result<bool, FundingError>,
    ) -> Result<(), FundingError> {
        let mut t = self.env.write_txn()?;
        let unknown = || FundingError::UnknownAuthorisation(auth_id.to_string());
        let reference = self
            .by_id
            .get(&t, auth_id)?
            .ok_or_else(unknown)?
            .to_string();
        let mut a = self.by_ref.get(&t, &reference)?.ok_or_else(unknown)?;
        if f(&mut a)? {
            self.by_ref.put(&mut t, &reference, &a)?;
            t.commit()?;
        }
        Ok(())
    }

    /// An authorisation's state (tests, support).
    pub fn authorisation(&self, id: &str) -> Result<ProcessorAuth, FundingError> {
        Ok(self.get(id)?.1)
    }
}

impl FundingSource for SandboxProcessor {
    fn name(&self) -> &str {
        "card"
    }

    /// Its store is a local LMDB file without fsync (it stands in for a remote processor
    /// whose durability is its own): a call writes pages and never waits for the disk.
    fn waits(&self) -> bool {
        false
    }

    fn check_instrument(&self, id: &str) -> Result<(), FundingError> {
        if id.starts_with("tok_") {
            Ok(())
        } else {
            Err(FundingError::Declined(format!(
                "instrument {id:?} is not a card token (tok_…)"
            )))
        }
    }

    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError> {
        if req.amount_minor <= 0 {
            return Err(FundingError::Declined("amount must be positive".into()));
        }
        let token = req.instrument;
        if !token.starts_with("tok_") {
            return Err(FundingError::Declined(format!(
                "instrument {token:?} is not a card token"
            )));
        }
        let same_request = |existing: ProcessorAuth| {
            if existing.amount_minor != req.amount_minor || existing.token != token {
                return Err(FundingError::Declined(
                    "duplicate reference with different details".into(),
                ));
            }
            Ok(existing.id)
        };
        {
            let r = self.env.read_txn()?;
            if let Some(existing) = self.by_ref.get(&r, req.reference)? {
                return same_request(existing);
            }
        }
        if token.starts_with("tok_decline") {
            return Err(FundingError::Declined("insufficient funds".into()));
        }
        if let Some(rest) = token.strip_prefix("tok_limit_") {
            let limit: i64 = rest
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .and_then(|d| d.parse().ok())
                .unwrap_or(0);
            if req.amount_minor > limit {
                return Err(FundingError::Declined(format!(
                    "over the card's limit of {limit}"
                )));
            }
        }
        // Random, not a count: a sandbox that lost its last writes (it does not fsync) must never
        // hand out an id our ledger already holds for another authorisation.
        let id = {
            use rand::RngCore;
            let mut b = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut b);
            format!("auth_{}", hex::encode(b))
        };
        let a = ProcessorAuth {
            id: id.clone(),
            amount_minor: req.amount_minor,
            refunded_minor: 0,
            state: "authorised".into(),
            token: token.to_string(),
        };
        let stored = self.put_first(req.reference, &a)?;
        if stored.id != id {
            // Another request with this reference authorised in between.
            return same_request(stored);
        }
        if token.starts_with("tok_timeout") {
            // Authorised on the processor's side, but the answer is lost.
            return Err(FundingError::Timeout);
        }
        Ok(id)
    }

    fn capture(&self, auth_id: &str) -> Result<(), FundingError> {
        self.finish_authorisation(auth_id, "captured", "capture")
    }

    fn void(&self, auth_id: &str) -> Result<(), FundingError> {
        self.finish_authorisation(auth_id, "voided", "void")
    }

    fn refund(&self, auth_id: &str, amount_minor: i64) -> Result<(), FundingError> {
        self.change(auth_id, |a| {
            if a.state != "captured" {
                return Err(FundingError::WrongState {
                    id: auth_id.into(),
                    state: a.state.clone(),
                    op: "refund",
                });
            }
            if amount_minor <= 0 || a.refunded_minor + amount_minor > a.amount_minor {
                return Err(FundingError::Declined(
                    "refund exceeds what was captured".into(),
                ));
            }
            a.refunded_minor += amount_minor;
            Ok(true)
        })
    }
}

/// Most points one partner credit may carry.
pub const MAX_EARN_POINTS: i64 = 1_000_000_000;

/// Why a partner's points credit was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EarnError {
    /// The partner does not run this programme.
    #[error("partner {partner:?} may not credit {program} points")]
    NotThisProgrammesPartner {
        /// the partner (token name)
        partner: String,
        /// the programme
        program: String,
    },
    /// A malformed member id.
    #[error("member_id {0:?} must be 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidMember(String),
    /// A malformed account name.
    #[error("account {0:?} must be 1 to 64 letters, digits, '-', '_' or '.'")]
    InvalidAccount(String),
    /// Points out of range.
    #[error("points must be within 1..={MAX_EARN_POINTS}, got {0}")]
    InvalidPoints(i64),
    /// A malformed reference.
    #[error("reference must be 1 to 128 characters")]
    InvalidReference,
    /// The member id is linked to another account: a membership belongs to one account.
    #[error("member {member:?} of {program} is linked to another account")]
    MemberOfAnotherAccount {
        /// the programme
        program: String,
        /// the member id
        member: String,
    },
    /// The reference was used before for a different credit.
    #[error("reference {0:?} was already used for a different credit (member, account or points differ)")]
    ReferenceReused(String),
    /// Storage failed.
    #[error("points storage: {0}")]
    Storage(String),
}

impl From<LedgerError> for EarnError {
    fn from(e: LedgerError) -> Self {
        EarnError::Storage(e.to_string())
    }
}

/// A points credit as booked (or as booked earlier, for a replayed reference).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Earned {
    /// The programme.
    pub program: String,
    /// The member credited.
    pub member_id: String,
    /// The account the membership belongs to.
    pub account: String,
    /// Points credited.
    pub points: i64,
    /// The partner's reference.
    pub reference: String,
    /// The member's points after the credit.
    pub balance_points: i64,
    /// True when the reference had been booked before (nothing was credited again).
    #[serde(default)]
    pub replayed: bool,
}

/// Mileage or loyalty points kept in the ledger, converted to minor units by a fixed rule.
///
/// Points are credited only by the programme's partners ([`PointsProgram::earn`], the partner
/// API), which link each member id to the account it belongs to (the instrument registry); a
/// load may draw on a membership only for that account. Points live in their own accounts
/// (`pts:<program>:member:<id>`, in points, never mixed with money; `<id>` passes
/// [`valid_instrument_id`], so it can never name `pts:<program>:issued`, `…:redeemed` or
/// `…:held:…`): authorise moves them to `pts:<program>:held:<auth>`, capture to
/// `pts:<program>:redeemed`, void back to the member. The money side of a completed load is
/// posted from `funding:<program>` to the card like any other source.
pub struct PointsProgram {
    name: String,
    ledger: Ledger,
    /// Minor units one point is worth, as numerator/denominator (e.g. 1/1, or 2/3).
    minor_per_point: (i64, i64),
    /// Partner token names that may credit points.
    partners: Vec<String>,
}

impl PointsProgram {
    /// A program named `name` (e.g. `mileage`, `points`) whose point is worth
    /// `num/den` minor units. No partner may credit it until [`PointsProgram::with_partners`].
    pub fn new(name: &str, ledger: Ledger, num: i64, den: i64) -> Self {
        assert!(num > 0 && den > 0, "conversion rule must be positive");
        PointsProgram {
            name: name.to_string(),
            ledger,
            minor_per_point: (num, den),
            partners: Vec::new(),
        }
    }

    /// The partners (token names, role `partner`) that may credit this programme's points.
    pub fn with_partners(mut self, partners: Vec<String>) -> Self {
        self.partners = partners;
        self
    }

    /// Points needed for `amount_minor` (rounded up: the holder never gets value for free).
    pub fn points_for(&self, amount_minor: i64) -> i64 {
        let (num, den) = self.minor_per_point;
        (amount_minor * den + num - 1) / num
    }

    /// The account of a validated member id.
    fn holder_account(&self, member: &str) -> Result<String, FundingError> {
        if !valid_instrument_id(member) {
            return Err(FundingError::Declined(format!(
                "{member:?} is not a {} member id",
                self.name
            )));
        }
        Ok(format!("pts:{}:member:{member}", self.name))
    }

    /// Credits `points` to `member`, linking the membership to `account` (the cardholder's
    /// token name) on its first credit — issued by the programme through one of its partners.
    /// Idempotent by (partner, reference): the same credit again returns what was booked
    /// (`replayed`), a different one under the same reference is refused.
    pub fn earn(
        &self,
        partner: &str,
        member: &str,
        account: &str,
        points: i64,
        reference: &str,
        now_ms: u64,
    ) -> Result<Earned, EarnError> {
        if !self.partners.iter().any(|p| p == partner) {
            return Err(EarnError::NotThisProgrammesPartner {
                partner: partner.to_string(),
                program: self.name.clone(),
            });
        }
        if !valid_instrument_id(member) {
            return Err(EarnError::InvalidMember(member.to_string()));
        }
        if !valid_account_name(account) {
            return Err(EarnError::InvalidAccount(account.to_string()));
        }
        if !(1..=MAX_EARN_POINTS).contains(&points) {
            return Err(EarnError::InvalidPoints(points));
        }
        if reference.is_empty() || reference.len() > 128 {
            return Err(EarnError::InvalidReference);
        }
        let program = self.name.clone();
        let holder = format!("pts:{program}:member:{member}");
        let issued = format!("pts:{program}:issued");
        let idem = format!("points-earn:{program}:{partner}:{reference}");
        let (partner, member, account, reference) = (
            partner.to_string(),
            member.to_string(),
            account.to_string(),
            reference.to_string(),
        );
        self.ledger.transact(move |t| {
            let mut earned = Earned {
                program: program.clone(),
                member_id: member.clone(),
                account: account.clone(),
                points,
                reference: reference.clone(),
                balance_points: 0,
                replayed: false,
            };
            if let Some(v) = t.idempotent(&idem)? {
                let same = v["member_id"] == member.as_str()
                    && v["account"] == account.as_str()
                    && v["points"] == points;
                if !same {
                    return Ok(Err(EarnError::ReferenceReused(reference.clone())));
                }
                earned.balance_points = t.balance(&holder)?;
                earned.replayed = true;
                return Ok(Ok(earned));
            }
            match t.instrument(&program, &member)? {
                Some(i) if i.owner != account => {
                    return Ok(Err(EarnError::MemberOfAnotherAccount {
                        program: program.clone(),
                        member: member.clone(),
                    }))
                }
                Some(_) => {}
                None => t.put_instrument(&crate::ledger::Instrument {
                    source: program.clone(),
                    id: member.clone(),
                    owner: account.clone(),
                    registered_by: partner.clone(),
                    registered_ms: now_ms,
                })?,
            }
            t.post(
                now_ms,
                &issued,
                &holder,
                points,
                &format!("earn:{reference}"),
            )?;
            t.put_idempotent(
                &idem,
                &serde_json::json!({"member_id": member, "account": account, "points": points}),
            )?;
            earned.balance_points = t.balance(&holder)?;
            Ok(Ok(earned))
        })?
    }

    /// A member's points.
    pub fn balance(&self, member: &str) -> Result<i64, FundingError> {
        let account = self.holder_account(member)?;
        let r = self.ledger.read()?;
        Ok(r.balance(&account)?)
    }

    fn held_account(&self, auth_id: &str) -> String {
        format!("pts:{}:held:{}", self.name, auth_id)
    }

    /// The member an authorisation id (`<member>|<reference>`) holds points of.
    fn member_of(&self, auth_id: &str) -> Result<String, FundingError> {
        let member = auth_id.split('|').next().unwrap_or_default();
        self.holder_account(member)
    }

    /// Capture or void: whatever an authorisation still holds goes to account `to` (the
    /// redeemed account, or back to the member); nothing left is a done retry.
    fn move_held(&self, auth_id: &str, to: String) -> Result<(), FundingError> {
        let held = self.held_account(auth_id);
        let reference = auth_id.to_string();
        self.ledger.transact(move |t| {
            let points = t.balance(&held)?;
            if points > 0 {
                t.post(0, &held, &to, points, &reference)?;
            }
            Ok(())
        })?;
        Ok(())
    }
}

impl FundingSource for PointsProgram {
    fn name(&self) -> &str {
        &self.name
    }

    /// Points live in the ledger: a call is a ledger transaction, which waits for its group
    /// commit by itself ([`Ledger::transact`]).
    fn waits(&self) -> bool {
        false
    }

    fn holding(&self) -> Holding {
        Holding::LinkedByProgramme
    }

    fn as_points(&self) -> Option<&PointsProgram> {
        Some(self)
    }

    fn authorise(&self, req: &FundingRequest<'_>) -> Result<String, FundingError> {
        let holder = self.holder_account(req.instrument)?;
        let auth_id = format!("{}|{}", req.instrument, req.reference);
        let held = self.held_account(&auth_id);
        let points = self.points_for(req.amount_minor);
        let reference = req.reference.to_string();
        let (holder_t, held_t) = (holder.clone(), held);
        // Ok(None): held (now or by the same request before); Ok(Some(have)): too few points.
        let short = self.ledger.transact(move |t| {
            if t.balance(&held_t)? > 0 {
                return Ok(None); // the same request again
            }
            let have = t.balance(&holder_t)?;
            if have < points {
                return Ok(Some(have));
            }
            t.post(0, &holder_t, &held_t, points, &reference)?;
            Ok(None)
        })?;
        if let Some(have) = short {
            return Err(FundingError::Declined(format!(
                "{} has {have} {} points, {points} needed",
                req.instrument, self.name
            )));
        }
        Ok(auth_id)
    }

    fn capture(&self, auth_id: &str) -> Result<(), FundingError> {
        self.move_held(auth_id, format!("pts:{}:redeemed", self.name))
    }

    fn void(&self, auth_id: &str) -> Result<(), FundingError> {
        self.move_held(auth_id, self.member_of(auth_id)?)
    }

    fn refund(&self, auth_id: &str, amount_minor: i64) -> Result<(), FundingError> {
        let holder = self.member_of(auth_id)?;
        let points = self.points_for(amount_minor);
        let redeemed = format!("pts:{}:redeemed", self.name);
        let reference = auth_id.to_string();
        Ok(self
            .ledger
            .transact(move |t| t.post(0, &redeemed, &holder, points, &reference).map(drop))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(amount: i64, reference: &'a str, token: &'a str) -> FundingRequest<'a> {
        FundingRequest {
            amount_minor: amount,
            reference,
            instrument: token,
        }
    }

    #[test]
    fn sandbox_behaves_like_a_processor() {
        let dir = tempfile::tempdir().unwrap();
        let p = SandboxProcessor::open(dir.path()).unwrap();
        let a = p.authorise(&req(500, "load:1", "tok_visa")).unwrap();
        assert_eq!(
            p.authorise(&req(500, "load:1", "tok_visa")).unwrap(),
            a,
            "duplicate request"
        );
        assert!(
            p.authorise(&req(600, "load:1", "tok_visa")).is_err(),
            "same ref, other amount"
        );
        p.capture(&a).unwrap();
        p.capture(&a).unwrap();
        assert!(matches!(
            p.void(&a),
            Err(FundingError::WrongState { op: "void", .. })
        ));
        p.refund(&a, 200).unwrap();
        assert!(p.refund(&a, 301).is_err());
        assert!(matches!(
            p.authorise(&req(500, "load:2", "tok_decline")),
            Err(FundingError::Declined(_))
        ));
        // A timeout that did authorise: the retry finds it.
        assert_eq!(
            p.authorise(&req(700, "load:3", "tok_timeout")),
            Err(FundingError::Timeout)
        );
        let t = p.authorise(&req(700, "load:3", "tok_timeout")).unwrap();
        assert_eq!(p.authorisation(&t).unwrap().state, "authorised");
        p.void(&t).unwrap();
        p.void(&t).unwrap();
        assert_eq!(p.authorisation(&t).unwrap().state, "voided");
        assert!(matches!(
            p.capture(&t),
            Err(FundingError::WrongState { op: "capture", .. })
        ));
        assert!(p
            .authorise(&req(1_001, "load:4", "tok_limit_1000"))
            .is_err());
        p.authorise(&req(1_000, "load:5", "tok_limit_1000"))
            .unwrap();
        assert!(matches!(
            p.capture("auth_nope"),
            Err(FundingError::UnknownAuthorisation(_))
        ));
        drop(p);
        let p = SandboxProcessor::open(dir.path()).unwrap();
        assert_eq!(
            p.authorisation(&a).unwrap().refunded_minor,
            200,
            "state survives restart"
        );
        let b = p.authorise(&req(1, "load:6", "tok_x")).unwrap();
        assert_ne!(a, b);
    }

    /// A `mileage` programme credited by the partner `airline`, `minor_per_point` minor units
    /// a mile, over a new ledger (kept while its directory is).
    fn airline_miles(minor_per_point: i64) -> (tempfile::TempDir, Ledger, PointsProgram) {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path(), 16 << 20).unwrap();
        let miles = PointsProgram::new("mileage", ledger.clone(), minor_per_point, 1)
            .with_partners(vec!["airline".into()]);
        (dir, ledger, miles)
    }

    #[test]
    fn points_are_held_captured_and_released_exactly() {
        let (_dir, ledger, miles) = airline_miles(2); // 1 mile = 2 minor
        miles
            .earn("airline", "bob", "bob-phone", 1_000, "flight:1", 0)
            .unwrap();
        assert_eq!(miles.points_for(1_001), 501);
        let a = miles.authorise(&req(1_000, "load:1", "bob")).unwrap();
        assert_eq!(miles.balance("bob").unwrap(), 500);
        assert_eq!(miles.authorise(&req(1_000, "load:1", "bob")).unwrap(), a);
        assert_eq!(
            miles.balance("bob").unwrap(),
            500,
            "a retry holds nothing more"
        );
        miles.capture(&a).unwrap();
        let b = miles.authorise(&req(600, "load:2", "bob")).unwrap();
        assert_eq!(miles.balance("bob").unwrap(), 200);
        miles.void(&b).unwrap();
        assert_eq!(miles.balance("bob").unwrap(), 500);
        assert!(miles.authorise(&req(1_002, "load:3", "bob")).is_err());
        let r = ledger.read().unwrap();
        let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
        assert_eq!(sum, 0, "points postings balance");
    }

    #[test]
    fn points_are_credited_only_by_the_programmes_partners_once_per_reference() {
        let (_dir, ledger, miles) = airline_miles(1);
        assert!(matches!(
            miles.earn("mall", "M1", "alice", 100, "f1", 0),
            Err(EarnError::NotThisProgrammesPartner { .. })
        ));
        let e = miles.earn("airline", "M1", "alice", 100, "f1", 0).unwrap();
        assert_eq!((e.balance_points, e.replayed), (100, false));
        let again = miles.earn("airline", "M1", "alice", 100, "f1", 0).unwrap();
        assert_eq!((again.balance_points, again.replayed), (100, true));
        assert_eq!(
            miles.earn("airline", "M1", "alice", 999, "f1", 0),
            Err(EarnError::ReferenceReused("f1".into()))
        );
        assert!(matches!(
            miles.earn("airline", "M1", "mallory", 100, "f2", 0),
            Err(EarnError::MemberOfAnotherAccount { .. })
        ));
        for bad in [
            "",
            "redeemed:x",
            "a/b",
            "a|b",
            "x y",
            ".hidden",
            &"m".repeat(65),
        ] {
            assert!(
                matches!(
                    miles.earn("airline", bad, "alice", 1, "f3", 0),
                    Err(EarnError::InvalidMember(_))
                ),
                "{bad:?}"
            );
        }
        let r = ledger.read().unwrap();
        assert_eq!(
            r.instrument("mileage", "M1").unwrap().unwrap().owner,
            "alice"
        );
        assert_eq!(miles.balance("M1").unwrap(), 100);
        let sum: i64 = r.balances().unwrap().iter().map(|(_, b)| b).sum();
        assert_eq!(sum, 0);
    }

    #[test]
    fn a_points_authorisation_never_reaches_an_internal_account() {
        let (_dir, ledger, miles) = airline_miles(1);
        miles
            .earn("airline", "M1", "alice", 10_000, "f1", 0)
            .unwrap();
        // A load of 1 point captured puts value in the programme's redeemed pool.
        let a = miles.authorise(&req(1, "load:1", "M1")).unwrap();
        miles.capture(&a).unwrap();
        for bad in ["redeemed", "issued", "held:x", "member:M1", ""] {
            let got = miles.authorise(&req(1, "load:2", bad));
            assert!(got.is_err(), "{bad:?} authorised");
        }
        let r = ledger.read().unwrap();
        assert_eq!(r.balance("pts:mileage:redeemed").unwrap(), 1);
        assert_eq!(miles.balance("M1").unwrap(), 9_999);
    }
}
