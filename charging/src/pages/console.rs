//! The operator console: blocks (block and unblock a card, the blocklist and its versions),
//! anomalies beside the card's history, revenue and traffic as charts, the day's settlement
//! files. Every page needs an operator's session; a cardholder's answers 403. Reads the ledger
//! through the same handle as the API and writes only through `LedgerWrite::set_blocked`, as
//! `POST /v1/cards/{uid}/block` does.

use super::*;
use crate::ledger::BlockChange;
use std::collections::BTreeMap;

/// The console's routes (merged into the pages' router).
pub(super) fn routes() -> Router<Pages> {
    Router::new()
        .route("/console", get(overview))
        .route("/console/card", get(find_card))
        .route("/console/cards/{uid}", get(card_page))
        .route(
            "/console/cards/{uid}/block",
            post(|c, f| block_card(c, f, true)),
        )
        .route(
            "/console/cards/{uid}/unblock",
            post(|c, f| block_card(c, f, false)),
        )
        .route("/console/blocks", get(blocks).post(block_by_form))
        .route("/console/anomalies", get(anomalies))
        .route("/console/traffic", get(traffic))
        .route("/console/settlement", get(settlement))
        .route("/console/settlement/{day}/{name}", get(settlement_file))
}

fn operator(p: &Pages, headers: &HeaderMap) -> Result<session::Session, PageError> {
    p.signed_in_as(headers, PageRole::Operator)
}

/// A console page: `page`'s context in the frame every console page has (the operator's
/// name, the session's CSRF token, no cardholder).
pub(super) fn console_page(
    p: &Pages,
    s: &session::Session,
    name: &str,
    page: minijinja::Value,
) -> Response {
    p.render(
        name,
        minijinja::context! {
            operator => s.holder, csrf => s.csrf, holder => None::<String>, ..page
        },
    )
}

pub(super) fn uid_of(hex_uid: &str) -> Result<[u8; 7], PageError> {
    hex::decode(hex_uid.trim())
        .ok()
        .and_then(|v| v.try_into().ok())
        .ok_or_else(|| PageError::NotFound("A card number is 14 hexadecimal digits.".into()))
}

/// Every block change and the latest version (the console reads them all: the list is small
/// next to the postings).
fn change_ctx(c: &BlockChange) -> minijinja::Value {
    minijinja::context! {
        version => c.version, uid => c.card_uid, action => c.action, reason => c.reason,
        when => card::when(c.time_ms),
    }
}

async fn overview(State(p): State<Pages>, headers: HeaderMap) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let ctx = p
            .read(move |_, r| {
                let (_, version) = r.block_changes(u64::MAX - 1, 1)?;
                let cards = r.card_count()?;
                let blocked = r.blocked_cards()?.len();
                let (_, anomalies) = r.anomalies(u64::MAX - 1, 1)?;
                Ok(minijinja::context! {
                    version => version, cards => cards, blocked => blocked,
                    anomalies => anomalies,
                })
            })
            .await?;
        let stats = p.api.loads.stats();
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console.html",
            minijinja::context! {
                o => ctx, loads_completed => stats.completed, loads_refused => stats.refused,
                loads_pending => stats.pending,
            },
        ))
    })
    .await
}

#[derive(Deserialize)]
struct FindQuery {
    #[serde(default)]
    uid: String,
}

async fn find_card(
    State(p): State<Pages>,
    headers: HeaderMap,
    Query(q): Query<FindQuery>,
) -> Response {
    p.answer(async {
        operator(&p, &headers)?;
        let uid = uid_of(&q.uid)?;
        Ok::<_, PageError>(
            Redirect::to(&format!("/console/cards/{}", hex::encode_upper(uid))).into_response(),
        )
    })
    .await
}

#[derive(Deserialize)]
struct CardQuery {
    #[serde(default)]
    blocklist_version: Option<u64>,
    #[serde(default)]
    unchanged: Option<String>,
}

/// Lines of a card's history the console shows beside its anomalies.
const HISTORY_LINES: usize = 50;

/// What the console shows of a card: its state, its block changes, its anomalies, its history.
/// Most block changes the console's card page lists (the card's newest, through the per-card
/// index).
const CARD_CHANGES: usize = 100;

/// How many of the newest anomalies the console's card page looks through for the card's
/// (anomalies have no per-card index: a bounded reverse scan; an older one is not listed).
const ANOMALIES_SCANNED: u64 = 10_000;

