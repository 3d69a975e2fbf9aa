//! `tapgate fare …`: check, compile, test, explain, simulate and quote fare rules.
//!
//! RULES is a TOML source file, a GTFS feed (directory or .zip), or a compiled table (`.tgft`,
//! read without its signature being checked unless `--pubkey` is given).

use crate::cli_util::write_atomic;
use crate::keys_cmd::KeyOpts;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use fare_rules::cases::run_cases;
use fare_rules::engine::Engine;
use fare_rules::journey::{quote, Journey};
use fare_rules::{publish, signed, simulate};
use purse::sam::{Hsm, SoftwareHsm};
use std::path::{Path, PathBuf};

/// Arguments of `tapgate fare`.
#[derive(Args)]
pub struct FareArgs {
    #[command(subcommand)]
    cmd: FareCmd,
}

#[derive(Subcommand)]
enum FareCmd {
    /// Report contradictory, overlapping and unreachable rules, uncovered stop pairs and unused
    /// definitions (exit 1 if there is an error).
    Check {
        /// Rules: a .toml source, a GTFS directory or a .tgft table.
        rules: PathBuf,
    },
    /// Compile rules into a signed table for validators.
    Compile {
        rules: PathBuf,
        // The issuer key set (signs with its Ed25519 key).
        #[command(flatten)]
        keys: KeyOpts,
        /// Output file (.tgft).
        #[arg(long)]
        out: PathBuf,
        /// Compile even if `fare check` finds errors.
        #[arg(long)]
        force: bool,
    },
    /// Send rules to the charging server to check, sign in its HSM and publish to validators
    /// through the gateways (exit 1 if `fare check` finds an error: nothing is published).
    Publish {
        /// Rules: a .toml source or a zipped GTFS feed.
        rules: PathBuf,
        /// The charging server's base URL.
        #[arg(long)]
        server: String,
        /// An operator's API token (default: $TAPGATE_TOKEN).
        #[arg(long, env = "TAPGATE_TOKEN", hide_env_values = true)]
        token: String,
    },
    /// Show a compiled table's header and contents, verifying its signature if given a key.
    Inspect {
        table: PathBuf,
        /// The operator's Ed25519 public key, 64 hex digits.
        #[arg(long)]
        pubkey: Option<String>,
    },
    /// Run golden journeys: these taps, this rider → these fares (exit 1 if one fails).
    Test { rules: PathBuf, cases: PathBuf },
    /// The breakdown of quotes: every tap of the cases in CASES (or only --case NAME), or one
    /// whole journey (--journey FILE, the JSON of `fare quote`).
    Explain {
        rules: PathBuf,
        cases: Option<PathBuf>,
        #[arg(long)]
        case: Option<String>,
        #[arg(long)]
        journey: Option<PathBuf>,
    },
    /// Replay a tap log under new and baseline rules: revenue and per-rider-category impact.
    Simulate {
        #[arg(long)]
        rules: PathBuf,
        #[arg(long)]
        baseline: PathBuf,
        /// CSV with a header: card,rider,at,route,stop,kind.
        #[arg(long)]
        taps: PathBuf,
    },
    /// Quote a journey (JSON) against a GTFS-Fares v2 feed or rules; prints one JSON object
    /// on the last line.
    Quote {
        /// A GTFS feed: a directory or a .zip file (Fares v2, or v1 when it has no v2 files).
        #[arg(long, conflicts_with = "rules")]
        gtfs: Option<PathBuf>,
        /// A .toml source or .tgft table instead of a feed.
        #[arg(long)]
        rules: Option<PathBuf>,
        /// The journey JSON file ("-" for standard input).
        #[arg(long)]
        journey: PathBuf,
    },
}

fn engine(path: &Path) -> Result<Engine> {
    let t = fare_rules::load_any(path)?;
    Engine::new(t).with_context(|| format!("fare table from {}", path.display()))
}

