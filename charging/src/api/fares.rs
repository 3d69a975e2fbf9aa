//! Fare tables: `POST /v1/fares` publishes rules (`tapgate fare publish`; the console's
//! *Publish* is the same [`crate::fares::publish`]), and the gateways fetch the published,
//! signed table to relay to validators.

use super::*;
use crate::fares::{self, FaresError, Outcome};

/// The routes (the upload takes up to [`fares::MAX_UPLOAD_BYTES`]).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/fares",
            post(publish_rules).layer(axum::extract::DefaultBodyLimit::max(
                fares::MAX_UPLOAD_BYTES,
            )),
        )
        .route("/v1/fares/signed/snapshot", get(signed_snapshot))
        .route("/v1/fares/signed/delta", get(signed_delta))
}

#[derive(Deserialize)]
struct PublishQuery {
    /// The file's name (`rules.toml`, `feed.zip`): named in the findings.
    #[serde(default)]
    name: Option<String>,
}

/// `POST /v1/fares?name=rules.toml` (operator), the body the rules (TOML source or a zipped
/// GTFS feed): 201 `{version, bytes, findings, summary}` once signed and published; 422
/// `{error: "fare_check", findings, summary}` when `fare check` finds an error (nothing
/// published); 409 when the version is not newer than the published one; 400 when the rules
/// do not compile.
async fn publish_rules(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<PublishQuery>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Operator])?;
    let name = q.name.unwrap_or_else(|| "rules.toml".into());
    blocking(move || {
        let p = fares::propose(&name, &body).map_err(fares_error)?;
        let findings: Vec<String> = p.review.findings.iter().map(|f| f.to_string()).collect();
        let summary = p.review.summary.clone();
        let now = (st.clock)();
        match fares::publish(&st.loads, &p, &caller.name, now).map_err(fares_error)? {
            Outcome::Published(t) => Ok((
                StatusCode::CREATED,
                Json(serde_json::json!({
                    "version": t.version, "bytes": t.table_hex.len() / 2,
                    "findings": findings, "summary": summary,
                })),
            )
                .into_response()),
            Outcome::Refused(why) if p.review.errors > 0 => Ok((
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(serde_json::json!({
                    "error": "fare_check", "detail": why, "findings": findings, "summary": summary,
                })),
            )
                .into_response()),
            Outcome::Refused(why) => Err(ApiError::Conflict(why)),
        }
    })
    .await
}

fn fares_error(e: FaresError) -> ApiError {
    match e {
        FaresError::Rules(d) => ApiError::BadRequest(d),
        other => ApiError::Internal(other.to_string()),
    }
}

#[derive(Deserialize)]
struct AfterQuery {
    #[serde(default)]
    after: u64,
}

/// The published table if its version is above `after`, with its version in
/// `x-tapgate-fares-version`; 204 otherwise.
async fn signed_after(st: AppState, headers: HeaderMap, after: u64) -> Result<Response, ApiError> {
    require(&st.auth, &headers, &[Role::Gateway, Role::Operator])?;
    blocking(move || {
        let r = st.loads.ledger().read()?;
        let t = fares::published(&*r)?;
        Ok(match t.filter(|t| u64::from(t.version) > after) {
            Some(t) => (
                [
                    (
                        axum::http::header::CONTENT_TYPE,
                        "application/octet-stream".to_string(),
                    ),
                    (
                        axum::http::HeaderName::from_static("x-tapgate-fares-version"),
                        t.version.to_string(),
                    ),
                ],
                t.bytes(),
            )
                .into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        })
    })
    .await
}

/// `GET /v1/fares/signed/snapshot` (gateway, operator): the published table (`.tgft`, signed
/// by the back office); 204 before any.
async fn signed_snapshot(
    State(st): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    signed_after(st, headers, 0).await
}

/// `GET /v1/fares/signed/delta?after=N` (gateway, operator): the published table when it is
/// newer than version N (a table replaces the one before: its "change" is itself); 204 when
/// it is not.
async fn signed_delta(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<AfterQuery>,
) -> Result<Response, ApiError> {
    signed_after(st, headers, q.after).await
}