fn card_ctx(
    p: &Pages,
    r: &dyn LedgerRead,
    uid: &[u8; 7],
    history_lines: usize,
) -> Result<minijinja::Value, PageError> {
    let hex_uid = hex::encode_upper(uid);
    let known = r.card_known(uid)?;
    let shadow = r.card(uid)?;
    let balance = r.balance(&crate::ledger::card_account(uid))?;
    let mine: Vec<minijinja::Value> = r
        .card_block_changes(uid, CARD_CHANGES)?
        .iter()
        .map(change_ctx)
        .collect();
    let anomalies: Vec<minijinja::Value> = r
        .card_anomalies(uid, ANOMALIES_SCANNED)?
        .iter()
        .map(|(seq, a)| anomaly_ctx(*seq, a))
        .collect();
    let history = card::history(r, uid)?;
    let lines = history.len();
    let shown: Vec<minijinja::Value> = history
        .iter()
        .take(history_lines)
        .map(|e| entry_ctx(p, e))
        .collect();
    let reach = match mine.is_empty() {
        true => None,
        false => reach::card_figure(r, uid, p.now())?.map(minijinja::Value::from_serialize),
    };
    Ok(minijinja::context! {
        uid => hex_uid, known => known, owner => shadow.owner, reach => reach,
        balance => p.money(balance),
        proved_balance => shadow.last_reported_balance_minor.map(|b| p.money(i64::from(b))),
        last_tmc => shadow.last_tmc, booked_through_tmc => shadow.booked_through_tmc,
        blocked => shadow.blocked, block_reason => shadow.block_reason,
        changes => mine, anomalies => anomalies, history => shown, history_lines => lines,
    })
}

async fn card_page(
    CardRequest(p, uid_hex, headers): CardRequest,
    Query(q): Query<CardQuery>,
) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let uid = uid_of(&uid_hex)?;
        let ctx = p
            .read(move |p2, r| card_ctx(p2, r, &uid, HISTORY_LINES))
            .await?;
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console_card.html",
            minijinja::context! {
                card => ctx, blocklist_version => q.blocklist_version, unchanged => q.unchanged.is_some(),
            },
        ))
    })
    .await
}

#[derive(Deserialize)]
struct BlockForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    uid: String,
    #[serde(default)]
    reason: String,
}

/// Blocks or unblocks a card as the API's `block`/`unblock` do (`set_blocked` with a reason of
/// 1 to 200 characters), then shows the card with the blocklist version the change made.
async fn set_block(
    p: &Pages,
    headers: &HeaderMap,
    uid_hex: &str,
    f: &BlockForm,
    blocked: bool,
) -> Result<Response, PageError> {
    operator_posted(p, headers, &f.csrf)?;
    let uid = uid_of(uid_hex)?;
    let reason = f.reason.trim().to_string();
    if reason.is_empty() || reason.len() > 200 {
        return Err(PageError::Bad(
            "Give a reason of 1 to 200 characters (lost, stolen, fraud, …).".into(),
        ));
    }
    let p2 = p.clone();
    let version = blocking(move || {
        let l = p2.api.loads.ledger();
        let now = p2.now();
        Ok(l.transact(move |t| t.set_blocked(&uid, blocked, &reason, now))?)
    })
    .await?;
    let to = match version {
        Some(v) => format!(
            "/console/cards/{}?blocklist_version={v}",
            hex::encode_upper(uid)
        ),
        None => format!("/console/cards/{}?unchanged=1", hex::encode_upper(uid)),
    };
    Ok(Redirect::to(&to).into_response())
}

fn operator_posted(
    p: &Pages,
    headers: &HeaderMap,
    csrf: &str,
) -> Result<session::Session, PageError> {
    p.posted_as(headers, csrf, PageRole::Operator)
}

/// `POST /console/cards/{uid}/block` (`blocked`) and `…/unblock`.
async fn block_card(
    CardRequest(p, uid_hex, headers): CardRequest,
    Form(f): Form<BlockForm>,
    blocked: bool,
) -> Response {
    p.answer(set_block(&p, &headers, &uid_hex, &f, blocked))
        .await
}

/// The blocks page's form: a card number typed in.
async fn block_by_form(
    State(p): State<Pages>,
    headers: HeaderMap,
    Form(f): Form<BlockForm>,
) -> Response {
    p.answer(set_block(&p, &headers, &f.uid, &f, true)).await
}

/// Block changes shown on the blocks page.
const CHANGES_SHOWN: usize = 100;

