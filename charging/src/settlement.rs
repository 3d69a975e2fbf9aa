//! Settlement files for a business day (UTC): per franchise (its loads and its payments), per
//! operator (the fare revenue cleared from taps) and per merchant (its online payments and
//! refunds), plus a summary and, when merchants were paid, a merchants' summary with their fees,
//! as CSV.

use crate::ledger::{Ledger, LedgerError, LedgerRead, Posting};
use std::collections::BTreeMap;
use time::macros::format_description;

/// One CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettlementFile {
    /// File name, e.g. `franchise-corner-shop-2026-11-24.csv`.
    pub name: String,
    /// Contents.
    pub csv: String,
}

/// Parses `YYYY-MM-DD` into the day's [start, end) in unix ms.
pub fn day_bounds(day: &str) -> Result<(u64, u64), String> {
    let date = time::Date::parse(day, format_description!("[year]-[month]-[day]"))
        .map_err(|e| format!("day {day:?} is not YYYY-MM-DD: {e}"))?;
    let start = date.midnight().assume_utc().unix_timestamp();
    if start < 0 {
        return Err(format!("day {day:?} is before 1970"));
    }
    let start_ms = u64::try_from(start)
        .ok()
        .and_then(|s| s.checked_mul(1000))
        .ok_or_else(|| format!("day {day:?} is out of range"))?;
    Ok((start_ms, start_ms.saturating_add(86_400_000)))
}

fn utc(ms: u64) -> String {
    i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            ))
            .ok()
        })
        .unwrap_or_default()
}

fn split_ref(reference: &str) -> (&str, &str) {
    // `kind:<UID>:<TMC>` → (UID, TMC)
    let mut it = reference.split(':');
    let _ = it.next();
    (it.next().unwrap_or(""), it.next().unwrap_or(""))
}

#[derive(Default)]
struct Totals {
    // Wider than a posting: a day's sum of i64 postings cannot overflow it.
    loads_minor: i128,
    payments_minor: i128,
    debits_minor: i128,
}

/// What a posting is to the party it settles with.
#[derive(Clone, Copy)]
enum Kind {
    /// A franchise's load onto a card (it owes us).
    Load,
    /// A franchise's payment to us.
    Payment,
    /// Fare revenue cleared for an operator (we owe it).
    Debit,
    /// A card's online payment to a merchant (we owe it).
    Sale,
    /// A merchant's refund to a card (it owes us).
    Refund,
    /// A merchant's refund that expired uncollected: back to the merchant (we owe it again).
    RefundExpired,
}

impl Kind {
    fn word(self) -> &'static str {
        match self {
            Kind::Load => "load",
            Kind::Payment => "payment",
            Kind::Debit => "debit",
            Kind::Sale => "sale",
            Kind::Refund => "refund",
            Kind::RefundExpired => "refund_expired",
        }
    }
}

/// The party (`franchise:<id>`, `operator:<id>`) a posting settles with, and what it is.
fn classify(p: &Posting) -> Option<(String, Kind)> {
    if let Some(f) = p.from.strip_prefix("franchise:") {
        Some((format!("franchise:{f}"), Kind::Load))
    } else if let Some(f) = p.to.strip_prefix("franchise:") {
        Some((format!("franchise:{f}"), Kind::Payment))
    } else if let (Some(m), true) = (
        p.to.strip_prefix("merchant:"),
        p.reference.starts_with("refund-expired:"),
    ) {
        Some((format!("merchant:{m}"), Kind::RefundExpired))
    } else if let Some(m) = p.to.strip_prefix("merchant:") {
        Some((format!("merchant:{m}"), Kind::Sale))
    } else if let Some(m) = p.from.strip_prefix("merchant:") {
        Some((format!("merchant:{m}"), Kind::Refund))
    } else {
        let op = p.to.strip_prefix("operator:")?;
        Some((format!("operator:{op}"), Kind::Debit))
    }
}

