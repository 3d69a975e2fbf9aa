//! An emulated card presented to PC/SC as a virtual ICC through vsmartcard's vpcd, so real
//! PC/SC clients (the validator's `PcscReader`, `tapgate charge --reader pcsc`, any PC/SC
//! tool) talk to it through `pcscd` as to a card on a reader. `tapgate card serve` runs it.
//!
//! vpcd, the pcscd driver, listens on a TCP port per reader slot (35963 for the first); the
//! virtual card connects to it. Every message either way is a 2-byte big-endian length and a
//! payload. A 1-byte payload from vpcd is a control: 0x00 power off, 0x01 power on, 0x02 reset
//! (none answered), 0x04 get ATR (answered with the ATR). Anything longer is a command APDU,
//! answered with the response APDU. While the card is connected, pcscd sees a card in the
//! reader; when the connection closes, the card has left the field.
//!
//! The card hands its NVM to a saver after every command that changed it (`tapgate card
//! serve` writes the image file atomically), so a process killed at any point leaves the image
//! of a card that lost power there. A power-off or reset in the middle of a transaction is a
//! tear: volatile state (the session, staged changes) is lost and power-on runs the card's
//! recovery.
//!
//! This module needs no PC/SC library: it is a TCP client of vpcd.

use purse::card::{Card, Nvm};
use purse::sam::SoftwareHsm;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// vpcd's default port (its first reader slot).
pub const VPCD_DEFAULT: &str = "127.0.0.1:35963";

/// The ATR of a DESFire EV2 behind a PC/SC contactless reader (PC/SC part 3: T=1, one
/// historical byte 0x80).
pub const ATR: [u8; 6] = [0x3B, 0x81, 0x80, 0x01, 0x80, 0x80];

const CTRL_POWER_OFF: u8 = 0x00;
const CTRL_POWER_ON: u8 = 0x01;
const CTRL_RESET: u8 = 0x02;
const CTRL_ATR: u8 = 0x04;

/// How long vpcd may stay silent on a new connection before [`Event::Quiet`].
const QUIET_WARNING: Duration = Duration::from_secs(3);

/// Why the virtual card stopped.
#[derive(Debug, thiserror::Error)]
pub enum VpcdError {
    /// The card's keys could not be derived from the issuer key set.
    #[error("deriving the card's keys from the issuer key set: {0}")]
    Keys(#[from] purse::sam::SamError),
    /// The card's image could not be saved.
    #[error("saving the card image: {0}")]
    Save(String),
    /// The socket could not be set up.
    #[error("socket: {0}")]
    Socket(#[from] std::io::Error),
}

/// Where the card is pulled from the field (fault injection).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PullAt {
    /// At the N-th command APDU (GET DATA UID, answered by the reader, does not count).
    Command(u64),
    /// At the first CommitTransaction.
    Commit,
}

impl std::str::FromStr for PullAt {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "commit" => Ok(PullAt::Commit),
            n => match n.parse::<u64>() {
                Ok(n) if n > 0 => Ok(PullAt::Command(n)),
                _ => Err(format!(
                    "{s:?}: expected a command number (1, 2, …) or `commit`"
                )),
            },
        }
    }
}

impl PullAt {
    /// Whether `apdu`, the card's `n`-th command, is where the card is pulled.
    fn hits(self, n: u64, apdu: &[u8]) -> bool {
        match self {
            PullAt::Command(at) => n == at,
            PullAt::Commit => {
                apdu.len() >= 2
                    && apdu[0] == 0x90
                    && apdu[1] == purse::apdu::ins::COMMIT_TRANSACTION
            }
        }
    }
}

/// Saves the card's NVM after it changed (an error message on failure).
pub type Saver = Box<dyn FnMut(&Nvm) -> Result<(), String> + Send>;

/// The emulated card and where its image goes.
pub struct VirtualCard {
    card: Card,
    hsm: SoftwareHsm,
    save: Saver,
    saved: Nvm,
    rng: rand::rngs::OsRng,
    commands: u64,
}

