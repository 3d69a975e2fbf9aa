//! PC/SC end to end, real binaries and the real stack: `tapgate card serve` presents an emulated
//! card to pcscd through vsmartcard's vpcd (the reader "Virtual PCD 00 00", port 35963), and
//! `tapgate charge --reader pcsc` and `tapgate validator` with `reader = "pcsc"` find it there:
//! an online load through `tapgate charging`, a debit at the gate, then the card pulled in the
//! middle of a debit's and of a load's commit (a tear), each settled at the card's next contact.
//! Value is conserved and every change consumed exactly one card counter value.
//!
//! It needs pcscd running with vsmartcard-vpcd (`.ci/run` installs and starts them) and fails
//! with a clear message when they are not there. vpcd gives one virtual reader per port, so the
//! steps run in sequence in one test, and a lock file keeps a second run (another checkout, the
//! same machine) from sharing the slot.
#![cfg(feature = "pcsc")]

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tapgate_testkit::{free_port, http, spawn_charging, Kill};
use validator::journal::Journal;

const PASS: &str = "pcsc-e2e-pass";
const HOLDER: &str = "tg_pcsc_e2e_cardholder";
const OPERATOR: &str = "tg_pcsc_e2e_operator";
const VPCD_PORT: u16 = 35963;
const READER: &str = "Virtual PCD 00 00";
const UID: &str = "04C1C2C3C4C5C6";
const START_MINOR: i64 = 50_000;
/// Longer than pcscd's presence polling (0.4 s), so a card that left is seen gone.
const AWAY: Duration = Duration::from_millis(1500);

/// Fails, with what to do, unless pcscd runs with vpcd's reader slot listening.
fn require_pcscd_with_vpcd() {
    let socket = Path::new("/run/pcscd/pcscd.comm");
    assert!(
        std::os::unix::net::UnixStream::connect(socket).is_ok(),
        "pcscd is not running (no {}): install pcscd and vsmartcard-vpcd and start `pcscd` \
         (.ci/run does; see docs/readers.md)",
        socket.display()
    );
    // A LISTEN socket on vpcd's port, read from /proc (connecting would present a card).
    let want = format!(":{VPCD_PORT:04X}");
    let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&want) && cols[3] == "0A"
            })
    });
    assert!(
        listening,
        "pcscd runs but nothing listens on vpcd's port {VPCD_PORT}: install vsmartcard-vpcd \
         (/etc/reader.conf.d/vpcd) and restart pcscd (see docs/readers.md)"
    );
}

