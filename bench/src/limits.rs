//! Limits measured in the same run as the figures they bound (issue 22): the cryptographic work
//! alone of a debit or a load, and the durable LMDB commits alone of a validator's tap. Each is
//! the same work with nothing around it, timed in the same process right before the scenario,
//! so that a figure can be read as a ratio that survives the machine's ±30% from run to run.

use crate::stats::quantile;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes128;
use cmac::{Cmac, Mac};
use std::hint::black_box;
use std::time::Instant;

/// The cryptographic work of one card transaction, card and terminal sides together, counted
/// from the protocol code (purse/src: card.rs, sm.rs, sam.rs, crypto.rs, txn.rs).
///
/// A CMAC here is the `cmac` crate's over a message of that length with an expanded state:
/// ⌈len/16⌉ block encryptions (one for an empty message) and one more for its subkey at
/// finalisation (cmac 0.7 derives K1/K2 per message). Key expansions are `Aes128::new` (round
/// keys for both directions; a `Cmac` is built on one); encryptions and decryptions are single
/// AES blocks outside a CMAC (CBC blocks, IVs, AN10922 diversification).
///
/// The counts were checked against the code once by running a debit and a load on a copy of
/// `aes` 0.8.4 that counts key expansions and blocks (not kept): debit 9 expansions, 121
/// encryptions, 6 decryptions (with 7 records on the card; 93 with none); load 12, 82, 6.
#[derive(Clone, Copy, Debug)]
pub struct CryptoWork {
    /// AES-128 key expansions.
    pub key_expansions: u32,
    /// AES block encryptions outside CMACs.
    pub encryptions: u32,
    /// AES block decryptions.
    pub decryptions: u32,
    /// The length of every CMAC's message, bytes.
    pub cmacs: &'static [usize],
}

impl CryptoWork {
    /// AES block operations in all, CMAC blocks and their subkeys included.
    pub fn aes_blocks(&self) -> u64 {
        let cmac_blocks: usize = self.cmacs.iter().map(|&l| l.div_ceil(16).max(1) + 1).sum();
        u64::from(self.encryptions) + u64::from(self.decryptions) + cmac_blocks as u64
    }
}

/// A debit as the `debit` scenario runs it: a validator SAM (no reader id), a Debit in FULL
/// mode, one 32-byte trip record written, a card that already holds its 7 records (so the
/// read-records answer is 7 × 32 bytes), and the 80-byte tap record's device MAC.
///
/// Card (emulated, its card keys and K_TM's CMAC state expanded at personalisation):
/// - AuthenticateEV2First: E(RndB), 1 block. Part 2: D(RndA ‖ RndB') 2 blocks, E(TI ‖ RndA' ‖
///   …) 2 blocks; session keys SesAuthENC/SesAuthMAC: a CMAC state (1 expansion), 2 CMACs of
///   the 32-byte SV1/SV2; the channel expands SesAuthENC and SesAuthMAC (2 expansions).
/// - Each secure-messaging command is opened with a CMAC of Cmd ‖ CmdCtr ‖ TI ‖ header ‖ data
///   (7 + header + data bytes) and each answer sealed with one of RC ‖ CmdCtr ‖ TI ‖ data
///   (7 + data): GetValue 8 / 11, ReadData (TM file) 14 / 19, ReadRecords 14 / 231,
///   ReadData (profile file) 14 / 39,
///   Debit (FULL: 16 encrypted bytes) 24 / 7 plus its IV (1 encryption) and 1 decryption,
///   WriteRecord 46 / 7, CommitTransaction 8 / 19.
/// - Commit: SesTMMACKey = CMAC(K_TM, 16-byte SV) from the expanded state, then the TMV = CMAC
///   of the 20-byte TM input under a freshly expanded SesTMMACKey (1 expansion).
///
/// SAM (`SoftwareSam::validator`):
/// - AN10922 diversification of the debit key: 1 expansion, 3 encryptions (L for the subkeys,
///   2 CBC blocks); the card key expanded (1); D(E(RndB)) 1 block; E(RndA ‖ RndB') 2 blocks.
/// - Part 2: D 2 blocks; session keys as the card (1 expansion, CMACs of 32 and 32); channel 2.
/// - Commands MACed: GetValue 8, ReadData 14, ReadRecords 14, ReadData (profile) 14, Debit 24
///   (+ IV and 1 CBC block), WriteRecord 46, Commit 8; answers checked: 11, 19, 231, 39, 7, 7,
///   19.
/// - The tap record's device MAC: 71-byte body ‖ 8-byte length ‖ "metro" = 84 bytes.
pub const DEBIT: CryptoWork = CryptoWork {
    key_expansions: 4 + 5,
    encryptions: (1 + 2 + 1) + (3 + 2 + 1 + 1),
    decryptions: (2 + 1) + (1 + 2),
    cmacs: &[
        // card
        32, 32, 8, 11, 14, 19, 14, 231, 14, 39, 24, 7, 46, 7, 8, 16, 20, 19, // SAM
        32, 32, 8, 14, 14, 14, 11, 19, 231, 39, 24, 46, 8, 7, 7, 19, 84,
    ],
};

