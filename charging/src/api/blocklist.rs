//! The blocklist: numbered changes and the HSM-signed snapshot and delta the gateways relay.

use super::snapshot_cache::SignedSnapshot;
use super::*;
use crate::ledger::LedgerRead;
use purse::blocklist::{ListKind, ListUpdate};

#[derive(Deserialize)]
pub(super) struct ChangesQuery {
    #[serde(default)]
    pub(super) after: u64,
    #[serde(default = "default_limit")]
    pub(super) limit: usize,
}

pub(super) fn default_limit() -> usize {
    10_000
}

/// `GET /v1/blocklist/changes?after=N&limit=M` (gateway, operator): numbered block and unblock
/// changes, for the gateway to sign and publish in order.
pub(super) async fn block_changes(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    let l = st.loads.ledger();
    let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
    let (changes, latest) = r
        .block_changes(q.after, q.limit.clamp(1, 100_000))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(Json(
        serde_json::json!({"latest_version": latest, "changes": changes}),
    ))
}

pub(super) fn signed_list(
    st: &AppState,
    update: &purse::blocklist::ListUpdate,
) -> Result<Response, ApiError> {
    let bytes = sign_body(st, update.body())?;
    Ok(signed_list_response(
        "x-tapgate-blocklist-version",
        update.to_version,
        bytes,
    ))
}

/// A signed list's answer: its bytes as `application/octet-stream`, its version in the
/// `version_header` the gateway reads it from.
pub(super) fn signed_list_response(
    version_header: &'static str,
    version: u64,
    bytes: impl IntoResponse,
) -> Response {
    (
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/octet-stream".to_string(),
            ),
            (
                axum::http::HeaderName::from_static(version_header),
                version.to_string(),
            ),
        ],
        bytes,
    )
        .into_response()
}

/// The signed list a handler answers with: the read (`update`, in one ledger snapshot; `None`
/// when there is nothing to list) on the blocking pool, then the HSM's signature; 204 when
/// there is nothing.
async fn signed_answer(
    st: AppState,
    headers: HeaderMap,
    update: impl FnOnce(&dyn LedgerRead, &str) -> Result<Option<ListUpdate>, ApiError> + Send + 'static,
) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let l = st.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        let update = update(&*r, &st.operator)?;
        drop(r);
        match update {
            Some(u) => signed_list(&st, &u),
            None => Ok(StatusCode::NO_CONTENT.into_response()),
        }
    })
    .await
}

/// `?chunked=1` on the snapshot: the list in signed chunks.
#[derive(Deserialize)]
pub(super) struct SnapshotQuery {
    #[serde(default)]
    chunked: u8,
}

/// The latest version and every card blocked at it (sorted).
type BlockedCards = (u64, Vec<[u8; 7]>);

/// Every blocked card at the latest version, or `None` before the first change.
fn blocked_cards(r: &dyn LedgerRead) -> Result<Option<BlockedCards>, ApiError> {
    let latest = latest_version(r)?;
    if latest == 0 {
        return Ok(None);
    }
    let mut uids: Vec<[u8; 7]> = r
        .blocked_cards()
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .into_iter()
        .filter(|(_, c)| c.blocked)
        .map(|(uid, _)| uid)
        .collect();
    uids.sort_unstable();
    uids.dedup();
    Ok(Some((latest, uids)))
}

/// `GET /v1/blocklist/signed/snapshot` (gateway, operator): every blocked card at the latest
/// version, signed by the back office (wire format: purse::blocklist). With `?chunked=1` (the
/// gateway's relay), a list of more than `purse::blocklist::chunked::CHUNK_ENTRIES` cards is
/// cut into sorted chunks of that many cards, each signed (format 2), answered as
/// `application/x-tapgate-chunks` — each chunk preceded by its length (4 bytes, big-endian) —
/// with the chunk count in `x-tapgate-blocklist-chunks`; a smaller list is the one message.
pub(super) async fn signed_snapshot(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<SnapshotQuery>,
) -> Result<Response, ApiError> {
    if q.chunked != 0 {
        return chunked_snapshot(st, headers).await;
    }
    signed_answer(st, headers, |r, operator| {
        Ok(blocked_cards(r)?.map(|(latest, uids)| ListUpdate {
            kind: ListKind::Snapshot,
            operator: operator.to_string(),
            from_version: 0,
            to_version: latest,
            entries: uids.into_iter().map(|u| (u, true)).collect(),
        }))
    })
    .await
}

