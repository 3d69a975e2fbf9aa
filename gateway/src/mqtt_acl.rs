//! Who may publish and subscribe to what on the embedded broker: the promises of the shipped
//! Mosquitto ACL (`deploy/mosquitto/acl`), plus each device bound to its operator.
//!
//! A device (a validator; its username is its device id) publishes only its own taps and status
//! (`tapgate/v1/<its operator>/taps/<its id>`, `…/devices/<its id>/status`) and reads only its
//! own confirmations and action-list ceiling grant (`…/devices/<its id>/confirm`, `…/ceiling`)
//! and the downlink (`tapgate/v1/<any operator>/blocklist/#`, `…/fares/#`, `…/actions/#`). A
//! subscription filter is allowed only if every topic it can match is readable, so
//! `tapgate/v1/+/taps/+` or `#` is refused to a device. The gateway is not restricted.

/// What a connected client may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// The gateway (and the back office publishing fare tables with its credentials): every
    /// topic, any client id.
    Gateway,
    /// A validator: its username is its device id; `operator` binds it to one operator's topics
    /// (`None`: any operator, as Mosquitto's `%u` patterns allow).
    Device {
        /// The device id (its username).
        id: String,
        /// The operator whose topics it may use.
        operator: Option<String>,
    },
}

/// A name usable as one topic level in the ACL's rules: 1 to 64 ASCII letters, digits, `_`, `-`
/// or `.` (never a wildcard or a separator, which would widen a rule).
pub fn is_topic_safe(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// Whether `filter` is a valid MQTT 3.1.1 topic filter (§4.7.1): not empty, `#` only as the
/// whole last level, `+` only as a whole level.
pub fn is_valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        if l.contains('#') {
            *l == "#" && i == levels.len() - 1
        } else {
            !l.contains('+') || *l == "+"
        }
    })
}

/// Whether every topic that `filter` matches is also matched by `pattern` (both valid filters).
pub fn covers(pattern: &str, filter: &str) -> bool {
    let (mut p, mut f) = (pattern.split('/'), filter.split('/'));
    loop {
        match (p.next(), f.next()) {
            // `a/#` matches `a` and everything below it.
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some(_), None) | (None, Some(_)) => return false,
            (Some(pl), Some(fl)) => {
                let level_covered = match fl {
                    "#" => false,
                    "+" => pl == "+",
                    _ => pl == "+" || pl == fl,
                };
                if !level_covered {
                    return false;
                }
            }
        }
    }
}

impl Role {
    /// Whether this client may publish on `topic` (a topic name: wildcards are never allowed).
    pub fn may_publish(&self, topic: &str) -> bool {
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            return false;
        }
        match self {
            Role::Gateway => true,
            Role::Device { id, operator } => {
                let op_ok = |o: &str| match operator {
                    Some(op) => o == op,
                    None => is_topic_safe(o),
                };
                let levels: Vec<&str> = topic.split('/').collect();
                match levels.as_slice() {
                    ["tapgate", "v1", o, "taps", d] => op_ok(o) && d == id,
                    ["tapgate", "v1", o, "devices", d, "status"] => op_ok(o) && d == id,
                    _ => false,
                }
            }
        }
    }

    /// Whether this client may subscribe to `filter`: only if every topic it can match is
    /// readable. A shared subscription (`$share/<group>/<filter>`) is judged by its filter.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((group, f)) if is_topic_safe(group) => f,
                _ => return false,
            },
            None => filter,
        };
        if !is_valid_filter(filter) {
            return false;
        }
        match self {
            Role::Gateway => true,
            Role::Device { id, operator } => {
                let op = operator.as_deref().unwrap_or("+");
                let own_confirm = format!("tapgate/v1/{op}/devices/{id}/confirm");
                let own_ceiling = format!("tapgate/v1/{op}/devices/{id}/ceiling");
                [
                    own_confirm.as_str(),
                    own_ceiling.as_str(),
                    "tapgate/v1/+/blocklist/#",
                    "tapgate/v1/+/fares/#",
                    "tapgate/v1/+/actions/#",
                ]
                .iter()
                .any(|p| covers(p, filter))
            }
        }
    }
}