/// An online load as the `load` scenario runs it: the software HSM authenticates with the
/// credit key, Credit in FULL mode, no record, a card that holds no records (the read-records
/// answer is empty), and the HSM's check of the transaction MAC.
///
/// As [`DEBIT`] without the WriteRecord and the tap's device MAC, with a 7-byte read-records
/// answer, and the HSM's TMAC check: AN10922 diversification of K_TM (1 expansion, 3
/// encryptions), SesTMMACKey = CMAC of the 16-byte SV under K_TM (1 expansion), the TMV = CMAC of
/// the 20-byte TM input under SesTMMACKey (1 expansion).
pub const LOAD: CryptoWork = CryptoWork {
    key_expansions: 4 + 5 + 3,
    encryptions: (1 + 2 + 1) + (3 + 2 + 1 + 1 + 3),
    decryptions: (2 + 1) + (1 + 2),
    cmacs: &[
        // card
        32, 32, 8, 11, 14, 19, 14, 7, 14, 39, 24, 7, 8, 16, 20, 19, // HSM
        32, 32, 8, 14, 14, 14, 11, 19, 7, 39, 24, 8, 7, 19, 16, 20,
    ],
};

/// One run of `work` alone, as a closure to time.
pub fn crypto_work(work: &CryptoWork) -> impl FnMut() + '_ {
    let key = [0x2Bu8; 16];
    let cipher = Aes128::new(&key.into());
    let mut mac = <Cmac<Aes128> as KeyInit>::new(&[0x7Eu8; 16].into());
    let msg = [0x5Au8; 256];
    move || {
        for _ in 0..work.key_expansions {
            black_box(Aes128::new(black_box(&key).into()));
        }
        let mut block = [0u8; 16];
        for _ in 0..work.encryptions {
            cipher.encrypt_block((&mut block).into());
        }
        for _ in 0..work.decryptions {
            cipher.decrypt_block((&mut block).into());
        }
        black_box(block);
        for &len in work.cmacs {
            mac.update(black_box(&msg[..len]));
            black_box(mac.finalize_reset().into_bytes());
        }
    }
}

/// The figures of a crypto floor beside a scenario's median: `floor_ns`, `ratio_to_floor` and
/// the work counted.
pub fn crypto_floor_figures(work: &CryptoWork, floor: &[u64], median_ns: u64) -> crate::Figures {
    let floor_ns = quantile(floor, 0.5);
    vec![
        ("floor_ns", floor_ns.into()),
        ("ratio_to_floor", ratio(median_ns as f64, floor_ns as f64)),
        ("floor_key_expansions", work.key_expansions.into()),
        ("floor_aes_blocks", work.aes_blocks().into()),
        ("floor_cmacs", (work.cmacs.len() as u64).into()),
    ]
}

/// `a / b` rounded to two decimals, as JSON (null when `b` is 0).
pub fn ratio(a: f64, b: f64) -> serde_json::Value {
    if b > 0.0 {
        ((a / b * 100.0).round() / 100.0).into()
    } else {
        serde_json::Value::Null
    }
}