async fn blocks(State(p): State<Pages>, headers: HeaderMap) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let ctx = p
            .read(move |p2, r| {
                // Versions are numbered 1, 2, … without gaps: the newest are the last
                // CHANGES_SHOWN below the latest, and the latest is how many there are.
                let (_, version) = r.block_changes(u64::MAX - 1, 1)?;
                let from = version.saturating_sub(CHANGES_SHOWN as u64);
                let (changes, _) = r.block_changes(from, CHANGES_SHOWN)?;
                let blocked: Vec<minijinja::Value> = r
                    .blocked_cards()?
                    .into_iter()
                    .filter(|(_, c)| c.blocked)
                    .map(|(uid, c)| {
                        // Since its latest change, read through the per-card index.
                        let since = r.latest_block_change(&uid)?.map(|ch| ch.version);
                        Ok(minijinja::context! {
                            uid => hex::encode_upper(uid), reason => c.block_reason,
                            version => since,
                        })
                    })
                    .collect::<Result<_, PageError>>()?;
                let recent: Vec<minijinja::Value> = changes.iter().rev().map(change_ctx).collect();
                // The latest change's reach: its card's latest change is this one.
                let reach = match changes.last() {
                    Some(c) => Some((
                        c.card_uid.to_uppercase(),
                        reach::figure(&r.block_propagation()?, c, p2.now()),
                    )),
                    None => None,
                };
                Ok(minijinja::context! {
                    version => version, blocked => blocked, changes => recent,
                    total_changes => version,
                    reach_uid => reach.as_ref().map(|(u, _)| u.clone()),
                    reach => reach.map(|(_, f)| minijinja::Value::from_serialize(f)),
                })
            })
            .await?;
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console_blocks.html",
            minijinja::context! { b => ctx },
        ))
    })
    .await
}

fn anomaly_ctx(seq: u64, a: &crate::clearing::Anomaly) -> minijinja::Value {
    minijinja::context! {
        seq => seq, kind => a.kind, label => anomaly_label(&a.kind), uid => a.card_uid,
        tmc => a.tmc, device_id => a.device_id, device_seq => a.device_seq, detail => a.detail,
    }
}

/// What an anomaly kind means, in words (a kind without words: itself).
fn anomaly_label(kind: &str) -> String {
    let words = match kind {
        "forged_tmac" => "forged MAC",
        "malformed" => "malformed tap",
        "clone" => "clone",
        "counter_gap" => "counter gap",
        "negative_shadow" => "shadow mismatch (below zero)",
        "registration_mismatch" => "registration mismatch",
        "limited_credit_after_reversal" => "credit after a reversal",
        other => other,
    };
    words.to_string()
}

#[derive(Deserialize)]
struct AnomalyQuery {
    #[serde(default)]
    page: Option<usize>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
}

/// Anomalies per page.
const ANOMALY_LINES: usize = 50;

async fn anomalies(
    State(p): State<Pages>,
    headers: HeaderMap,
    Query(q): Query<AnomalyQuery>,
) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let page = q.page.unwrap_or(1).clamp(1, 1_000_000);
        let kind = q.kind.clone().filter(|k| !k.is_empty());
        let ctx = p.read(move |p2, r| {
            let (mut all, last) = r.anomalies(0, 1_000_000)?;
            all.reverse();
            let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
            for (_, a) in &all {
                *kinds.entry(a.kind.clone()).or_default() += 1;
            }
            let listed: Vec<&(u64, crate::clearing::Anomaly)> = all
                .iter()
                .filter(|(_, a)| kind.as_deref().is_none_or(|k| a.kind == k))
                .collect();
            let pages = listed.len().div_ceil(ANOMALY_LINES).max(1);
            let rows: Vec<minijinja::Value> = listed
                .iter()
                .skip((page - 1) * ANOMALY_LINES)
                .take(ANOMALY_LINES)
                .map(|(seq, a)| anomaly_ctx(*seq, a))
                .collect();
            // The one shown beside its card: the one asked for, else the newest listed.
            let selected = match q.seq {
                Some(seq) => all.iter().find(|(s, _)| *s == seq),
                None => listed.first().copied(),
            };
            let (selected, beside) = match selected {
                Some((seq, a)) => {
                    let card = uid_of(&a.card_uid)
                        .ok()
                        .map(|uid| card_ctx(p2, &*r, &uid, 20))
                        .transpose()?;
                    (Some(anomaly_ctx(*seq, a)), card)
                }
                None => (None, None),
            };
            let kinds: Vec<minijinja::Value> = kinds
                .into_iter()
                .map(|(k, n)| minijinja::context! { kind => anomaly_label(&k), key => k, count => n })
                .collect();
            Ok(minijinja::context! {
                rows => rows, page => page, pages => pages, last => last, kinds => kinds,
                kind => kind, selected => selected, card => beside, total => listed.len(),
            })
        })
        .await?;
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console_anomalies.html",
            minijinja::context! { a => ctx },
        ))
    })
    .await
}