/// A lock on vpcd's slot for this machine (removed when dropped; a dead holder's is taken over).
struct SlotLock(PathBuf);
impl SlotLock {
    fn take() -> SlotLock {
        let p = std::env::temp_dir().join(format!("tapgate-vpcd-{VPCD_PORT}.lock"));
        let t0 = Instant::now();
        loop {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(mut f) => {
                    use std::io::Write;
                    write!(f, "{}", std::process::id()).unwrap();
                    return SlotLock(p);
                }
                Err(_) => {
                    let holder = std::fs::read_to_string(&p).unwrap_or_default();
                    let alive = !holder.trim().is_empty()
                        && Path::new(&format!("/proc/{}", holder.trim())).exists();
                    if !alive {
                        let _ = std::fs::remove_file(&p);
                        continue;
                    }
                    assert!(
                        t0.elapsed() < Duration::from_secs(600),
                        "vpcd's slot is held by process {holder} for 10 minutes"
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}
impl Drop for SlotLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A child process killed when the guard drops (a failed assertion leaves no card in vpcd).
struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
impl Proc {
    /// SIGTERM, then the output (the test fails if it does not end within 30 s).
    fn terminate(mut self) -> (bool, String, String) {
        let pid = self.0.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        self.wait_done(Duration::from_secs(30))
    }
    fn wait_done(&mut self, limit: Duration) -> (bool, String, String) {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                let mut out = String::new();
                let mut err = String::new();
                if let Some(mut o) = self.0.stdout.take() {
                    std::io::Read::read_to_string(&mut o, &mut out).unwrap();
                }
                if let Some(mut e) = self.0.stderr.take() {
                    std::io::Read::read_to_string(&mut e, &mut err).unwrap();
                }
                return (st.success(), out, err);
            }
            assert!(t0.elapsed() < limit, "process did not end within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tapgate(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tapgate"));
    c.current_dir(dir)
        .env("TAPGATE_KEY_PASSPHRASE", PASS)
        .env("TAPGATE_TOKEN", HOLDER);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    tapgate(dir).args(args).output().unwrap()
}

fn must(o: Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// `tapgate card serve` (with `--pull-at N` when given), once it is in vpcd's field.
fn serve(dir: &Path, pull_at: Option<&str>) -> Proc {
    let mut c = tapgate(dir);
    c.args(["card", "serve", "--keys", "keys", "--card", "card.json"]);
    if let Some(n) = pull_at {
        c.args(["--pull-at", n]);
    }
    let mut p = Proc(
        c.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    let mut stdout = BufReader::new(p.0.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    assert!(
        line.starts_with(&format!("card {UID} in the field of vpcd")),
        "card serve: {line:?}"
    );
    // Keep reading its stdout so it never blocks on a full pipe; hand the rest back at the end.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = std::io::Read::read_to_string(&mut stdout, &mut rest);
        let _ = tx.send(rest);
    });
    SERVE_OUT.with(|s| *s.borrow_mut() = Some(rx));
    p
}

thread_local! {
    static SERVE_OUT: std::cell::RefCell<Option<std::sync::mpsc::Receiver<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// The card serve's output after its first line, once it ended.
fn serve_rest() -> String {
    SERVE_OUT.with(|s| {
        s.borrow_mut()
            .take()
            .and_then(|rx| rx.recv_timeout(Duration::from_secs(10)).ok())
            .unwrap_or_default()
    })
}

/// The card image's committed state (as `tapgate card show` would print after recovery).
fn card_state(dir: &Path) -> (i64, u64) {
    let out = must(run(dir, &["card", "show", "card.json"]));
    let field = |name: &str| -> i64 {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {out}"))
            .trim()
            .parse()
            .unwrap()
    };
    (field("balance_minor"), field("tmc") as u64)
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Taps the validator counted so far, from its metrics endpoint.
fn taps_counted(metrics: &str) -> u64 {
    let Ok(r) = ureq::get(&format!("http://{metrics}/metrics")).call() else {
        return 0;
    };
    tapgate_testkit::metrics::sum(
        &r.into_string().unwrap_or_default(),
        "tapgate_validator_taps_total",
    ) as u64
}

fn summary(out: &str) -> serde_json::Value {
    serde_json::from_str(out.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no JSON summary ({e}) in {out}"))
}

fn charge(dir: &Path, base: &str, amount: &str, key: &str) -> Output {
    run(
        dir,
        &[
            "charge",
            "--server",
            base,
            "--amount",
            amount,
            "--funding",
            "card:tok_visa",
            "--idempotency-key",
            key,
            "--reader",
            &format!("pcsc:{READER}"),
            "--wait",
            "20",
        ],
    )
}

fn start_charging(dir: &Path) -> (Kill, String) {
    spawn_charging(
        tapgate(dir)
            .args(["charging", "--config", "charging.toml", "--keys", "keys"])
            .stderr(Stdio::inherit()),
    )
}

#[test]
fn a_card_behind_vpcd_is_loaded_debited_and_torn_through_pcsc() {
    require_pcscd_with_vpcd();
    let _slot = SlotLock::take();
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();

    support::keys_and_fare_table(dir, PASS, "metro-city/rules.toml", "metro.tgft");
    must(run(
        dir,
        &[
            "card",
            "issue",
            "--keys",
            "keys",
            "--uid",
            UID,
            "--balance",
            &START_MINOR.to_string(),
            "--out",
            "card.json",
        ],
    ));
    let metrics = format!("127.0.0.1:{}", free_port());
    let metrics2 = format!("127.0.0.1:{}", free_port());
    for (file, device, stop, journal, listen) in [
        ("validator.toml", 1001, "Central", "journal", &metrics),
        ("gate2.toml", 1002, "Harbor", "journal2", &metrics2),
    ] {
        std::fs::write(
            dir.join(file),
            format!(
                r#"device_id = {device}
operator = "metro"
stop = "{stop}"
route = "M1"
kind = "entry"
utc_offset_minutes = 540
journal = "{journal}"
keys = "keys"
fare_table = "metro.tgft"
reader = "pcsc"
reader_name = "{READER}"
[metrics]
listen = "{listen}"
"#
            ),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("charging.toml"),
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\nledger_map_size_bytes = 67108864\n\n[[tokens]]\nname = \"alice\"\nrole = \"cardholder\"\nsha256 = \"{}\"\n\n[[tokens]]\nname = \"ops\"\nrole = \"operator\"\nsha256 = \"{}\"\n",
            charging::api::Auth::hash_token(HOLDER),
            charging::api::Auth::hash_token(OPERATOR)
        ),
    )
    .unwrap();
    let (_charging, base) = start_charging(dir);

    // (ii) An online load: the cardholder's client finds the card on the reader and relays.
    let card = serve(dir, None);
    let out = must(charge(dir, &base, "2000", "pcsc-l1"));
    assert!(
        out.starts_with("load completed: amount_minor=2000 balance_minor=52000 tmc=1"),
        "{out}"
    );
    assert_eq!(card_state(dir), (52_000, 1));

    // (i) A debit at a validator reading the same card through pcscd.
    let validator = Proc(
        tapgate(dir)
            .args(["validator", "--config", "validator.toml", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    wait_until("the validator's tap", Duration::from_secs(30), || {
        taps_counted(&metrics) >= 1
    });
    let (ok, out, err) = validator.terminate();
    assert!(ok, "{out}{err}");
    let s = summary(&out);
    assert_eq!(s["taps"], 1, "one presentation, one tap: {out}");
    assert_eq!(s["taps_accepted"], 1, "{out}");
    let fare = s["fares_minor"].as_i64().unwrap();
    assert!(fare > 0, "value left the card: {out}");
    assert_eq!(card_state(dir), (52_000 - fare, 2));

    // The card pulled at the debit's commit: the card commits, the gate never hears it.
    // The next gate is another one (the same gate would see a repeat within 20 s and take
    // nothing); whatever it charges, debit or a free transfer's record, is committed.
    let (ok, out, err) = card.terminate();
    assert!(ok, "{out}{err}");
    let _ = serve_rest();
    std::thread::sleep(AWAY);
    let mut card = serve(dir, Some("commit"));
    let validator = Proc(
        tapgate(dir)
            .args(["validator", "--config", "gate2.toml", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let (ok, _, err) = card.wait_done(Duration::from_secs(30));
    assert!(ok, "{err}");
    let rest = serve_rest();
    assert!(rest.contains(&format!("card {UID} pulled after")), "{rest}");
    let (after_pull, tmc) = card_state(dir);
    assert_eq!(tmc, 3, "the card committed the tap it was pulled in");
    let torn_fare = 52_000 - fare - after_pull;
    assert!(torn_fare >= 0);
    // Presented again: the gate settles the torn debit from the card's counter and records.
    std::thread::sleep(AWAY);
    let card = serve(dir, None);
    wait_until("the tap after the tear", Duration::from_secs(30), || {
        taps_counted(&metrics2) >= 2
    });
    let (ok, out, err) = validator.terminate();
    assert!(ok, "{out}{err}");
    let s = summary(&out);
    assert_eq!(s["taps_torn"], 1, "{out}");
    assert_eq!(s["tears_settled"], 1, "{out}");
    assert_eq!(s["taps"], 2, "{out}");

    // The card pulled at a load's commit: the client fails, the card has the credit.
    let (ok, _, err) = card.terminate();
    assert!(ok, "{err}");
    let _ = serve_rest();
    std::thread::sleep(AWAY);
    let mut card = serve(dir, Some("commit"));
    let o = charge(dir, &base, "500", "pcsc-l2");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.starts_with("load pending:") && out.contains("settled at the card's next contact"),
        "a load whose commit answer never came back is pending, not done: {out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let (ok, _, err) = card.wait_done(Duration::from_secs(30));
    assert!(ok, "{err}");
    let _ = serve_rest();
    let (balance, tmc) = card_state(dir);
    assert_eq!(tmc, 4);
    // Presented again: the next load settles the torn one (completed) before its own.
    std::thread::sleep(AWAY);
    let card = serve(dir, None);
    let out = must(charge(dir, &base, "300", "pcsc-l3"));
    assert!(
        out.starts_with(&format!(
            "load completed: amount_minor=300 balance_minor={} tmc=5",
            balance + 300
        )),
        "{out}"
    );
    let (ok, _, err) = card.terminate();
    assert!(ok, "{err}");
    let rest = serve_rest();
    assert!(rest.contains(&format!("card {UID} stopped")), "{rest}");

    // Value conserved: what the card holds is what was issued, loaded and debited, and the
    // journals hold every accepted tap once with the counter it consumed.
    let mut debits = 0i64;
    let mut counters = Vec::new();
    for journal in ["journal", "journal2"] {
        let j = Journal::open(&dir.join(journal), 1_000_000, 1 << 30).unwrap();
        assert!(j.pendings().unwrap().is_empty(), "the tear was settled");
        assert!(j.unresolved().unwrap().is_empty());
        for (_, w) in j.outbox_after(0, 1_000).unwrap() {
            if w[1] == 0 {
                // Accepted: a debit (kind 1) or a free transfer's record (kind 0, amount 0).
                assert_eq!(hex::encode_upper(&w[4..11]), UID);
                debits += i64::from(i32::from_be_bytes(w[15..19].try_into().unwrap()));
                counters.push(u32::from_be_bytes(w[11..15].try_into().unwrap()));
            }
        }
    }
    assert_eq!(debits, fare + torn_fare, "journalled debits");
    assert_eq!(counters, [2, 3], "each tap once, with its own counter");
    let (balance, tmc) = card_state(dir);
    assert_eq!(balance, START_MINOR + 2_000 + 500 + 300 - debits);
    assert_eq!(tmc, 5, "one counter value per change: 3 loads, 2 debits");
    let (code, got) = http::get(&format!("{base}/v1/cards/{UID}"), OPERATOR);
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["pending_loads"], 0, "the torn load was settled: {got}");
    let (code, m) = http::get_text(&format!("{base}/metrics"), OPERATOR);
    assert_eq!(code, 200, "{m}");
    assert!(
        m.contains("tapgate_charging_loads_settled_completed_total 1"),
        "the torn load was completed from the card's counter: {m}"
    );
}
