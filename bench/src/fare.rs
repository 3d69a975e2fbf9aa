//! Bench scenario `fare`: a 3-leg journey with transfers (bus → metro under a distance-combined
//! transfer → regional rail on an origin–destination zone table) quoted against a city-sized
//! table (`fare_rules::synth::CitySize::CITY`: ~5,000 stops, 330 routes, ~800 leg rules).
//!
//! Figures: `median_ns`/`p99_ns` for the whole-journey quote (`Engine::price_journey`, what
//! `tapgate fare quote` runs); `tap_median_ns`/`tap_p99_ns` for the validator's quote at the
//! journey's last tap-out (`Engine::quote_tap`: rebuilds the journey from the card's records
//! and prices it twice); the compiled table's signed size and the time to verify and load it.
//!
//! The floor, in the same run: `flat_median_ns`/`flat_p99_ns`, a one-leg quote on a trivial
//! table (one route of two stops, one flat fare, nothing else), and `ratio_to_flat` and
//! `tap_ratio_to_flat`, the journey and tap medians over it.

use crate::stats::{quantile, time_each};
use crate::Figures;
use ed25519_dalek::{Signer, SigningKey};
use fare_rules::cases::{parse_local, SimCard};
use fare_rules::engine::{CardView, Engine, Leg, Rider, Tap};
use fare_rules::record::TapKind;
use fare_rules::synth::{bus_stop, city_source, metro_stop, rail_stop, CitySize};
use fare_rules::table::NONE;
use std::hint::black_box;
use std::time::Instant;

pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(200_000);
    let size = CitySize::CITY;
    let (signed, pk, compile_ms) = signed_city_table(size)?;
    let loads = time_each(3, 21, || {
        black_box(fare_rules::signed::verify(black_box(&signed), &pk).expect("verify"));
    });
    let engine = fare_rules::signed::verify(&signed, &pk)?;

    let legs = journey(&engine, size)?;
    let rider = Rider {
        category: NONE,
        medium: NONE,
    };
    let priced = engine
        .price_journey(rider, &legs)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let transfers = priced.legs().iter().filter(|l| l.transfer != NONE).count();
    anyhow::ensure!(
        transfers == 2,
        "the bench journey should transfer twice: {priced:?}"
    );
    let samples = time_each(n / 10, n, || {
        black_box(
            engine
                .price_journey(rider, black_box(&legs))
                .expect("quote"),
        );
    });

    // The validator's view: the card holds the first five taps; quote the last tap-out.
    let (card, last, total) = tap_by_tap(&engine, rider, &legs)?;
    anyhow::ensure!(
        total == priced.total_minor,
        "tap by tap ({total}) and whole journey ({}) disagree",
        priced.total_minor
    );
    let view = CardView {
        rider,
        history: &card.history,
        passes: &[],
    };
    let tap_samples = time_each(n / 10, n, || {
        black_box(
            engine
                .quote_tap(black_box(&view), black_box(&last))
                .expect("tap"),
        );
    });

    let flat = flat_quote(n)?;
    let t = engine.table();
    let (median, tap_median) = (quantile(&samples, 0.5), quantile(&tap_samples, 0.5));
    let flat_median = quantile(&flat, 0.5);
    Ok(vec![
        ("n", n.into()),
        ("median_ns", median.into()),
        ("p99_ns", quantile(&samples, 0.99).into()),
        ("tap_median_ns", tap_median.into()),
        ("tap_p99_ns", quantile(&tap_samples, 0.99).into()),
        ("flat_median_ns", flat_median.into()),
        ("flat_p99_ns", quantile(&flat, 0.99).into()),
        (
            "ratio_to_flat",
            crate::limits::ratio(median as f64, flat_median as f64),
        ),
        (
            "tap_ratio_to_flat",
            crate::limits::ratio(tap_median as f64, flat_median as f64),
        ),
        ("journey_total_minor", priced.total_minor.into()),
        ("stops", t.stops.len().into()),
        ("routes", t.routes.len().into()),
        ("leg_rules", t.leg_rules.len().into()),
        ("table_bytes", signed.len().into()),
        ("load_ms", (quantile(&loads, 0.5) as f64 / 1e6).into()),
        ("compile_ms", compile_ms.into()),
    ])
}

/// The city-sized table compiled and signed: the signed bytes, the verifying key and the
/// compile time (ms).
fn signed_city_table(size: CitySize) -> anyhow::Result<(Vec<u8>, [u8; 32], f64)> {
    let src = city_source(size);
    let t0 = Instant::now();
    let table =
        fare_rules::source::compile("city.toml", &src).map_err(|e| anyhow::anyhow!("{e}"))?;
    let compile_ms = t0.elapsed().as_secs_f64() * 1e3;
    let key = SigningKey::from_bytes(&[9; 32]);
    let signed = fare_rules::signed::encode(&table, |m| key.sign(m).to_bytes())?;
    Ok((signed, key.verifying_key().to_bytes(), compile_ms))
}