use tapgate_http::pages::chart::{chart, CHART_WIDTH};

/// The UTC day (`YYYY-MM-DD`) of a time.
fn day_of(ms: u64) -> String {
    card::when(ms)[..10].to_string()
}

/// Days of revenue the traffic page shows (the latest ones with postings).
const DAYS_SHOWN: usize = 14;

/// What the traffic page counts from one scan of the postings.
#[derive(Default)]
struct Traffic {
    /// (day, operator) → (net revenue, taps).
    revenue: BTreeMap<(String, String), (i64, u64)>,
    /// source → (amount, loads).
    loads: BTreeMap<String, (i64, u64)>,
}

fn traffic_of(postings: &[crate::ledger::Posting]) -> Traffic {
    let mut t = Traffic::default();
    for p in postings {
        let day = day_of(p.time_ms);
        if let Some(op) = p.to.strip_prefix("operator:") {
            let e = t.revenue.entry((day.clone(), op.to_string())).or_default();
            e.0 = e.0.saturating_add(p.amount_minor);
            if p.reference.starts_with("tap:") {
                e.1 += 1;
            }
        }
        if let Some(op) = p.from.strip_prefix("operator:") {
            let e = t.revenue.entry((day, op.to_string())).or_default();
            e.0 = e.0.saturating_sub(p.amount_minor);
        }
        let word = p.reference.split(':').next().unwrap_or("");
        // A load's value leaves its source for the card (or for the issuer's float when the
        // card was learned later from a state that already held it).
        if matches!(word, "load" | "franchise-load")
            && (p.from.starts_with("funding:") || p.from.starts_with("franchise:"))
        {
            let e = t.loads.entry(p.from.clone()).or_default();
            e.0 = e.0.saturating_add(p.amount_minor);
            e.1 += 1;
        }
    }
    t
}

async fn traffic(State(p): State<Pages>, headers: HeaderMap) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let (t, anomalies) = p
            .read(move |_, r| {
                let t = traffic_of(&r.postings_with_prefix("")?);
                let (all, _) = r.anomalies(0, 1_000_000)?;
                let mut by_kind: BTreeMap<String, i64> = BTreeMap::new();
                for (_, a) in all {
                    *by_kind.entry(a.kind).or_default() += 1;
                }
                Ok((t, by_kind))
            })
            .await?;
        let mut days: Vec<&String> = t.revenue.keys().map(|(d, _)| d).collect();
        days.dedup();
        let first_day = days
            .len()
            .checked_sub(DAYS_SHOWN)
            .and_then(|i| days.get(i))
            .map(|d| d.to_string());
        let shown = t
            .revenue
            .iter()
            .filter(|((d, _), _)| first_day.as_ref().is_none_or(|f| d >= f));
        let revenue = chart(
            shown
                .clone()
                .map(|((d, op), (v, _))| (format!("{d} · {op}"), *v, p.money(*v)))
                .collect(),
        );
        let taps = chart(
            shown
                .map(|((d, op), (_, n))| (format!("{d} · {op}"), *n as i64, format!("{n} taps")))
                .collect(),
        );
        let loads = chart(
            t.loads
                .iter()
                .map(|(src, (v, n))| {
                    (
                        src.clone(),
                        *v,
                        format!(
                            "{} in {n} load{}",
                            p.money(*v),
                            if *n == 1 { "" } else { "s" }
                        ),
                    )
                })
                .collect(),
        );
        let stats = p.api.loads.stats();
        let mut refused: Vec<(String, i64, String)> = p
            .api
            .clearing
            .anomalies_by_kind()
            .into_iter()
            .filter(|(k, _)| k == "forged_tmac" || k == "malformed")
            .map(|(k, n)| {
                (
                    format!("tap refused at clearing: {}", anomaly_label(&k)),
                    n as i64,
                    n.to_string(),
                )
            })
            .collect();
        refused.push((
            "load refused by the back office".into(),
            stats.refused as i64,
            stats.refused.to_string(),
        ));
        let refusals = chart(refused);
        let anomalies = chart(
            anomalies
                .into_iter()
                .map(|(k, n)| (anomaly_label(&k), n, n.to_string()))
                .collect(),
        );
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console_traffic.html",
            minijinja::context! {
                revenue => revenue, taps => taps, loads => loads, refusals => refusals,
                anomalies => anomalies, width => CHART_WIDTH, currency => p.currency,
            },
        ))
    })
    .await
}