/// The durable LMDB commits of validator taps alone, on the disk the journal uses (a
/// temporary directory beside it), opened through `tapgate-lmdb` as the journal is: per tap the
/// pending debit (7-byte UID → `validator::journal::PENDING_LEN` bytes, committed), then the tap
/// (the outbox's length and the next sequence number read, 8-byte sequence → 80-byte record,
/// the next sequence number written, the pending debit deleted, committed).
pub struct RawJournal {
    env: tapgate_lmdb::LmdbEnv,
    outbox: tapgate_lmdb::RawDatabase,
    pending: tapgate_lmdb::RawDatabase,
    meta: tapgate_lmdb::RawDatabase,
    next: u64,
    _dir: tempfile::TempDir,
}

impl RawJournal {
    /// A fresh environment in a temporary directory.
    pub fn open() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (env, [outbox, pending, meta]) = tapgate_lmdb::open(
            dir.path(),
            ["outbox", "pending", "meta"],
            &tapgate_lmdb::EnvConfig::durable(1 << 30),
        )?;
        Ok(Self {
            env,
            outbox,
            pending,
            meta,
            next: 0,
            _dir: dir,
        })
    }

    /// One tap's two commits; returns the µs they took.
    pub fn tap(&mut self) -> anyhow::Result<u64> {
        let i = self.next;
        self.next += 1;
        let b = (i as u32).to_be_bytes();
        let uid = [0x04, 0xBE, 0x0C, b[0], b[1], b[2], b[3]];
        let pending_value = [0xA5u8; validator::journal::PENDING_LEN];
        let tap = [0x3Cu8; purse::tap::TAP_LEN];
        let t = Instant::now();
        let mut w = self.env.write_txn()?;
        self.pending.put(&mut w, &uid, &pending_value)?;
        w.commit()?;
        let mut w = self.env.write_txn()?;
        black_box(self.outbox.len(&w)?);
        black_box(self.meta.get(&w, b"next_seq")?);
        self.outbox.put(&mut w, &(i + 1).to_be_bytes(), &tap)?;
        self.meta.put(&mut w, b"next_seq", &(i + 2).to_be_bytes())?;
        self.pending.delete(&mut w, &uid)?;
        w.commit()?;
        Ok(t.elapsed().as_micros() as u64)
    }
}

/// One HTTP round trip as the charging client makes it: the request line and the sizes of the
/// request and response bodies.
#[derive(Clone, Debug)]
pub struct RoundTrip {
    /// `POST /v1/...`
    pub request_line: String,
    /// Request body, bytes.
    pub request_bytes: usize,
    /// Response body, bytes.
    pub response_bytes: usize,
}

/// A byte-recording TCP relay in front of `upstream` for one connection: what the client sent
/// and what the server answered, each as one byte stream. Connect to `addr`; join the handle
/// once the client has closed its connection.
pub struct Recorder {
    /// Where the client connects.
    pub addr: std::net::SocketAddr,
    handle: std::thread::JoinHandle<std::io::Result<(Vec<u8>, Vec<u8>)>>,
}

