//! Signed notifications of payments' outcomes to merchants.
//!
//! When a payment completes (at once, or settled later from the card's next contact), the same
//! ledger transaction stores a [`Notification`] due at once. [`deliver_due`] (the server runs
//! it every few seconds) POSTs each due one to the payment's `notify_url`:
//!
//! - body: `{"event": "payment.completed", "payment": {…}}` (the payment as
//!   `GET /v1/merchant/payments/{id}` shows it);
//! - header `Tapgate-Signature`: hex Ed25519 signature, by the back office's signing key in the
//!   HSM, over [`SIGNATURE_CONTEXT`] ‖ body. The merchant verifies it with the public key from
//!   `GET /v1/merchant/notification-key`. The context keeps a notification from ever verifying
//!   as a blocklist or fare table signed with the same key.
//!
//! A 2xx answer delivers it; anything else (an error, a timeout, no answer) retries after
//! 5 s, 10 s, 20 s, … up to an hour between attempts, for as long as it takes. The merchant
//! de-duplicates by the payment id (a delivery whose 2xx was lost is sent again).

use crate::api::payment_json;
use crate::ledger::{LedgerError, Notification};
use crate::load::LoadService;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};

/// What the signature covers before the body.
pub const SIGNATURE_CONTEXT: &[u8] = b"tapgate-payment-notification-v1\n";

/// The header carrying the signature.
pub const SIGNATURE_HEADER: &str = "Tapgate-Signature";

/// Most notifications sent per call.
const BATCH: usize = 64;

/// Most notifications in flight at once (a slow merchant holds one of them, at most for the
/// HTTP client's timeout; the others go on).
pub const CONCURRENCY: usize = 8;

/// The wait before attempt `attempts + 1`: 5 s doubled per failure, at most an hour.
pub fn backoff_ms(attempts: u32) -> u64 {
    let doubled = 5_000u64.saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
    doubled.min(3_600_000)
}

/// What one round of deliveries did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delivered {
    /// Answered 2xx.
    pub delivered: u64,
    /// Failed, to be retried.
    pub failed: u64,
}

/// A notification's body and its signature.
pub type SignedBody = (Vec<u8>, [u8; 64]);

/// The body and signature of a payment's notification (`None`: no such payment).
pub fn signed_body(
    loads: &LoadService,
    payment_id: &str,
    now_ms: u64,
) -> Result<Option<SignedBody>, NotifyError> {
    let payment = {
        let r = loads.ledger().read()?;
        r.payment(payment_id)?
    };
    let Some(payment) = payment else {
        return Ok(None);
    };
    let body = serde_json::to_vec(&serde_json::json!({
        "event": "payment.completed",
        "payment": payment_json(&payment, now_ms),
    }))
    .map_err(|e| NotifyError::Body(e.to_string()))?;
    let mut msg = SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(&body);
    let sig = loads
        .hsm()
        .lock()
        .expect("hsm lock")
        .sign(&msg)
        .map_err(|e| NotifyError::Hsm(e.to_string()))?;
    Ok(Some((body, sig)))
}

/// Sends one notification and stores the outcome: `Some(true)` delivered, `Some(false)` failed
/// (retried after [`backoff_ms`]), `None` its payment is gone.
fn deliver_one(
    loads: &LoadService,
    agent: &ureq::Agent,
    mut n: Notification,
    now_ms: u64,
) -> Result<Option<bool>, NotifyError> {
    let Some((body, sig)) = signed_body(loads, &n.payment_id, now_ms)? else {
        return Ok(None);
    };
    let sent = agent
        .post(&n.url)
        .set("Content-Type", "application/json")
        .set(SIGNATURE_HEADER, &hex::encode(sig))
        .send_bytes(&body);
    n.attempts = n.attempts.saturating_add(1);
    let ok = match sent {
        Ok(r) if (200..300).contains(&r.status()) => {
            n.delivered_ms = Some(now_ms);
            n.last_error = None;
            true
        }
        other => {
            let why = match other {
                Ok(r) => format!("answered {}", r.status()),
                Err(ureq::Error::Status(code, _)) => format!("answered {code}"),
                Err(e) => e.to_string(),
            };
            tracing::warn!(payment_id = %n.payment_id, attempts = n.attempts, why, "notification not delivered; retried");
            n.next_attempt_ms = now_ms.saturating_add(backoff_ms(n.attempts));
            n.last_error = Some(why);
            false
        }
    };
    loads.ledger().transact(move |t| t.put_notification(&n))?;
    Ok(Some(ok))
}

