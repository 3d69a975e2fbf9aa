//! The day's timeline, one function per phase: the world opens (back office, riders, gates,
//! broker and gateways, the validators' MQTT clients); each tap picks a rider and a gate, maybe
//! tears the dialogue, books what the gate answered and tops up a rider who ran short; a third
//! into the day a card is reported lost and blocked, half-way the metro's gateway is killed and
//! restarted; every [`SALE_EVERY_TAPS`] taps a rider buys a train ticket online from the rail
//! ticket office ([`crate::shop`]); at the end torn cards meet their gate again (and the office
//! online), every tap is confirmed and cleared, and the ledger is checked against the cards and
//! the merchant's books.

use crate::back_office::BackOffice;
use crate::check::{self, Conservation};
use crate::faults::{pick_tear, pick_vanish, Tear, TornReader};
use crate::fleet::{Device, Fleet, FleetOptions};
use crate::gates::{tv_sale, Gates, DAY0_MS, FIRST_DEVICE};
use crate::operators::Operators;
use crate::riders::{self, Rider};
use crate::shop::{Shop, Short, MERCHANT, SALE_EVERY_TAPS};
use crate::tally::{DayReport, Progress, Tally};
use crate::SimError;
use charging::client::{Client, LoadAsk};
use charging::load::Reply;
use fare_rules::record::TapKind as GateKind;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use purse::txn::{self, Decision, EmulatedReader, Outcome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use validator::gate::{Answer, Settled, TapOutcome};

/// The sizes and seed of a day.
#[derive(Clone, Debug)]
pub struct DayConfig {
    /// Metro validators (the hotel's box comes on top).
    pub validators: u32,
    /// Riders, one card each.
    pub cards: u32,
    /// Presentations in the day.
    pub taps: u32,
    /// Random seed: a day with the same seed and sizes repeats, but for timings.
    pub seed: u64,
    /// Per mille of card dialogues torn, and of load clients that vanish.
    pub tear_per_mille: u32,
    /// Where the charging data goes (default: the day's temporary directory).
    pub data: Option<PathBuf>,
}

/// What the day tells its observer as it goes.
pub enum Event<'a> {
    /// The charging server is up at `base`.
    Started {
        /// Its base URL.
        base: &'a str,
    },
    /// Another tenth of the day's taps is done.
    Progress(Progress),
    /// The cardholder pages are served at `console` (the server's base URL); `name` signs in
    /// with `password` (a new random one each day) and sees its card; `operator` signs in
    /// with `operator_password` and sees the operator console.
    Pages {
        /// The pages' address.
        console: &'a str,
        /// The cardholder's account name.
        name: &'a str,
        /// The cardholder's password.
        password: &'a str,
        /// The operator's account name.
        operator: &'a str,
        /// The operator's password.
        operator_password: &'a str,
    },
    /// The metro gateway's operator console is served at `console`; the same operator login
    /// signs in to it.
    GatewayConsole {
        /// The console's address.
        console: &'a str,
    },
}

/// The cardholder who may sign in to the pages during the demo.
pub const PAGES_HOLDER: &str = "rider-0";

/// The operator who may sign in to the console during the demo.
pub const PAGES_OPERATOR: &str = "operator";

