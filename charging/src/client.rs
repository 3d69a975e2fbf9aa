//! The load-relay client: the cardholder's side of `POST /v1/loads`, `POST /v1/reversals` and
//! `POST /v1/loads/{id}/steps`.
//!
//! A [`Client`] starts a load or a reversal, then relays the server's commands to the card over
//! any [`purse::txn::Transport`] (an emulated card, a PC/SC reader) and the card's answers back,
//! until the server gives a final [`Reply`]. It holds no key and cannot change the amount: the
//! card and the HSM talk through it. The bodies it sends are the server's own request types
//! ([`StartLoad`], [`StartReversal`], [`StepBody`]) and the answers it reads are [`Reply`], so the
//! two sides cannot drift apart.
//!
//! A batch of commands stops at the first answer that is not [`Status::Ok`] or
//! [`Status::AdditionalFrame`] (the card has ended the session and would refuse the rest), or
//! when the card leaves the field; the answers the card gave are posted, and whatever the card
//! received is settled by the server at the card's next contact.

use crate::api::{
    Funding, PayPayment, RegisterInstrument, StartLoad, StartReversal, StepBody, IN_PROGRESS,
    UNKNOWN_SESSION,
};
use crate::load::Reply;
use purse::apdu::Status;
use purse::txn::{Transport, TransportError};
use std::time::Duration;

/// How long one HTTP exchange may take before the client gives up (the load is then settled
/// or resumed with the same idempotency key).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a relayed load or reversal did not reach a final answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an HTTP error (4xx: the request; 5xx: the server).
    #[error("server answered {code}: {detail}")]
    Server {
        /// HTTP status code.
        code: u16,
        /// The problem's `detail`, or `(no detail)`.
        detail: String,
    },
    /// The server could not be reached (connection, TLS, timeout).
    #[error("reaching {base}: {source}")]
    Unreachable {
        /// The server's base URL.
        base: String,
        /// What failed.
        source: Box<ureq::Transport>,
    },
    /// The server asks to start again with the same idempotency key (HTTP 409 with error code
    /// `unknown_session`: the step reached a server that does not hold the session; or
    /// `in_progress`: the load is being worked on right now, here or on another server).
    /// [`Client::load`] does, by itself, up to [`RESTARTS`] times.
    #[error("server answered {code} {error}: {detail}")]
    StartAgain {
        /// HTTP status code.
        code: u16,
        /// `unknown_session` or `in_progress`.
        error: String,
        /// The problem's `detail`.
        detail: String,
    },
    /// The server's answer is not a [`Reply`].
    #[error("the server's answer is not a load reply: {0}")]
    BadAnswer(String),
    /// The server sent a command that is not hex.
    #[error("the server sent a command that is not hex")]
    BadCommand,
    /// The server sent a `command` answer with no command in it.
    #[error("the server sent no command to relay")]
    NoCommand,
    /// There was no card to start with.
    #[error("the card left the field before the load started: {0}")]
    NoCard(TransportError),
    /// The card left the field before it answered any command of a batch.
    #[error("{0}: the card left the field; the load is settled at its next contact")]
    CardLeft(TransportError),
}

/// What to load.
#[derive(Clone, Debug)]
pub struct LoadAsk<'a> {
    /// Amount, minor units.
    pub amount_minor: i32,
    /// Funding source name (`card`, `mileage`, `voucher`, …).
    pub source: &'a str,
    /// Instrument at the source (a card token, a membership, a voucher code).
    pub instrument: &'a str,
    /// Idempotency key: the same key resumes the same load and never loads twice.
    pub idempotency_key: &'a str,
    /// Fault injection (demo, tests): the client vanishes mid-dialogue.
    pub vanish: Option<Vanish>,
}

/// Fault injection: where the client vanishes without answering the server (a phone that
/// lost its network, a cardholder who walked away). The load is settled at the card's next
/// contact.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vanish {
    /// At the n-th command relayed (1-based), after delivering it to the card (`deliver`) or
    /// not.
    AtCommand {
        /// 1-based index of the command, counted over the whole dialogue.
        n: usize,
        /// Whether the card receives that command.
        deliver: bool,
    },
    /// Right after delivering the first command with this instruction byte (e.g.
    /// `purse::apdu::ins::COMMIT_TRANSACTION`: the card applied the load, the server never
    /// hears its answer).
    AfterIns(u8),
}