/// Sends every notification due at `now_ms`, [`CONCURRENCY`] at a time, and returns when all
/// were answered or timed out (blocking: call it off the async workers). Only the due ones are
/// read (the ledger's due index), earliest due first.
pub fn deliver_due(
    loads: &LoadService,
    agent: &ureq::Agent,
    now_ms: u64,
) -> Result<Delivered, NotifyError> {
    let due = {
        let r = loads.ledger().read()?;
        r.notifications_due(now_ms, BATCH)?
    };
    let workers = due.len().min(CONCURRENCY);
    let queue = std::sync::Mutex::new(due.into_iter());
    let outcomes = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| loop {
                let next = queue.lock().expect("queue lock").next();
                let Some(n) = next else { break };
                let outcome = deliver_one(loads, agent, n, now_ms);
                outcomes.lock().expect("outcomes lock").push(outcome);
            });
        }
    });
    let mut out = Delivered::default();
    for o in outcomes.into_inner().expect("outcomes lock") {
        match o? {
            Some(true) => out.delivered += 1,
            Some(false) => out.failed += 1,
            None => {}
        }
    }
    Ok(out)
}

/// The server's notifier: each tick starts the due notifications that are not in flight yet,
/// at most [`CONCURRENCY`] in flight at once, each on its own thread, and returns at once — a
/// merchant whose endpoint takes its time holds one slot until the HTTP timeout, never the
/// tick nor another merchant's notification.
pub struct Notifier {
    agent: ureq::Agent,
    in_flight: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl Notifier {
    /// A notifier sending with `agent` (its timeout bounds a slow merchant's hold on a slot).
    pub fn new(agent: ureq::Agent) -> Notifier {
        Notifier {
            agent,
            in_flight: Default::default(),
        }
    }

    /// Notifications being sent right now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().expect("in-flight lock").len()
    }

    /// Starts sending the notifications due at `now_ms` that are not in flight, while fewer
    /// than [`CONCURRENCY`] are; returns how many it started. Each records its outcome in the
    /// ledger when its merchant answers (or the timeout passes).
    pub fn start_due(
        &self,
        loads: &std::sync::Arc<LoadService>,
        now_ms: u64,
    ) -> Result<usize, NotifyError> {
        let busy = self.in_flight();
        if busy >= CONCURRENCY {
            return Ok(0);
        }
        // The ones in flight are still due in the index (their outcome is not stored yet).
        let due = {
            let r = loads.ledger().read()?;
            r.notifications_due(now_ms, busy + CONCURRENCY)?
        };
        let mut started = 0;
        for n in due {
            {
                let mut flying = self.in_flight.lock().expect("in-flight lock");
                if flying.len() >= CONCURRENCY {
                    break;
                }
                if !flying.insert(n.payment_id.clone()) {
                    continue;
                }
            }
            let (loads, agent, flying) =
                (loads.clone(), self.agent.clone(), self.in_flight.clone());
            let (id, key) = (n.payment_id.clone(), n.payment_id.clone());
            let spawned = std::thread::Builder::new()
                .name("notify".into())
                .spawn(move || {
                    if let Err(e) = deliver_one(&loads, &agent, n, now_ms) {
                        tracing::error!(%e, payment_id = %id, "storing a notification's outcome failed; retried");
                    }
                    flying.lock().expect("in-flight lock").remove(&id);
                });
            if let Err(e) = spawned {
                tracing::error!(%e, "cannot start a notification thread; retried at the next tick");
                self.in_flight.lock().expect("in-flight lock").remove(&key);
                break;
            }
            started += 1;
        }
        Ok(started)
    }
}

/// Why a round of deliveries stopped.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The HSM could not sign.
    #[error("signing the notification: {0}")]
    Hsm(String),
    /// The body could not be made.
    #[error("notification body: {0}")]
    Body(String),
}

#[cfg(test)]
mod tests {
    use super::backoff_ms;

    #[test]
    fn retries_back_off_to_an_hour() {
        assert_eq!(backoff_ms(1), 5_000);
        assert_eq!(backoff_ms(2), 10_000);
        assert_eq!(backoff_ms(5), 80_000);
        assert_eq!(backoff_ms(12), 3_600_000);
        assert_eq!(backoff_ms(u32::MAX), 3_600_000);
    }
}