#[derive(Deserialize)]
struct SettlementQuery {
    #[serde(default)]
    day: Option<String>,
    /// Basis points; empty is 0 (a form's field), anything else not a number is refused.
    #[serde(default)]
    merchant_fee_bps: Option<String>,
}

impl SettlementQuery {
    fn fee_bps(&self) -> Result<u32, PageError> {
        match self.merchant_fee_bps.as_deref().map(str::trim) {
            None | Some("") => Ok(0),
            Some(t) => t.parse().map_err(|_| {
                PageError::Bad("A merchant fee is a whole number of basis points.".into())
            }),
        }
    }
}

/// A file name as a `Content-Disposition` parameter: only `[A-Za-z0-9._-]` (a franchise's or
/// merchant's name is configuration, not a header's syntax).
fn safe_file_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The day's files, built as `tapgate charging settlement` builds them.
async fn build_settlement(
    p: &Pages,
    day: String,
    fee_bps: u32,
) -> Result<Vec<crate::settlement::SettlementFile>, PageError> {
    crate::settlement::day_bounds(&day).map_err(PageError::Bad)?;
    if fee_bps > crate::settlement::MAX_MERCHANT_FEE_BPS {
        return Err(PageError::Bad(format!(
            "A merchant fee is at most {} basis points.",
            crate::settlement::MAX_MERCHANT_FEE_BPS
        )));
    }
    let p2 = p.clone();
    blocking(move || {
        crate::settlement::settlement_with_fees(p2.api.loads.ledger(), &day, fee_bps)
            .map_err(|e| PageError::Internal(e.to_string()))
    })
    .await
}

async fn settlement(
    State(p): State<Pages>,
    headers: HeaderMap,
    Query(q): Query<SettlementQuery>,
) -> Response {
    p.answer(async {
        let s = operator(&p, &headers)?;
        let day = q
            .day
            .clone()
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| day_of(p.now()));
        let fee = q.fee_bps()?;
        let files = build_settlement(&p, day.clone(), fee).await?;
        let days = p
            .read(move |_, r| {
                let mut days: Vec<String> = r
                    .postings_with_prefix("")?
                    .iter()
                    .map(|p| day_of(p.time_ms))
                    .collect();
                days.sort();
                days.dedup();
                days.reverse();
                days.truncate(DAYS_SHOWN);
                Ok(days)
            })
            .await?;
        let rows: Vec<minijinja::Value> = files
            .iter()
            .map(|f| {
                minijinja::context! {
                    name => f.name, lines => f.csv.lines().count().saturating_sub(1),
                    bytes => f.csv.len(),
                }
            })
            .collect();
        Ok::<_, PageError>(console_page(
            &p,
            &s,
            "console_settlement.html",
            minijinja::context! { day => day,
                fee => fee, files => rows, days => days,
            },
        ))
    })
    .await
}

