//! PC/SC card readers through pcsc-lite (`pcscd`): a [`Reader`] for the gate loop and a
//! [`Transport`] ([`PcscCard`]) that the cardholder's charging client uses too.
//!
//! - Readers are chosen by a case-insensitive substring of their name (`None`: any reader).
//! - Card presence comes from `SCardGetStatusChange`, with the `\\?PnP?\Notification`
//!   pseudo-reader in the set so readers plugged in or out are picked up without a restart,
//!   and the PC/SC service itself is waited for (and re-established after `pcscd` restarts).
//! - One presentation is one transaction: after a card was handled, the reader waits until that
//!   card has left the field (or was presented again: pcsc-lite's per-reader event counter
//!   moved) before it hands out a card again.
//! - The card's UID comes from the PC/SC pseudo-APDU GET DATA (`FF CA 00 00 00`), which the
//!   reader answers with the UID it learnt in anticollision.
//! - Transmit errors are mapped to [`TransportError`]: the card removed, reset, unpowered or
//!   mute is [`TransportError::CardGone`] (the gate treats it as a tear and settles later from
//!   the card's counter); a reader unplugged or the service stopped is
//!   [`TransportError::Link`] with what happened. A "successful" transmit with no status word
//!   (what pcscd returns when vpcd's virtual card disconnects mid-command) is `CardGone` too.
//!   Status words are passed through untouched: they are the purse crate's to interpret.

use crate::reader::Reader;
use pcsc::{Context, Disposition, Protocols, ReaderState, Scope, ShareMode, State};
use purse::txn::{Transport, TransportError};
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// PC/SC part 3 GET DATA, P1 = 00: the card's UID as the reader learnt it in anticollision.
pub const GET_DATA_UID: [u8; 5] = [0xFF, 0xCA, 0x00, 0x00, 0x00];

/// How long one `SCardGetStatusChange` waits before the stop flag is looked at again.
const POLL: Duration = Duration::from_millis(250);

/// Why a PC/SC card could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PcscError {
    /// A PC/SC call failed.
    #[error("PC/SC {what}: {source}")]
    Pcsc {
        /// what was being done
        what: String,
        /// pcsc-lite's error
        source: pcsc::Error,
    },
    /// The reader did not give a 7-byte UID for GET DATA.
    #[error(
        "reader {reader:?}: GET DATA (UID) answered {answer}; a tapgate card has a 7-byte UID"
    )]
    Uid {
        /// the reader
        reader: String,
        /// the answer, hex
        answer: String,
    },
}

/// A card connected through a PC/SC reader.
pub struct PcscCard {
    card: Option<pcsc::Card>,
    reader: String,
    uid: [u8; 7],
    gone: bool,
}

impl std::fmt::Debug for PcscCard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcscCard")
            .field("reader", &self.reader)
            .field("uid", &hex_upper(&self.uid))
            .field("gone", &self.gone)
            .finish()
    }
}

impl PcscCard {
    /// Connects to the card on `reader` (shared) and reads its UID with GET DATA.
    pub fn connect(ctx: &Context, reader: &str) -> Result<PcscCard, PcscError> {
        let name = CString::new(reader).map_err(|_| PcscError::Pcsc {
            what: format!("reader name {reader:?}"),
            source: pcsc::Error::InvalidParameter,
        })?;
        let card = ctx
            .connect(&name, ShareMode::Shared, Protocols::ANY)
            .map_err(|source| PcscError::Pcsc {
                what: format!("connecting to the card on {reader:?}"),
                source,
            })?;
        let mut buf = [0u8; pcsc::MAX_BUFFER_SIZE];
        let answer = card
            .transmit(&GET_DATA_UID, &mut buf)
            .map_err(|source| PcscError::Pcsc {
                what: format!("GET DATA (UID) on {reader:?}"),
                source,
            })?;
        let uid = match answer {
            [uid @ .., 0x90, 0x00] if uid.len() == 7 => {
                let mut u = [0u8; 7];
                u.copy_from_slice(uid);
                u
            }
            other => {
                let answer = hex_upper(other);
                let _ = card.disconnect(Disposition::LeaveCard);
                return Err(PcscError::Uid {
                    reader: reader.to_string(),
                    answer,
                });
            }
        };
        Ok(PcscCard {
            card: Some(card),
            reader: reader.to_string(),
            uid,
            gone: false,
        })
    }

    /// The reader's name.
    pub fn reader(&self) -> &str {
        &self.reader
    }

    /// The card's UID.
    pub fn uid(&self) -> [u8; 7] {
        self.uid
    }

    /// Lets the card go: the connection is closed and the card reset, so no session it had
    /// open outlives this transaction.
    pub fn release(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if let Some(c) = self.card.take() {
            let _ = c.disconnect(Disposition::ResetCard);
        }
    }

