//! Versioned migrations (`charging/migrations/NNNN_name.sql`, embedded in the binary), the
//! `schema_version` table, and the check a server makes at start.

use super::{db_error, LedgerError, PgConfig};

/// The migrations this build knows, in order: (version, name, SQL). The schema version of a
/// database is the highest version applied.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "ledger",
        include_str!("../../../migrations/0001_ledger.sql"),
    ),
    (
        2,
        "finance_views",
        include_str!("../../../migrations/0002_finance_views.sql"),
    ),
    (
        3,
        "card_counters",
        include_str!("../../../migrations/0003_card_counters.sql"),
    ),
    (
        4,
        "block_changes_card",
        include_str!("../../../migrations/0004_block_changes_card.sql"),
    ),
    (
        5,
        "expect_rows",
        include_str!("../../../migrations/0005_expect_rows.sql"),
    ),
    (
        6,
        "card_owner",
        include_str!("../../../migrations/0006_card_owner.sql"),
    ),
    (
        7,
        "card_blocked",
        include_str!("../../../migrations/0007_card_blocked.sql"),
    ),
];

/// The schema version this build runs on.
pub fn known_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

const VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_version (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// The highest migration applied to the database behind `client` (0: none, or no table).
fn applied(client: &mut postgres::Client) -> Result<i32, postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?
        .get(0);
    if !exists {
        return Ok(0);
    }
    let v: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_version", &[])?
        .get(0);
    Ok(v.unwrap_or(0))
}

/// Refuses a database whose schema is not exactly [`known_version`].
pub(super) fn check(client: &mut postgres::Client) -> Result<(), LedgerError> {
    let have = applied(client).map_err(|e| db_error(&e))?;
    let want = known_version();
    match have.cmp(&want) {
        std::cmp::Ordering::Equal => Ok(()),
        std::cmp::Ordering::Less => Err(LedgerError::Schema(format!(
            "the ledger database has schema version {have}, this tapgate needs {want}: run `tapgate charging migrate --config …` first"
        ))),
        std::cmp::Ordering::Greater => Err(LedgerError::Schema(format!(
            "the ledger database has schema version {have}, newer than the {want} this tapgate knows: run the tapgate that migrated it (never an older one)"
        ))),
    }
}

/// The schema version of the database `cfg` names. The synchronous client runs where a
/// runtime may be driven (`super::on_this_thread`), so any thread may call it, an async test's
/// included.
pub fn schema_version(cfg: &PgConfig) -> Result<i32, LedgerError> {
    super::on_this_thread(|| {
        let mut client = cfg.connect()?;
        applied(&mut client).map_err(|e| db_error(&e))
    })
}

/// Applies the migrations the database lacks, each in its own transaction with its
/// `schema_version` row, under an advisory lock (two `migrate`s at once apply each migration
/// once). Returns the versions applied (none when it was up to date). A database newer than
/// this build is refused. Callable from any thread (see [`schema_version`]).
pub fn migrate(cfg: &PgConfig) -> Result<Vec<i32>, LedgerError> {
    super::on_this_thread(|| migrate_here(cfg))
}

fn migrate_here(cfg: &PgConfig) -> Result<Vec<i32>, LedgerError> {
    let mut client = cfg.connect()?;
    let e = |e: postgres::Error| db_error(&e);
    // One migrator at a time (a lock held for the session, released at the end), taken before
    // anything is created.
    const LOCK: i64 = 0x7461_7067_6174_6531; // "tapgate1"
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
        .map_err(e)?;
    let result = (|| {
        client.batch_execute(VERSION_TABLE).map_err(e)?;
        let have = applied(&mut client).map_err(e)?;
        if have > known_version() {
            return Err(LedgerError::Schema(format!(
                "the ledger database has schema version {have}, newer than the {} this tapgate knows",
                known_version()
            )));
        }
        let mut done = Vec::new();
        for &(version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > have) {
            let mut tx = client.transaction().map_err(e)?;
            tx.batch_execute(sql).map_err(|err| {
                LedgerError::Schema(format!("migration {version:04}_{name}: {}", db_error(&err)))
            })?;
            tx.execute(
                "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
                &[&version, &name],
            )
            .map_err(e)?;
            tx.commit().map_err(e)?;
            done.push(version);
        }
        Ok(done)
    })();
    let _ = client.execute("SELECT pg_advisory_unlock($1)", &[&LOCK]);
    result
}