async fn settlement_file(
    State(p): State<Pages>,
    headers: HeaderMap,
    Path((day, name)): Path<(String, String)>,
    Query(q): Query<SettlementQuery>,
) -> Response {
    p.answer(async {
        operator(&p, &headers)?;
        let files = build_settlement(&p, day, q.fee_bps()?).await?;
        // Only a file the day has: the name is one of the built files', never a path.
        let f = files
            .into_iter()
            .find(|f| f.name == name)
            .ok_or_else(|| PageError::NotFound("The day has no such settlement file.".into()))?;
        Ok::<_, PageError>(
            (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
                    (
                        header::CONTENT_DISPOSITION,
                        format!("attachment; filename=\"{}\"", safe_file_name(&f.name)),
                    ),
                ],
                f.csv,
            )
                .into_response(),
        )
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_download_name_and_a_fee_are_read_strictly() {
        assert_eq!(
            safe_file_name("merchant-a\"b\r\n.csv"),
            "merchant-a_b__.csv"
        );
        assert_eq!(
            safe_file_name("summary-2026-12-06.csv"),
            "summary-2026-12-06.csv"
        );
        let q = |v: Option<&str>| SettlementQuery {
            day: None,
            merchant_fee_bps: v.map(String::from),
        };
        assert_eq!(q(None).fee_bps().ok(), Some(0));
        assert_eq!(q(Some(" ")).fee_bps().ok(), Some(0));
        assert_eq!(q(Some("250")).fee_bps().ok(), Some(250));
        assert!(q(Some("2.5")).fee_bps().is_err());
    }

    #[test]
    fn an_anomaly_kind_without_words_is_shown_as_itself() {
        assert_eq!(anomaly_label("forged_tmac"), "forged MAC");
        assert_eq!(anomaly_label("some_new_kind"), "some_new_kind");
    }

    #[test]
    fn traffic_counts_revenue_per_day_and_operator_and_loads_per_source() {
        let post =
            |time_ms, from: &str, to: &str, amount_minor, reference: &str| crate::ledger::Posting {
                seq: 0,
                time_ms,
                from: from.into(),
                to: to.into(),
                amount_minor,
                reference: reference.into(),
            };
        let day = 86_400_000;
        let t = traffic_of(&[
            post(0, "card:04", "operator:metro", 1_250, "tap:04:1"),
            post(10, "card:05", "operator:metro", 1_250, "tap:05:1"),
            post(day, "card:04", "operator:bus", 900, "tap:04:2"),
            post(day, "operator:bus", "card:04", 100, "reversal:04:3"),
            post(5, "funding:card", "card:04", 5_000, "load:04:4"),
            post(6, "franchise:shop", "card:05", 3_000, "franchise-load:05:2"),
            post(7, "issuer:float", "card:06", 3_000, "issue:06"),
            post(8, "funding:card", "issuer:float", 1_000, "load:07:3"),
        ]);
        assert_eq!(
            t.revenue[&("1970-01-01".into(), "metro".into())],
            (2_500, 2)
        );
        assert_eq!(t.revenue[&("1970-01-02".into(), "bus".into())], (800, 1));
        assert_eq!(t.loads["funding:card"], (6_000, 2));
        assert_eq!(t.loads["franchise:shop"], (3_000, 1));
        assert_eq!(t.loads.len(), 2);
    }

    #[test]
    fn console_templates_render() {
        let env = environment();
        let c = chart(vec![("x".into(), 3, "3".into())]);
        let r = env
            .get_template("console_traffic.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", holder => None::<String>, revenue => &c, taps => &c,
                loads => &c, refusals => &c, anomalies => chart(Vec::new()), width => CHART_WIDTH,
                currency => "KRW",
            });
        assert!(r.unwrap().contains("<svg"));
    }

    fn card() -> minijinja::Value {
        minijinja::context! {
            uid => "04A1A1A1A1A1A1", known => true, owner => Some("ann"), balance => "5 KRW",
            proved_balance => None::<String>, last_tmc => 0, booked_through_tmc => 0,
            blocked => true, block_reason => Some("fraud"),
            changes => vec![minijinja::context! { version => 1, uid => "04A1A1A1A1A1A1", action => "block", reason => "fraud", when => "w" }],
            anomalies => Vec::<minijinja::Value>::new(),
            history => vec![minijinja::context! { when => "w", kind => "issue", place => "float", amount => "5", credit => true, tmc => None::<u32>, stop => None::<String>, marks => Vec::<&str>::new(), month => "m" }],
            history_lines => 1,
        }
    }

    #[test]
    fn a_card_and_an_anomaly_beside_its_card_render() {
        let env = environment();
        let r = env
            .get_template("console_card.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", holder => None::<String>, card => card(),
                blocklist_version => Some(1), unchanged => false,
            });
        let html = r.unwrap();
        assert!(
            html.contains("Blocked: fraud") && html.contains("/unblock"),
            "{html}"
        );
        let selected = minijinja::context! { seq => 3, kind => "clone", label => "clone", uid => "04A1A1A1A1A1A1", tmc => 4, device_id => 1, device_seq => 9, detail => "two cards" };
        let a = minijinja::context! {
            rows => vec![selected.clone()], page => 1, pages => 1, last => 3,
            kinds => vec![minijinja::context! { kind => "clone", key => "clone", count => 1 }],
            kind => None::<String>, selected => selected, card => card(), total => 1,
        };
        let r = env
            .get_template("console_anomalies.html")
            .unwrap()
            .render(minijinja::context! {
                operator => "ops", csrf => "c", holder => None::<String>, a => a,
            });
        let html = r.unwrap();
        assert!(
            html.contains("two cards") && html.contains("float"),
            "{html}"
        );
    }
}