/// Runs a whole day; `observe` hears of its progress.
pub fn run(cfg: &DayConfig, observe: &mut dyn FnMut(Event<'_>)) -> Result<DayReport, SimError> {
    let mut world = day(cfg, observe)?;
    let report = world.report()?;
    world.office.stop(&world.rt);
    Ok(report)
}

/// The back office (and its pages) kept serving after the day: stopped when dropped.
pub struct Serving {
    world: World,
}

impl Serving {
    /// The charging server's base URL.
    pub fn base(&self) -> &str {
        &self.world.office.base
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        self.world.office.stop(&self.world.rt);
    }
}

/// Runs a whole day like [`run`], but leaves the charging server (API and pages) serving until
/// the returned [`Serving`] is dropped.
pub fn run_and_keep_serving(
    cfg: &DayConfig,
    observe: &mut dyn FnMut(Event<'_>),
) -> Result<(DayReport, Serving), SimError> {
    let mut world = day(cfg, observe)?;
    let report = world.report()?;
    Ok((report, Serving { world }))
}

/// The day up to its end: taps, the end of day and the drain.
fn day(cfg: &DayConfig, observe: &mut dyn FnMut(Event<'_>)) -> Result<World, SimError> {
    if cfg.validators == 0 || cfg.cards == 0 {
        return Err(SimError::Setup(
            "--validators and --cards must be > 0".into(),
        ));
    }
    let mut world = World::open(cfg, observe)?;
    let step = (cfg.taps / 10).max(1);
    for tap in 0..cfg.taps {
        world.tap(tap)?;
        if (tap + 1) % step == 0 {
            observe(Event::Progress(world.progress((tap + 1) * 100 / cfg.taps)));
        }
    }
    world.end_of_day()?;
    world.drain()?;
    Ok(world)
}

/// Everything of the day (fields drop in order: the stores before their directory, the
/// runtime last).
struct World {
    cfg: DayConfig,
    rng: StdRng,
    card_rng: StdRng,
    hsm: SoftwareHsm,
    office: BackOffice,
    riders: Vec<Rider>,
    gates: Gates,
    ops: Operators,
    fleet: Fleet,
    tally: Tally,
    /// The rail ticket office.
    shop: Shop,
    /// Simulated time between taps: the day runs 05:00 to 24:00.
    ms_per_tap: u64,
    /// A rider who just tapped out often changes lines right away (a transfer).
    next_rider: Option<usize>,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

/// The metro gateway's API and operator console on a loopback port (its store and counters
/// survive the gateway's restart), the operator signing in with `operator_password`: its URL.
fn gateway_console(
    rt: &tokio::runtime::Runtime,
    keys: &KeySet,
    ops: &Operators,
    currency: (String, u32),
    operator_password: &str,
) -> Result<String, SimError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let console = format!("http://{}/console", listener.local_addr()?);
    let state = gateway::api::ApiState {
        store: ops.metro.store.clone(),
        keys: keys.for_role(purse::keys::Role::Gateway, 0)?,
        stats: ops.metro.stats.clone(),
        auth: tapgate_http::auth::Auth::new(&[]).map_err(SimError::Setup)?,
        currency,
        places: Default::default(),
        metrics_public: false,
        operator: "metro".into(),
    };
    let mut pages = tapgate_http::pages::PagesConfig::default();
    pages.operators.push(tapgate_http::pages::PageLogin {
        name: PAGES_OPERATOR.into(),
        password_argon2: tapgate_http::pages::hash_password(operator_password),
    });
    let router = gateway::api::router(state.clone())
        .merge(gateway::console::router(state, &pages, false).map_err(SimError::Setup)?);
    rt.spawn(async move {
        let _ = tapgate_http::serve::serve_router(
            "gateway-api",
            listener,
            None,
            router,
            std::future::pending(),
        )
        .await;
    });
    Ok(console)
}

impl World {
    /// The back office, the riders, the gates, the broker and gateways, the validators' clients.
    fn open(cfg: &DayConfig, observe: &mut dyn FnMut(Event<'_>)) -> Result<World, SimError> {
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let card_rng = StdRng::seed_from_u64(cfg.seed ^ 0x5eed);
        let keys = KeySet::generate(&mut rng);
        let hsm = SoftwareHsm::new(&keys)?;
        let dir = tempfile::tempdir()?;
        let data = cfg
            .data
            .clone()
            .unwrap_or_else(|| dir.path().join("charging"));
        let partner_key = ed25519_dalek::SigningKey::from_bytes(&{
            let mut b = [0u8; 32];
            rng.fill(&mut b);
            b
        });
        let mut server_cfg = BackOffice::config(&data, cfg.cards, &partner_key)?;
        // One rider signs in to the cardholder pages, and an operator to the console, each with
        // a new random password (from the OS, so the seeded day stays the same).
        let new_password = || {
            use rand::RngCore;
            let mut b = [0u8; 12];
            rand::rngs::OsRng.fill_bytes(&mut b);
            hex::encode(b)
        };
        let (password, operator_password) = (new_password(), new_password());
        server_cfg
            .pages
            .cardholders
            .push(charging::pages::CardholderLogin {
                name: PAGES_HOLDER.into(),
                password_argon2: charging::pages::hash_password(&password),
            });
        server_cfg.pages.operators.push(charging::pages::PageLogin {
            name: PAGES_OPERATOR.into(),
            password_argon2: charging::pages::hash_password(&operator_password),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let office = BackOffice::start(&rt, &server_cfg, &keys, partner_key)?;
        observe(Event::Started { base: &office.base });
        observe(Event::Pages {
            console: &format!("{}/", office.base),
            name: PAGES_HOLDER,
            password: &password,
            operator: PAGES_OPERATOR,
            operator_password: &operator_password,
        });
        let riders = riders::issue(cfg.cards, &office, &hsm, &mut rng)?;
        let gates = Gates::install(&keys, &hsm, cfg.validators, cfg.seed, dir.path())?;
        let ops = Operators::start(
            &rt,
            &keys,
            gates.len(),
            gates.tv,
            &office.base,
            dir.path(),
            &mut rng,
        )?;
        let console = gateway_console(
            &rt,
            &keys,
            &ops,
            (
                gates.table.meta.currency.clone(),
                u32::from(gates.table.meta.currency_exponent),
            ),
            &operator_password,
        )?;
        observe(Event::GatewayConsole { console: &console });
        let fleet = connect_fleet(&rt, &keys, &gates, &ops)?;
        // The office sells in the card scheme's currency (the metro's).
        let meta = &gates.table.meta;
        let shop = Shop::new(
            cfg.seed,
            cfg.tear_per_mille,
            &meta.currency,
            meta.currency_exponent,
        );
        Ok(World {
            cfg: cfg.clone(),
            rng,
            card_rng,
            hsm,
            office,
            riders,
            gates,
            ops,
            fleet,
            tally: Tally::default(),
            shop,
            ms_per_tap: (19 * 3_600_000 / u64::from(cfg.taps.max(1))).max(1),
            next_rider: None,
            _dir: dir,
            rt,
        })
    }

    /// One presentation: who, where, whether torn; what the gate answered; the day's events
    /// that fall on this tap.
    fn tap(&mut self, tap: u32) -> Result<(), SimError> {
        if tap == self.cfg.taps / 3 {
            self.block_lost_card()?;
        }
        let ri = match self.next_rider.take() {
            Some(ri) => ri,
            None => self.rng.gen_range(0..self.riders.len()),
        };
        // A torn payment or collection is settled at the card's next contact: the rider goes
        // back online to the office before tapping.
        self.shop_contact(ri)?;
        let vi = self.choose_gate(ri);
        let tear = pick_tear(&mut self.rng, self.cfg.tear_per_mille);
        // The validator holds the blocklist it verified and applied from MQTT.
        self.fleet
            .refresh_blocklist(vi, &mut self.gates.gates[vi].blocklist);
        let now_ms = DAY0_MS + u64::from(tap) * self.ms_per_tap;
        let began = Instant::now();
        let out = self.present(ri, vi, tear, now_ms, &format!("tap {tap}"))?;
        let elapsed_ns = began.elapsed().as_nanos() as u64;
        let short = self.book(ri, vi, out, elapsed_ns)?;
        riders::repower(&mut self.riders[ri].card, &self.hsm)?;
        if tap % 200 == 199 {
            self.fleet.prune();
        }
        if tap + 1 == self.cfg.taps / 2 {
            // The gateway is killed mid-day and restarted: its persistent MQTT session and the
            // validators' outboxes lose nothing; duplicates are dropped by (device, sequence).
            self.ops.restart_metro(&self.rt);
        }
        if short && self.riders[ri].torn_at.is_none() {
            self.top_up(ri, &tap.to_string())?;
        }
        if tap % SALE_EVERY_TAPS == SALE_EVERY_TAPS / 2 {
            if let Some(ci) = self.shop.customer(&self.riders) {
                self.shop_contact(ci)?;
                let short = self
                    .shop
                    .sell(&self.office, &mut self.riders[ci], &self.hsm)?;
                self.pay_short(ci, short)?;
            }
        }
        Ok(())
    }

    /// Rider `ri`'s card's next contact with the ticket office (its torn payment or collection
    /// settled).
    fn shop_contact(&mut self, ri: usize) -> Result<(), SimError> {
        let short = self
            .shop
            .next_contact(&self.office, &mut self.riders[ri], &self.hsm)?;
        self.pay_short(ri, short)
    }

    /// A rider whose card held too little for a ticket tops up online, then pays it.
    fn pay_short(&mut self, ri: usize, short: Option<Short>) -> Result<(), SimError> {
        if let Some(short) = short {
            self.top_up(ri, &short.tag)?;
            self.shop
                .pay_after_top_up(&self.office, &mut self.riders[ri], &self.hsm, short)?;
        }
        Ok(())
    }

    /// A rider reports a card lost: the back office blocks it; the signed delta reaches every
    /// validator through the gateway. Measures how long until each one holds it.
    fn block_lost_card(&mut self) -> Result<(), SimError> {
        let uid = self.riders[0].card.state().uid;
        self.office.post(
            &format!("/v1/cards/{}/block", hex::encode_upper(uid)),
            crate::back_office::OPS,
            serde_json::json!({"reason": "reported lost"}),
        )?;
        self.tally.block_propagation_ms =
            self.fleet
                .wait_blocked(&uid, Instant::now(), Duration::from_secs(30))?;
        self.tally.lost_card_blocked = true;
        Ok(())
    }

    /// Which gate: back to the one where the card was torn; sometimes the hotel's pay-TV; an
    /// exit on the network of a trip in progress; else an entry.
    fn choose_gate(&mut self, ri: usize) -> usize {
        let g = &self.gates;
        let r = &mut self.riders[ri];
        match r.torn_at.take() {
            Some(v) => v,
            None if self.rng.gen_ratio(1, 40) => g.tv,
            None => {
                let n_val = g.tv;
                let fits: Vec<usize> = (0..n_val)
                    .filter(|&v| match r.trip_network {
                        Some(net) => g.kind[v] == GateKind::Out && g.network[v] == net,
                        None => g.kind[v] != GateKind::Out,
                    })
                    .collect();
                if fits.is_empty() {
                    self.rng.gen_range(0..n_val)
                } else {
                    fits[self.rng.gen_range(0..fits.len())]
                }
            }
        }
    }

    /// Rider `ri`'s card at gate `vi`, torn as `tear` says; at the pay-TV box the guest buys a
    /// film or sports hours.
    fn present(
        &mut self,
        ri: usize,
        vi: usize,
        tear: Option<Tear>,
        now_ms: u64,
        at: &str,
    ) -> Result<TapOutcome, SimError> {
        let card = &mut self.riders[ri].card;
        if let Some(Tear::Power(k)) = tear {
            card.tear_after_writes(Some(k));
        }
        let mut reader = TornReader {
            inner: EmulatedReader {
                card,
                rng: &mut self.card_rng,
            },
            tear,
            sent: 0,
        };
        let (gate, journal) = (&mut self.gates.gates[vi], &self.gates.journals[vi]);
        let out = if vi == self.gates.tv {
            let sale = tv_sale(&mut self.rng);
            self.tally.tv_sales += 1;
            gate.charge(&mut reader, journal, now_ms, &sale, &mut |_| {})
        } else {
            gate.tap(&mut reader, journal, now_ms, &mut |_| {})
        };
        self.riders[ri].card.tear_after_writes(None);
        out.map_err(|e| SimError::Gate {
            at: at.to_string(),
            why: e.to_string(),
        })
    }

    /// Books a settled earlier tear: its tap goes out if the card had committed it.
    fn book_settled(&mut self, vi: usize, settled: Settled) -> Result<(), SimError> {
        match settled {
            Settled::Committed { seq } => {
                self.tally.debits_settled_committed += 1;
                self.publish_accepted(vi, seq)?;
            }
            Settled::NotCommitted => self.tally.debits_settled_not_committed += 1,
            Settled::Unprovable => self.tally.debits_unresolved += 1,
            Settled::None => {}
        }
        Ok(())
    }

    /// Publishes an accepted tap and books its fare to the gate's operator.
    fn publish_accepted(&mut self, vi: usize, seq: u64) -> Result<(), SimError> {
        self.tally.taps_accepted += 1;
        let amount = self.gates.publish(&mut self.fleet, vi, seq)?;
        self.tally.book(self.gates.operator(vi), amount);
        Ok(())
    }

    /// Books what gate `vi` answered rider `ri`; whether the card was short of value.
    fn book(
        &mut self,
        ri: usize,
        vi: usize,
        out: TapOutcome,
        elapsed_ns: u64,
    ) -> Result<bool, SimError> {
        self.book_settled(vi, out.settled)?;
        let tv = vi == self.gates.tv;
        match out.answer {
            Answer::Accepted { seq, .. } => {
                self.tally.latencies_ns.push(elapsed_ns);
                self.publish_accepted(vi, seq)?;
                if tv {
                    self.tally.tv_accepted += 1;
                } else {
                    self.tally.count_fare_flags(&self.riders[ri].card);
                    self.riders[ri].trip_network =
                        (self.gates.kind[vi] == GateKind::In).then_some(self.gates.network[vi]);
                }
                if self.gates.kind[vi] == GateKind::Out && self.rng.gen_bool(0.4) {
                    self.next_rider = Some(ri);
                }
                Ok(false)
            }
            Answer::Refused { reason, seq } => {
                if let Some(seq) = seq {
                    // Refusals are reported to the gateway too.
                    self.gates.publish(&mut self.fleet, vi, seq)?;
                    self.tally.refusals_reported += 1;
                }
                if !tv {
                    self.riders[ri].trip_network = None;
                }
                Ok(self.tally.refused(reason))
            }
            Answer::Torn => {
                self.tally.taps_torn += 1;
                self.riders[ri].torn_at = Some(vi);
                Ok(false)
            }
            Answer::Repeat => {
                self.tally.taps_repeat += 1;
                Ok(false)
            }
        }
    }

    /// Tops up online through the charging server, funded by card, mileage or a voucher bought
    /// from the mall; the client sometimes vanishes mid-load.
    fn top_up(&mut self, ri: usize, tag: &str) -> Result<(), SimError> {
        let (source, instrument) = match self.rng.gen_range(0..3) {
            0 => ("card".to_string(), self.riders[ri].card_token.clone()),
            1 => ("mileage".to_string(), self.riders[ri].member.clone()),
            _ => (
                "voucher".to_string(),
                self.office.buy_voucher(&format!("order-{tag}"), 20_000)?,
            ),
        };
        let vanish = pick_vanish(&mut self.rng, self.cfg.tear_per_mille);
        let key = format!("demo-load-{tag}");
        let ask = LoadAsk {
            amount_minor: 20_000,
            source: &source,
            instrument: &instrument,
            idempotency_key: &key,
            vanish,
        };
        let r = &mut self.riders[ri];
        let client = Client::with_agent(self.office.agent.clone(), &self.office.base, &r.token);
        let mut reader = EmulatedReader {
            card: &mut r.card,
            rng: rand::rngs::OsRng,
        };
        match client.load(&mut reader, &ask)?.reply() {
            Some(Reply::Completed { .. }) => {
                self.tally.loads_completed += 1;
                *self.tally.loads_by_source.entry(source).or_default() += 1;
                r.pending_load = false; // older pending loads were settled by the server
            }
            Some(Reply::Refused { .. }) => self.tally.loads_refused += 1,
            _ => {
                self.tally.loads_torn += 1;
                r.pending_load = true;
            }
        }
        riders::repower(&mut r.card, &self.hsm)
    }

    /// End of day: a card with a torn payment or collection goes back online to the office;
    /// a card torn at a validator meets it once more (its journal settles the debit from the
    /// card's counter); a card with a torn load makes a free check-in tap, which books the next
    /// counter so clearing settles the load.
    fn end_of_day(&mut self) -> Result<(), SimError> {
        let end_ms = DAY0_MS + u64::from(self.cfg.taps) * self.ms_per_tap;
        for ri in 0..self.riders.len() {
            self.shop_contact(ri)?;
            if let Some(vi) = self.riders[ri].torn_at.take() {
                self.last_presentation(ri, vi, end_ms)?;
            }
            if self.riders[ri].pending_load {
                self.check_in(ri, end_ms)?;
            }
        }
        Ok(())
    }

    /// A torn card's last presentation at its gate (at the pay-TV box the guest buys again
    /// what the torn presentation did not sell).
    fn last_presentation(&mut self, ri: usize, vi: usize, end_ms: u64) -> Result<(), SimError> {
        let out = self.present(ri, vi, None, end_ms, "end-of-day tap")?;
        let before = self.tally.taps_accepted;
        let refused_before = self.tally.taps_refused + self.tally.taps_refused_blocked;
        self.book_settled(vi, out.settled)?;
        match out.answer {
            Answer::Accepted { seq, .. } => self.publish_accepted(vi, seq)?,
            Answer::Refused {
                seq: Some(seq),
                reason,
            } => {
                self.gates.publish(&mut self.fleet, vi, seq)?;
                self.tally.refusals_reported += 1;
                self.tally.refused(reason);
            }
            _ => {}
        }
        self.tally.taps_accepted_at_day_end += self.tally.taps_accepted - before;
        self.tally.taps_refused_at_day_end +=
            self.tally.taps_refused + self.tally.taps_refused_blocked - refused_before;
        self.riders[ri].card.remove_from_field();
        Ok(())
    }

    /// A free check-in tap at the first gate, so that clearing sees the counter after a torn
    /// load.
    fn check_in(&mut self, ri: usize, end_ms: u64) -> Result<(), SimError> {
        let r = &mut self.riders[ri];
        let mut reader = EmulatedReader {
            card: &mut r.card,
            rng: &mut self.card_rng,
        };
        let gate = &mut self.gates.gates[0];
        let out = txn::debit(&mut reader, &mut gate.sam, &mut self.rng, |_| {
            Decision::Apply {
                amount_minor: 0,
                record: None,
            }
        })?;
        if let Outcome::Committed { receipt, .. } = out {
            let sam = &self.gates.gates[0].sam;
            let seq = self.gates.journals[0].append_tap(None, |seq| {
                crate::taps::signed_accepted(sam, &receipt, "metro", FIRST_DEVICE, seq, end_ms)
            })?;
            self.gates.publish(&mut self.fleet, 0, seq)?;
            self.tally.check_in_taps += 1;
        }
        r.pending_load = false;
        r.card.remove_from_field();
        Ok(())
    }

    /// Every tap confirmed by the gateway (resending what is not), then forwarded to and
    /// cleared by the charging server; the gateways stop.
    fn drain(&mut self) -> Result<(), SimError> {
        const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);
        let drain = Instant::now();
        let mut last_resend = Instant::now();
        while self.fleet.prune() > 0 {
            if drain.elapsed() > DRAIN_TIMEOUT {
                return Err(SimError::Timeout(
                    "taps not confirmed by the gateway in time".into(),
                ));
            }
            if last_resend.elapsed() > Duration::from_secs(2) {
                self.fleet.resend_unconfirmed()?;
                last_resend = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        while self.ops.outbox_len()? > 0 {
            if drain.elapsed() > DRAIN_TIMEOUT {
                return Err(SimError::Timeout(
                    "taps not forwarded to clearing in time".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.fleet.disconnect();
        self.ops.stop(&self.rt);
        self.tally.taps_cleared = self.ops.forwarded()?;
        self.tally.clearing_duplicates = self.ops.both(|s| &s.duplicates);
        self.tally.clearing_anomalies = self.ops.both(|s| &s.quarantined);
        Ok(())
    }

    /// The ledger checked against every card.
    fn report(&mut self) -> Result<DayReport, SimError> {
        let cons: Conservation = check::conservation(
            self.office.state.loads.ledger(),
            self.riders.iter().map(|r| &r.card),
        )?;
        let books = check::shop_books(self.office.state.loads.ledger(), &[MERCHANT])?;
        self.tally
            .payments_by_merchant
            .insert(MERCHANT.to_string(), self.shop.tally.clone());
        let meta = &self.gates.table.meta;
        let currencies = [
            ("metro", (meta.currency.clone(), meta.currency_exponent)),
            (
                "hotel",
                (
                    self.gates.hotel_meta.currency.clone(),
                    self.gates.hotel_meta.currency_exponent,
                ),
            ),
        ]
        .into_iter()
        .collect();
        Ok(DayReport::new(
            std::mem::take(&mut self.tally),
            self.gates.table.meta.clone(),
            currencies,
            self.ops.restarts,
            cons,
            books,
        ))
    }

    fn progress(&self, percent: u32) -> Progress {
        Progress {
            percent,
            taps_accepted: self.tally.taps_accepted,
            taps_refused: self.tally.taps_refused + self.tally.taps_refused_blocked,
            taps_torn: self.tally.taps_torn,
            loads_completed: self.tally.loads_completed,
            loads_torn: self.tally.loads_torn,
            cleared: self
                .ops
                .metro
                .stats
                .forwarded
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// The validators' clients: the metro's devices and the hotel's box, each on its operator's
/// topics, holding the metro's (the card scheme's) blocklist.
fn connect_fleet(
    rt: &tokio::runtime::Runtime,
    keys: &KeySet,
    gates: &Gates,
    ops: &Operators,
) -> Result<Fleet, SimError> {
    let devices = ops
        .device_passwords
        .iter()
        .enumerate()
        .map(|(vi, password)| Device {
            id: FIRST_DEVICE + vi as u32,
            password: password.clone(),
            operator: gates.operator(vi).to_string(),
        })
        .collect();
    let opts = FleetOptions {
        host: "127.0.0.1".into(),
        port: ops.mqtt_port,
        card_scheme: "metro".into(),
        verifying_key: keys.verifying_key,
        persistent_session: true,
        queue_capacity: 10_000,
        inflight: None,
        max_packet_bytes: None,
        tcp_nodelay: false,
    };
    Fleet::connect(rt.handle().clone(), &opts, devices)
}
