//! Mosquitto as the deployment runs it: passwords from `mosquitto_passwd`, the shipped ACL
//! (`deploy/mosquitto/acl`) or the shipped configuration (`deploy/mosquitto/tapgate.conf`)
//! with a test's paths and ports.

use crate::process::Kill;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const BINARIES: [&str; 3] = [
    "/usr/sbin/mosquitto",
    "/usr/bin/mosquitto",
    "/usr/local/sbin/mosquitto",
];

/// The `mosquitto` binary, if installed.
pub fn binary() -> Option<PathBuf> {
    BINARIES.into_iter().map(PathBuf::from).find(|p| p.exists())
}

/// The shipped Mosquitto files (`deploy/mosquitto`: `acl`, `tapgate.conf`, `tapgate-acl.sh`).
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto")
}

/// Writes a Mosquitto password file for `users` (name, password) with `mosquitto_passwd -b`.
pub fn write_passwd(path: &Path, users: &[(&str, &str)]) -> Result<(), String> {
    for (i, (user, pass)) in users.iter().enumerate() {
        let mut c = Command::new("mosquitto_passwd");
        c.arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        let st = c
            .arg(path)
            .arg(user)
            .arg(pass)
            .status()
            .map_err(|e| format!("mosquitto_passwd: {e} (./test.sh installs mosquitto)"))?;
        if !st.success() {
            return Err(format!("mosquitto_passwd failed for {user}"));
        }
    }
    Ok(())
}

/// Which configuration a broker runs.
#[derive(Clone, Debug)]
enum Base {
    /// One listener on loopback `port`, no anonymous clients, the given lines added.
    Minimal { port: u16 },
    /// `deploy/mosquitto/tapgate.conf` with the validators' listener on `device_port` and the
    /// gateway's on `gateway_port` (both loopback).
    Shipped { device_port: u16, gateway_port: u16 },
}

/// What a test's Mosquitto runs with; [`MosquittoConfig::start`] starts it.
#[derive(Clone, Debug)]
pub struct MosquittoConfig {
    base: Base,
    users: Vec<(String, String)>,
    acl: Option<PathBuf>,
    extra: String,
    log: bool,
}

impl MosquittoConfig {
    /// One loopback listener on `port` (`per_listener_settings false`, `allow_anonymous false`,
    /// no persistence), no ACL until [`Self::acl`] or [`Self::shipped_acl`].
    pub fn on_port(port: u16) -> MosquittoConfig {
        MosquittoConfig {
            base: Base::Minimal { port },
            users: Vec::new(),
            acl: None,
            extra: String::new(),
            log: true,
        }
    }

    /// The shipped `tapgate.conf` (its two listeners on these loopback ports; persistence off),
    /// with the shipped ACL unless [`Self::acl`] names another.
    pub fn shipped(device_port: u16, gateway_port: u16) -> MosquittoConfig {
        MosquittoConfig {
            base: Base::Shipped {
                device_port,
                gateway_port,
            },
            acl: Some(deploy_dir().join("acl")),
            ..MosquittoConfig::on_port(0)
        }
    }

    /// Adds a user and password.
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.users.push((name.into(), password.into()));
        self
    }

    /// The ACL file to use.
    pub fn acl(mut self, path: &Path) -> Self {
        self.acl = Some(path.into());
        self
    }

    /// The shipped ACL (`deploy/mosquitto/acl`).
    pub fn shipped_acl(self) -> Self {
        self.acl(&deploy_dir().join("acl"))
    }

    /// A configuration line added at the end (`max_queued_messages 1000000`, …).
    pub fn line(mut self, line: &str) -> Self {
        self.extra.push_str(line);
        self.extra.push('\n');
        self
    }

    /// No log file (`log_dest none`; benchmarks). By default the broker logs to
    /// `<dir>/mosquitto.log`.
    pub fn no_log(mut self) -> Self {
        self.log = false;
        self
    }

    /// The ports the broker listens on.
    pub fn ports(&self) -> Vec<u16> {
        match self.base {
            Base::Minimal { port } => vec![port],
            Base::Shipped {
                device_port,
                gateway_port,
            } => vec![device_port, gateway_port],
        }
    }

    fn conf_text(&self, dir: &Path, passwd: &Path) -> Result<String, String> {
        let log = if self.log {
            format!("log_dest file {}", dir.join("mosquitto.log").display())
        } else {
            "log_dest none".into()
        };
        let mut conf = match self.base {
            Base::Minimal { port } => {
                let acl = self
                    .acl
                    .as_ref()
                    .map(|a| format!("acl_file {}\n", a.display()))
                    .unwrap_or_default();
                format!(
                    "per_listener_settings false\nallow_anonymous false\npassword_file {}\n{acl}persistence false\n{log}\nlistener {port} 127.0.0.1\n",
                    passwd.display()
                )
            }
            Base::Shipped {
                device_port,
                gateway_port,
            } => {
                let shipped = std::fs::read_to_string(deploy_dir().join("tapgate.conf"))
                    .map_err(|e| format!("reading the shipped tapgate.conf: {e}"))?;
                let acl = self.acl.clone().unwrap_or(deploy_dir().join("acl"));
                let mut conf = String::new();
                for line in shipped.lines() {
                    let line = match line.split_whitespace().next() {
                        Some("password_file") => format!("password_file {}", passwd.display()),
                        Some("acl_file") => format!("acl_file {}", acl.display()),
                        Some("persistence") => "persistence false".into(),
                        Some("autosave_interval") | Some("log_dest") => continue,
                        Some("listener") if line.contains("127.0.0.1") => {
                            format!("listener {gateway_port} 127.0.0.1")
                        }
                        Some("listener") => format!("listener {device_port} 127.0.0.1"),
                        _ => line.to_string(),
                    };
                    conf.push_str(&line);
                    conf.push('\n');
                }
                conf.push_str(&log);
                conf.push('\n');
                conf
            }
        };
        conf.push_str(&self.extra);
        Ok(conf)
    }

    /// Writes `passwd` and `mosquitto.conf` into `dir`, starts Mosquitto and waits until every
    /// listener accepts connections. Starting again in the same `dir` (a restart) rewrites
    /// the same files.
    pub fn try_start(&self, dir: &Path) -> Result<Mosquitto, String> {
        let bin = binary().ok_or(
            "mosquitto is not installed: apt-get install mosquitto (./test.sh does)".to_string(),
        )?;
        let passwd = dir.join("passwd");
        let users: Vec<(&str, &str)> = self
            .users
            .iter()
            .map(|(u, p)| (u.as_str(), p.as_str()))
            .collect();
        write_passwd(&passwd, &users)?;
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, self.conf_text(dir, &passwd)?)
            .map_err(|e| format!("writing {}: {e}", conf.display()))?;
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting mosquitto: {e}"))?;
        let guard = Kill(child);
        for port in self.ports() {
            crate::net::wait_for_port(port, "mosquitto");
        }
        Ok(Mosquitto {
            conf,
            _guard: guard,
        })
    }

    /// [`Self::try_start`], panicking with the reason.
    pub fn start(&self, dir: &Path) -> Mosquitto {
        self.try_start(dir).unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A running Mosquitto, killed when dropped.
#[derive(Debug)]
pub struct Mosquitto {
    conf: PathBuf,
    _guard: Kill,
}

impl Mosquitto {
    /// The configuration file it runs with.
    pub fn conf(&self) -> &Path {
        &self.conf
    }

    /// The broker's process id.
    pub fn pid(&self) -> u32 {
        self._guard.id()
    }
}
