//! Bad fare files get a precise error: the file, the line, the field, and what would do.

use fare_rules::source::{compile, SourceError};

const SAMPLE: &str = include_str!("../samples/metro-city/rules.toml");

fn err_of(src: &str) -> String {
    match compile("rules.toml", src) {
        Ok(_) => panic!("compiled"),
        Err(e) => e.to_string(),
    }
}

fn line_of(src: &str, needle: &str) -> usize {
    src[..src.find(needle).expect("needle")]
        .matches('\n')
        .count()
        + 1
}

fn replaced(from: &str, to: &str) -> String {
    assert!(SAMPLE.contains(from), "{from}");
    SAMPLE.replacen(from, to, 1)
}

#[test]
fn malformed_toml() {
    let e = err_of("[table\nname = 1");
    assert!(
        e.starts_with("rules.toml: TOML parse error at line 1"),
        "{e}"
    );
}

#[test]
fn a_duration_without_unit() {
    let src = replaced("within = \"30m\"", "within = \"30\"");
    let e = err_of(&src);
    assert!(
        e.contains(&format!("line {}", line_of(&src, "within = \"30\""))),
        "{e}"
    );
    assert!(
        e.contains("duration \"30\" needs a unit, e.g. \"30m\""),
        "{e}"
    );
}

#[test]
fn fractional_money() {
    let src = replaced("penalty = 2800", "penalty = 28.5");
    let e = err_of(&src);
    assert!(e.contains("not whole minor units"), "{e}");
    assert!(e.contains("write 2850"), "{e}");
}

#[test]
fn an_unknown_network_with_a_suggestion() {
    let src = replaced(
        "id = \"metro\"\nnetwork = \"metro\"",
        "id = \"metro\"\nnetwork = \"metor\"",
    );
    let e = err_of(&src);
    assert_eq!(
        e,
        format!(
            "rules.toml line {}, field fares.network: unknown network \"metor\"; did you mean \"metro\"?",
            line_of(&src, "network = \"metor\"")
        )
    );
}

#[test]
fn an_unknown_stop_in_a_join() {
    let src = format!("{SAMPLE}\n[[joins]]\nfrom_network = \"metro\"\nto_network = \"metro\"\nfrom_stop = \"Centrall\"\n");
    let e = err_of(&src);
    assert!(
        e.contains("field joins.from_stop: unknown stop \"Centrall\"; did you mean \"Central\"?"),
        "{e}"
    );
}

#[test]
fn an_unknown_field_lists_the_known_ones() {
    let src = replaced("within = \"30m\"", "windw = \"30m\"");
    let e = err_of(&src);
    assert!(e.contains("unknown field `windw`"), "{e}");
    assert!(e.contains("within"), "{e}");
}

#[test]
fn cyclic_products() {
    let src = replaced(
        "night_bus = { name = \"Night bus\", like = \"bus_base\", add = 1000 }",
        "night_bus = { name = \"Night bus\", like = \"late_bus\", add = 1000 }\nlate_bus = { like = \"night_bus\" }",
    );
    let e = err_of(&src);
    assert!(e.contains("products refer to each other in a cycle"), "{e}");
    assert!(e.contains("late_bus → night_bus → late_bus"), "{e}");
}

#[test]
fn contradictory_origin_destination_prices() {
    let src = replaced(
        "  [\"city\", \"airport\", 4750],",
        "  [\"city\", \"airport\", 4750],\n  [\"airport\", \"city\", 4800],",
    );
    let e = err_of(&src);
    assert!(
        e.contains("contradictory prices for airport → city: 4800 here, 4750 at line"),
        "{e}"
    );
}

#[test]
fn exactly_one_default_category() {
    let src = replaced("adult = { default = true }", "adult = {}");
    assert!(err_of(&src).contains("exactly one rider category needs `default = true` (found 0)"));
}

#[test]
fn a_bad_transfer_pricing_names_the_choices() {
    let src = replaced("pricing = \"distance_combined\"", "pricing = \"combined\"");
    let e = err_of(&src);
    assert!(
        e.contains("field transfers.pricing: \"combined\" is not a transfer pricing; use free"),
        "{e}"
    );
}

#[test]
fn distance_bands_out_of_order() {
    let src = replaced(
        "{ upto = \"50km\", every = \"5km\", add = 100 },",
        "{ upto = \"5km\", every = \"5km\", add = 100 },",
    );
    let e = err_of(&src);
    assert!(
        e.contains("band 1 ends at 5000 m, not after where the previous one ends (10000 m)"),
        "{e}"
    );
}

#[test]
fn a_fare_needs_one_price_source() {
    let src = replaced(
        "id = \"nightbus\"\nnetwork = \"nightbus\"\nproduct = \"night_bus\"",
        "id = \"nightbus\"\nnetwork = \"nightbus\"",
    );
    let e = err_of(&src);
    assert!(
        e.contains("needs exactly one of `price`, `product` or `od`"),
        "{e}"
    );
    assert!(matches!(compile("r", &src), Err(SourceError::Field { .. })));
}

#[test]
fn table_and_section_errors_point_at_their_section() {
    let src = replaced(
        "effective_from = \"2026-01-01\"",
        "effective_from = \"2026-01-01\"\neffective_until = \"2025-01-01\"",
    );
    let e = err_of(&src);
    assert!(
        e.contains(&format!(
            "line {}, field table.effective_until",
            line_of(&src, "[table]")
        )),
        "{e}"
    );
    let src = replaced("adult = { default = true }", "adult = {}");
    let e = err_of(&src);
    assert!(
        e.contains(&format!(
            "line {}, field categories",
            line_of(&src, "[categories]")
        )),
        "{e}"
    );
}

#[test]
fn silent_no_ops_are_refused() {
    let e = err_of(&replaced(
        "categories = [\"adult\", \"youth\"]\n\n[[caps]]\nid = \"weekly\"",
        "categories = []\n\n[[caps]]\nid = \"weekly\"",
    ));
    assert!(e.contains("an empty list caps nobody"), "{e}");
    let e = err_of(&replaced(
        "pricing = \"distance_combined\"",
        "pricing = \"cost_only\"",
    ));
    assert!(e.contains("give it (0 would make it free)"), "{e}");
    let e = err_of(&replaced(
        "id = \"nightbus\"\n",
        "id = \"nightbus\"\nsymmetric = true\n",
    ));
    assert!(e.contains("`symmetric` applies to an `od` table"), "{e}");
    let e = err_of(&replaced("{ days = \"mon-fri\", from = \"07:00\", to = \"09:30\" }", "{ days = \"mon-fri\", from = \"07:00\", to = \"09:30\", start = \"2026-05-01\", end = \"2026-04-01\" }"));
    assert!(e.contains("the span ends before it starts"), "{e}");
}
