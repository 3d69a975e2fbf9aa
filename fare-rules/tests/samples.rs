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

/// docs/fare-rules.md shows the samples verbatim: they cannot drift apart.
#[test]
fn the_docs_show_the_samples_as_they_are() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("../docs/fare-rules.md")).unwrap();
    for s in ["metro-city/rules.toml", "hotel/rules.toml"] {
        let src = std::fs::read_to_string(root.join("samples").join(s)).unwrap();
        assert!(
            doc.contains(&src),
            "docs/fare-rules.md does not show samples/{s} as it is"
        );
    }
}
