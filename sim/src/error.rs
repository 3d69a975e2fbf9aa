//! What can stop a simulated day.

/// Why the simulated world could not go on.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The world could not be set up as asked (sizes, paths, a sample that does not compile).
    #[error("{0}")]
    Setup(String),
    /// Something the day waits for did not happen in time.
    #[error("{0}")]
    Timeout(String),
    /// A back-office call was answered with an error status.
    #[error("{url}: {status} {detail}")]
    Http {
        /// The URL called.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The answer's `detail`.
        detail: String,
    },
    /// A back-office call did not get an answer.
    #[error("{url}: {why}")]
    Unreachable {
        /// The URL called.
        url: String,
        /// The transport error.
        why: String,
    },
    /// A gate failed (not a refusal: an error of the gate itself).
    #[error("{at}: {why}")]
    Gate {
        /// Which tap (`tap 17`, `end-of-day tap`).
        at: String,
        /// The gate's error.
        why: String,
    },
    /// A load relay failed (not a refusal or a vanished client).
    #[error(transparent)]
    Relay(#[from] charging::client::ClientError),
    /// The ticket office got an answer its day cannot go on from (a refund not collected).
    #[error("ticket office: {0}")]
    Shop(String),
    /// A journal's tap is not where the gate said.
    #[error("{0}")]
    Journal(String),
    /// Files, sockets.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// Key set or card keys.
    #[error(transparent)]
    Keys(#[from] purse::keys::KeyError),
    /// The software SAM or HSM.
    #[error(transparent)]
    Sam(#[from] purse::sam::SamError),
    /// A card dialogue.
    #[error(transparent)]
    Tx(#[from] purse::txn::TxError),
    /// A signed fare table.
    #[error(transparent)]
    Signed(#[from] fare_rules::signed::SignedError),
    /// A validator's journal.
    #[error(transparent)]
    ValidatorJournal(#[from] validator::journal::JournalError),
    /// A gateway's store.
    #[error(transparent)]
    Store(#[from] gateway::store::StoreError),
    /// The charging server.
    #[error(transparent)]
    Charging(#[from] charging::server::ServerError),
    /// The charging server's ledger.
    #[error(transparent)]
    Ledger(#[from] charging::ledger::LedgerError),
    /// A validator's MQTT client.
    #[error(transparent)]
    Mqtt(#[from] rumqttc::ClientError),
}