/// The card and counter of a merchant's posting, from its payment or refund record.
fn merchant_card(r: &dyn LedgerRead, p: &Posting) -> Result<(String, String), LedgerError> {
    let show =
        |uid: String, tmc: Option<u32>| (uid, tmc.map(|t| t.to_string()).unwrap_or_default());
    if let Some(id) = p.reference.strip_prefix("payment:") {
        if let Some(pay) = r.payment(id)? {
            return Ok(show(pay.card_uid.unwrap_or_default(), pay.tmc));
        }
    }
    if let Some(id) = p
        .reference
        .strip_prefix("refund-made:")
        .or_else(|| p.reference.strip_prefix("refund-expired:"))
    {
        if let Some(refund) = r.refund(id)? {
            return Ok(show(refund.card_uid, refund.tmc));
        }
    }
    Ok(Default::default())
}

/// Builds the day's settlement files, merchants paying no fee.
pub fn settlement(ledger: &Ledger, day: &str) -> Result<Vec<SettlementFile>, SettlementError> {
    settlement_with_fees(ledger, day, 0)
}

/// The highest merchant fee, in basis points: 10 000 bps is the whole sale.
pub const MAX_MERCHANT_FEE_BPS: u32 = 10_000;

/// Builds the day's settlement files; merchants pay `merchant_fee_bps` basis points of their
/// sales (rounded down, per merchant and day). A fee above [`MAX_MERCHANT_FEE_BPS`] (more
/// than the sale) is refused: [`SettlementError::FeeTooHigh`].
pub fn settlement_with_fees(
    ledger: &Ledger,
    day: &str,
    merchant_fee_bps: u32,
) -> Result<Vec<SettlementFile>, SettlementError> {
    if merchant_fee_bps > MAX_MERCHANT_FEE_BPS {
        return Err(SettlementError::FeeTooHigh(merchant_fee_bps));
    }
    let (start, end) = day_bounds(day).map_err(SettlementError::Day)?;
    let r = ledger.read()?;
    let mut rows: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut totals: BTreeMap<String, Totals> = BTreeMap::new();
    // Merchants: (sales, refunds).
    let mut merchants: BTreeMap<String, (i128, i128)> = BTreeMap::new();
    let all: Vec<Posting> = r.postings_with_prefix("")?;
    for p in all.iter().filter(|p| p.time_ms >= start && p.time_ms < end) {
        let Some((party, kind)) = classify(p) else {
            continue;
        };
        let merchant_card = match kind {
            Kind::Sale | Kind::Refund | Kind::RefundExpired => merchant_card(&*r, p)?,
            _ => Default::default(),
        };
        let (uid, tmc) = match kind {
            Kind::Payment => ("", ""),
            Kind::Load | Kind::Debit => split_ref(&p.reference),
            Kind::Sale | Kind::Refund | Kind::RefundExpired => {
                (merchant_card.0.as_str(), merchant_card.1.as_str())
            }
        };
        rows.entry(party.replacen(':', "-", 1))
            .or_default()
            .push(format!(
                "{},{},{uid},{tmc},{},{}",
                utc(p.time_ms),
                kind.word(),
                p.amount_minor,
                p.reference
            ));
        let amount = i128::from(p.amount_minor);
        match kind {
            Kind::Sale => merchants.entry(party).or_default().0 += amount,
            Kind::Refund => merchants.entry(party).or_default().1 += amount,
            // Never reached the card: the refund is taken back out of the day's refunds.
            Kind::RefundExpired => merchants.entry(party).or_default().1 -= amount,
            Kind::Load => totals.entry(party).or_default().loads_minor += amount,
            Kind::Payment => totals.entry(party).or_default().payments_minor += amount,
            Kind::Debit => totals.entry(party).or_default().debits_minor += amount,
        }
    }
    let mut files = Vec::new();
    for (party, lines) in rows {
        let mut csv = String::from("time_utc,type,card_uid,tmc,amount_minor,reference\n");
        for l in lines {
            csv.push_str(&l);
            csv.push('\n');
        }
        files.push(SettlementFile {
            name: format!("{party}-{day}.csv"),
            csv,
        });
    }
    let mut summary = String::from("party,loads_minor,payments_minor,debits_minor,net_minor\n");
    for (party, t) in &totals {
        // What the party owes us (+) or we owe it (−) for the day.
        let net = t.loads_minor - t.payments_minor - t.debits_minor;
        summary.push_str(&format!(
            "{party},{},{},{},{net}\n",
            t.loads_minor, t.payments_minor, t.debits_minor
        ));
    }
    files.push(SettlementFile {
        name: format!("summary-{day}.csv"),
        csv: summary,
    });
    if !merchants.is_empty() {
        let mut csv = String::from("merchant,sales_minor,refunds_minor,fee_minor,net_minor\n");
        for (party, (sales, refunds)) in &merchants {
            // What we owe the merchant for the day: its sales less its refunds and its fee.
            let fee = sales * i128::from(merchant_fee_bps) / 10_000;
            let net = sales - refunds - fee;
            csv.push_str(&format!("{party},{sales},{refunds},{fee},{net}\n"));
        }
        files.push(SettlementFile {
            name: format!("merchants-{day}.csv"),
            csv,
        });
    }
    Ok(files)
}