/// How a relay ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The server's final answer (`completed`, `refused` or `pending`).
    Answered(Reply),
    /// The client vanished ([`Vanish`]) in the session with this id.
    Vanished {
        /// The server's session id.
        session_id: String,
    },
}

/// The outcome of a relayed load or reversal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relayed {
    /// How it ended.
    pub ending: Ending,
    /// HTTP round trips made (the start included), in the attempt that ended it.
    pub round_trips: u32,
    /// How many times the load started again with the same idempotency key
    /// ([`Client::load`]; 0 for the rest).
    pub restarts: u32,
}

impl Relayed {
    /// The server's final answer, unless the client vanished.
    pub fn reply(&self) -> Option<&Reply> {
        match &self.ending {
            Ending::Answered(r) => Some(r),
            Ending::Vanished { .. } => None,
        }
    }

    /// The completed load's (amount, balance after, counter), if it completed.
    pub fn completed(&self) -> Option<(i32, i32, u32)> {
        match self.reply()? {
            Reply::Completed {
                amount_minor,
                balance_minor,
                tmc,
                ..
            } => Some((*amount_minor, *balance_minor, *tmc)),
            _ => None,
        }
    }
}

/// How many times [`Client::load`] starts a load again with the same idempotency key (a
/// server that cannot be reached or failed, a step that reached a server not holding the
/// session, a load in progress elsewhere) before it gives up with the last error.
pub const RESTARTS: u32 = 30;

/// A typed client of the charging server's load API for one caller (bearer token), of one
/// server (or a load balancer in front of several) or of several servers it fails over
/// between ([`Client::with_servers`]).
pub struct Client {
    agent: ureq::Agent,
    /// The servers' base URLs (at least one).
    bases: Vec<String>,
    /// The one in use (an index into `bases`).
    current: std::sync::atomic::AtomicUsize,
    token: String,
}

impl Clone for Client {
    fn clone(&self) -> Self {
        Client {
            agent: self.agent.clone(),
            bases: self.bases.clone(),
            current: std::sync::atomic::AtomicUsize::new(self.current_index()),
            token: self.token.clone(),
        }
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("bases", &self.bases)
            .field("token", &"<secret>")
            .finish()
    }
}

impl Client {
    /// A client of the server at `base` (e.g. `https://charging.example`) with the API token
    /// `token`, with its own connection pool and [`DEFAULT_TIMEOUT`].
    pub fn new(base: &str, token: &str) -> Self {
        let agent = ureq::AgentBuilder::new().timeout(DEFAULT_TIMEOUT).build();
        Self::with_agent(agent, base, token)
    }

    /// A client that shares `agent` (its connection pool, TLS and timeouts).
    pub fn with_agent(agent: ureq::Agent, base: &str, token: &str) -> Self {
        Self::with_servers(agent, &[base], token)
    }

    /// A client of several charging servers on one ledger, starting with the first: a load
    /// that cannot go on where it is (the server unreachable or failing, the session not held
    /// there) starts again with the same idempotency key on the next ([`Client::load`]).
    /// `bases` must not be empty.
    pub fn with_servers(agent: ureq::Agent, bases: &[&str], token: &str) -> Self {
        assert!(!bases.is_empty(), "a client needs a server");
        Self {
            agent,
            bases: bases
                .iter()
                .map(|b| b.trim_end_matches('/').to_string())
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
            token: token.to_string(),
        }
    }

    fn current_index(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.bases.len()
    }

    /// The base URL of the server in use.
    pub fn base(&self) -> &str {
        &self.bases[self.current_index()]
    }

    /// Moves on to the next server (the same one when there is only one).
    fn next_server(&self) {
        self.current
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn post<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
        key: Option<&str>,
    ) -> Result<ureq::Response, ClientError> {
        let mut req = self
            .agent
            .post(&format!("{}{path}", self.base()))
            .set("Authorization", &format!("Bearer {}", self.token));
        if let Some(k) = key {
            req = req.set("Idempotency-Key", k);
        }
        self.answer(req.send_json(body))
    }