impl Recorder {
    /// Listens on loopback for one connection and relays it to `upstream`.
    pub fn start(upstream: std::net::SocketAddr) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let handle = std::thread::spawn(move || {
            let (client, _) = listener.accept()?;
            let server = std::net::TcpStream::connect(upstream)?;
            let copy = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
                std::thread::spawn(move || -> std::io::Result<Vec<u8>> {
                    use std::io::{Read, Write};
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        let k = from.read(&mut buf)?;
                        if k == 0 {
                            let _ = to.shutdown(std::net::Shutdown::Write);
                            return Ok(seen);
                        }
                        seen.extend_from_slice(&buf[..k]);
                        to.write_all(&buf[..k])?;
                    }
                })
            };
            let up = copy(client.try_clone()?, server.try_clone()?);
            let down = copy(server, client);
            let sent = up
                .join()
                .map_err(|_| std::io::Error::other("relay panicked"))??;
            let answered = down
                .join()
                .map_err(|_| std::io::Error::other("relay panicked"))??;
            Ok((sent, answered))
        });
        Ok(Self { addr, handle })
    }

    /// The round trips seen, once the client has closed the connection.
    pub fn finish(self) -> anyhow::Result<Vec<RoundTrip>> {
        let (sent, answered) = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("recorder panicked"))??;
        let requests = http_messages(&sent)?;
        let responses = http_messages(&answered)?;
        anyhow::ensure!(
            requests.len() == responses.len(),
            "{} requests, {} responses",
            requests.len(),
            responses.len()
        );
        Ok(requests
            .into_iter()
            .zip(responses)
            .map(|((line, req), (_, resp))| RoundTrip {
                request_line: line,
                request_bytes: req,
                response_bytes: resp,
            })
            .collect())
    }
}

/// HTTP/1.1 messages in a byte stream: each one's first line and its body length (from
/// Content-Length; a chunked body is refused).
fn http_messages(stream: &[u8]) -> anyhow::Result<Vec<(String, usize)>> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let end = stream[at..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| anyhow::anyhow!("an HTTP message without the end of its head"))?;
        let raw_head = String::from_utf8_lossy(&stream[at..at + end]);
        let first = raw_head.lines().next().unwrap_or_default().to_string();
        let head = raw_head.to_ascii_lowercase();
        anyhow::ensure!(
            !head.contains("transfer-encoding: chunked"),
            "a chunked body: {first}"
        );
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map(|v| v.trim().parse::<usize>())
            .transpose()?
            .unwrap_or(0);
        out.push((first, len));
        at += end + 4 + len;
    }
    Ok(out)
}

/// Round trips to an endpoint that does nothing but answer a body of the asked size: an axum
/// router served by `tapgate_http::serve::serve_router` (the charging server's listener code)
/// on a tokio runtime of 2 workers (as the `loads` scenario's), driven by `clients` threads
/// that each make `per_client` times the `plan`'s round trips (same bodies' sizes, the same
/// headers as the charging client) on one keep-alive agent. Returns the round trips made, the
/// seconds they took and the process CPU seconds (server and clients) they used.
pub fn raw_round_trips(
    clients: usize,
    per_client: u64,
    plan: &[RoundTrip],
    token: &str,
) -> anyhow::Result<(u64, f64, f64)> {
    use axum::extract::Path;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let base = format!("http://{}", listener.local_addr()?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let router = axum::Router::new().route(
        "/raw/{n}",
        axum::routing::any(|Path(n): Path<usize>, body: axum::body::Bytes| async move {
            black_box(body);
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                vec![b' '; n],
            )
        }),
    );
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(tapgate_http::serve::serve_router(
        "raw",
        listener,
        None,
        router,
        async {
            let _ = stop_rx.await;
        },
    ));
    let body = vec![b' '; plan.iter().map(|r| r.request_bytes).max().unwrap_or(0)];
    let auth = format!("Bearer {token}");
    let cpu_before = crate::stats::cpu_s();
    let started = Instant::now();
    let done = std::thread::scope(|scope| -> anyhow::Result<u64> {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let (base, body, auth) = (&base, &body, &auth);
                scope.spawn(move || -> anyhow::Result<u64> {
                    let agent = ureq::AgentBuilder::new().build();
                    let mut n = 0u64;
                    for _ in 0..per_client {
                        for r in plan {
                            let resp = agent
                                .post(&format!("{base}/raw/{}", r.response_bytes))
                                .set("Authorization", auth)
                                .set("Content-Type", "application/json")
                                .send_bytes(&body[..r.request_bytes])?;
                            let mut got = Vec::with_capacity(r.response_bytes);
                            std::io::Read::read_to_end(&mut resp.into_reader(), &mut got)?;
                            n += 1;
                        }
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut n = 0;
        for h in handles {
            n += h.join().map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(n)
    })?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = crate::stats::cpu_s() - cpu_before;
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
    Ok((done, wall, cpu))
}
