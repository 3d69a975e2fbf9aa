//! The fare-table relay: the table the back office published (checked, signed in its HSM;
//! `tapgate fare publish` or the operator console) fetched from `GET /v1/fares/signed/delta`
//! and relayed retained on `tapgate/v1/<operator>/fares/table`, where validators take it once it
//! verifies and is newer than theirs. The gateway cannot forge or alter a table (it has no
//! signing key); one validators would refuse is logged once per version and not relayed. The
//! relaying itself is [`SignedListRelay`]'s. The version relayed is not kept across a restart:
//! the table is then published again, which validators holding it ignore.

use super::signed_list::{SignedList, SignedListRelay, Wanted};
use super::GatewayConfig;
use crate::store::Store;
use std::time::Duration;
use tokio::task::JoinHandle;

/// How often the charging server is asked for a newer table.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Starts the relay (it ends at once without a charging server or with relaying off).
pub(super) fn spawn(
    client: rumqttc::AsyncClient,
    cfg: GatewayConfig,
    store: Store,
    verifying_key: purse::rotation::TrustedKeys,
) -> JoinHandle<()> {
    let relay = SignedListRelay::for_config(client, cfg, store, verifying_key, FareTable);
    tokio::spawn(async move {
        if let Some(r) = relay {
            r.run(POLL_INTERVAL).await;
        }
    })
}

/// The published fare table (a new version replaces the one before).
struct FareTable;

impl SignedList for FareTable {
    const PATH: &'static str = "fares";
    const NAME: &'static str = "fare table";
    const DELTA_TOPIC: &'static str = "table";
    const DELTA_RETAINED: bool = true;
    const SNAPSHOT_TOPIC: &'static str = "table";
    const REPORT_SNAPSHOT_REFUSAL: bool = true;

    /// Signed by the back office, at the version the header says.
    fn check(&self, bytes: &[u8], want: &Wanted) -> Result<(), String> {
        want.key
            .verify_with(
                |k| fare_rules::signed::verify(bytes, k),
                |e| matches!(e, fare_rules::signed::SignedError::Signature),
            )
            .map_err(|e| e.to_string())?;
        let v = fare_rules::signed::peek(bytes)
            .map_err(|e| e.to_string())?
            .version;
        match want.version {
            Some(w) if w == u64::from(v) => Ok(()),
            Some(w) => Err(format!("the header says version {w}, the table {v}")),
            None => Err("no version header".into()),
        }
    }

    fn persist(_: &Store, _: u64) {}
}