/// Whether `ip` is not a public address: loopback, private, link-local, unspecified, shared
/// (100.64/10), "this network" (0/8), IPv6 unique-local, or the IPv4-mapped or NAT64 form of one
/// of those. A merchant's notification is never sent to such an address unless the operator
/// allows it (`[limits.payments] notify_private_hosts`).
pub fn not_public(ip: IpAddr) -> bool {
    let v4 = |a: Ipv4Addr| {
        let [o0, o1, ..] = a.octets();
        a.is_loopback()
            || a.is_private()
            || a.is_link_local()
            || a.is_broadcast()
            || o0 == 0
            || (o0 == 100 && (64..128).contains(&o1))
    };
    match ip {
        IpAddr::V4(a) => v4(a),
        IpAddr::V6(a) => {
            let s = a.segments();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            match a.to_ipv4_mapped() {
                Some(m) => v4(m),
                None if nat64 => v4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                )),
                None => {
                    a.is_loopback()
                        || a.is_unspecified()
                        || s[0] & 0xfe00 == 0xfc00
                        || s[0] & 0xffc0 == 0xfe80
                }
            }
        }
    }
}

/// The notifications' name resolver: the system's, keeping only public addresses. The check of
/// a `notify_url` when the payment is made reads only its text; a public name can still resolve
/// to a private address (or be re-pointed at one later), so the addresses are checked again
/// here, when each notification is sent, and those are the only ones the client connects to.
#[derive(Clone, Copy, Debug, Default)]
pub struct PublicOnly;

impl ureq::Resolver for PublicOnly {
    fn resolve(&self, netloc: &str) -> std::io::Result<Vec<SocketAddr>> {
        let all: Vec<SocketAddr> = netloc.to_socket_addrs()?.collect();
        let public: Vec<SocketAddr> = all
            .iter()
            .copied()
            .filter(|a| !not_public(a.ip()))
            .collect();
        if public.is_empty() && !all.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "{netloc} resolves only to addresses that are not public ({}); \
                     [limits.payments] notify_private_hosts allows them",
                    all.iter()
                        .map(|a| a.ip().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(public)
    }
}

/// The HTTP client that sends notifications: `timeout` per request, no redirects (a merchant's
/// endpoint cannot bounce the signed POST elsewhere) and, unless `private_hosts`, only public
/// addresses ([`PublicOnly`]).
pub fn agent(timeout: std::time::Duration, private_hosts: bool) -> ureq::Agent {
    let b = ureq::AgentBuilder::new().timeout(timeout).redirects(0);
    if private_hosts {
        b.build()
    } else {
        b.resolver(PublicOnly).build()
    }
}

#[cfg(test)]
mod resolver_tests {
    use super::*;
    use ureq::Resolver;

    /// Whatever a name or an address resolves to, only public addresses are kept; a netloc
    /// with none is refused with the addresses it named (a public name re-pointed at the back
    /// office's network, DNS rebinding, is caught here, when the notification is sent).
    #[test]
    fn only_public_addresses_are_resolved() {
        for netloc in [
            "localhost:80",
            "127.0.0.1:443",
            "10.1.2.3:80",
            "[::1]:80",
            "[::ffff:192.168.0.1]:80",
            "[64:ff9b::a00:1]:80",
            "100.64.0.1:80",
            "0.0.0.0:80",
        ] {
            let e = PublicOnly.resolve(netloc).expect_err(netloc);
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{netloc}");
            assert!(e.to_string().contains("notify_private_hosts"), "{e}");
        }
        let public = PublicOnly.resolve("93.184.216.34:443").unwrap();
        assert_eq!(public, vec!["93.184.216.34:443".parse().unwrap()]);
    }

    /// A server that allows private hosts resolves them as the system does (its tests and an
    /// operator's own network); one that does not, refuses before any connection.
    #[test]
    fn the_agent_keeps_private_addresses_only_when_allowed() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
        let refused = agent(std::time::Duration::from_secs(2), false)
            .post(&url)
            .send_string("{}");
        match refused {
            Err(ureq::Error::Transport(t)) => {
                assert!(t.to_string().contains("not public"), "{t}")
            }
            other => panic!("sent to a loopback address: {other:?}"),
        }
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            s.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
        });
        let allowed = agent(std::time::Duration::from_secs(2), true)
            .post(&url)
            .send_string("{}");
        assert_eq!(allowed.expect("allowed").status(), 204);
    }
}