fn read_text(path: &Path) -> Result<String> {
    if path == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        return Ok(s);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn money(minor: i64, exponent: u8) -> String {
    if exponent == 0 {
        return minor.to_string();
    }
    let p = 10i64.pow(u32::from(exponent));
    let sign = if minor < 0 { "-" } else { "" };
    let m = minor.abs();
    format!("{sign}{}.{:0w$}", m / p, m % p, w = usize::from(exponent))
}

/// Run `tapgate fare …`; returns the process exit code.
pub fn run(args: FareArgs) -> Result<u8> {
    match args.cmd {
        FareCmd::Check { rules } => check(&rules),
        FareCmd::Compile {
            rules,
            keys,
            out,
            force,
        } => compile(&rules, &keys, &out, force),
        FareCmd::Publish {
            rules,
            server,
            token,
        } => publish_rules(&rules, &server, &token),
        FareCmd::Inspect { table, pubkey } => inspect(&table, pubkey),
        FareCmd::Test { rules, cases } => test(&rules, &cases),
        FareCmd::Explain {
            rules,
            cases,
            case,
            journey,
        } => {
            let e = engine(&rules)?;
            match (journey, cases) {
                (Some(j), _) => explain_journey(&e, &j),
                (None, Some(cases)) => explain_cases(&e, &cases, case),
                (None, None) => bail!(crate::cli_util::input_err(
                    "give a CASES file (optionally --case NAME) or --journey FILE"
                )),
            }
        }
        FareCmd::Simulate {
            rules,
            baseline,
            taps,
        } => simulate(&rules, &baseline, &taps),
        FareCmd::Quote {
            gtfs,
            rules,
            journey,
        } => {
            let src = match (gtfs, rules) {
                (Some(g), None) => g,
                (None, Some(r)) => r,
                _ => bail!(crate::cli_util::input_err(
                    "give the fares: --gtfs DIR|ZIP (or --rules FILE)"
                )),
            };
            quote_journey(&src, &journey)
        }
    }
}

/// `fare check`: the findings, then a summary line; exit 1 on an error.
fn check(rules: &Path) -> Result<u8> {
    let e = engine(rules)?;
    let r = publish::review(&e, publish::authored(rules));
    for f in &r.findings {
        println!("{f}");
    }
    println!("{}", r.summary);
    Ok(u8::from(r.errors > 0))
}

/// `fare compile`: check (unless forced), sign with the key set's Ed25519 key, verify, write.
fn compile(rules: &Path, keys: &KeyOpts, out: &Path, force: bool) -> Result<u8> {
    let e = engine(rules)?;
    let ks = keys.load()?;
    let hsm = SoftwareHsm::new(&ks)?;
    let sign = |m: &[u8]| hsm.sign(m);
    let bytes = match publish::sign_checked(
        &e,
        publish::authored(rules),
        force,
        sign,
        &hsm.verifying_key(),
    ) {
        Ok(b) => b,
        Err(publish::SignError::Findings(errors)) => {
            for f in &errors {
                eprintln!("{f}");
            }
            bail!(
                "{} error(s) in {}: fix them (see `tapgate fare check`) or pass --force",
                errors.len(),
                rules.display()
            );
        }
        Err(err) => return Err(err.into()),
    };
    write_atomic(out, &bytes)?;
    let t = e.table();
    println!(
        "compiled {} version {} ({} rules, {} stops) into {}: {} bytes, signed",
        t.meta.name,
        t.meta.version,
        t.leg_rules.len(),
        t.stops.len(),
        out.display(),
        bytes.len()
    );
    Ok(0)
}

/// `fare publish`: the rules sent to the charging server, which checks them, signs them in its
/// HSM and hands them to the gateways for validators (`POST /v1/fares`, what the operator
/// console's *Publish* does). Exit 1 when `fare check` found an error (nothing published).
fn publish_rules(rules: &Path, server: &str, token: &str) -> Result<u8> {
    if rules.is_dir() {
        bail!(crate::cli_util::input_err(
            "a GTFS feed is published zipped: give its .zip file"
        ));
    }
    let bytes = std::fs::read(rules).with_context(|| format!("reading {}", rules.display()))?;
    let name = rules
        .file_name()
        .map_or("rules".into(), |n| n.to_string_lossy().into_owned());
    let url = format!("{}/v1/fares", server.trim_end_matches('/'));
    let answer = match ureq::post(&url)
        .query("name", &name)
        .set("Authorization", &format!("Bearer {token}"))
        .set("Content-Type", "application/octet-stream")
        .send_bytes(&bytes)
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => bail!("{url}: {e}"),
    };
    let status = answer.status();
    let body: serde_json::Value = answer
        .into_json()
        .with_context(|| format!("{url}: the answer is not JSON (status {status})"))?;
    for f in body["findings"].as_array().into_iter().flatten() {
        println!("{}", f.as_str().unwrap_or_default());
    }
    if let Some(s) = body["summary"].as_str() {
        println!("{s}");
    }
    match status {
        201 => {
            println!(
                "published version {} ({} bytes, signed by the back office); the gateways relay it to validators",
                body["version"], body["bytes"]
            );
            Ok(0)
        }
        422 if body["error"] == "fare_check" => {
            println!("nothing published: fix the error(s) above");
            Ok(1)
        }
        _ => bail!(
            "{url}: {status} {}",
            body["detail"].as_str().unwrap_or_default()
        ),
    }
}