    /// The server's answer, or its HTTP error as a [`ClientError`].
    fn answer(
        &self,
        result: Result<ureq::Response, ureq::Error>,
    ) -> Result<ureq::Response, ClientError> {
        match result {
            Ok(r) => Ok(r),
            Err(ureq::Error::Status(code, r)) => {
                let body: serde_json::Value = r.into_json().unwrap_or_default();
                let detail = body["detail"].as_str().unwrap_or("(no detail)").to_string();
                match body["error"].as_str() {
                    Some(e @ (UNKNOWN_SESSION | IN_PROGRESS)) => Err(ClientError::StartAgain {
                        code,
                        error: e.to_string(),
                        detail,
                    }),
                    _ => Err(ClientError::Server { code, detail }),
                }
            }
            Err(ureq::Error::Transport(t)) => Err(ClientError::Unreachable {
                base: self.base().to_string(),
                source: Box::new(t),
            }),
        }
    }

    fn call<B: serde::Serialize>(
        &self,
        path: &str,
        body: &B,
        key: Option<&str>,
    ) -> Result<Reply, ClientError> {
        self.post(path, body, key)?
            .into_json()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Registers a card-processor token to the caller's account (`POST /v1/instruments`): a
    /// load is funded only from the caller's own instruments. Already the caller's: nothing to
    /// do; another account's: an error.
    pub fn register_card_token(&self, instrument: &str) -> Result<(), ClientError> {
        let body = RegisterInstrument {
            source: "card".into(),
            instrument: instrument.into(),
        };
        self.post("/v1/instruments", &body, None).map(drop)
    }

    /// `POST /v1/loads`: starts (or, with a used key, resumes or answers again) a load.
    pub fn start_load(&self, uid: &[u8; 7], ask: &LoadAsk<'_>) -> Result<Reply, ClientError> {
        let body = StartLoad {
            card_uid: hex::encode_upper(uid),
            amount_minor: ask.amount_minor,
            funding: Funding {
                source: ask.source.into(),
                instrument: ask.instrument.into(),
            },
        };
        self.call("/v1/loads", &body, Some(ask.idempotency_key))
    }

    /// `POST /v1/reversals`: starts taking back the load that consumed counter `load_tmc`.
    pub fn start_reversal(
        &self,
        uid: &[u8; 7],
        load_tmc: u32,
        idempotency_key: &str,
    ) -> Result<Reply, ClientError> {
        let body = StartReversal {
            card_uid: hex::encode_upper(uid),
            load_tmc,
        };
        self.call("/v1/reversals", &body, Some(idempotency_key))
    }

    /// `POST /v1/payments/{id}/pay`: starts (or, with a used key, answers again) paying the
    /// merchant's payment `payment_id` from the card (`pin`: the card's payment PIN, when its
    /// holder set one and the payment is above its amount).
    pub fn start_payment(
        &self,
        uid: &[u8; 7],
        payment_id: &str,
        idempotency_key: &str,
        pin: Option<&str>,
    ) -> Result<Reply, ClientError> {
        let body = PayPayment {
            card_uid: hex::encode_upper(uid),
            pin: pin.map(str::to_string),
        };
        self.call(
            &format!("/v1/payments/{payment_id}/pay"),
            &body,
            Some(idempotency_key),
        )
    }

    /// Relays collecting the merchant's refund `refund_id` onto the card behind `card` (the
    /// card that paid) from start to the server's final answer.
    pub fn collect_refund(
        &self,
        card: &mut dyn Transport,
        refund_id: &str,
        idempotency_key: &str,
        vanish: Option<Vanish>,
    ) -> Result<Relayed, ClientError> {
        let uid = card.card_uid().map_err(ClientError::NoCard)?;
        let body = PayPayment {
            card_uid: hex::encode_upper(uid),
            pin: None,
        };
        let first = self.call(
            &format!("/v1/refunds/{refund_id}/collect"),
            &body,
            Some(idempotency_key),
        )?;
        self.relay(card, first, vanish)
    }

    /// `GET /v1/payments/{id}`: what the payment asks for (merchant, amount, currency,
    /// description, state).
    pub fn payment(&self, payment_id: &str) -> Result<serde_json::Value, ClientError> {
        let req = self
            .agent
            .get(&format!("{}/v1/payments/{payment_id}", self.base()))
            .set("Authorization", &format!("Bearer {}", self.token));
        self.answer(req.call())?
            .into_json()
            .map_err(|e| ClientError::BadAnswer(e.to_string()))
    }

    /// Relays paying `payment_id` for the card behind `card` from start to the server's final
    /// answer (`vanish`: fault injection, as for loads).
    pub fn pay(
        &self,
        card: &mut dyn Transport,
        payment_id: &str,
        idempotency_key: &str,
        vanish: Option<Vanish>,
    ) -> Result<Relayed, ClientError> {
        self.pay_with_pin(card, payment_id, idempotency_key, None, vanish)
    }

    /// [`Client::pay`] with the card's payment PIN.
    pub fn pay_with_pin(
        &self,
        card: &mut dyn Transport,
        payment_id: &str,
        idempotency_key: &str,
        pin: Option<&str>,
        vanish: Option<Vanish>,
    ) -> Result<Relayed, ClientError> {
        let uid = card.card_uid().map_err(ClientError::NoCard)?;
        let first = self.start_payment(&uid, payment_id, idempotency_key, pin)?;
        self.relay(card, first, vanish)
    }

    /// `POST /v1/loads/{id}/steps`: the card's answers to the commands of step `seq`.
    pub fn step(
        &self,
        session_id: &str,
        seq: u32,
        responses: &[Vec<u8>],
    ) -> Result<Reply, ClientError> {
        let body = StepBody {
            seq,
            responses: responses.iter().map(hex::encode_upper).collect(),
        };
        self.call(&format!("/v1/loads/{session_id}/steps"), &body, None)
    }

    /// Relays one load for the card behind `card` from start to the server's final answer.
    /// When it cannot go on where it is — the server unreachable or failing (5xx), the step
    /// reached a server that does not hold the session (`unknown_session`), the load is being
    /// worked on elsewhere (`in_progress`) — it starts again with the same idempotency key
    /// (on the next server, if it has several), up to [`RESTARTS`] times: the server resolves
    /// what an earlier attempt left on the card, so the card is never loaded twice.
    pub fn load(
        &self,
        card: &mut dyn Transport,
        ask: &LoadAsk<'_>,
    ) -> Result<Relayed, ClientError> {
        let uid = card.card_uid().map_err(ClientError::NoCard)?;
        let mut restarts = 0;
        loop {
            let attempt = self
                .start_load(&uid, ask)
                .and_then(|first| self.relay(card, first, ask.vanish));
            match attempt {
                Ok(mut relayed) => {
                    relayed.restarts = restarts;
                    return Ok(relayed);
                }
                Err(e) if restarts < RESTARTS && start_again(&e) => {
                    restarts += 1;
                    if !matches!(&e, ClientError::StartAgain { error, .. } if error == IN_PROGRESS)
                    {
                        self.next_server();
                    }
                    std::thread::sleep(Duration::from_millis(50 * u64::from(restarts.min(8))));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Relays one reversal of the load that consumed `load_tmc` for the card behind `card`.
    pub fn reverse(
        &self,
        card: &mut dyn Transport,
        load_tmc: u32,
        idempotency_key: &str,
    ) -> Result<Relayed, ClientError> {
        let uid = card.card_uid().map_err(ClientError::NoCard)?;
        let first = self.start_reversal(&uid, load_tmc, idempotency_key)?;
        self.relay(card, first, None)
    }

    /// Relays from the server's answer `reply` (to a start) until a final answer: each batch
    /// of commands to the card, its answers back.
    pub fn relay(
        &self,
        card: &mut dyn Transport,
        mut reply: Reply,
        vanish: Option<Vanish>,
    ) -> Result<Relayed, ClientError> {
        let mut round_trips = 1;
        let mut sent = 0usize;
        while let Reply::Command {
            session_id,
            seq,
            commands,
        } = &reply
        {
            let answers = match relay_batch(card, commands, &mut sent, vanish)? {
                Batch::Answers(a) => a,
                Batch::Vanished => {
                    return Ok(Relayed {
                        ending: Ending::Vanished {
                            session_id: session_id.clone(),
                        },
                        round_trips,
                        restarts: 0,
                    })
                }
            };
            reply = self.step(session_id, *seq, &answers)?;
            round_trips += 1;
        }
        Ok(Relayed {
            ending: Ending::Answered(reply),
            round_trips,
            restarts: 0,
        })
    }
}

/// Whether a load that failed with `e` may start again with the same idempotency key: the
/// server could not be reached or failed, or asked for it. A refusal of the request (4xx) is
/// final; so is the card leaving the field (the load is settled at its next contact).
fn start_again(e: &ClientError) -> bool {
    match e {
        ClientError::StartAgain { .. } | ClientError::Unreachable { .. } => true,
        ClientError::Server { code, .. } => *code >= 500,
        _ => false,
    }
}

/// What one batch of commands gave.
enum Batch {
    /// The card's answers, in command order.
    Answers(Vec<Vec<u8>>),
    /// The client vanished.
    Vanished,
}

/// Whether the card's answer lets the batch go on (the session is still open).
fn session_goes_on(resp: &[u8]) -> bool {
    resp.ends_with(&Status::Ok.sw()) || resp.ends_with(&Status::AdditionalFrame.sw())
}

/// Sends one batch of hex commands to the card; `sent` counts commands over the dialogue.
fn relay_batch(
    card: &mut dyn Transport,
    commands: &[String],
    sent: &mut usize,
    vanish: Option<Vanish>,
) -> Result<Batch, ClientError> {
    let mut answers = Vec::with_capacity(commands.len());
    for c in commands {
        let cmd = hex::decode(c).map_err(|_| ClientError::BadCommand)?;
        *sent += 1;
        match vanish {
            Some(Vanish::AtCommand { n, deliver }) if *sent >= n => {
                if deliver {
                    let _ = card.transmit(&cmd);
                }
                return Ok(Batch::Vanished);
            }
            _ => {}
        }
        match card.transmit(&cmd) {
            Ok(resp) => {
                if matches!(vanish, Some(Vanish::AfterIns(i)) if cmd.get(1) == Some(&i)) {
                    return Ok(Batch::Vanished);
                }
                let goes_on = session_goes_on(&resp);
                answers.push(resp);
                if !goes_on {
                    break;
                }
            }
            // The card left the field (or the reader failed): what it received is settled at
            // its next contact.
            Err(e) if answers.is_empty() => return Err(ClientError::CardLeft(e)),
            Err(_) => break,
        }
    }
    if answers.is_empty() {
        return Err(ClientError::NoCommand);
    }
    Ok(Batch::Answers(answers))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_goes_on_only_while_the_card_keeps_its_session() {
        assert!(session_goes_on(&purse::apdu::response(&[1, 2], Status::Ok)));
        assert!(session_goes_on(&purse::apdu::response(
            &[],
            Status::AdditionalFrame
        )));
        assert!(!session_goes_on(&purse::apdu::response(
            &[],
            Status::IntegrityError
        )));
        assert!(!session_goes_on(&[]));
    }

    #[test]
    fn a_load_starts_again_only_when_the_server_failed_or_asked_for_it() {
        let again = |e: ClientError| start_again(&e);
        assert!(again(ClientError::StartAgain {
            code: 409,
            error: UNKNOWN_SESSION.into(),
            detail: String::new(),
        }));
        assert!(again(ClientError::Server {
            code: 500,
            detail: String::new(),
        }));
        assert!(again(ClientError::Server {
            code: 503,
            detail: String::new(),
        }));
        // A refusal of the request, a card that left: final.
        for code in [400, 403, 404, 409, 422, 429] {
            assert!(!again(ClientError::Server {
                code,
                detail: String::new(),
            }));
        }
        assert!(!again(ClientError::CardLeft(TransportError::CardGone)));
        assert!(!again(ClientError::BadCommand));
    }
}
