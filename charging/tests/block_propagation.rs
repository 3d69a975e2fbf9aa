//! The gateways' block-propagation figures kept by the ledger (on LMDB, and on PostgreSQL with
//! `TAPGATE_TEST_LEDGER=postgres`): per gateway, the latest figure of each version, the newest
//! 64 versions; a card blocked at version V reads, per gateway, the figure of the oldest
//! version it published at or after V.

use charging::ledger::{block_propagation, BlockReach};
use tapgate_testkit::charging::test_ledger;

fn figure(version: u64, online: u64, holding: u64, to_100: Option<u64>) -> BlockReach {
    BlockReach {
        version,
        published_at_ms: 1_000 * version,
        online_validators: online,
        holding,
        ms_to_50: (holding * 2 >= online && holding > 0).then_some(100),
        ms_to_99: to_100,
        ms_to_100: to_100,
        reported_ms: 0,
    }
}

#[test]
fn the_latest_figure_per_gateway_and_version_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (ledger, _pg) = test_ledger(&dir.path().join("ledger"));
    assert!(ledger
        .read()
        .unwrap()
        .block_propagation()
        .unwrap()
        .is_empty());

    let record = |gw: &'static str, figures: Vec<BlockReach>, now: u64| {
        ledger
            .transact(move |t| t.record_block_propagation(gw, &figures, now))
            .unwrap()
    };
    assert_eq!(record("west", vec![figure(2, 4, 1, None)], 10), 1);
    assert_eq!(
        record(
            "east",
            vec![figure(2, 3, 0, None), figure(5, 3, 0, None)],
            11
        ),
        2
    );
    // A later figure of version 2 replaces the first; version 3 is added between.
    assert_eq!(
        record(
            "west",
            vec![figure(3, 4, 4, Some(900)), figure(2, 4, 4, Some(800))],
            12
        ),
        2
    );

    let all = ledger.read().unwrap().block_propagation().unwrap();
    let names: Vec<&str> = all.iter().map(|(g, _)| g.as_str()).collect();
    assert_eq!(names, ["east", "west"]);
    let west = &all[1].1;
    assert_eq!(west.iter().map(|f| f.version).collect::<Vec<_>>(), [2, 3]);
    assert_eq!(
        (west[0].holding, west[0].ms_to_100, west[0].reported_ms),
        (4, Some(800), 12)
    );

    // A card blocked at version 4: east published 5 (which holds 4), west has not yet.
    let east = &all[0].1;
    assert_eq!(
        block_propagation::reach_of(east, 4).map(|f| f.version),
        Some(5)
    );
    assert_eq!(block_propagation::reach_of(west, 4), None);
    assert_eq!(
        block_propagation::reach_of(west, 1).map(|f| f.version),
        Some(2)
    );

    // Only the newest 64 versions are kept.
    let many: Vec<BlockReach> = (10..80).map(|v| figure(v, 1, 1, Some(5))).collect();
    assert_eq!(record("west", many, 13), block_propagation::KEPT_VERSIONS);
    let all = ledger.read().unwrap().block_propagation().unwrap();
    let west = &all[1].1;
    assert_eq!(west.first().map(|f| f.version), Some(16));
    assert_eq!(west.last().map(|f| f.version), Some(79));
    ledger.close();
}

#[test]
fn a_figure_no_gateway_could_measure_is_refused() {
    let mut f = figure(1, 2, 3, None);
    assert!(f.check().is_err(), "more holders than validators");
    f.holding = 0;
    f.ms_to_100 = Some(5);
    f.ms_to_99 = Some(5);
    assert!(f.check().is_err(), "100 % with no holder");
    f = figure(1, 2, 2, Some(50));
    f.ms_to_50 = Some(80);
    assert!(f.check().is_err(), "50 % after 100 %");
    f.ms_to_50 = Some(10);
    assert!(f.check().is_ok());
    assert_eq!(f.percent(), 100);
    assert_eq!(figure(1, 3, 2, None).percent(), 66);
    assert_eq!(figure(1, 0, 0, None).percent(), 0);
}
