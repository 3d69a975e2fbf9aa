//! A card's block reaching the validators: the figures the gateways report
//! (`POST /v1/blocklist/propagation`, kept by the ledger per gateway and version) for the
//! blocklist version of the card's latest block change, on the cardholder's card page and the
//! console's card page. Each page's script fetches the same figure as JSON every 2 seconds
//! (`/cards/{uid}/block.json`, `/console/cards/{uid}/block.json`) and rewrites it; without the
//! script the page is complete as rendered.

use super::*;
use crate::ledger::{block_propagation, BlockChange, BlockReach};
use serde_json::json;

/// The JSON routes (merged into the pages' router).
pub(super) fn routes() -> Router<Pages> {
    Router::new()
        .route(
            "/cards/{uid}/block.json",
            get(|c| figure_json(c, PageRole::Cardholder)),
        )
        .route(
            "/console/cards/{uid}/block.json",
            get(|c| figure_json(c, PageRole::Operator)),
        )
}

/// How long something took, as the gateway's console says it.
fn duration(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{}.{} s", ms / 1000, (ms % 1000) / 100),
        _ => format!("{} min {} s", ms / 60_000, (ms % 60_000) / 1000),
    }
}

fn reached(at: Option<u64>) -> String {
    match at {
        Some(ms) => format!("reached after {}", duration(ms)),
        None => "not yet".into(),
    }
}

/// One gateway's line: its name, then how many of its validators hold the version, then when
/// 50, 99 and 100 % of them did, and when it reported.
fn row(gateway: &str, f: Option<&BlockReach>) -> Vec<String> {
    match f {
        Some(f) => vec![
            gateway.to_string(),
            format!(
                "{} of {} validators ({}%)",
                f.holding,
                f.online_validators,
                f.percent()
            ),
            format!("50%: {}", reached(f.ms_to_50)),
            format!("99%: {}", reached(f.ms_to_99)),
            format!("100%: {}", reached(f.ms_to_100)),
            format!("reported {}", card::when(f.reported_ms)),
        ],
        None => vec![
            gateway.to_string(),
            "not sent to its validators yet".into(),
            "50%: not yet".into(),
            "99%: not yet".into(),
            "100%: not yet".into(),
            String::new(),
        ],
    }
}

/// The figure for `change`'s version over every gateway that reported: the validators
/// holding it of those online (a gateway that has not published it counts its validators
/// online at its latest figure, none holding), a line per gateway, and the texts the page
/// shows (`shown`, rewritten by its script).
pub(super) fn figure(
    gateways: &[(String, Vec<BlockReach>)],
    change: &BlockChange,
    now_ms: u64,
) -> serde_json::Value {
    let (mut holding, mut online) = (0u64, 0u64);
    let mut rows = Vec::new();
    for (g, figures) in gateways {
        let f = block_propagation::reach_of(figures, change.version);
        holding = holding.saturating_add(f.map_or(0, |f| f.holding));
        online = online.saturating_add(f.or(figures.last()).map_or(0, |f| f.online_validators));
        rows.push(row(g, f));
    }
    let percent = block_propagation::share(holding, online);
    let what = if change.action == "unblock" {
        "the unblocking"
    } else {
        "the block"
    };
    let summary = match (gateways.is_empty(), percent) {
        (true, _) => format!(
            "No gateway has reported version {} yet: each fetches it within a second and its validators take it at their next heartbeat.",
            change.version
        ),
        (false, None) => format!("No validator is online at the {} gateway(s) that reported.", gateways.len()),
        (false, Some(p)) => format!(
            "{holding} of {online} validators online hold {what} ({p}%), at {} gateway(s).",
            gateways.len()
        ),
    };
    json!({
        "version": change.version,
        "action": change.action,
        "holding": holding,
        "max": online.max(1),
        "all": online > 0 && holding == online,
        "rows": rows,
        "shown": {
            "reach_summary": summary,
            "reach_percent": percent.map_or("—".to_string(), |p| format!("{p}%")),
            "reach_as_of": card::when(now_ms),
        },
    })
}

/// The figure for the card's latest block change (`None`: the card never had one).
pub(super) fn card_figure(
    r: &dyn LedgerRead,
    uid: &[u8; 7],
    now_ms: u64,
) -> Result<Option<serde_json::Value>, PageError> {
    // The change its state is from, read through the ledger's per-card index (the page polls
    // this every 2 seconds: never a scan of every change).
    let Some(change) = r.latest_block_change(uid)? else {
        return Ok(None);
    };
    Ok(Some(figure(&r.block_propagation()?, &change, now_ms)))
}

