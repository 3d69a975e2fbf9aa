//! Bench scenario `payments`: online payments to a merchant end to end over HTTP against the
//! real charging server (axum, software HSM by default, LMDB ledger) on loopback, and `loads`
//! in the same run on the same server, so that `ratio_to_loads` (payments/s ÷ loads/s) compares
//! the two under the same machine load. Client threads each own an emulated card and only relay
//! APDUs; the merchant's payments are made before the clock starts.

use crate::Figures;
use charging::client::Client;
use purse::card::{Card, Personalisation};
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use purse::txn::EmulatedReader;
use rand::SeedableRng;
use std::time::Instant;
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::token;

const MERCHANT: &str = "tg_bench_merchant";
const OPERATOR: &str = "tg_bench_operator";

/// Runs `n` payments and `n` loads from `TAPGATE_BENCH_CLIENTS` (8) client threads.
pub fn run(n: Option<u64>) -> anyhow::Result<Figures> {
    let n = n.unwrap_or(2_000);
    let clients: u64 = std::env::var("TAPGATE_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let per_client = n.div_ceil(clients);
    let keys = KeySet::generate(&mut rand::rngs::StdRng::seed_from_u64(2));
    let hsm = SoftwareHsm::new(&keys)?;
    let server =
        tapgate_testkit::charging::start_with_hsm(Box::new(SoftwareHsm::new(&keys)?), |cfg| {
            cfg.tokens = vec![
                token("bench", Role::Cardholder, crate::loads::TOKEN),
                token("rail-shop", Role::Merchant, MERCHANT),
                token("ops", Role::Operator, OPERATOR),
            ];
            cfg.limits.loads_per_minute_per_client = 0;
        });
    let base = server.base.clone();
    let agent = ureq::AgentBuilder::new().build();
    crate::loads::register_tokens(
        &agent,
        &base,
        (0..clients).flat_map(|c| load_keys(c, per_client)),
    )?;
    let mut work = payments_made(&base, &hsm, clients, per_client)?;

    // Loads, then payments, each phase timed on its own.
    let t0 = Instant::now();
    drive_loads(&agent, &base, &hsm, clients, per_client)?;
    let loads_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let round_trips = drive_payments(&agent, &base, &mut work)?;
    let payments_s = t1.elapsed().as_secs_f64();

    let done = clients * per_client;
    conserved(&server, &work, done)?;
    let (payments_per_s, loads_per_s) = (done as f64 / payments_s, done as f64 / loads_s);
    Ok(vec![
        ("clients", clients.into()),
        ("payments", done.into()),
        ("payments_per_s", (payments_per_s.round() as u64).into()),
        (
            "round_trips_per_payment",
            (round_trips as f64 / done as f64).into(),
        ),
        ("loads", done.into()),
        ("loads_per_s", (loads_per_s.round() as u64).into()),
        (
            "ratio_to_loads",
            ((payments_per_s / loads_per_s * 100.0).round() / 100.0).into(),
        ),
        ("hsm", "software".into()),
    ])
}

/// Client `c`'s idempotency keys for its `per_client` loads (`l<c>-<i>`).
fn load_keys(c: u64, per_client: u64) -> impl Iterator<Item = String> {
    (0..per_client).map(move |i| format!("l{c}-{i}"))
}

/// Before the clock: each client's card issued with value, and its payments made by the
/// merchant. (card, payment ids) a client.
fn payments_made(
    base: &str,
    hsm: &SoftwareHsm,
    clients: u64,
    per_client: u64,
) -> anyhow::Result<Vec<(Card, Vec<String>)>> {
    let expires = charging::api::rfc3339(
        u64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis(),
        )? + 3_600_000,
    );
    let mut work = Vec::new();
    for c in 0..clients {
        let uid = [0x04, 0xBE, 0x9A, 0, 0, (c >> 8) as u8, c as u8];
        let (code, body) = tapgate_testkit::http::post(
            &format!("{base}/v1/cards"),
            OPERATOR,
            serde_json::json!({"card_uid": hex::encode_upper(uid), "personalised_minor": 400_000}),
        );
        anyhow::ensure!(code == 201, "registering a card: {code} {body}");
        let card = Card::personalise(
            &Personalisation::transit(uid, 400_000),
            hsm.card_keys(&uid, 1)?,
        );
        let mut ids = Vec::new();
        for i in 0..per_client {
            let (code, body) = tapgate_testkit::http::post(
                &format!("{base}/v1/merchant/payments"),
                MERCHANT,
                serde_json::json!({
                    "amount_minor": 100, "currency": "KRW", "order_id": format!("o{c}-{i}"),
                    "description": "bench", "expires": expires,
                }),
            );
            anyhow::ensure!(code == 201, "making a payment: {code} {body}");
            ids.push(body["id"].as_str().unwrap_or_default().to_string());
        }
        work.push((card, ids));
    }
    Ok(work)
}

