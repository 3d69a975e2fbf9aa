//! `tapgate card serve`: an emulated card presented to PC/SC as a virtual ICC through
//! vsmartcard's vpcd, so real PC/SC clients (`tapgate validator --reader pcsc`, `tapgate charge
//! --reader pcsc`, any PC/SC tool) talk to it through `pcscd` as to a card on a reader.
//!
//! vpcd, the pcscd driver, listens on a TCP port per reader slot (35963 for the first); the
//! virtual card connects to it. Every message either way is a 2-byte big-endian length and a
//! payload. A 1-byte payload from vpcd is a control: 0x00 power off, 0x01 power on, 0x02 reset
//! (none answered), 0x04 get ATR (answered with the ATR). Anything longer is a command APDU,
//! answered with the response APDU. While the card is connected, pcscd sees a card in the
//! reader; when the connection closes, the card has left the field.
//!
//! The card keeps its NVM in the image file: it is written atomically after every command that
//! changed it, so a process killed at any point leaves the image of a card that lost power
//! there. A power-off or reset in the middle of a transaction is a tear: volatile state (the
//! session, staged changes) is lost and power-on runs the card's recovery.

use crate::card_cmd::{read_image, write_image};
use crate::cli_util::input_err;
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use purse::card::{Card, Nvm};
use purse::sam::SoftwareHsm;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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

/// What `tapgate card serve` was asked.
pub struct ServeOpts {
    pub card: PathBuf,
    pub keys: PathBuf,
    pub passphrase_file: Option<PathBuf>,
    pub vpcd: String,
    /// Fault injection: the card leaves the field at this command, after executing it and
    /// before its answer reaches the reader. The process then ends.
    pub pull_at: Option<PullAt>,
}

/// Where `--pull-at` pulls the card.
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

/// The emulated card and its image file.
struct VirtualCard {
    card: Card,
    hsm: SoftwareHsm,
    image: PathBuf,
    saved: Nvm,
    rng: rand::rngs::OsRng,
    commands: u64,
}

impl VirtualCard {
    fn open(image: &Path, hsm: SoftwareHsm) -> Result<Self> {
        let nvm = read_image(image)?;
        let keys = hsm
            .card_keys(&nvm.main.uid, nvm.main.key_version)
            .context("deriving the card's keys from the issuer key set")?;
        let card = Card::power_on(nvm.clone(), keys);
        let mut v = Self {
            card,
            hsm,
            image: image.to_path_buf(),
            saved: nvm,
            rng: rand::rngs::OsRng,
            commands: 0,
        };
        v.persist()?; // recovery at power-on may have settled a torn commit
        Ok(v)
    }

    fn uid(&self) -> [u8; 7] {
        self.card.state().uid
    }

    fn persist(&mut self) -> Result<()> {
        if *self.card.nvm() != self.saved {
            write_image(&self.image, self.card.nvm())?;
            self.saved = self.card.nvm().clone();
        }
        Ok(())
    }

    /// Power on (or after a reset): recovery from the NVM image, no session.
    fn power_on(&mut self) -> Result<()> {
        let nvm = self.card.nvm().clone();
        let keys = self
            .hsm
            .card_keys(&nvm.main.uid, nvm.main.key_version)
            .context("deriving the card's keys")?;
        self.card = Card::power_on(nvm, keys);
        self.persist()
    }

    /// Power off, or the card leaves the field: what was not committed is gone.
    fn power_off(&mut self) {
        self.card.remove_from_field();
    }