/// `GET /cards/{uid}/block.json` (`role` cardholder: the holder's own card) and
/// `GET /console/cards/{uid}/block.json` (operator: any card): the card's figure as JSON, the
/// card resolved in the same ledger read; a card that never had a block change is not found.
async fn figure_json(CardRequest(p, uid_hex, headers): CardRequest, role: PageRole) -> Response {
    p.answer(async {
        let s = p.signed_in_as(&headers, role)?;
        let v = p
            .read(move |p2, r| {
                let uid = match role {
                    PageRole::Cardholder => p2.own_card(r, &s.holder, &uid_hex)?,
                    PageRole::Operator => super::console::uid_of(&uid_hex)?,
                };
                card_figure(r, &uid, p2.now())
            })
            .await?;
        match v {
            Some(v) => Ok(Json(v).into_response()),
            None => Err(PageError::NotFound(
                "This card has never been blocked.".into(),
            )),
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(version: u64, online: u64, holding: u64, to: [Option<u64>; 3]) -> BlockReach {
        BlockReach {
            version,
            published_at_ms: 1_000,
            online_validators: online,
            holding,
            ms_to_50: to[0],
            ms_to_99: to[1],
            ms_to_100: to[2],
            reported_ms: 2_000,
        }
    }

    #[test]
    fn a_block_s_figure_sums_the_gateways_and_names_each() {
        let change = BlockChange {
            version: 5,
            card_uid: "04000000000001".into(),
            action: "block".into(),
            reason: "lost".into(),
            time_ms: 0,
        };
        let gateways = vec![
            // Published 6 (which holds 5): 2 of 3 hold it.
            (
                "east".to_string(),
                vec![
                    f(4, 3, 3, [Some(1), Some(2), Some(3)]),
                    f(6, 3, 2, [Some(300), None, None]),
                ],
            ),
            // Not published 5 yet: its 2 validators online count, none holding.
            (
                "west".to_string(),
                vec![f(4, 2, 2, [Some(1), Some(1), Some(1)])],
            ),
        ];
        let v = figure(&gateways, &change, 0);
        assert_eq!(
            (v["holding"].as_u64(), v["max"].as_u64()),
            (Some(2), Some(5))
        );
        assert_eq!(v["shown"]["reach_percent"], "40%");
        assert!(v["shown"]["reach_summary"]
            .as_str()
            .unwrap()
            .starts_with("2 of 5 validators online hold the block (40%), at 2 gateway(s)"));
        assert_eq!(v["rows"][0][1], "2 of 3 validators (66%)");
        assert_eq!(v["rows"][0][2], "50%: reached after 300 ms");
        assert_eq!(v["rows"][0][4], "100%: not yet");
        assert_eq!(v["rows"][1][1], "not sent to its validators yet");
        assert_eq!(v["all"], false);
        let none = figure(&[], &change, 0);
        assert!(none["shown"]["reach_summary"]
            .as_str()
            .unwrap()
            .starts_with("No gateway has reported version 5"));
        assert_eq!(duration(61_500), "1 min 1 s");
        // The largest counts a report may carry (holding ≤ online) neither overflow nor panic.
        let huge = vec![
            ("a".to_string(), vec![f(5, u64::MAX, u64::MAX, [None; 3])]),
            ("b".to_string(), vec![f(5, u64::MAX, 1, [None; 3])]),
        ];
        let v = figure(&huge, &change, 0);
        assert_eq!(
            v["rows"][0][1],
            format!("{0} of {0} validators (100%)", u64::MAX)
        );
        assert_eq!(v["max"].as_u64(), Some(u64::MAX));
        assert_eq!(v["shown"]["reach_percent"], "100%");
    }

    #[test]
    fn a_blocked_card_s_page_shows_the_figure_and_polls_it() {
        let change = BlockChange {
            version: 3,
            card_uid: "04".into(),
            action: "block".into(),
            reason: "lost".into(),
            time_ms: 0,
        };
        let gateways = vec![(
            "metro-gw".to_string(),
            vec![f(3, 2, 2, [Some(5), Some(9), Some(9)])],
        )];
        let reach = minijinja::Value::from_serialize(figure(&gateways, &change, 0));
        let card = minijinja::context! { uid => "04", balance => "5 KRW", proved_balance => None::<String>, last_tmc => 0, blocked => true, block_reason => "lost", history => Vec::<minijinja::Value>::new(), page => 1usize, pages => 1usize, loads => Vec::<minijinja::Value>::new(), topups => Vec::<minijinja::Value>::new(), months => Vec::<String>::new(), free_taps => Vec::<minijinja::Value>::new(), reach => reach };
        let html = super::super::environment()
            .get_template("card.html")
            .unwrap()
            .render(minijinja::context! { holder => "ann", csrf => "c", card => card, blocklist_version => Some(3u64) })
            .unwrap();
        for want in [
            r#"data-poll="&#x2f;cards&#x2f;04&#x2f;block.json""#,
            "2 of 2 validators online hold the block (100%), at 1 gateway(s).",
            r#"<th scope="row">metro-gw</th><td>2 of 2 validators (100%)</td><td>50%: reached after 5 ms</td>"#,
            r#"<progress id="reach-held" max="2" value="2">"#,
        ] {
            assert!(html.contains(want), "{want}: {html}");
        }
    }
}