/// `fare inspect`: a signed table's header and contents, its signature checked if given a key.
fn inspect(table: &Path, pubkey: Option<String>) -> Result<u8> {
    let bytes = std::fs::read(table).with_context(|| format!("reading {}", table.display()))?;
    let h = signed::peek(&bytes).with_context(|| table.display().to_string())?;
    let (e, verified) = match pubkey {
        Some(k) => {
            let key: [u8; 32] = hex::decode(k.trim())
                .ok()
                .and_then(|v| v.try_into().ok())
                .ok_or_else(|| crate::cli_util::input_err("--pubkey must be 64 hex digits"))?;
            (signed::verify(&bytes, &key)?, true)
        }
        None => (signed::decode_unverified(&bytes)?, false),
    };
    let t = e.table();
    println!("table: {} version {}", t.meta.name, h.version);
    let day = |d: i32| {
        let s = fare_rules::cases::format_local(i64::from(d) * 86_400);
        s.get(..10).unwrap_or(&s).to_string()
    };
    println!(
        "effective: from {} until {}",
        day(h.effective_from_day),
        h.effective_until_day
            .map_or("further notice".to_string(), day)
    );
    println!(
        "contents: {} categories, {} networks, {} areas, {} stops, {} routes, {} products, {} leg rules, {} transfer rules, {} caps, {} passes, {} charges, {} coupons",
        t.categories.len(), t.networks.len(), t.areas.len(), t.stops.len(), t.routes.len(),
        t.products.len(), t.leg_rules.len(), t.transfer_rules.len(), t.caps.len(),
        t.passes.len(), t.charges.len(), t.coupons.len()
    );
    println!(
        "signature: {}",
        if verified {
            "verified"
        } else {
            "not checked (give --pubkey)"
        }
    );
    Ok(0)
}

/// `fare test`: golden journeys, each failure explained; exit 1 if one fails.
fn test(rules: &Path, cases: &Path) -> Result<u8> {
    let e = engine(rules)?;
    let text = read_text(cases)?;
    let results = run_cases(&e, &cases.display().to_string(), &text)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    let mut failed = 0;
    for r in &results {
        if r.passed() {
            println!("ok   {}", r.name);
            continue;
        }
        failed += 1;
        println!("FAIL {} ({}:{})", r.name, cases.display(), r.line);
        if let Some(err) = &r.error {
            println!("  error: {err}");
        }
        if let Some(exp) = &r.expected {
            println!("  expected fares: {exp:?}");
        }
        if let Some(t) = r.expected_total {
            println!("  expected total: {t}");
        }
        println!(
            "  actual fares:   {:?} (total {})",
            r.actual,
            r.actual.iter().map(|&f| u64::from(f)).sum::<u64>()
        );
        for (i, x) in r.explained.iter().enumerate() {
            let mark = match &r.expected {
                Some(exp) if exp.get(i) != r.actual.get(i) => "≠",
                _ => " ",
            };
            println!("  {mark} {}", x.replace('\n', "\n    "));
        }
    }
    println!(
        "fare test: {} passed, {failed} failed",
        results.len() - failed
    );
    Ok(u8::from(failed > 0))
}