/// The device the unit tests here and the broker's act as: device 1001 of operator `metro`.
#[cfg(test)]
pub(crate) fn metro_1001() -> Role {
    Role::Device {
        id: "1001".into(),
        operator: Some("metro".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_publishes_only_its_own_taps_and_status_under_its_operator() {
        let d = metro_1001();
        assert!(d.may_publish("tapgate/v1/metro/taps/1001"));
        assert!(d.may_publish("tapgate/v1/metro/devices/1001/status"));
        for t in [
            "tapgate/v1/metro/taps/1002",
            "tapgate/v1/hotel/taps/1001",
            "tapgate/v1/metro/devices/1002/confirm",
            "tapgate/v1/metro/devices/1001/confirm",
            "tapgate/v1/metro/devices/1002/status",
            "tapgate/v1/metro/blocklist/snapshot",
            "tapgate/v1/metro/blocklist/snapshot/0",
            "tapgate/v1/metro/blocklist/snapshot/4095",
            "tapgate/v1/metro/blocklist/delta",
            "tapgate/v1/metro/fares/table",
            "tapgate/v1/metro/actions/delta",
            "tapgate/v1/metro/taps/1001/x",
            "tapgate/v1/metro/taps/+",
            "tapgate/v1/+/taps/1001",
            "$SYS/broker",
            "",
        ] {
            assert!(!d.may_publish(t), "{t}");
        }
        let unbound = Role::Device {
            id: "1001".into(),
            operator: None,
        };
        assert!(unbound.may_publish("tapgate/v1/hotel/taps/1001"));
        assert!(!unbound.may_publish("tapgate/v1//taps/1001"));
        assert!(!unbound.may_publish("tapgate/v1/metro/taps/1002"));
    }

    #[test]
    fn a_device_reads_only_its_own_confirmations_and_the_downlink() {
        let d = metro_1001();
        for f in [
            "tapgate/v1/metro/devices/1001/confirm",
            "tapgate/v1/metro/blocklist/snapshot",
            "tapgate/v1/metro/blocklist/delta",
            "tapgate/v1/metro/blocklist/#",
            "tapgate/v1/+/blocklist/#",
            "tapgate/v1/hotel/fares/table",
            "tapgate/v1/metro/fares/+",
            "tapgate/v1/metro/actions/snapshot",
            "tapgate/v1/metro/actions/delta",
            "tapgate/v1/+/actions/#",
            "tapgate/v1/metro/devices/1001/ceiling",
            "$share/g/tapgate/v1/metro/devices/1001/confirm",
        ] {
            assert!(d.may_subscribe(f), "{f}");
        }
        for f in [
            "#",
            "+/#",
            "tapgate/#",
            "tapgate/v1/#",
            "tapgate/v1/+/taps/+",
            "tapgate/v1/metro/taps/1001",
            "tapgate/v1/metro/taps/1002",
            "tapgate/v1/metro/devices/+/confirm",
            "tapgate/v1/metro/devices/1002/confirm",
            "tapgate/v1/metro/devices/1002/ceiling",
            "tapgate/v1/hotel/devices/1001/confirm",
            "tapgate/v1/+/devices/1001/confirm",
            "tapgate/v1/metro/devices/1001/#",
            "tapgate/v1/metro/devices/1001/status",
            "tapgate/v1/metro/+/snapshot",
            "tapgate/v1/+/+/#",
            "$SYS/#",
            "$share/g/#",
            "$share/#",
            "tapgate/v1/metro/blocklist#",
            "tapgate/v1/metro/blocklist/#/x",
            "tapgate/v1/metro/fares+",
            "",
        ] {
            assert!(!d.may_subscribe(f), "{f}");
        }
    }

    #[test]
    fn the_gateway_is_not_restricted_but_filters_must_be_valid() {
        assert!(Role::Gateway.may_subscribe("tapgate/v1/metro/taps/+"));
        assert!(Role::Gateway.may_subscribe("$share/gw/tapgate/v1/metro/taps/+"));
        assert!(Role::Gateway.may_publish("tapgate/v1/metro/devices/1001/confirm"));
        assert!(!Role::Gateway.may_subscribe("a/#/b"));
        assert!(!Role::Gateway.may_publish("a/+"));
    }

    #[test]
    fn covers_is_topic_set_inclusion() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/+/c"));
        assert!(covers("a/+", "a/b"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("a/+", "a/#"));
        assert!(!covers("a/+", "a"));
        assert!(!covers("a", "a/b"));
        assert!(covers("#", "#"));
    }

    #[test]
    fn topic_safe_names_exclude_wildcards_and_separators() {
        assert!(is_topic_safe("1001"));
        assert!(is_topic_safe("metro-2.x_y"));
        for n in ["", "+", "#", "a/b", "a b", "$x", &"x".repeat(65)] {
            assert!(!is_topic_safe(n), "{n}");
        }
    }
}
