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