impl VirtualCard {
    /// Powers on the card of `nvm` (its keys from `hsm`), saving its image with `save`
    /// whenever it changes — at once if power-on recovery settled a torn commit.
    pub fn open(nvm: Nvm, hsm: SoftwareHsm, save: Saver) -> Result<Self, VpcdError> {
        let keys = hsm.card_keys_of(&nvm.main)?;
        let card = Card::power_on(nvm.clone(), keys);
        let mut v = Self {
            card,
            hsm,
            save,
            saved: nvm,
            rng: rand::rngs::OsRng,
            commands: 0,
        };
        v.persist()?;
        Ok(v)
    }

    /// The card's UID.
    pub fn uid(&self) -> [u8; 7] {
        self.card.state().uid
    }

    /// The card itself.
    pub fn card(&self) -> &Card {
        &self.card
    }

    /// Command APDUs executed so far (not counting the reader's GET DATA).
    pub fn commands(&self) -> u64 {
        self.commands
    }

    /// Saves the image if the NVM changed since the last save.
    pub fn persist(&mut self) -> Result<(), VpcdError> {
        if *self.card.nvm() != self.saved {
            (self.save)(self.card.nvm()).map_err(VpcdError::Save)?;
            self.saved = self.card.nvm().clone();
        }
        Ok(())
    }

    /// Power on (or after a reset): recovery from the NVM image, no session.
    fn power_on(&mut self) -> Result<(), VpcdError> {
        let nvm = self.card.nvm().clone();
        let keys = self.hsm.card_keys_of(&nvm.main)?;
        self.card = Card::power_on(nvm, keys);
        self.persist()
    }

    /// Power off, or the card leaves the field: what was not committed is gone.
    pub fn power_off(&mut self) {
        self.card.remove_from_field();
    }

    /// Executes a command APDU; `None` when the card tore (no answer).
    fn command(&mut self, apdu: &[u8]) -> Result<Option<Vec<u8>>, VpcdError> {
        // PC/SC part 3 GET DATA: answered by the reader from anticollision, not by the card.
        if apdu.len() >= 4 && apdu[0] == 0xFF && apdu[1] == 0xCA {
            let mut r = match (apdu[2], apdu[3]) {
                (0x00, 0x00) => self.uid().to_vec(),
                _ => Vec::new(),
            };
            r.extend_from_slice(if r.is_empty() {
                &[0x6A, 0x81]
            } else {
                &[0x90, 0x00]
            });
            return Ok(Some(r));
        }
        self.commands += 1;
        let r = self.card.process(apdu, &mut self.rng);
        self.persist()?;
        Ok(r.ok())
    }
}

/// What happens while the card is served, for the caller to report.
#[derive(Debug)]
pub enum Event<'a> {
    /// vpcd is not reachable (said once until it is).
    Unreachable {
        /// The error.
        why: &'a str,
    },
    /// vpcd spoke on a new connection: the card is in the reader's field.
    InField,
    /// Connected, but vpcd said nothing for a while: another virtual card may hold the slot.
    Quiet,
    /// vpcd sent a control byte this card does not know (ignored).
    UnknownControl(u8),
    /// The connection ended; the card reconnects.
    Reconnecting {
        /// Why it ended.
        why: &'a str,
    },
}

/// How serving ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Served {
    /// The stop flag was set.
    Stopped,
    /// The card was pulled at [`PullAt`].
    Pulled,
}

/// How one connection to vpcd ended.
enum Ended {
    Stopped,
    VpcdGone(String),
    Pulled,
}

