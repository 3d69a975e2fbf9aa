//! A throwaway NATS cluster: three `nats-server` nodes on free loopback ports in a temporary
//! directory, each with JetStream (its own store) and an MQTT listener, clustered by routes,
//! with the users and per-device permissions `deploy/nats/tapgate-nats-users.sh` writes from a
//! devices file. A node can be killed and started again (same name, ports and store).

use crate::process::Kill;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BINARIES: [&str; 3] = [
    "/usr/sbin/nats-server",
    "/usr/bin/nats-server",
    "/usr/local/bin/nats-server",
];

/// The `nats-server` binary, if installed.
pub fn binary() -> Option<PathBuf> {
    BINARIES.into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// The shipped NATS files (`deploy/nats`).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/nats")
}

/// One node's name and loopback ports.
#[derive(Clone, Debug)]
pub struct Node {
    /// Its `server_name`.
    pub name: String,
    /// NATS clients.
    pub client_port: u16,
    /// Routes from the other nodes.
    pub cluster_port: u16,
    /// MQTT clients (validators, the gateway's downlink).
    pub mqtt_port: u16,
}

/// A running cluster; every node is killed when it is dropped (the directory removed).
pub struct NatsCluster {
    dir: tempfile::TempDir,
    nodes: Vec<Node>,
    running: Vec<Option<Kill>>,
}

impl NatsCluster {
    /// Starts a cluster of `n` nodes (3 for quorum) whose users are written by the shipped
    /// `tapgate-nats-users.sh` from `devices` (`device password [operator]` lines) with
    /// `gateway` (user, password), and waits until every node accepts MQTT and NATS clients
    /// and JetStream has a leader.
    pub fn start(n: usize, devices: &str, gateway: (&str, &str)) -> Result<NatsCluster, String> {
        let bin = binary().ok_or(
            "nats-server is not installed: apt-get install nats-server (./test.sh does)"
                .to_string(),
        )?;
        // TAPGATE_KEEP_NATS=1 keeps the directory (configurations, logs) for a post-mortem.
        let dir = tempfile::Builder::new()
            .prefix("tapgate-nats-")
            .disable_cleanup(std::env::var_os("TAPGATE_KEEP_NATS").is_some())
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        let devices_file = dir.path().join("devices");
        std::fs::write(&devices_file, devices).map_err(|e| format!("devices file: {e}"))?;
        let out = Command::new("sh")
            .arg(deploy_dir().join("tapgate-nats-users.sh"))
            .arg(&devices_file)
            .arg(gateway.0)
            .env("TAPGATE_GATEWAY_PASSWORD", gateway.1)
            .output()
            .map_err(|e| format!("tapgate-nats-users.sh: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "tapgate-nats-users.sh: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        std::fs::write(dir.path().join("tapgate-users.conf"), &out.stdout)
            .map_err(|e| format!("users file: {e}"))?;
        let nodes: Vec<Node> = (1..=n)
            .map(|i| Node {
                name: format!("n{i}"),
                client_port: crate::free_port(),
                cluster_port: crate::free_port(),
                mqtt_port: crate::free_port(),
            })
            .collect();
        let mut cluster = NatsCluster {
            dir,
            running: nodes.iter().map(|_| None).collect(),
            nodes,
        };
        for i in 0..n {
            cluster.write_conf(i)?;
        }
        for i in 0..n {
            cluster.spawn(i, &bin)?;
        }
        for i in 0..n {
            cluster.wait_ready(i)?;
        }
        Ok(cluster)
    }

    fn conf_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.conf", self.nodes[i].name))
    }

    /// Node `i`'s log file.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("{}.log", self.nodes[i].name))
    }

    fn write_conf(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        let routes: Vec<String> = self
            .nodes
            .iter()
            .filter(|o| o.name != node.name)
            .map(|o| format!("\"nats-route://127.0.0.1:{}\"", o.cluster_port))
            .collect();
        let store = self.dir.path().join(format!("{}-store", node.name));
        let conf = format!(
            "server_name: {name}\n\
             listen: \"127.0.0.1:{client}\"\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             cluster {{\n  name: tapgate\n  listen: \"127.0.0.1:{cluster}\"\n  routes: [{routes}]\n}}\n\
             mqtt {{\n  listen: \"127.0.0.1:{mqtt}\"\n  ack_wait: \"30s\"\n  max_ack_pending: 1000\n  stream_replicas: 3\n  consumer_replicas: 3\n}}\n\
             max_payload: 8MB\n\
             include \"tapgate-users.conf\"\n",
            name = node.name,
            client = node.client_port,
            store = store.display(),
            cluster = node.cluster_port,
            routes = routes.join(", "),
            mqtt = node.mqtt_port,
        );
        std::fs::write(self.conf_path(i), conf).map_err(|e| format!("node config: {e}"))
    }

    fn spawn(&mut self, i: usize, bin: &Path) -> Result<(), String> {
        // A fresh log per start: readiness is read from it.
        let log = self.log_path(i);
        if log.exists() {
            let kept = self.dir.path().join(format!(
                "{}.log.{}",
                self.nodes[i].name,
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ));
            std::fs::rename(&log, kept).map_err(|e| format!("keeping the old log: {e}"))?;
        }
        let child = Command::new(bin)
            .arg("-c")
            .arg(self.conf_path(i))
            .arg("-l")
            .arg(self.log_path(i))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting nats-server: {e}"))?;
        self.running[i] = Some(Kill(child));
        Ok(())
    }

    /// Waits until node `i` accepts NATS and MQTT clients and its JetStream is up (its log
    /// says so), 60 s at most.
    fn wait_ready(&self, i: usize) -> Result<(), String> {
        let node = &self.nodes[i];
        crate::wait_for_port(node.client_port, "nats-server");
        crate::wait_for_port(node.mqtt_port, "nats-server's MQTT listener");
        let log = self.log_path(i);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("Listening for MQTT clients") && !text.contains("[FTL]") {
                return Ok(());
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("{} did not start: {}", node.name, log.display()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// `nats://127.0.0.1:<port>` of every node.
    pub fn nats_urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect()
    }

    /// `mqtt://127.0.0.1:<port>` of node `i`.
    pub fn mqtt_url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// Kills node `i` (SIGKILL: no goodbye to the cluster or its clients).
    pub fn kill(&mut self, i: usize) {
        self.running[i] = None;
    }

    /// Starts node `i` again with its name, ports and store, and waits until it is ready.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        let bin = binary().ok_or("nats-server is not installed")?;
        self.kill(i);
        self.spawn(i, &bin)?;
        self.wait_ready(i)
    }

    /// Whether node `i` is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.running[i].is_some()
    }

    /// The cluster's directory (configurations, logs, stores).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