/// Settlement errors.
#[derive(Debug, thiserror::Error)]
pub enum SettlementError {
    /// The day is malformed.
    #[error("{0}")]
    Day(String),
    /// The merchant fee is above [`MAX_MERCHANT_FEE_BPS`] (more than the sale itself).
    #[error("merchant fee of {0} basis points is above 10000 (100 % of the sale)")]
    FeeTooHigh(u32),
    /// Storage.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn day_bounds_are_utc_midnights() {
        assert_eq!(
            day_bounds("1970-01-02").unwrap(),
            (86_400_000, 2 * 86_400_000)
        );
        assert!(day_bounds("2026-13-01").is_err());
        assert!(day_bounds("yesterday").is_err());
    }

    #[test]
    fn a_merchant_fee_above_the_whole_sale_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = crate::ledger::Ledger::open(dir.path(), 16 << 20).unwrap();
        assert!(settlement_with_fees(&l, "2024-10-04", MAX_MERCHANT_FEE_BPS).is_ok());
        match settlement_with_fees(&l, "2024-10-04", 10_001) {
            Err(SettlementError::FeeTooHigh(10_001)) => {}
            other => panic!("a fee of 10001 bps settled: {other:?}"),
        }
        assert!(matches!(
            settlement_with_fees(&l, "2024-10-04", u32::MAX),
            Err(SettlementError::FeeTooHigh(_))
        ));
    }

    #[test]
    fn a_day_of_franchise_activity_settles() {
        let dir = tempfile::tempdir().unwrap();
        let l = crate::ledger::Ledger::open(dir.path(), 16 << 20).unwrap();
        let day = 86_400_000 * 20_000; // 2024-10-04
        let load = |uid: [u8; 7], amount: i32| {
            purse::sam::TmacVerified::for_tests(purse::receipt::CommitReceipt::for_tests(
                uid,
                1,
                [0; 8],
                purse::receipt::TxKind::Credit,
                amount,
                amount,
            ))
        };
        let (a, b) = ([4, 1, 0, 0, 0, 0, 1], [4, 2, 0, 0, 0, 0, 1]);
        let (load_a, load_b) = (load(a, 2_000), load(b, 999));
        l.transact(move |t| {
            t.post_franchise_load(
                &load_a,
                "shop",
                "franchise-load:04010000000001:1",
                day + 1_000,
            )
            .unwrap();
            t.post(
                day + 2_000,
                "bank:settlements",
                "franchise:shop",
                1_500,
                "franchise-payment:shop:b1",
            )
            .unwrap();
            t.post_franchise_load(&load_b, "shop", "franchise-load:04020000000001:1", day - 1)
                .unwrap();
            Ok(())
        })
        .unwrap();
        let files = settlement(&l, "2024-10-04").unwrap();
        let shop = files
            .iter()
            .find(|f| f.name == "franchise-shop-2024-10-04.csv")
            .unwrap();
        assert_eq!(shop.csv.lines().count(), 3, "{}", shop.csv);
        assert!(shop.csv.contains(
            "2024-10-04T00:00:01Z,load,04010000000001,1,2000,franchise-load:04010000000001:1"
        ));
        let summary = files
            .iter()
            .find(|f| f.name == "summary-2024-10-04.csv")
            .unwrap();
        assert!(
            summary.csv.contains("franchise:shop,2000,1500,0,500"),
            "{}",
            summary.csv
        );
    }
}