/// Serves `card` to vpcd at `addr`, reconnecting whenever vpcd goes away, until `stop` is set
/// or the card is pulled at `pull_at`. The image is saved at the end.
pub fn serve(
    addr: SocketAddr,
    card: &mut VirtualCard,
    stop: &AtomicBool,
    pull_at: Option<PullAt>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Served, VpcdError> {
    let mut unreachable_said = false;
    let served = loop {
        if stop.load(Ordering::Relaxed) {
            break Served::Stopped;
        }
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => {
                if !unreachable_said {
                    on_event(Event::Unreachable {
                        why: &e.to_string(),
                    });
                    unreachable_said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        unreachable_said = false;
        s.set_nodelay(true).ok();
        quick_ack(&s);
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
        let end = session(&mut s, card, stop, pull_at, on_event)?;
        card.power_off();
        drop(s);
        match end {
            Ended::Stopped => break Served::Stopped,
            Ended::Pulled => break Served::Pulled,
            Ended::VpcdGone(why) => {
                on_event(Event::Reconnecting { why: &why });
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    card.persist()?;
    Ok(served)
}

/// Reads exactly `buf.len()` bytes, looking at `stop` (and calling `idle`) while vpcd is quiet.
fn read_full(
    s: &mut TcpStream,
    buf: &mut [u8],
    stop: &AtomicBool,
    idle: &mut dyn FnMut(),
) -> Result<(), Ended> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(Ended::VpcdGone("vpcd closed the connection".into())),
            Ok(n) => {
                got += n;
                quick_ack(s);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if stop.load(Ordering::Relaxed) {
                    return Err(Ended::Stopped);
                }
                idle();
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(Ended::VpcdGone(e.to_string())),
        }
    }
    Ok(())
}

/// Acknowledges at once. vpcd (Debian's 3.3) writes a message's length and its payload in
/// two sends on a socket with Nagle's algorithm on, so the payload waits for the length's ACK:
/// with delayed ACKs that is ~40 ms per APDU (measured: 44 ms per command, 580 ms per tap).
fn quick_ack(s: &TcpStream) {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "fuchsia",
        target_os = "cygwin"
    ))]
    let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "fuchsia",
        target_os = "cygwin"
    )))]
    let _ = s;
}

fn send(s: &mut TcpStream, payload: &[u8]) -> Result<(), Ended> {
    let len = u16::try_from(payload.len())
        .map_err(|_| Ended::VpcdGone("answer longer than 65535 bytes".into()))?;
    let mut msg = Vec::with_capacity(payload.len() + 2);
    msg.extend_from_slice(&len.to_be_bytes());
    msg.extend_from_slice(payload);
    s.write_all(&msg)
        .map_err(|e| Ended::VpcdGone(e.to_string()))
}

