//! Blocklist propagation as the gateways measure it: each gateway reports how many of its
//! online validators hold each blocklist version it published (`POST`, its gateway token), and
//! operators read where a version has reached (`GET`). The cardholder's page and the console
//! show the same figures (docs/pages.md).

use super::*;
use crate::ledger::{block_propagation, BlockReach};

/// Most figures in one report (a gateway tracks its newest 64 versions).
pub const MAX_FIGURES: usize = block_propagation::KEPT_VERSIONS;

/// A gateway's report: its figures, one per version (the gateway's own
/// `GET /v1/blocklist/propagation` answers).
#[derive(Debug, Deserialize, Serialize)]
pub struct PropagationReport {
    /// The figures.
    pub figures: Vec<BlockReach>,
}

/// `POST /v1/blocklist/propagation` (gateway): the calling gateway's figures, kept under its
/// token's name (a gateway reports for itself only). 200 with how many versions are kept.
pub(super) async fn report_propagation(
    State(st): State<AppState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let caller = require(&st.auth, &headers, &[Role::Gateway])?;
    let report: PropagationReport = json_body(&body)?;
    if report.figures.is_empty() || report.figures.len() > MAX_FIGURES {
        return Err(ApiError::BadRequest(format!(
            "figures: 1 to {MAX_FIGURES} a report"
        )));
    }
    for f in &report.figures {
        f.check().map_err(ApiError::BadRequest)?;
    }
    let now = (st.clock)();
    let ledger = st.loads.ledger().clone();
    let kept = blocking(move || {
        ledger
            .transact(move |t| t.record_block_propagation(&caller.name, &report.figures, now))
            .map_err(ApiError::from)
    })
    .await?;
    Ok(Json(serde_json::json!({ "kept_versions": kept })))
}

#[derive(Deserialize)]
pub(super) struct VersionQuery {
    version: Option<u64>,
}

/// `GET /v1/blocklist/propagation?version=V` (operator; default: the latest version): per
/// gateway that reported, its figure for V ([`block_propagation::reach_of`]: the figure of the
/// oldest version it published at or after V), `null` while it has not published V.
pub(super) async fn read_propagation(
    State(st): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(q): axum::extract::Query<VersionQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    require(&st.auth, &headers, &[Role::Operator])?;
    let r = st.loads.ledger().read()?;
    let version = match q.version {
        Some(v) => v,
        None => r.block_changes(u64::MAX - 1, 1)?.1,
    };
    let gateways: Vec<serde_json::Value> = r
        .block_propagation()?
        .iter()
        .map(|(g, figures)| {
            serde_json::json!({
                "gateway": g,
                "figure": block_propagation::reach_of(figures, version),
            })
        })
        .collect();
    Ok(Json(
        serde_json::json!({ "version": version, "gateways": gateways }),
    ))
}