/// `fare explain --journey FILE`: the breakdown of one whole journey's quote.
fn explain_journey(e: &Engine, j: &Path) -> Result<u8> {
    let text = read_text(j)?;
    let jn: Journey =
        serde_json::from_str(&text).with_context(|| format!("journey {}", j.display()))?;
    let q = quote(e, &jn).map_err(|err| anyhow::anyhow!("{err}"))?;
    let exp = e.table().meta.currency_exponent;
    for (i, l) in q.legs.iter().enumerate() {
        println!(
            "leg {} (journey legs {:?}) {} → {}: rule {} product {} fare {}{}; adds {}",
            i + 1,
            l.journey_legs,
            l.from_stop_id,
            l.to_stop_id,
            l.leg_rule,
            l.fare_product_id,
            l.fare_minor,
            l.transfer_rule
                .as_ref()
                .map_or(String::new(), |t| format!("; transfer {t}")),
            l.amount_minor
        );
    }
    // Amounts in minor units, as `fare test` and `fare explain --case` print them (and as the
    // rules are written); the total in the currency too.
    println!(
        "total {} ({})",
        q.total_minor,
        crate::money::amount(q.total_minor, exp, &q.currency)
    );
    Ok(0)
}

/// `fare explain CASES [--case NAME]`: every tap of the cases (or of the one named).
fn explain_cases(e: &Engine, cases: &Path, case: Option<String>) -> Result<u8> {
    let text = read_text(cases)?;
    let results = run_cases(e, &cases.display().to_string(), &text)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    let mut shown = 0;
    for r in results
        .iter()
        .filter(|r| case.as_ref().is_none_or(|c| &r.name == c))
    {
        shown += 1;
        println!("{}", r.name);
        for x in &r.explained {
            println!("  {}", x.replace('\n', "\n  "));
        }
        if let Some(err) = &r.error {
            println!("  error: {err}");
        }
        println!(
            "  total {}",
            r.actual.iter().map(|&f| u64::from(f)).sum::<u64>()
        );
    }
    if shown == 0 {
        bail!(crate::cli_util::input_err(format!(
            "no case named {:?} in {}",
            case.unwrap_or_default(),
            cases.display()
        )));
    }
    Ok(0)
}

/// `fare simulate`: a tap log replayed under new and baseline rules.
fn simulate(rules: &Path, baseline: &Path, taps: &Path) -> Result<u8> {
    let new = engine(rules)?;
    let old = engine(baseline)?;
    let log = read_text(taps)?;
    let rep = simulate::simulate(&new, &old, &taps.display().to_string(), &log)
        .map_err(|err| anyhow::anyhow!("{err}"))?;
    let exp = new.table().meta.currency_exponent;
    println!(
        "replayed {} taps of {} cards: baseline {} → new {} {} ({:+})",
        rep.taps,
        rep.cards,
        money(rep.total.baseline_minor, exp),
        money(rep.total.new_minor, exp),
        rep.currency,
        rep.total.change_minor
    );
    for (cat, imp) in &rep.by_rider_category {
        println!(
            "  {cat:<10} {:>7} taps  {} → {} ({:+})",
            imp.taps,
            money(imp.baseline_minor, exp),
            money(imp.new_minor, exp),
            imp.change_minor
        );
    }
    if rep.unpriced_taps > 0 {
        println!("  {} tap(s) could not be priced, e.g.:", rep.unpriced_taps);
        for x in &rep.unpriced_examples {
            println!("    {x}");
        }
    }
    println!("{}", serde_json::to_string(&rep)?);
    Ok(0)
}

/// `fare quote`: one journey's quote as JSON on the last line.
fn quote_journey(src: &Path, journey: &Path) -> Result<u8> {
    let e = engine(src)?;
    let text = read_text(journey)?;
    let jn: Journey = serde_json::from_str(&text).map_err(|err| {
        crate::cli_util::input_err(format!("journey {}: {err}", journey.display()))
    })?;
    let q = quote(&e, &jn).map_err(|err| anyhow::anyhow!("{err}"))?;
    println!("{}", serde_json::to_string(&q)?);
    Ok(0)
}