/// The bench journey: bus → metro (a distance-combined transfer) → regional rail.
fn journey(engine: &Engine, size: CitySize) -> anyhow::Result<[Leg; 3]> {
    let id = |s: &str| engine.stop(s).ok_or_else(|| anyhow::anyhow!("no stop {s}"));
    let route = |s: &str| {
        engine
            .route(s)
            .ok_or_else(|| anyhow::anyhow!("no route {s}"))
    };
    let at = |s: &str| parse_local(&format!("2026-12-01T{s}")).map_err(|e| anyhow::anyhow!(e));
    let (b, m, r) = (5usize, 5usize, 5usize);
    let interchange = metro_stop(m, size.stops_per_metro_line - 1);
    Ok([
        Leg {
            route: route(&format!("B{b}"))?,
            from_stop: id(&bus_stop(b, size.stops_per_bus_route - 1))?,
            to_stop: id(&metro_stop(
                b % size.metro_lines,
                (b / size.metro_lines) % size.stops_per_metro_line,
            ))?,
            departure_s: at("08:00")?,
            arrival_s: at("08:20")?,
        },
        Leg {
            route: route(&format!("M{m}"))?,
            from_stop: id(&metro_stop(m, 0))?,
            to_stop: id(&interchange)?,
            departure_s: at("08:25")?,
            arrival_s: at("09:05")?,
        },
        Leg {
            route: route(&format!("R{r}"))?,
            from_stop: id(&interchange)?,
            to_stop: id(&rail_stop(r, size.stops_per_rail_line - 1))?,
            departure_s: at("09:10")?,
            arrival_s: at("09:50")?,
        },
    ])
}

/// The journey tapped in and out leg by leg on a card: the card holding the first five taps'
/// records, the last tap-out, and the fares of all six quoted as the validator does.
fn tap_by_tap(engine: &Engine, rider: Rider, legs: &[Leg]) -> anyhow::Result<(SimCard, Tap, u64)> {
    let taps = |l: &Leg| {
        [
            Tap {
                kind: TapKind::In,
                time_s: l.departure_s as u32,
                route: l.route,
                stop: l.from_stop,
            },
            Tap {
                kind: TapKind::Out,
                time_s: l.arrival_s as u32,
                route: l.route,
                stop: l.to_stop,
            },
        ]
    };
    let all: Vec<Tap> = legs.iter().flat_map(taps).collect();
    let mut card = SimCard::default();
    let mut total = 0u64;
    for (k, tap) in all.iter().enumerate() {
        let view = CardView {
            rider,
            history: &card.history,
            passes: &[],
        };
        let q = engine
            .quote_tap(&view, tap)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        total += u64::from(q.fare_minor);
        if k < 5 {
            card.write(&q.record);
        }
    }
    Ok((card, all[5], total))
}

/// A trivial table: one network, one route of two stops, one flat fare.
const FLAT: &str = r#"
[table]
name = "Flat"
version = 1
currency = "KRW"
effective_from = "2026-01-01"

[networks.bus]

[[routes]]
id = "B1"
network = "bus"
stops = ["A", "B"]

[products]
flat = { name = "Flat fare", price = 1000 }

[[fares]]
id = "flat"
network = "bus"
product = "flat"
"#;

/// `n` one-leg quotes on [`FLAT`] (after `n / 10` warm-up runs): sorted ns per quote.
fn flat_quote(n: u64) -> anyhow::Result<Vec<u64>> {
    let table =
        fare_rules::source::compile("flat.toml", FLAT).map_err(|e| anyhow::anyhow!("{e}"))?;
    let engine = fare_rules::engine::Engine::new(table).map_err(|e| anyhow::anyhow!("{e}"))?;
    let at = |s: &str| parse_local(&format!("2026-12-01T{s}")).map_err(|e| anyhow::anyhow!(e));
    let stop = |s: &str| engine.stop(s).ok_or_else(|| anyhow::anyhow!("no stop {s}"));
    let legs = [Leg {
        route: engine
            .route("B1")
            .ok_or_else(|| anyhow::anyhow!("no route B1"))?,
        from_stop: stop("A")?,
        to_stop: stop("B")?,
        departure_s: at("08:00")?,
        arrival_s: at("08:20")?,
    }];
    let rider = Rider {
        category: NONE,
        medium: NONE,
    };
    let total = engine
        .price_journey(rider, &legs)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .total_minor;
    anyhow::ensure!(total == 1000, "the flat fare should be 1000, got {total}");
    Ok(time_each(n / 10, n, || {
        black_box(
            engine
                .price_journey(rider, black_box(&legs))
                .expect("quote"),
        );
    }))
}
