//! The sample rule sets compile and every golden case beside them holds.

use fare_rules::cases::run_cases;
use fare_rules::engine::Engine;
use fare_rules::source::compile;
use std::path::Path;

fn run(dir: &str) {
    let base = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("samples")
        .join(dir);
    let rules = std::fs::read_to_string(base.join("rules.toml")).unwrap();
    let table = compile("rules.toml", &rules).unwrap_or_else(|e| panic!("{e}"));
    let engine = Engine::new(table).unwrap();
    let cases = std::fs::read_to_string(base.join("cases.toml")).unwrap();
    let results = run_cases(&engine, "cases.toml", &cases).unwrap_or_else(|e| panic!("{e}"));
    assert!(!results.is_empty());
    let mut failed = Vec::new();
    for r in &results {
        if !r.passed() {
            failed.push(format!(
                "{} (line {}): expected {:?} total {:?}, got {:?} {}\n  {}",
                r.name,
                r.line,
                r.expected,
                r.expected_total,
                r.actual,
                r.error.clone().unwrap_or_default(),
                r.explained.join("\n  ")
            ));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn metro_city_cases_hold() {
    run("metro-city");
}

#[test]
fn hotel_cases_hold() {
    run("hotel");
}