    /// Executes a command APDU; `None` when the card tore (no answer).
    fn command(&mut self, apdu: &[u8]) -> Result<Option<Vec<u8>>> {
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

/// How a connection to vpcd ended.
enum Ended {
    Stopped,
    VpcdGone(String),
    Pulled,
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
/// `greet` runs at vpcd's first message (a connection alone may sit in the listen backlog of a
/// slot another virtual card holds).
fn session(
    s: &mut TcpStream,
    card: &mut VirtualCard,
    stop: &AtomicBool,
    pull_at: Option<PullAt>,
    greet: &mut dyn FnMut(),
) -> Result<Ended> {
    let mut len = [0u8; 2];
    let connected = std::time::Instant::now();
    let greeted = std::cell::Cell::new(false);
    let mut warned = false;
    let mut idle = || {
        if !greeted.get() && !warned && connected.elapsed() > Duration::from_secs(3) {
            eprintln!(
                "connected, but vpcd has said nothing for 3 s: is another virtual card in this reader slot?"
            );
            warned = true;
        }
    };
    loop {
        if let Err(end) = read_full(s, &mut len, stop, &mut idle) {
            return Ok(end);
        }
        let n = usize::from(u16::from_be_bytes(len));
        let mut msg = vec![0u8; n];
        if let Err(end) = read_full(s, &mut msg, stop, &mut idle) {
            return Ok(end);
        }
        if !greeted.replace(true) {
            greet();
        }
        let answer = match msg.as_slice() {
            [] => continue,
            [CTRL_POWER_OFF] => {
                card.power_off();
                continue;
            }
            [CTRL_POWER_ON] => {
                card.power_on()?;
                continue;
            }
            [CTRL_RESET] => {
                card.power_off();
                card.power_on()?;
                continue;
            }
            [CTRL_ATR] => ATR.to_vec(),
            [c] => {
                eprintln!("vpcd: unknown control byte {c:#04x} ignored");
                continue;
            }
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

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| input_err(format!("--vpcd {addr:?}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| input_err(format!("--vpcd {addr:?}: no address")))
}

/// Runs `tapgate card serve` until Ctrl-C / SIGTERM (or the pull of `--pull-at`).
pub fn run(o: ServeOpts) -> Result<()> {
    let addr = resolve(&o.vpcd)?;
    let ks = load_keyset(&o.keys, o.passphrase_file.as_deref())?;
    let hsm = SoftwareHsm::new(&ks)?;
    let mut card = VirtualCard::open(&o.card, hsm)?;
    let uid = hex::encode_upper(card.uid());

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the signal handler")?;
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                rt.block_on(crate::cli_util::shutdown_signal());
                stop.store(true, Ordering::Relaxed);
            })
            .context("starting the signal handler")?;
    }

    let mut waiting_said = false;
    let how = loop {
        if stop.load(Ordering::Relaxed) {
            break "stopped";
        }
        let mut s = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(s) => s,
            Err(e) => {
                if !waiting_said {
                    eprintln!(
                        "card {uid}: vpcd is not reachable at {addr} ({e}); is pcscd running with vsmartcard-vpcd? retrying"
                    );
                    waiting_said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        waiting_said = false;
        s.set_nodelay(true).ok();
        quick_ack(&s);
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .context("socket timeout")?;
        let mut greet = || println!("card {uid} in the field of vpcd {addr}");
        let end = session(&mut s, &mut card, &stop, o.pull_at, &mut greet)?;
        card.power_off();
        drop(s);
        match end {
            Ended::Stopped => break "stopped",
            Ended::Pulled => break "pulled",
            Ended::VpcdGone(why) => {
                eprintln!("card {uid}: {why}; reconnecting");
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    };
    card.persist()?;
    let st = card.card.state();
    println!(
        "card {uid} {how} after {} commands: balance_minor={} tmc={}",
        card.commands, st.balance_minor, st.tmc
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The vpcd side of the protocol, played by the test over a loopback socket.
    use super::*;
    use purse::card::Personalisation;
    use purse::keys::KeySet;
    use std::net::TcpListener;

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
        let dir = tempfile::tempdir().unwrap();
        let ks = KeySet::generate(&mut rand::rngs::OsRng);
        let hsm = SoftwareHsm::new(&ks).unwrap();
        let uid = [0x04, 1, 2, 3, 4, 5, 6];
        let c = Card::personalise(
            &Personalisation::transit(uid, 700),
            hsm.card_keys(&uid, 1).unwrap(),
        );
        let image = dir.path().join("card.json");
        write_image(&image, c.nvm()).unwrap();
        let mut card = VirtualCard::open(&image, SoftwareHsm::new(&ks).unwrap()).unwrap();

        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
                let mut greeted = 0;
                let end = session(&mut s, &mut card, &stop, None, &mut || greeted += 1).unwrap();
                (matches!(end, Ended::VpcdGone(_)), card.commands, greeted)
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
        let (gone, commands, greeted) = server.join().unwrap();
        assert_eq!(greeted, 1, "in the field once vpcd spoke");
        assert!(gone, "the end of the connection is vpcd going away");
        assert_eq!(commands, 1, "GET DATA is the reader's, not a card command");
        let nvm: Nvm = read_image(&image).unwrap();
        assert_eq!(nvm.main.balance_minor, 700);
    }
}