    /// Maps a transmit error: the card's absence is `CardGone`, the reader's or the service's a
    /// `Link` error that says which.
    fn map_error(&self, e: pcsc::Error) -> TransportError {
        use pcsc::Error as E;
        let r = &self.reader;
        match e {
            E::RemovedCard
            | E::ResetCard
            | E::UnpoweredCard
            | E::NoSmartcard
            | E::UnresponsiveCard => TransportError::CardGone,
            E::ReaderUnavailable | E::UnknownReader => {
                TransportError::Link(format!("reader {r:?} was removed ({e})"))
            }
            E::NoService | E::ServiceStopped | E::Shutdown | E::InvalidHandle => {
                TransportError::Link(format!(
                    "the PC/SC service (pcscd) stopped while talking to {r:?} ({e})"
                ))
            }
            // The reader lost the answer: the card left during it, or the reader failed.
            E::NotTransacted | E::CommError | E::CommDataLost | E::UnknownError => {
                let present = self
                    .card
                    .as_ref()
                    .and_then(|c| c.status2_owned().ok())
                    .is_some_and(|s| !s.status().intersects(pcsc::Status::ABSENT));
                if present {
                    TransportError::Link(format!("reader {r:?}: the card did not answer ({e})"))
                } else {
                    TransportError::CardGone
                }
            }
            e => TransportError::Link(format!("reader {r:?}: {e}")),
        }
    }
}

impl Drop for PcscCard {
    fn drop(&mut self) {
        self.close();
    }
}

impl Transport for PcscCard {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        if self.gone {
            return Err(TransportError::CardGone);
        }
        Ok(self.uid)
    }

    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        if self.gone {
            return Err(TransportError::CardGone);
        }
        let Some(card) = self.card.as_ref() else {
            return Err(TransportError::CardGone);
        };
        let mut buf = [0u8; pcsc::MAX_BUFFER_SIZE_EXTENDED];
        match card.transmit(command, &mut buf) {
            // Every response APDU ends in a status word; nothing at all is a card that left
            // during its answer (vpcd reports a virtual card gone mid-command this way).
            Ok(r) if r.len() < 2 => {
                self.gone = true;
                Err(TransportError::CardGone)
            }
            Ok(r) => Ok(r.to_vec()),
            Err(e) => {
                let te = self.map_error(e);
                if te == TransportError::CardGone {
                    self.gone = true;
                }
                Err(te)
            }
        }
    }
}

/// A PC/SC reader for the gate loop (and, with [`PcscReader::wait_for_card`], for one-off
/// clients): it waits for the service, for a matching reader (hot-plug included) and for a card.
pub struct PcscReader {
    filter: Option<String>,
    stop: Arc<AtomicBool>,
    ctx: Option<Context>,
    /// `[0]` is the PnP pseudo-reader; then the readers that match the filter.
    states: Vec<ReaderState>,
    refresh: bool,
    current: Option<PcscCard>,
    /// The last card handled, by reader and event count: it must leave first.
    handled: Option<(String, u32)>,
    said: String,
}

impl std::fmt::Debug for PcscReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcscReader")
            .field("filter", &self.filter)
            .field("readers", &self.readers())
            .finish_non_exhaustive()
    }
}

impl PcscReader {
    /// A reader whose name contains `filter` (case-insensitive; `None`: the first reader with a
    /// card). `stop` ends any wait.
    pub fn new(filter: Option<String>, stop: Arc<AtomicBool>) -> Self {
        Self {
            filter: filter.filter(|f| !f.is_empty()),
            stop,
            ctx: None,
            states: Vec::new(),
            refresh: true,
            current: None,
            handled: None,
            said: String::new(),
        }
    }

    /// The matching readers seen at the last look.
    pub fn readers(&self) -> Vec<String> {
        self.states
            .iter()
            .skip(1)
            .map(|s| s.name().to_string_lossy().into_owned())
            .collect()
    }

    fn matches(&self, name: &str) -> bool {
        match &self.filter {
            None => true,
            Some(f) => name.to_lowercase().contains(&f.to_lowercase()),
        }
    }

    /// Logs a state of the wait once (not at every poll).
    fn say(&mut self, msg: String) {
        if msg != self.said {
            tracing::warn!("{msg}");
            self.said = msg;
        }
    }

    fn establish(&mut self) -> bool {
        if self.ctx.is_some() {
            return true;
        }
        match Context::establish(Scope::User) {
            Ok(c) => {
                self.ctx = Some(c);
                self.states = vec![ReaderState::new(pcsc::PNP_NOTIFICATION(), State::UNAWARE)];
                self.refresh = true;
                true
            }
            Err(e) => {
                self.say(format!(
                    "PC/SC: the service is not reachable ({e}); waiting for pcscd"
                ));
                false
            }
        }
    }