/// Serves vpcd on one connection until it closes, the stop flag is set or the card is pulled.
/// [`Event::InField`] comes at vpcd's first message (a connection alone may sit in the listen
/// backlog of a slot another virtual card holds).
fn session(
    s: &mut TcpStream,
    card: &mut VirtualCard,
    stop: &AtomicBool,
    pull_at: Option<PullAt>,
    on_event: &mut dyn FnMut(Event<'_>),
) -> Result<Ended, VpcdError> {
    let mut len = [0u8; 2];
    let connected = std::time::Instant::now();
    let mut greeted = false;
    let mut warned = false;
    loop {
        let mut idle = || {
            if !greeted && !warned && connected.elapsed() > QUIET_WARNING {
                on_event(Event::Quiet);
                warned = true;
            }
        };
        if let Err(end) = read_full(s, &mut len, stop, &mut idle) {
            return Ok(end);
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if let Err(end) = read_full(s, &mut msg, stop, &mut idle) {
            return Ok(end);
        }
        if !greeted {
            greeted = true;
            on_event(Event::InField);
        }
        let answer = match msg.as_slice() {
            [] => continue,
            [c] => match control(card, *c)? {
                Some(a) => a,
                None => {
                    if ![CTRL_POWER_OFF, CTRL_POWER_ON, CTRL_RESET].contains(c) {
                        on_event(Event::UnknownControl(*c));
                    }
                    continue;
                }
            },
            apdu => {
                let pull = !(apdu[0] == 0xFF && apdu[1] == 0xCA)
                    && pull_at.is_some_and(|p| p.hits(card.commands + 1, apdu));
                let r = card.command(apdu)?;
                if pull {
                    card.power_off();
                    return Ok(Ended::Pulled);
                }
                match r {
                    Some(r) => r,
                    None => {
                        // The card tore: it answers nothing until it is powered again.
                        card.power_on()?;
                        continue;
                    }
                }
            }
        };
        if let Err(end) = send(s, &answer) {
            return Ok(end);
        }
    }
}

/// A control byte from vpcd: power off, power on, reset (none answered), get ATR.
fn control(card: &mut VirtualCard, c: u8) -> Result<Option<Vec<u8>>, VpcdError> {
    match c {
        CTRL_POWER_OFF => card.power_off(),
        CTRL_POWER_ON => card.power_on()?,
        CTRL_RESET => {
            card.power_off();
            card.power_on()?;
        }
        CTRL_ATR => return Ok(Some(ATR.to_vec())),
        _ => {}
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    //! The vpcd side of the protocol, played by the test over a loopback socket.
    use super::*;
    use purse::card::Personalisation;
    use purse::keys::KeySet;
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    fn frame(s: &mut TcpStream, payload: &[u8]) {
        let mut m = (payload.len() as u16).to_be_bytes().to_vec();
        m.extend_from_slice(payload);
        s.write_all(&m).unwrap();
    }

    fn answer(s: &mut TcpStream) -> Vec<u8> {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).unwrap();
        let mut b = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut b).unwrap();
        b
    }

    #[test]
    fn speaks_vpcd_atr_uid_apdus_and_keeps_the_image() {
        let ks = KeySet::generate(&mut rand::rngs::OsRng);
        let hsm = SoftwareHsm::new(&ks).unwrap();
        let uid = [0x04, 1, 2, 3, 4, 5, 6];
        let c = Card::personalise(
            &Personalisation::transit(uid, 700),
            hsm.card_keys(&uid, 1).unwrap(),
        );
        let image: Arc<Mutex<Option<Nvm>>> = Arc::default();
        let saved = image.clone();
        let save: Saver = Box::new(move |nvm| {
            *saved.lock().unwrap() = Some(nvm.clone());
            Ok(())
        });
        let mut card =
            VirtualCard::open(c.nvm().clone(), SoftwareHsm::new(&ks).unwrap(), save).unwrap();

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut greeted = 0;
                let end = session(&mut s, &mut card, &stop, None, &mut |e| {
                    if matches!(e, Event::InField) {
                        greeted += 1
                    }
                })
                .unwrap();
                card.persist().unwrap();
                let balance = card.card().state().balance_minor;
                (
                    matches!(end, Ended::VpcdGone(_)),
                    card.commands,
                    greeted,
                    balance,
                )
            })
        };
        let (mut v, _) = l.accept().unwrap();
        frame(&mut v, &[CTRL_POWER_ON]);
        frame(&mut v, &[CTRL_ATR]);
        assert_eq!(answer(&mut v), ATR);
        frame(&mut v, &[0xFF, 0xCA, 0x00, 0x00, 0x00]);
        let mut want = uid.to_vec();
        want.extend_from_slice(&[0x90, 0x00]);
        assert_eq!(answer(&mut v), want);
        // SelectApplication: the card's own answer (DESFire OK 91 00).
        frame(
            &mut v,
            &purse::apdu::wrap(
                purse::apdu::ins::SELECT_APPLICATION,
                &purse::keys::DEFAULT_AID,
            ),
        );
        assert_eq!(answer(&mut v), [0x91, 0x00]);
        frame(&mut v, &[CTRL_RESET]);
        frame(&mut v, &[CTRL_POWER_OFF]);
        drop(v);
        let (gone, commands, greeted, balance) = server.join().unwrap();
        assert_eq!(greeted, 1, "in the field once vpcd spoke");
        assert!(gone, "the end of the connection is vpcd going away");
        assert_eq!(commands, 1, "GET DATA is the reader's, not a card command");
        assert_eq!(balance, 700);
        // Selecting and power cycles change no NVM: nothing to save (saved only when changed).
        assert!(image.lock().unwrap().is_none());
    }
}