/// `clients` threads each load a card of their own `per_client` times.
fn drive_loads(
    agent: &ureq::Agent,
    base: &str,
    hsm: &SoftwareHsm,
    clients: u64,
    per_client: u64,
) -> anyhow::Result<()> {
    std::thread::scope(|s| -> anyhow::Result<()> {
        let handles: Vec<_> = (0..clients)
            .map(|c| {
                let (agent, base) = (agent.clone(), base.to_string());
                s.spawn(move || -> anyhow::Result<()> {
                    let uid = [0x04, 0xBE, 0x10, 0, 0, (c >> 8) as u8, c as u8];
                    let mut card = Card::personalise(
                        &Personalisation::transit(uid, 0),
                        hsm.card_keys(&uid, 1)?,
                    );
                    for key in load_keys(c, per_client) {
                        crate::loads::relay(&agent, &base, &mut card, &key, 100)?;
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| anyhow::anyhow!("a load client panicked"))??;
        }
        Ok(())
    })
}

/// One thread a client pays its payments with its card; the round trips they took.
fn drive_payments(
    agent: &ureq::Agent,
    base: &str,
    work: &mut [(Card, Vec<String>)],
) -> anyhow::Result<u64> {
    std::thread::scope(|s| -> anyhow::Result<u64> {
        let handles: Vec<_> = work
            .iter_mut()
            .enumerate()
            .map(|(c, (card, ids))| {
                let client = Client::with_agent(agent.clone(), base, crate::loads::TOKEN);
                s.spawn(move || -> anyhow::Result<u64> {
                    let mut trips = 0u64;
                    for (i, id) in ids.iter().enumerate() {
                        let mut reader = EmulatedReader {
                            card: &mut *card,
                            rng: rand::rngs::StdRng::seed_from_u64(7),
                        };
                        let paid = client.pay(&mut reader, id, &format!("p{c}-{i}"), None)?;
                        anyhow::ensure!(
                            paid.completed().is_some(),
                            "payment did not complete: {:?}",
                            paid.ending
                        );
                        trips += u64::from(paid.round_trips);
                    }
                    Ok(trips)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| anyhow::anyhow!("a payment client panicked"))??;
        }
        Ok(total)
    })
}

/// Every payment booked once, every card as the ledger says.
fn conserved(
    server: &tapgate_testkit::charging::ChargingServer,
    work: &[(Card, Vec<String>)],
    done: u64,
) -> anyhow::Result<()> {
    let ledger = server.state.loads.ledger();
    let merchant = ledger.read()?.balance("merchant:rail-shop")?;
    anyhow::ensure!(
        merchant == i64::try_from(done * 100)?,
        "merchant booked {merchant}, paid {}",
        done * 100
    );
    let truths = work.iter().map(|(card, _)| charging::reconcile::CardTruth {
        uid: card.state().uid,
        balance_minor: card.state().balance_minor,
        tmc: card.state().tmc,
    });
    let conserved = charging::reconcile::conservation(ledger, truths, &[])?;
    anyhow::ensure!(
        conserved.payments_paid_twice == 0 && conserved.cards_out_of_balance == 0,
        "{conserved:?}"
    );
    Ok(())
}