    /// Re-lists the readers: new matching ones are watched, gone ones dropped.
    fn refresh_readers(&mut self) {
        let Some(ctx) = &self.ctx else { return };
        let names = match ctx.list_readers_owned() {
            Ok(n) => n,
            Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
            Err(e) => {
                self.say(format!("PC/SC: listing readers failed ({e})"));
                return;
            }
        };
        let names: Vec<CString> = names
            .into_iter()
            .filter(|n| self.matches(&n.to_string_lossy()))
            .collect();
        self.states.retain(|s| {
            s.name() == pcsc::PNP_NOTIFICATION() || names.iter().any(|n| n.as_c_str() == s.name())
        });
        for n in names {
            if !self.states.iter().any(|s| s.name() == n.as_c_str()) {
                tracing::info!(reader = %n.to_string_lossy(), "PC/SC reader watched");
                self.states.push(ReaderState::new(n, State::UNAWARE));
            }
        }
        if self.states.len() == 1 {
            let which = match &self.filter {
                Some(f) => format!("a reader whose name contains {f:?}"),
                None => "a reader".to_string(),
            };
            self.say(format!("PC/SC: waiting for {which} to be plugged in"));
        }
        self.refresh = false;
    }

    /// Waits for a card to be presented (until `deadline`, or for ever with `None`); `None`
    /// when the deadline passed or the stop flag was set. The card is held until the next call
    /// or [`Reader::card_removed`].
    pub fn wait_for_card(&mut self, deadline: Option<Instant>) -> Option<&mut PcscCard> {
        if let Some(c) = self.current.take() {
            c.release();
        }
        let mut wait = true;
        loop {
            if self.stop.load(Ordering::Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
                return None;
            }
            if !self.establish() {
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            if self.refresh {
                self.refresh_readers();
            }
            if wait {
                let ctx = self.ctx.as_ref().expect("established");
                let timeout = match deadline {
                    Some(d) => POLL.min(d.saturating_duration_since(Instant::now())),
                    None => POLL,
                };
                match ctx.get_status_change(timeout, &mut self.states) {
                    Ok(()) => {
                        for s in &mut self.states {
                            s.sync_current_state();
                        }
                        let pnp = self.states[0].current_state();
                        if pnp.contains(State::CHANGED) || self.states.len() == 1 {
                            self.refresh = true;
                        }
                        if self.states[1..].iter().any(|s| {
                            s.current_state()
                                .intersects(State::UNKNOWN | State::UNAVAILABLE | State::IGNORE)
                        }) {
                            self.refresh = true;
                        }
                    }
                    Err(pcsc::Error::Timeout) => continue,
                    Err(pcsc::Error::UnknownReader | pcsc::Error::ReaderUnavailable) => {
                        self.refresh = true;
                        continue;
                    }
                    Err(
                        e @ (pcsc::Error::NoService
                        | pcsc::Error::ServiceStopped
                        | pcsc::Error::InvalidHandle
                        | pcsc::Error::Shutdown
                        | pcsc::Error::CommError),
                    ) => {
                        self.say(format!(
                            "PC/SC: the service went away ({e}); waiting for it"
                        ));
                        self.ctx = None;
                        self.states.clear();
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                    Err(e) => {
                        self.say(format!("PC/SC: waiting for a card failed ({e}); retrying"));
                        std::thread::sleep(Duration::from_millis(500));
                        continue;
                    }
                }
            }
            wait = true;
            // Which reader has a card that was not handled yet?
            let mut candidate = None;
            for s in &self.states[1..] {
                let name = s.name().to_string_lossy().into_owned();
                let st = s.current_state();
                if st.contains(State::PRESENT) && !st.contains(State::MUTE) {
                    let seen = (name, s.event_count());
                    if self.handled.as_ref() != Some(&seen) && candidate.is_none() {
                        candidate = Some(seen);
                    }
                } else if st.contains(State::EMPTY)
                    && self.handled.as_ref().is_some_and(|(r, _)| *r == name)
                {
                    self.handled = None;
                }
            }
            let Some((name, count)) = candidate else {
                if self.states.len() > 1 {
                    tracing::debug!(readers = %self.readers().join(", "), "PC/SC: waiting for a card");
                }
                continue;
            };
            let ctx = self.ctx.as_ref().expect("established");
            match PcscCard::connect(ctx, &name) {
                Ok(card) => {
                    self.said.clear();
                    self.handled = Some((name, count));
                    self.current = Some(card);
                    return self.current.as_mut();
                }
                Err(PcscError::Pcsc {
                    source: pcsc::Error::SharingViolation,
                    ..
                }) => {
                    // Another application holds the card exclusively: look again shortly.
                    std::thread::sleep(Duration::from_millis(100));
                    wait = false;
                }
                Err(e) => {
                    // Not a card we can use (or it left at once): wait for the next one.
                    tracing::warn!(error = %e, "card ignored");
                    self.handled = Some((name, count));
                }
            }
        }
    }
}

impl Reader for PcscReader {
    fn wait_card(&mut self) -> Option<&mut dyn Transport> {
        self.wait_for_card(None).map(|c| c as &mut dyn Transport)
    }

    fn card_removed(&mut self) {
        if let Some(c) = self.current.take() {
            c.release();
        }
    }
}

fn hex_upper(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02X}")).collect()
}
