//! A front to an MQTT broker that refuses subscriptions while told to, as a broker may for a
//! while (a NATS node whose JetStream is moving leaderships): a SUBSCRIBE is then answered
//! with a SUBACK whose every return code is 0x80 (Failure) and never reaches the broker, so
//! no subscription is made. Everything else passes through, frame by frame.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What the front has been asked to do and what it did.
#[derive(Default)]
struct State {
    refusing: AtomicBool,
    /// Every filter of every SUBSCRIBE: whether it was refused.
    seen: Mutex<Vec<(String, bool)>>,
}

/// The front, listening on a loopback port; it runs for the rest of the test process.
pub struct RefusingFront {
    port: u16,
    state: Arc<State>,
}

impl RefusingFront {
    /// A front to the broker on loopback `broker_port`, refusing subscriptions until
    /// [`Self::allow`].
    pub fn start(broker_port: u16) -> RefusingFront {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the front");
        let port = listener.local_addr().expect("the front's address").port();
        let state = Arc::new(State::default());
        state.refusing.store(true, Ordering::SeqCst);
        let st = state.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                if let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)) {
                    relay(client, broker, st.clone());
                }
            }
        });
        RefusingFront { port, state }
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// From now on subscriptions pass to the broker.
    pub fn allow(&self) {
        self.state.refusing.store(false, Ordering::SeqCst);
    }

    /// How many times a SUBSCRIBE for `filter` was refused, and how many passed.
    pub fn subscriptions(&self, filter: &str) -> (usize, usize) {
        let seen = self.state.seen.lock().expect("front state");
        let of = |refused: bool| {
            seen.iter()
                .filter(|(f, r)| f == filter && *r == refused)
                .count()
        };
        (of(true), of(false))
    }
}

/// Relays one connection, each direction on its own thread; either side closing closes both.
fn relay(client: TcpStream, broker: TcpStream, state: Arc<State>) {
    let (Ok(client_in), Ok(broker_out)) = (client.try_clone(), broker.try_clone()) else {
        return;
    };
    let to_client = Arc::new(Mutex::new(client));
    let down = to_client.clone();
    std::thread::spawn(move || {
        let _ = pass(broker, |frame| write(&down, frame));
        if let Ok(c) = down.lock() {
            let _ = c.shutdown(Shutdown::Both);
        }
    });
    std::thread::spawn(move || {
        let mut broker_out = broker_out;
        let _ = pass(client_in, |frame| match refused_suback(frame, &state) {
            Some(suback) => write(&to_client, &suback),
            None => broker_out.write_all(frame),
        });
        let _ = broker_out.shutdown(Shutdown::Both);
    });
}

fn write(to: &Mutex<TcpStream>, frame: &[u8]) -> io::Result<()> {
    to.lock()
        .map_err(|_| io::Error::other("poisoned"))?
        .write_all(frame)
}

/// Reads whole MQTT frames from `from` and hands each to `on`, until either fails.
fn pass(mut from: TcpStream, mut on: impl FnMut(&[u8]) -> io::Result<()>) -> io::Result<()> {
    loop {
        let mut frame = vec![0u8; 1];
        from.read_exact(&mut frame)?;
        // The remaining length: 1 to 4 bytes of 7 bits, least significant first.
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let mut b = [0u8];
            from.read_exact(&mut b)?;
            frame.push(b[0]);
            len |= usize::from(b[0] & 0x7f) << shift;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let at = frame.len();
        frame.resize(at + len, 0);
        from.read_exact(&mut frame[at..])?;
        on(&frame)?;
    }
}

/// For a SUBSCRIBE while refusing: the SUBACK refusing each of its filters (recorded either
/// way). `None`: the frame goes on to the broker.
fn refused_suback(frame: &[u8], state: &State) -> Option<Vec<u8>> {
    if frame[0] >> 4 != 8 {
        return None;
    }
    let refusing = state.refusing.load(Ordering::SeqCst);
    let body_at = 1 + frame[1..].iter().position(|b| b & 0x80 == 0)? + 1;
    let (pid, mut rest) = (&frame[body_at..body_at + 2], &frame[body_at + 2..]);
    let mut filters = Vec::new();
    while rest.len() >= 3 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let filter = String::from_utf8_lossy(rest.get(2..2 + n)?).into_owned();
        filters.push((filter, refusing));
        rest = rest.get(2 + n + 1..)?;
    }
    let count = filters.len();
    state.seen.lock().ok()?.extend(filters);
    if !refusing {
        return None;
    }
    // Few filters: the remaining length fits one byte.
    let mut suback = vec![0x90, u8::try_from(2 + count).ok()?, pid[0], pid[1]];
    suback.extend(std::iter::repeat_n(0x80, count));
    Some(suback)
}
