//! A throwaway PostgreSQL cluster per test: `initdb` into a temporary directory, `postgres` on a
//! free loopback port (its Unix socket in the same directory, never the machine's own cluster on
//! 5432), a database per test, the cluster stopped when the guard drops.
//!
//! PostgreSQL refuses to run as root: when the tests run as root, the cluster runs as the
//! `postgres` user the Debian package creates (`runuser -u postgres --`), its directory owned by
//! that user. The cluster's one role (`tapgate`) logs in with a random password over TCP
//! (SCRAM-SHA-256), so a test exercises the same password path a deployment does.
//!
//! `./test.sh` installs the `postgresql` package when its binaries are absent.

use crate::process::ProcStat;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Where the Debian package puts the server binaries (newest first).
const BIN_DIRS: [&str; 5] = [
    "/usr/lib/postgresql/17/bin",
    "/usr/lib/postgresql/16/bin",
    "/usr/lib/postgresql/15/bin",
    "/usr/lib/postgresql/14/bin",
    "/usr/lib/postgresql/13/bin",
];

/// The role the cluster's tests log in as.
pub const USER: &str = "tapgate";

/// The directory holding `initdb`, `postgres` and `pg_ctl`, if PostgreSQL is installed.
pub fn bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TAPGATE_PG_BIN") {
        return Some(PathBuf::from(dir));
    }
    BIN_DIRS
        .into_iter()
        .map(PathBuf::from)
        .find(|d| d.join("initdb").exists() && d.join("postgres").exists())
}

/// Whether this process runs as root (PostgreSQL then runs as `postgres`).
fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user.
fn postgres_ids() -> Result<(u32, u32), String> {
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .map_err(|e| format!("id {flag} postgres: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                "no `postgres` user (the Debian postgresql package creates it)".to_string()
            })
    };
    Ok((id("-u")?, id("-g")?))
}

/// A running throwaway cluster; stopped (and its directory removed) on drop.
pub struct Cluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    password: String,
    as_postgres: bool,
    running: bool,
    databases: u32,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Initialises and starts a cluster on a free loopback port, waiting until it accepts
    /// connections. Panics with what to install when PostgreSQL is absent.
    pub fn start() -> Cluster {
        Self::try_start().unwrap_or_else(|e| panic!("a test PostgreSQL cluster: {e}"))
    }

    /// [`Cluster::start`], or why not.
    pub fn try_start() -> Result<Cluster, String> {
        let bin = bin_dir()
            .ok_or("PostgreSQL is not installed (./test.sh installs the `postgresql` package)")?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("tapgate-pg-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let data = dir.path().join("data");
        std::fs::create_dir(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let pwfile = dir.path().join("pw");
        let password = hex::encode(rand::random::<[u8; 12]>());
        std::fs::write(&pwfile, &password).map_err(|e| format!("{}: {e}", pwfile.display()))?;
        if as_postgres {
            let (uid, gid) = postgres_ids()?;
            for p in [dir.path(), &data, &pwfile] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        let mut c = Cluster {
            bin,
            dir,
            port: crate::free_port(),
            password,
            as_postgres,
            running: false,
            databases: 0,
        };
        let out = c
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                USER,
                "--auth=scram-sha-256",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        c.start_server()?;
        Ok(c)
    }

    /// A command running `program` from the cluster's binaries, as `postgres` when root.
    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut c = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        };
        c.current_dir(self.dir.path()).stdin(Stdio::null());
        c
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server (after [`Cluster::stop`]) on the same port and waits until it
    /// accepts connections.
    pub fn start_server(&mut self) -> Result<(), String> {
        let log = self.dir.path().join("server.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "-o", &opts])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "pg_ctl start failed: {}{}",
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        self.running = true;
        crate::wait::wait_until(
            &format!("PostgreSQL on port {}", self.port),
            Duration::from_secs(30),
            || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok(),
        );
        Ok(())
    }

    /// Stops the server (fast shutdown: sessions are ended, nothing committed is lost).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        self.running = false;
    }

    /// Turns TLS on with this certificate chain and key (PEM) and restarts the server; clients
    /// may still connect without TLS unless they ask for it.
    pub fn enable_tls(&mut self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let data = self.data();
        let (cert, key) = (data.join("server.crt"), data.join("server.key"));
        std::fs::write(&cert, cert_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
        std::fs::write(&key, key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| format!("chmod {}: {e}", key.display()))?;
        if self.as_postgres {
            let (uid, gid) = postgres_ids()?;
            for p in [&cert, &key] {
                std::os::unix::fs::chown(p, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", p.display()))?;
            }
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).map_err(|e| format!("{e}"))?;
        text.push_str("\nssl = on\n");
        std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
        self.stop();
        self.start_server()
    }

    /// The CPU time (user + system, seconds) the cluster's processes used so far: the
    /// postmaster's own and that of the children it has reaped (exited backends), and each
    /// live child's (backends, WAL writer, checkpointer, …). 0 off Linux or when not running.
    /// A bench reads it either side of a run: what the database cost, beside what the
    /// charging server cost.
    pub fn cpu_s(&self) -> f64 {
        cluster_cpu_s(&self.data())
    }

    /// [`Cluster::cpu_s`] as a reader that does not borrow the cluster (which a caller may
    /// change meanwhile: a new database, a restart).
    pub fn cpu_reader(&self) -> impl Fn() -> f64 + Send + 'static {
        let data = self.data();
        move || cluster_cpu_s(&data)
    }

    /// The loopback TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The password of [`USER`] (a test writes it to a `password_file` or the environment).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The cluster's directory (its Unix socket, `server.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// A `postgres://` URL (no password) for database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates a new database (`test1`, `test2`, …) and returns its URL (no password).
    pub fn create_database(&mut self) -> String {
        self.databases += 1;
        let name = format!("test{}", self.databases);
        let out = self
            .command("createdb")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg(&name)
            .env("PGPASSWORD", &self.password)
            .output()
            .unwrap_or_else(|e| panic!("createdb: {e}"));
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Runs `sql` in database `db` with `psql` and returns its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = self
            .command("psql")
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .args(["-d", db, "-c", sql])
            .env("PGPASSWORD", &self.password)
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A database of its own in a cluster of its own: what a test of the PostgreSQL ledger takes.
#[derive(Debug)]
pub struct TestDb {
    /// The running cluster.
    pub cluster: Cluster,
    /// The database's URL (no password: [`Cluster::password`]).
    pub url: String,
}

impl TestDb {
    /// Starts a cluster and creates a database in it.
    pub fn start() -> TestDb {
        let mut cluster = Cluster::start();
        let url = cluster.create_database();
        TestDb { cluster, url }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        self.url.rsplit('/').next().unwrap_or_default()
    }

    /// The password.
    pub fn password(&self) -> &str {
        self.cluster.password()
    }
}

/// The CPU seconds of the cluster whose data directory is `data` ([`Cluster::cpu_s`]).
fn cluster_cpu_s(data: &Path) -> f64 {
    let Some(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|t| t.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
    else {
        return 0.0;
    };
    let own = ProcStat::read(&format!("/proc/{pid}/stat"));
    let mut ticks = own.map_or(0.0, |s| s.utime + s.stime + s.cutime + s.cstime);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(child) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        if let Some(s) = ProcStat::read(&format!("/proc/{child}/stat")) {
            if s.ppid == pid {
                ticks += s.utime + s.stime;
            }
        }
    }
    // CLK_TCK is 100 on Linux.
    ticks / 100.0
}
