//! `[mqtt] fallback_brokers`: a broker cluster's other nodes, checked at start-up.

use validator::config::Config;

fn config(mqtt: &str) -> Config {
    Config::from_toml(&format!(
        "device_id = 1001\noperator = \"metro\"\nstop = \"Central\"\njournal = \"j\"\nkeys = \"keys\"\n[mqtt]\n{mqtt}"
    ))
    .unwrap()
}

#[test]
fn the_other_nodes_of_a_cluster_follow_the_broker_in_order() {
    let c = config(
        "broker = \"mqtt://n1:1883\"\nfallback_brokers = [\"mqtt://n2:1884\", \"mqtt://n3:1885\"]\n",
    );
    let m = c.mqtt_settings().unwrap().unwrap();
    assert_eq!((m.host.as_str(), m.port), ("n1", 1883));
    assert_eq!(
        m.fallback,
        vec![("n2".to_string(), 1884), ("n3".to_string(), 1885)]
    );
    let alone = config("broker = \"mqtt://n1:1883\"\n");
    assert!(alone.mqtt_settings().unwrap().unwrap().fallback.is_empty());
}

#[test]
fn a_fallback_of_another_scheme_or_without_a_port_is_refused() {
    for fallback in ["mqtts://n2:8883", "mqtt://n2", "tcp://n2:1883"] {
        let c = config(&format!(
            "broker = \"mqtt://n1:1883\"\nfallback_brokers = [\"{fallback}\"]\n"
        ));
        let e = c.mqtt_settings().err().map(|e| e.to_string());
        assert!(e.is_some(), "{fallback} was accepted");
    }
}

#[test]
fn the_connect_timeout_defaults_to_30_s_and_is_bounded() {
    let default = config("broker = \"mqtt://n1:1883\"\n");
    assert_eq!(
        default.mqtt_settings().unwrap().unwrap().connect_timeout,
        std::time::Duration::from_secs(validator::config::DEFAULT_CONNECT_TIMEOUT_S)
    );
    let set = config("broker = \"mqtt://n1:1883\"\nconnect_timeout_s = 5\n");
    assert_eq!(
        set.mqtt_settings().unwrap().unwrap().connect_timeout,
        std::time::Duration::from_secs(5)
    );
    for bad in [0, 301, 100_000] {
        let c = config(&format!(
            "broker = \"mqtt://n1:1883\"\nconnect_timeout_s = {bad}\n"
        ));
        let e = c
            .mqtt_settings()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(e.contains("connect_timeout_s"), "{bad}: {e:?}");
    }
}
