//! The blocklist: numbered changes and the HSM-signed snapshot and delta the gateways relay.

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
    let body = update.body();
    let sig = st
        .loads
        .hsm()
        .lock()
        .expect("hsm lock")
        .sign(&body)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut bytes = body;
    bytes.extend_from_slice(&sig);
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
    bytes: Vec<u8>,
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
    let (_, latest) = r
        .block_changes(u64::MAX - 1, 1)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    if latest == 0 {
        return Ok(None);
    }
    let mut uids: Vec<[u8; 7]> = r
        .all_cards()
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

/// The chunked snapshot: one ledger read, every chunk signed by the HSM.
async fn chunked_snapshot(st: AppState, headers: HeaderMap) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let l = st.loads.ledger();
        let r = l.read().map_err(|e| ApiError::Internal(e.to_string()))?;
        let cards = blocked_cards(&*r)?;
        drop(r);
        let Some((latest, uids)) = cards else {
            return Ok(StatusCode::NO_CONTENT.into_response());
        };
        if uids.len() <= purse::blocklist::chunked::CHUNK_ENTRIES {
            // A list that fits one chunk stays one message, which every validator takes.
            return signed_list(
                &st,
                &ListUpdate {
                    kind: ListKind::Snapshot,
                    operator: st.operator.clone(),
                    from_version: 0,
                    to_version: latest,
                    entries: uids.into_iter().map(|u| (u, true)).collect(),
                },
            );
        }
        let chunks = purse::blocklist::chunked::cut(
            &st.operator,
            latest,
            &uids,
            purse::blocklist::chunked::CHUNK_ENTRIES,
        );
        drop(uids);
        let mut out = Vec::new();
        let hsm = st.loads.hsm();
        for c in &chunks {
            let body = c.body();
            let sig = hsm
                .lock()
                .expect("hsm lock")
                .sign(&body)
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            out.extend_from_slice(&((body.len() + sig.len()) as u32).to_be_bytes());
            out.extend_from_slice(&body);
            out.extend_from_slice(&sig);
        }
        let mut resp = signed_list_response("x-tapgate-blocklist-version", latest, out);
        let h = resp.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/x-tapgate-chunks"),
        );
        h.insert(
            axum::http::HeaderName::from_static("x-tapgate-blocklist-chunks"),
            axum::http::HeaderValue::from(chunks.len()),
        );
        Ok(resp)
    })
    .await
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