/// The chunked snapshot: the answer kept for the latest version
/// ([`SnapshotCache`](super::snapshot_cache::SnapshotCache)), built
/// (one ledger read, every chunk signed by the HSM) only when the version has changed.
async fn chunked_snapshot(st: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let latest = {
            let l = st.loads.ledger();
            let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
            latest_version(&*r)?
        };
        if latest == 0 {
            return Ok(StatusCode::NO_CONTENT.into_response());
        }
        let answer = st
            .blocklist_snapshot
            .get_or_build(latest, || signed_chunks(&st))?;
        Ok(snapshot_response(&answer))
    })
    .await
}

/// The latest blocklist version (0 before the first change).
fn latest_version(r: &dyn LedgerRead) -> Result<u64, ApiError> {
    let (_, latest) = r
        .block_changes(u64::MAX - 1, 1)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(latest)
}

/// Reads the blocked cards and signs them: one message when they fit one chunk (which every
/// validator takes), otherwise chunks of `CHUNK_ENTRIES`, each preceded by its length and
/// signed one at a time (one chunk's keys held, not the whole list's).
fn signed_chunks(st: &AppState) -> Result<SignedSnapshot, ApiError> {
    use purse::blocklist::chunked::{cut_iter, CHUNK_ENTRIES};
    let cards = {
        let l = st.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        blocked_cards(&*r)?
    };
    let (latest, uids) =
        cards.ok_or_else(|| ApiError::Internal("the blocklist has no version".into()))?;
    if uids.len() <= CHUNK_ENTRIES {
        let update = ListUpdate {
            kind: ListKind::Snapshot,
            operator: st.operator.clone(),
            from_version: 0,
            to_version: latest,
            entries: uids.into_iter().map(|u| (u, true)).collect(),
        };
        return Ok(SignedSnapshot {
            version: latest,
            chunks: None,
            bytes: sign_body(st, update.body())?.into(),
        });
    }
    let chunks = cut_iter(&st.operator, latest, &uids, CHUNK_ENTRIES);
    let count = chunks.len();
    let mut out = Vec::with_capacity(uids.len() * 7 + count * (4 + 128 + st.operator.len()));
    for c in chunks {
        let signed = sign_body(st, c.body())?;
        out.extend_from_slice(&(signed.len() as u32).to_be_bytes());
        out.extend_from_slice(&signed);
    }
    Ok(SignedSnapshot {
        version: latest,
        chunks: Some(count),
        bytes: out.into(),
    })
}

/// `body` followed by the HSM's signature of it.
fn sign_body(st: &AppState, mut body: Vec<u8>) -> Result<Vec<u8>, ApiError> {
    let sig = st
        .loads
        .hsm()
        .lock()
        .expect("hsm lock")
        .sign(&body)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    body.extend_from_slice(&sig);
    Ok(body)
}

/// The answer of a kept snapshot: one message as `application/octet-stream`, chunks as
/// `application/x-tapgate-chunks` with their count in `x-tapgate-blocklist-chunks`.
fn snapshot_response(s: &SignedSnapshot) -> Response {
    let mut resp = signed_list_response("x-tapgate-blocklist-version", s.version, s.bytes.clone());
    if let Some(count) = s.chunks {
        let h = resp.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/x-tapgate-chunks"),
        );
        h.insert(
            axum::http::HeaderName::from_static("x-tapgate-blocklist-chunks"),
            axum::http::HeaderValue::from(count),
        );
    }
    resp
}

/// `GET /v1/blocklist/signed/delta?after=N` (gateway, operator): the changes after version N,
/// signed; 204 when there are none.
pub(super) async fn signed_delta(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<ChangesQuery>,
) -> Result<Response, ApiError> {
    signed_answer(st, headers, move |r, operator| {
        let (changes, _) = r
            .block_changes(q.after, q.limit.clamp(1, 1_000_000))
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        let Some(last) = changes.last().map(|c| c.version) else {
            return Ok(None);
        };
        let mut entries = Vec::with_capacity(changes.len());
        for c in &changes {
            let uid: [u8; 7] = hex::decode(&c.card_uid)
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| ApiError::Internal(format!("stored UID {:?}", c.card_uid)))?;
            entries.push((uid, c.action == "block"));
        }
        Ok(Some(ListUpdate {
            kind: ListKind::Delta,
            operator: operator.to_string(),
            from_version: q.after,
            to_version: last,
            entries,
        }))
    })
    .await
}
