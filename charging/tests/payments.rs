//! Online payments (issue 20): a merchant makes a payment, the cardholder's client relays the
//! card's dialogue, the server debits the card and books card → merchant once. Attacks: a
//! merchant acting on another merchant's payment, a payment replayed to another merchant, a
//! second client racing the first on one payment, a payment torn at every relay position then
//! settled once. Value is conserved in every test (`charging::reconcile::conservation`).

mod common;

use charging::client::{Client, Ending, Vanish};
use charging::load::Reply;
use charging::reconcile::{conservation, CardTruth};
use purse::card::Card;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use purse::txn::{EmulatedReader, Transport};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde_json::{json, Value};
use tapgate_http::auth::Role;
use tapgate_testkit::fixtures::{token, transit_card};
use tapgate_testkit::http::{get, post, post_with_key};

const OPS: &str = "tg_ops_pay";
const ALICE: &str = "tg_alice_pay";
const BOB: &str = "tg_bob_pay";
const SHOP: &str = "tg_shop_pay";
const OTHER: &str = "tg_other_pay";

struct World {
    srv: common::Running,
    hsm: SoftwareHsm,
    keys: KeySet,
}

fn world() -> World {
    // The notification receivers of these tests listen on loopback.
    world_on(true)
}

fn world_on(notify_private_hosts: bool) -> World {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(20));
    let srv = common::start(&keys, |cfg| {
        cfg.tokens = vec![
            token("ops", Role::Operator, OPS),
            token("alice", Role::Cardholder, ALICE),
            token("bob", Role::Cardholder, BOB),
            token("rail-shop", Role::Merchant, SHOP),
            token("other-shop", Role::Merchant, OTHER),
        ];
        // The torn-at-every-position tests start many relays in a second.
        cfg.limits.loads_per_minute_per_client = 0;
        cfg.limits.payments.notify_private_hosts = notify_private_hosts;
    });
    World {
        srv,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys,
    }
}

fn rfc3339_in(seconds: i64) -> String {
    (time::OffsetDateTime::now_utc() + time::Duration::seconds(seconds))
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

impl World {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.srv.base)
    }

    /// A card personalised with `balance`, registered to `owner`.
    fn card(&self, n: u8, balance: i32, owner: &str) -> Card {
        let uid = [0x04, 0x20, n, 1, 2, 3, 4];
        let (code, body) = post(
            &self.url("/v1/cards"),
            OPS,
            json!({"card_uid": hex::encode_upper(uid), "personalised_minor": balance, "owner": owner}),
        );
        assert_eq!(code, 201, "{body}");
        transit_card(&self.hsm, uid, balance)
    }

    /// Makes a payment as `merchant`: (status, body).
    fn create(&self, merchant: &str, order: &str, amount: i32) -> (u16, Value) {
        post(
            &self.url("/v1/merchant/payments"),
            merchant,
            json!({
                "amount_minor": amount,
                "currency": "KRW",
                "order_id": order,
                "description": "Rail ticket Lyon → Paris",
                "expires": rfc3339_in(3_600),
                "notify_url": "https://shop.example/notify",
            }),
        )
    }

    fn payment_id(&self, merchant: &str, order: &str, amount: i32) -> String {
        let (code, body) = self.create(merchant, order, amount);
        assert_eq!(code, 201, "{body}");
        body["id"].as_str().unwrap().to_string()
    }

    fn client(&self, token: &str) -> Client {
        Client::new(&self.srv.base, token)
    }

    fn pay(
        &self,
        who: &str,
        card: &mut Card,
        id: &str,
        key: &str,
        vanish: Option<Vanish>,
    ) -> Ending {
        let mut reader = EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(3),
        };
        self.client(who)
            .pay(&mut reader, id, key, vanish)
            .unwrap()
            .ending
    }

    /// The ledger against the cards: value conserved, nothing booked twice, and every card
    /// reconciles (no payment left pending).
    fn conserved(&self, cards: &[&Card]) {
        let truths = cards.iter().map(|c| CardTruth {
            uid: c.state().uid,
            balance_minor: c.state().balance_minor,
            tmc: c.state().tmc,
        });
        let c = conservation(self.srv.state.loads.ledger(), truths, &[]).unwrap();
        assert!(c.holds(&Default::default()), "{c:#?}");
    }

    fn balance(&self, account: &str) -> i64 {
        let l = self.srv.state.loads.ledger();
        let r = l.read().unwrap();
        r.balance(account).unwrap()
    }
}

fn completed(e: &Ending) -> (i32, i32, u32) {
    match e {
        Ending::Answered(Reply::Completed {
            amount_minor,
            balance_minor,
            tmc,
            ..
        }) => (*amount_minor, *balance_minor, *tmc),
        other => panic!("not completed: {other:?}"),
    }
}

fn refused(e: &Ending) -> String {
    match e {
        Ending::Answered(Reply::Refused { reason, .. }) => reason.clone(),
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_payment_is_paid_once_and_its_merchant_alone_sees_it() {
    let w = world();
    let mut card = w.card(1, 5_000, "alice");
    let id = w.payment_id(SHOP, "order-1", 1_200);
    assert!(id.starts_with("pay_"), "{id}");

    // The same order id gives the same payment; with other terms it is refused.
    let (code, again) = w.create(SHOP, "order-1", 1_200);
    assert_eq!((code, again["id"].as_str()), (200, Some(id.as_str())));
    assert_eq!(w.create(SHOP, "order-1", 1_300).0, 422);

    // Bad requests are refused with a clear error.
    for bad in [
        json!({"amount_minor": 0, "currency": "KRW", "order_id": "x", "expires": rfc3339_in(60)}),
        json!({"amount_minor": 5, "currency": "euro", "order_id": "x", "expires": rfc3339_in(60)}),
        json!({"amount_minor": 5, "currency": "KRW", "order_id": "x", "expires": rfc3339_in(-60)}),
        json!({"amount_minor": 5, "currency": "KRW", "order_id": "x", "expires": "tomorrow"}),
        json!({"amount_minor": 5, "currency": "KRW", "order_id": "x", "expires": rfc3339_in(60), "notify_url": "ftp://x"}),
    ] {
        let (code, body) = post(&w.url("/v1/merchant/payments"), SHOP, bad);
        assert_eq!(code, 400, "{body}");
    }
    // Above the per-payment limit (200 000 by default).
    assert_eq!(w.create(SHOP, "big", 200_001).0, 403);

    // Roles: a cardholder cannot make payments, a merchant cannot pay one.
    assert_eq!(w.create(ALICE, "order-x", 100).0, 403);
    let (code, _) = post_with_key(
        &w.url(&format!("/v1/payments/{id}/pay")),
        SHOP,
        "k",
        json!({"card_uid": hex::encode_upper(card.state().uid)}),
    );
    assert_eq!(code, 403);

    // The cardholder sees what it pays; the other merchant does not see it at all.
    let (code, seen) = get(&w.url(&format!("/v1/payments/{id}")), ALICE);
    assert_eq!(code, 200, "{seen}");
    assert_eq!(
        (seen["amount_minor"].as_i64(), seen["merchant"].as_str()),
        (Some(1_200), Some("rail-shop"))
    );
    let (code, _) = get(&w.url(&format!("/v1/merchant/payments/{id}")), OTHER);
    assert_eq!(code, 404);

    // Paid through the relay: the card is debited once, the merchant credited.
    let paid = w.pay(ALICE, &mut card, &id, "pay-1", None);
    let (amount, balance, tmc) = completed(&paid);
    assert_eq!((amount, balance, tmc), (1_200, 3_800, 1));
    assert_eq!(card.state().balance_minor, 3_800);
    assert_eq!(w.balance("merchant:rail-shop"), 1_200);
    let (code, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(code, 200);
    assert_eq!(p["state"], "completed", "{p}");
    assert_eq!(p["card_uid"], hex::encode_upper(card.state().uid));
    assert_eq!(p["tmc"], 1);

    // The same key again: the same answer, the card untouched; another key: refused.
    assert_eq!(w.pay(ALICE, &mut card, &id, "pay-1", None), paid);
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(4),
    };
    let again = w.client(ALICE).pay(&mut reader, &id, "pay-2", None);
    assert!(
        matches!(
            again,
            Err(charging::client::ClientError::Server { code: 409, .. })
        ),
        "{again:?}"
    );
    assert_eq!(card.state().balance_minor, 3_800);
    w.conserved(&[&card]);
}

/// A merchant cannot aim the server's signed notifications at the back office's own network
/// (unless the operator allows it, as the loopback receivers of the other tests need).
#[test]
fn a_notify_url_naming_a_private_host_is_refused() {
    let w = world_on(false);
    for url in [
        "http://127.0.0.1:5432/",
        "http://localhost:9090/metrics",
        "https://LOCALHOST./x",
        "http://[::1]:8080/",
        "http://[::ffff:10.0.0.1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.1.2.3/",
        "http://user@192.168.1.1:80/",
        "http://0.0.0.0/",
        // Forms the HTTP client reads as 127.0.0.1 (WHATWG URL rules).
        "http://127.1/",
        "http://2130706433/",
        "http://0x7f.0.0.1/",
        "http://%31%32%37.0.0.1/",
        "http://127.0.0.1\\@example.com/",
        "http://100.100.100.200/",
        "http://[64:ff9b::a9fe:a9fe]/",
    ] {
        let (code, body) = post(
            &w.url("/v1/merchant/payments"),
            SHOP,
            json!({"amount_minor": 5, "currency": "KRW", "order_id": "x", "expires": rfc3339_in(60), "notify_url": url}),
        );
        assert_eq!(code, 400, "{url}: {body}");
        assert!(body.to_string().contains("notify_url"), "{url}: {body}");
    }
    let (code, body) = w.create(SHOP, "public", 5);
    assert_eq!(code, 201, "a public endpoint is taken: {body}");
}

#[test]
fn a_card_that_holds_too_little_or_is_someone_elses_is_refused() {
    let w = world();
    let mut poor = w.card(2, 100, "alice");
    let id = w.payment_id(SHOP, "order-2", 1_000);
    assert_eq!(
        refused(&w.pay(ALICE, &mut poor, &id, "k1", None)),
        "insufficient_value"
    );
    assert_eq!(poor.state().balance_minor, 100);

    // Bob cannot pay with Alice's card.
    let mut rich = w.card(3, 5_000, "alice");
    let mut reader = EmulatedReader {
        card: &mut rich,
        rng: StdRng::seed_from_u64(5),
    };
    let r = w.client(BOB).pay(&mut reader, &id, "k2", None);
    assert!(
        matches!(
            r,
            Err(charging::client::ClientError::Server { code: 403, .. })
        ),
        "{r:?}"
    );
    // The payment stayed open: Alice pays it with her other card.
    completed(&w.pay(ALICE, &mut rich, &id, "k3", None));
    w.conserved(&[&poor, &rich]);
}

#[test]
fn a_payment_replayed_to_another_merchant_pays_only_its_own() {
    let w = world();
    let mut card = w.card(4, 5_000, "alice");
    let a = w.payment_id(SHOP, "order-7", 700);
    // The other merchant makes a payment with the same order id: a payment of its own.
    let b = w.payment_id(OTHER, "order-7", 700);
    assert_ne!(a, b);
    completed(&w.pay(ALICE, &mut card, &a, "key-a", None));
    // The same start replayed against the other merchant's payment: the key names another
    // request, refused; the card is not touched.
    let (code, body) = post_with_key(
        &w.url(&format!("/v1/payments/{b}/pay")),
        ALICE,
        "key-a",
        json!({"card_uid": hex::encode_upper(card.state().uid)}),
    );
    assert_eq!(code, 422, "{body}");
    assert_eq!(w.balance("merchant:rail-shop"), 700);
    assert_eq!(w.balance("merchant:other-shop"), 0);
    let (_, pb) = get(&w.url(&format!("/v1/merchant/payments/{b}")), OTHER);
    assert_eq!(pb["state"], "open");
    // A merchant cannot read the other's, whatever the id.
    assert_eq!(
        get(&w.url(&format!("/v1/merchant/payments/{a}")), OTHER).0,
        404
    );
    assert_eq!(
        get(&w.url(&format!("/v1/merchant/payments/{b}")), SHOP).0,
        404
    );
    assert_eq!(card.state().balance_minor, 4_300);
    w.conserved(&[&card]);
}

/// Sends one batch of the server's commands to the card and posts its answers.
fn step(client: &Client, reader: &mut dyn Transport, reply: &Reply) -> Reply {
    let Reply::Command {
        session_id,
        seq,
        commands,
    } = reply
    else {
        panic!("no command to relay: {reply:?}");
    };
    let answers: Vec<Vec<u8>> = commands
        .iter()
        .map(|c| reader.transmit(&hex::decode(c).unwrap()).unwrap())
        .collect();
    client.step(session_id, *seq, &answers).unwrap()
}

fn has_ins(reply: &Reply, ins: u8) -> bool {
    matches!(reply, Reply::Command { commands, .. }
        if commands.iter().any(|c| hex::decode(c).unwrap().get(1) == Some(&ins)))
}

fn has_debit(reply: &Reply) -> bool {
    has_ins(reply, purse::apdu::ins::DEBIT)
}

#[test]
fn a_second_client_racing_the_first_on_one_payment_is_refused() {
    let w = world();
    let mut first = w.card(5, 5_000, "alice");
    let mut second = w.card(6, 5_000, "bob");
    let id = w.payment_id(SHOP, "order-race", 900);
    let (alice, bob) = (w.client(ALICE), w.client(BOB));
    let mut ra = EmulatedReader {
        card: &mut first,
        rng: StdRng::seed_from_u64(6),
    };
    let mut rb = EmulatedReader {
        card: &mut second,
        rng: StdRng::seed_from_u64(7),
    };
    // Both start while the payment is open.
    let mut a = alice
        .start_payment(&ra.card.state().uid, &id, "race-a", None)
        .unwrap();
    let b = bob
        .start_payment(&rb.card.state().uid, &id, "race-b", None)
        .unwrap();
    // The first reaches its Debit: its intent is durable, the payment pending.
    while !has_debit(&a) {
        a = step(&alice, &mut ra, &a);
    }
    // The second runs to its decision: refused, its card untouched.
    let relayed = bob.relay(&mut rb, b, None).unwrap();
    assert!(
        matches!(relayed.reply(), Some(Reply::Refused { reason, .. }) if reason == "payment_not_payable"),
        "{relayed:?}"
    );
    // The first completes.
    let done = alice.relay(&mut ra, a, None).unwrap();
    assert!(done.completed().is_some(), "{done:?}");
    assert_eq!(
        (first.state().balance_minor, second.state().balance_minor),
        (4_100, 5_000)
    );
    assert_eq!(w.balance("merchant:rail-shop"), 900);
    w.conserved(&[&first, &second]);
}

#[test]
fn a_payment_torn_at_every_relay_position_is_settled_once() {
    let w = world();
    // How many commands a whole payment relays.
    let mut probe = w.card(7, 5_000, "alice");
    let id = w.payment_id(SHOP, "probe", 100);
    let mut reader = EmulatedReader {
        card: &mut probe,
        rng: StdRng::seed_from_u64(8),
    };
    let mut counter = Counting {
        inner: &mut reader,
        sent: 0,
    };
    assert!(w
        .client(ALICE)
        .pay(&mut counter, &id, "probe", None)
        .unwrap()
        .completed()
        .is_some());
    let commands = counter.sent;
    assert!(commands >= 6, "{commands}");

    let mut cards = vec![probe];
    let mut paid = 100i64;
    let mut n = 10u8;
    let (mut made_before, mut made_now) = (0, 0);
    for at in 1..=commands {
        for deliver in [false, true] {
            n += 1;
            let mut card = w.card(n, 5_000, "alice");
            let id = w.payment_id(SHOP, &format!("torn-{at}-{deliver}"), 300);
            let torn = w.pay(
                ALICE,
                &mut card,
                &id,
                &format!("t-{n}"),
                Some(Vanish::AtCommand { n: at, deliver }),
            );
            assert!(matches!(torn, Ending::Vanished { .. }), "{torn:?}");
            // The card's next contact: paying the same payment again with it settles the torn
            // attempt first — paid already (the card made it) or paid now (it never did).
            let next = w.pay(ALICE, &mut card, &id, &format!("n-{n}"), None);
            match &next {
                Ending::Answered(Reply::Completed { .. }) => made_now += 1,
                Ending::Answered(Reply::Refused { reason, .. }) if reason == "already_paid" => {
                    made_before += 1
                }
                other => panic!("command {at} deliver {deliver}: {other:?}"),
            }
            assert_eq!(
                card.state().balance_minor,
                4_700,
                "command {at} deliver {deliver}: debited exactly once"
            );
            let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
            assert_eq!(
                p["state"], "completed",
                "command {at} deliver {deliver}: {p}"
            );
            paid += 300;
            cards.push(card);
        }
    }
    assert!(
        made_before >= 1 && made_now >= 1,
        "both outcomes exercised: {made_before} torn after the card paid, {made_now} before"
    );
    assert_eq!(w.balance("merchant:rail-shop"), paid);
    w.conserved(&cards.iter().collect::<Vec<_>>());
}

/// A card the torn payment left holding less than the amount: paying again is `already_paid`
/// (the payment is settled from this contact), not `insufficient_value`.
#[test]
fn a_torn_payment_that_left_the_card_short_is_already_paid_not_refused() {
    let w = world();
    let mut cards = Vec::new();
    let mut already_paid = 0;
    for at in 1..=12u8 {
        let mut card = w.card(100 + at, 400, "alice");
        let id = w.payment_id(SHOP, &format!("short-{at}"), 300);
        let torn = w.pay(
            ALICE,
            &mut card,
            &id,
            &format!("s-{at}"),
            Some(Vanish::AtCommand {
                n: usize::from(at),
                deliver: true,
            }),
        );
        // Fewer commands than `at`: the first attempt was whole.
        if !matches!(torn, Ending::Answered(Reply::Completed { .. })) {
            assert!(matches!(torn, Ending::Vanished { .. }), "{torn:?}");
            match w.pay(ALICE, &mut card, &id, &format!("sn-{at}"), None) {
                Ending::Answered(Reply::Completed { .. }) => {}
                Ending::Answered(Reply::Refused { reason, .. }) if reason == "already_paid" => {
                    already_paid += 1
                }
                other => panic!("torn at command {at}: {other:?}"),
            }
        }
        assert_eq!(card.state().balance_minor, 100, "command {at}: paid once");
        cards.push(card);
    }
    assert!(
        already_paid >= 1,
        "a tear after the card paid was exercised"
    );
    assert_eq!(w.balance("merchant:rail-shop"), 12 * 300);
    w.conserved(&cards.iter().collect::<Vec<_>>());
}

/// A transport that counts the commands it carries.
struct Counting<'a> {
    inner: &'a mut dyn Transport,
    sent: usize,
}

impl Transport for Counting<'_> {
    fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, purse::txn::TransportError> {
        self.sent += 1;
        self.inner.transmit(apdu)
    }

    fn card_uid(&mut self) -> Result<[u8; 7], purse::txn::TransportError> {
        self.inner.card_uid()
    }
}

/// A merchant's notification endpoint on a loopback port: it records every request's body and
/// signature, and answers 503 while `down`, 204 after.
struct Receiver {
    url: String,
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen: Seen,
}

/// Each request the receiver answered: (status, body, signature header).
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(u16, Vec<u8>, String)>>>;

fn receiver() -> Receiver {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/notify", listener.local_addr().unwrap());
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let seen: Seen = Default::default();
    let (d, s) = (down.clone(), seen.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let (mut length, mut signature) = (0usize, String::new());
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if let Some(v) = lower.strip_prefix("tapgate-signature:") {
                    signature = v.trim().to_string();
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let code = if d.load(Ordering::SeqCst) { 503 } else { 204 };
            s.lock().unwrap().push((code, body, signature));
            let status = if code == 204 {
                "204 No Content"
            } else {
                "503 Service Unavailable"
            };
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    Receiver { url, down, seen }
}

#[test]
fn a_notification_receiver_down_for_an_hour_is_told_later_once_and_signed() {
    use std::sync::atomic::Ordering;
    let w = world();
    let rx = receiver();
    let mut card = w.card(40, 5_000, "alice");
    let (code, body) = post(
        &w.url("/v1/merchant/payments"),
        SHOP,
        json!({
            "amount_minor": 450, "currency": "KRW", "order_id": "notified",
            "description": "Hotel film", "expires": rfc3339_in(600), "notify_url": rx.url,
        }),
    );
    assert_eq!(code, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    completed(&w.pay(ALICE, &mut card, &id, "n1", None));

    let loads = &w.srv.state.loads;
    let agent = ureq::AgentBuilder::new()
        .timeout(std::time::Duration::from_secs(5))
        .build();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Down for an hour: every attempt that falls due fails and backs off.
    let mut now = t0;
    while now < t0 + 3_600_000 {
        charging::notify::deliver_due(loads, &agent, now).unwrap();
        now += 60_000;
    }
    let failed = rx.seen.lock().unwrap().len();
    assert!(
        (5..=40).contains(&failed),
        "{failed} attempts while down: retried with backoff"
    );
    // Back up: delivered at the next due attempt, then never again.
    rx.down.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        now += 3_600_000;
        charging::notify::deliver_due(loads, &agent, now).unwrap();
    }
    let seen = rx.seen.lock().unwrap().clone();
    let delivered: Vec<_> = seen.iter().filter(|(code, _, _)| *code == 204).collect();
    assert_eq!(
        delivered.len(),
        1,
        "delivered once: {} requests",
        seen.len()
    );
    let (_, body, signature) = delivered[0];
    let n = {
        let r = loads.ledger().read().unwrap();
        r.notification(&id).unwrap().unwrap()
    };
    assert!(
        n.delivered_ms.is_some() && n.attempts as usize == seen.len(),
        "{n:?}"
    );

    // The body names the payment, completed; the signature verifies with the published key
    // over the context and the body, and not over anything else.
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        (
            v["event"].as_str(),
            v["payment"]["id"].as_str(),
            v["payment"]["state"].as_str()
        ),
        (
            Some("payment.completed"),
            Some(id.as_str()),
            Some("completed")
        )
    );
    let (code, key) = get(&w.url("/v1/merchant/notification-key"), SHOP);
    assert_eq!(code, 200, "{key}");
    let public: [u8; 32] = hex::decode(key["public_key_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let public = ed25519_dalek::VerifyingKey::from_bytes(&public).unwrap();
    let sig: [u8; 64] = hex::decode(signature).unwrap().try_into().unwrap();
    let sig = ed25519_dalek::Signature::from_bytes(&sig);
    let mut msg = charging::notify::SIGNATURE_CONTEXT.to_vec();
    msg.extend_from_slice(body);
    public
        .verify_strict(&msg, &sig)
        .expect("signature verifies");
    assert!(
        public.verify_strict(body, &sig).is_err(),
        "only with the context"
    );
    assert_eq!(get(&w.url("/v1/merchant/notification-key"), ALICE).0, 403);
    w.conserved(&[&card]);
}

impl World {
    /// A refund of `amount` of payment `id` by `merchant` with `key`: (status, body).
    fn refund(&self, merchant: &str, id: &str, amount: i32, key: &str) -> (u16, Value) {
        post_with_key(
            &self.url(&format!("/v1/merchant/payments/{id}/refunds")),
            merchant,
            key,
            json!({"amount_minor": amount}),
        )
    }

    fn collect(&self, card: &mut Card, refund: &str, key: &str, vanish: Option<Vanish>) -> Ending {
        let mut reader = EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(11),
        };
        self.client(ALICE)
            .collect_refund(&mut reader, refund, key, vanish)
            .unwrap()
            .ending
    }
}

#[test]
fn refunds_stay_within_what_was_paid_and_reach_only_the_card_that_paid() {
    let w = world();
    let mut card = w.card(50, 5_000, "alice");
    let mut other = w.card(51, 5_000, "alice");
    let id = w.payment_id(SHOP, "refund-me", 1_000);
    // Not paid yet: nothing to refund.
    assert_eq!(w.refund(SHOP, &id, 100, "r0").0, 409);
    completed(&w.pay(ALICE, &mut card, &id, "p", None));
    assert_eq!(card.state().balance_minor, 4_000);

    // Partial, then above what is left: refused; the rest: made. The same key gives the same
    // refund; another merchant's token does not find the payment.
    let (code, first) = w.refund(SHOP, &id, 600, "r1");
    assert_eq!(code, 201, "{first}");
    assert_eq!(first["state"], "pending");
    assert_eq!(w.refund(SHOP, &id, 600, "r1").1["id"], first["id"]);
    assert_eq!(w.refund(SHOP, &id, 700, "r1").0, 422);
    let (code, body) = w.refund(SHOP, &id, 401, "r2");
    assert_eq!(code, 409, "{body}");
    assert_eq!(w.refund(OTHER, &id, 100, "r3").0, 404);
    assert_eq!(w.refund(SHOP, &id, 0, "r4").0, 409);
    let (code, second) = w.refund(SHOP, &id, 400, "r5");
    assert_eq!(code, 201, "{second}");
    assert_eq!(w.refund(SHOP, &id, 1, "r6").0, 409);
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["refunded_minor"], 1_000);
    // Held apart from the merchant until the card collects it.
    assert_eq!(w.balance("merchant:rail-shop"), 0);
    assert_eq!(w.balance("refunds:pending"), 1_000);

    // Only the card that paid collects it; the refund is a Credit the HSM made.
    let first_id = first["id"].as_str().unwrap();
    let mut reader = EmulatedReader {
        card: &mut other,
        rng: StdRng::seed_from_u64(12),
    };
    let r = w
        .client(ALICE)
        .collect_refund(&mut reader, first_id, "c0", None);
    assert!(
        matches!(
            r,
            Err(charging::client::ClientError::Server { code: 409, .. })
        ),
        "{r:?}"
    );
    let (amount, balance, _) = completed(&w.collect(&mut card, first_id, "c1", None));
    assert_eq!((amount, balance), (600, 4_600));
    // Collected once: again with another key is refused, the card untouched.
    assert_eq!(
        refused(&w.collect(&mut card, first_id, "c2", None)),
        "refund_not_collectable"
    );
    assert_eq!(card.state().balance_minor, 4_600);
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{first_id}")), SHOP);
    assert_eq!(r["state"], "credited", "{r}");
    assert_eq!(
        get(&w.url(&format!("/v1/merchant/refunds/{first_id}")), OTHER).0,
        404
    );

    // The second refund's collection torn at every relay position: settled once.
    let second_id = second["id"].as_str().unwrap().to_string();
    let torn = w.collect(
        &mut card,
        &second_id,
        "c3",
        Some(Vanish::AfterIns(purse::apdu::ins::COMMIT_TRANSACTION)),
    );
    assert!(matches!(torn, Ending::Vanished { .. }), "{torn:?}");
    card.remove_from_field();
    // The card's next contact (a payment of another order) settles the torn credit.
    let next = w.payment_id(SHOP, "after-refund", 100);
    completed(&w.pay(ALICE, &mut card, &next, "p2", None));
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{second_id}")), SHOP);
    assert_eq!(r["state"], "credited", "{r}");
    assert_eq!(card.state().balance_minor, 4_600 + 400 - 100);
    assert_eq!(w.balance("refunds:pending"), 0);
    assert_eq!(w.balance("merchant:rail-shop"), 100);
    w.conserved(&[&card, &other]);
}

#[test]
fn a_refund_collection_torn_at_every_relay_position_is_credited_once() {
    let w = world();
    let mut probe = w.card(60, 5_000, "alice");
    let id = w.payment_id(SHOP, "probe-refund", 500);
    completed(&w.pay(ALICE, &mut probe, &id, "p", None));
    let (_, r) = w.refund(SHOP, &id, 500, "r");
    let refund = r["id"].as_str().unwrap().to_string();
    let mut reader = EmulatedReader {
        card: &mut probe,
        rng: StdRng::seed_from_u64(13),
    };
    let mut counter = Counting {
        inner: &mut reader,
        sent: 0,
    };
    assert!(w
        .client(ALICE)
        .collect_refund(&mut counter, &refund, "c", None)
        .unwrap()
        .completed()
        .is_some());
    let commands = counter.sent;
    let mut cards = vec![probe];
    let mut n = 60u8;
    let (mut before, mut now) = (0, 0);
    for at in 1..=commands {
        for deliver in [false, true] {
            n += 1;
            let mut card = w.card(n, 5_000, "alice");
            let id = w.payment_id(SHOP, &format!("r-{at}-{deliver}"), 300);
            completed(&w.pay(ALICE, &mut card, &id, &format!("p{n}"), None));
            let (_, r) = w.refund(SHOP, &id, 300, &format!("r{n}"));
            let refund = r["id"].as_str().unwrap().to_string();
            let torn = w.collect(
                &mut card,
                &refund,
                &format!("t{n}"),
                Some(Vanish::AtCommand { n: at, deliver }),
            );
            assert!(matches!(torn, Ending::Vanished { .. }), "{torn:?}");
            card.remove_from_field();
            // Collecting again settles the torn attempt first: credited already, or now.
            match w.collect(&mut card, &refund, &format!("a{n}"), None) {
                Ending::Answered(Reply::Completed { .. }) => now += 1,
                Ending::Answered(Reply::Refused { reason, .. })
                    if reason == "refund_not_collectable" =>
                {
                    before += 1
                }
                other => panic!("command {at} deliver {deliver}: {other:?}"),
            }
            assert_eq!(
                card.state().balance_minor,
                5_000,
                "command {at} deliver {deliver}: credited exactly once"
            );
            cards.push(card);
        }
    }
    assert!(
        before >= 1 && now >= 1,
        "both outcomes: {before} before, {now} now"
    );
    assert_eq!(w.balance("refunds:pending"), 0);
    w.conserved(&cards.iter().collect::<Vec<_>>());
}

#[test]
fn a_merchants_day_settles_its_sales_refunds_and_fee() {
    let w = world();
    let mut card = w.card(90, 5_000, "alice");
    let uid = hex::encode_upper(card.state().uid);
    let a = w.payment_id(SHOP, "s-1", 1_000);
    let b = w.payment_id(SHOP, "s-2", 500);
    completed(&w.pay(ALICE, &mut card, &a, "sa", None));
    completed(&w.pay(ALICE, &mut card, &b, "sb", None));
    let (code, refund) = w.refund(SHOP, &a, 200, "ra");
    assert_eq!(code, 201, "{refund}");
    let day = time::OffsetDateTime::now_utc()
        .date()
        .format(time::macros::format_description!("[year]-[month]-[day]"))
        .unwrap();
    let files =
        charging::settlement::settlement_with_fees(w.srv.state.loads.ledger(), &day, 150).unwrap();
    let file = |name: &str| {
        files
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "{name} in {:?}",
                    files.iter().map(|f| &f.name).collect::<Vec<_>>()
                )
            })
            .csv
            .clone()
    };
    let shop = file(&format!("merchant-rail-shop-{day}.csv"));
    assert_eq!(shop.lines().count(), 4, "{shop}");
    assert!(
        shop.contains(&format!(",sale,{uid},1,1000,payment:{a}")),
        "{shop}"
    );
    assert!(
        shop.contains(&format!(",sale,{uid},2,500,payment:{b}")),
        "{shop}"
    );
    assert!(
        shop.contains(&format!(
            ",refund,{uid},,200,refund-made:{}",
            refund["id"].as_str().unwrap()
        )),
        "{shop}"
    );
    // 1 500 sold, 200 refunded, 1.5 % fee (22.5, rounded down): 1 278 owed to the merchant.
    let merchants = file(&format!("merchants-{day}.csv"));
    assert!(
        merchants.contains("merchant:rail-shop,1500,200,22,1278"),
        "{merchants}"
    );
    w.conserved(&[&card]);
}

/// A validator's fare debit of `card` (device 1001), as clearing receives it.
fn fare_at_a_validator(w: &World, card: &mut Card, amount: i32, seq: u64) {
    let mut sam = purse::sam::SoftwareSam::validator(&w.keys, 1001).unwrap();
    let r = tapgate_testkit::fixtures::value_tx(
        &mut sam,
        card,
        purse::keys::KeyKind::Debit,
        purse::apdu::ins::DEBIT,
        amount,
    )
    .unwrap();
    let tap = tapgate_testkit::fixtures::clearing_tap(&r, seq);
    let loads = &w.srv.state.loads;
    let batch = charging::clearing::ClearingBatch {
        batch_id: format!("b{seq}"),
        taps: vec![tap],
    };
    let out = charging::clearing::clear_batch(loads.ledger(), loads.hsm(), batch, 0).unwrap();
    assert!(out.anomalies.is_empty(), "{out:?}");
}

#[test]
fn a_payment_and_a_refund_racing_a_tap_at_a_validator_are_settled_by_clearing() {
    let w = world();
    let mut card = w.card(95, 5_000, "alice");
    let alice = w.client(ALICE);
    let id = w.payment_id(SHOP, "race-tap", 1_000);

    // The payment's intent is durable and its Debit on the way, but the card leaves for a
    // validator, which debits a fare at the counter the payment would have used.
    let uid = card.state().uid;
    let mut reply = alice.start_payment(&uid, &id, "rt1", None).unwrap();
    {
        let mut reader = EmulatedReader {
            card: &mut card,
            rng: StdRng::seed_from_u64(14),
        };
        while !has_debit(&reply) {
            reply = step(&alice, &mut reader, &reply);
        }
    }
    card.remove_from_field();
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["state"], "pending", "{p}");
    fare_at_a_validator(&w, &mut card, 150, 1);
    // Clearing saw the counter used by the fare: the payment is open again, the merchant
    // unpaid; paying it now completes it once.
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["state"], "open", "{p}");
    assert_eq!(w.balance("merchant:rail-shop"), 0);
    completed(&w.pay(ALICE, &mut card, &id, "rt2", None));
    assert_eq!(card.state().balance_minor, 5_000 - 150 - 1_000);

    // A refund's collection races a tap the same way: pending again, then collected once.
    let (_, refund) = w.refund(SHOP, &id, 400, "rt-r");
    let refund = refund["id"].as_str().unwrap().to_string();
    let body = json!({"card_uid": hex::encode_upper(uid)});
    let (code, first) = post_with_key(
        &w.url(&format!("/v1/refunds/{refund}/collect")),
        ALICE,
        "rt3",
        body,
    );
    assert_eq!(code, 200, "{first}");
    let mut reply: Reply = serde_json::from_value(first).unwrap();
    {
        let mut reader = EmulatedReader {
            card: &mut card,
            rng: StdRng::seed_from_u64(15),
        };
        while !has_ins(&reply, purse::apdu::ins::CREDIT) {
            reply = step(&alice, &mut reader, &reply);
        }
    }
    card.remove_from_field();
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{refund}")), SHOP);
    assert_eq!(r["state"], "collecting", "{r}");
    fare_at_a_validator(&w, &mut card, 150, 2);
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{refund}")), SHOP);
    assert_eq!(r["state"], "pending", "{r}");
    completed(&w.collect(&mut card, &refund, "rt4", None));
    assert_eq!(card.state().balance_minor, 5_000 - 150 - 1_000 - 150 + 400);
    assert_eq!(w.balance("operator:metro"), 300);
    assert_eq!(w.balance("refunds:pending"), 0);
    w.conserved(&[&card]);
}

#[test]
fn above_the_amount_its_holder_chose_a_card_pays_only_with_its_pin() {
    let w = world();
    let mut card = w.card(97, 5_000, "alice");
    let uid = hex::encode_upper(card.state().uid);
    let set =
        |who: &str, body: Value| post(&w.url(&format!("/v1/cards/{uid}/payment-pin")), who, body).0;
    // Only the card's registered owner sets it; a PIN is 4 to 12 digits.
    assert_eq!(set(BOB, json!({"pin": "2468", "above_minor": 500})), 403);
    assert_eq!(set(ALICE, json!({"pin": "12ab", "above_minor": 500})), 400);
    assert_eq!(set(ALICE, json!({"pin": "1357", "above_minor": 500})), 204);
    // Changing it takes the current one (a wrong one counts towards the lock).
    assert_eq!(set(ALICE, json!({"pin": "2468", "above_minor": 500})), 403);
    assert_eq!(
        set(
            ALICE,
            json!({"pin": "2468", "above_minor": 500, "current_pin": "0000"})
        ),
        403
    );
    assert_eq!(
        set(
            ALICE,
            json!({"pin": "2468", "above_minor": 500, "current_pin": "1357"})
        ),
        204
    );

    let pay = |card: &mut Card, id: &str, key: &str, pin: Option<&str>| {
        let mut reader = EmulatedReader {
            card,
            rng: StdRng::seed_from_u64(16),
        };
        w.client(ALICE)
            .pay_with_pin(&mut reader, id, key, pin, None)
    };
    let forbidden = |r: Result<charging::client::Relayed, charging::client::ClientError>,
                     why: &str| {
        assert!(
            matches!(&r, Err(charging::client::ClientError::Server { code: 403, detail }) if detail.starts_with(why)),
            "{why}: {r:?}"
        );
    };
    // At or below the amount: no PIN needed.
    let small = w.payment_id(SHOP, "pin-small", 500);
    assert!(pay(&mut card, &small, "s", None)
        .unwrap()
        .completed()
        .is_some());
    // Above it: refused without the PIN or with a wrong one, paid with the right one.
    let big = w.payment_id(SHOP, "pin-big", 501);
    forbidden(pay(&mut card, &big, "b1", None), "pin_required");
    forbidden(pay(&mut card, &big, "b2", Some("1111")), "wrong_pin");
    assert_eq!(card.state().balance_minor, 4_500, "nothing moved");
    assert!(pay(&mut card, &big, "b3", Some("2468"))
        .unwrap()
        .completed()
        .is_some());
    // Three wrong in a row lock it, even against the right one, until it is set again.
    let other = w.payment_id(SHOP, "pin-locked", 600);
    for k in ["l1", "l2"] {
        forbidden(pay(&mut card, &other, k, Some("0000")), "wrong_pin");
    }
    forbidden(pay(&mut card, &other, "l3", Some("0000")), "pin_locked");
    forbidden(pay(&mut card, &other, "l4", Some("2468")), "pin_locked");
    // The owner's token alone does not lift the PIN: a new one needs the current one, which a
    // locked PIN does not take either; an operator (who identified the holder) resets it.
    assert_eq!(set(ALICE, json!({"pin": "97531", "above_minor": 500})), 403);
    assert_eq!(
        set(
            ALICE,
            json!({"pin": "97531", "above_minor": 0, "current_pin": "2468"})
        ),
        403
    );
    assert_eq!(set(OPS, json!({"pin": "97531", "above_minor": 500})), 204);
    assert!(pay(&mut card, &other, "l5", Some("97531"))
        .unwrap()
        .completed()
        .is_some());
    assert_eq!(card.state().balance_minor, 5_000 - 500 - 501 - 600);
    w.conserved(&[&card]);
}

#[test]
fn the_running_server_notifies_the_merchant_on_its_own() {
    use std::sync::atomic::Ordering;
    let w = world();
    let rx = receiver();
    rx.down.store(false, Ordering::SeqCst);
    let mut card = w.card(98, 5_000, "alice");
    let (code, body) = post(
        &w.url("/v1/merchant/payments"),
        SHOP,
        json!({
            "amount_minor": 250, "currency": "KRW", "order_id": "ticked",
            "expires": rfc3339_in(600), "notify_url": rx.url,
        }),
    );
    assert_eq!(code, 201, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    completed(&w.pay(ALICE, &mut card, &id, "t", None));
    // The server's own tick (every 5 s) sends it: no call from the test.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while rx.seen.lock().unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no notification within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let seen = rx.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "sent once");
    let v: Value = serde_json::from_slice(&seen[0].1).unwrap();
    assert_eq!(v["payment"]["id"].as_str(), Some(id.as_str()));
    w.conserved(&[&card]);
}

#[test]
fn a_torn_payment_is_settled_by_the_cards_next_load() {
    let w = world();
    let mut card = w.card(99, 5_000, "alice");
    let id = w.payment_id(SHOP, "torn-then-load", 800);
    let torn = w.pay(
        ALICE,
        &mut card,
        &id,
        "tl1",
        Some(Vanish::AfterIns(purse::apdu::ins::COMMIT_TRANSACTION)),
    );
    assert!(matches!(torn, Ending::Vanished { .. }), "{torn:?}");
    card.remove_from_field();
    assert_eq!(
        card.state().balance_minor,
        4_200,
        "the card made the payment"
    );
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["state"], "pending", "{p}");
    // The card's next contact is a load: it settles the payment first.
    tapgate_testkit::charging::register_instrument(&w.srv.base, ALICE, "card", "tok_visa_tl");
    let mut reader = EmulatedReader {
        card: &mut card,
        rng: StdRng::seed_from_u64(17),
    };
    let ask = charging::client::LoadAsk {
        amount_minor: 1_000,
        source: "card",
        instrument: "tok_visa_tl",
        idempotency_key: "load-after",
        vanish: None,
    };
    let loaded = w.client(ALICE).load(&mut reader, &ask).unwrap();
    assert!(loaded.completed().is_some(), "{loaded:?}");
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["state"], "completed", "{p}");
    assert_eq!(w.balance("merchant:rail-shop"), 800);
    assert_eq!(card.state().balance_minor, 5_200);
    w.conserved(&[&card]);
}

/// A payment's amount is in the cards' minor units: a merchant's payment (or refund) in another
/// currency than the card scheme's is refused when it is made, never debited as if it were.
#[test]
fn a_payment_or_refund_in_another_currency_than_the_schemes_is_refused() {
    let w = world();
    let mut card = w.card(90, 5_000, "alice");
    for currency in ["EUR", "USD"] {
        let (code, body) = post(
            &w.url("/v1/merchant/payments"),
            SHOP,
            json!({"amount_minor": 500, "currency": currency, "order_id": format!("fx-{currency}"),
                   "expires": rfc3339_in(3_600)}),
        );
        assert_eq!(code, 400, "{body}");
        let detail = body["detail"].as_str().unwrap_or_default();
        assert!(
            detail.contains(&format!("currency \"{currency}\" is not the card scheme's"))
                && detail.contains("cards hold KRW"),
            "{body}"
        );
    }
    // In the scheme's currency: made and paid; a refund naming another currency is refused,
    // one naming KRW (or none) is made.
    let id = w.payment_id(SHOP, "fx-ok", 500);
    completed(&w.pay(ALICE, &mut card, &id, "fx-p", None));
    let (code, body) = post_with_key(
        &w.url(&format!("/v1/merchant/payments/{id}/refunds")),
        SHOP,
        "fx-r1",
        json!({"amount_minor": 100, "currency": "EUR"}),
    );
    assert_eq!(code, 400, "{body}");
    assert!(
        body["detail"]
            .as_str()
            .unwrap_or_default()
            .contains("cards hold KRW"),
        "{body}"
    );
    let (code, body) = post_with_key(
        &w.url(&format!("/v1/merchant/payments/{id}/refunds")),
        SHOP,
        "fx-r2",
        json!({"amount_minor": 100, "currency": "KRW"}),
    );
    assert_eq!(code, 201, "{body}");
    assert_eq!(card.state().balance_minor, 4_500);
    w.conserved(&[&card]);

    // A scheme in EUR (charging.toml `currency = "EUR"`) takes EUR and refuses KRW.
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(21));
    let eur = common::start(&keys, |cfg| {
        cfg.tokens = vec![token("rail-shop", Role::Merchant, SHOP)];
        cfg.currency = "EUR".into();
    });
    let make = |currency: &str, order: &str| {
        post(
            &format!("{}/v1/merchant/payments", eur.base),
            SHOP,
            json!({"amount_minor": 500, "currency": currency, "order_id": order,
                   "expires": rfc3339_in(3_600)}),
        )
        .0
    };
    assert_eq!(make("EUR", "e1"), 201);
    assert_eq!(make("KRW", "k1"), 400);
    // A currency that is not an ISO 4217 code is a configuration error.
    let cfg = charging::server::ServerConfig::from_toml(
        "data_dir = \"/nonexistent\"\ncurrency = \"won\"",
    )
    .unwrap();
    let hsm = Box::new(SoftwareHsm::new(&keys).unwrap());
    match charging::server::build(&cfg, hsm) {
        Err(e) => assert!(e.to_string().contains("currency \"won\""), "{e}"),
        Ok(_) => panic!("a currency of \"won\" was accepted"),
    }
}

/// A merchant's endpoint that takes its time: it reads each request, counts it, and answers
/// 204 only once `release` is set. Each connection is served on its own thread.
fn slow_receiver() -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/slow", listener.local_addr().unwrap());
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, a) = (release.clone(), accepted.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (r, a) = (r.clone(), a.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut length = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; length];
                let _ = reader.read_exact(&mut body);
                a.fetch_add(1, Ordering::SeqCst);
                while !r.load(Ordering::SeqCst) {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                let _ = write!(
                    stream,
                    "HTTP/1.1 204 No Content\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                );
            });
        }
    });
    (url, release, accepted)
}

/// Notifications go out several at a time: on the running server's own tick, a merchant whose
/// endpoint hangs does not hold back another merchant's notification, which is delivered while
/// the slow ones still wait for their answers; then every one is delivered, each request one
/// counted attempt (nothing sent twice while in flight).
#[test]
fn a_slow_merchant_does_not_delay_another_merchants_notification() {
    use std::sync::atomic::Ordering;
    let w = world();
    let (slow_url, release, accepted) = slow_receiver();
    let fast = receiver();
    fast.down.store(false, Ordering::SeqCst);
    let mut card = w.card(95, 5_000, "alice");
    let mut ids = Vec::new();
    // The slow merchant's payments complete first: they are due first.
    for (merchant, order, url) in [
        (SHOP, "slow-1", slow_url.as_str()),
        (SHOP, "slow-2", slow_url.as_str()),
        (SHOP, "slow-3", slow_url.as_str()),
        (OTHER, "fast-1", fast.url.as_str()),
    ] {
        let (code, body) = post(
            &w.url("/v1/merchant/payments"),
            merchant,
            json!({"amount_minor": 100, "currency": "KRW", "order_id": order,
                   "expires": rfc3339_in(600), "notify_url": url}),
        );
        assert_eq!(code, 201, "{body}");
        let id = body["id"].as_str().unwrap().to_string();
        completed(&w.pay(ALICE, &mut card, &id, order, None));
        ids.push(id);
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let wait = |what: &str, secs: u64, done: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // The server's tick (every 5 s) sends them; the other merchant is told while the slow one
    // has answered none (a sequential round would wait on each slow one first).
    wait(
        "the fast merchant was not told while the slow one hung",
        30,
        &|| !fast.seen.lock().unwrap().is_empty(),
    );
    assert!(!release.load(Ordering::SeqCst));
    // The slow ones were sent side by side, not one after the other.
    wait("slow ones not sent side by side", 30, &|| {
        accepted.load(Ordering::SeqCst) >= 3
    });
    release.store(true, Ordering::SeqCst);
    let loads = &w.srv.state.loads;
    let notes = || -> Vec<charging::ledger::Notification> {
        let r = loads.ledger().read().unwrap();
        ids.iter()
            .map(|id| r.notification(id).unwrap().unwrap())
            .collect()
    };
    wait("not all delivered", 90, &|| {
        notes().iter().all(|n| n.delivered_ms.is_some())
    });
    let notes = notes();
    assert_eq!(notes[3].attempts, 1, "{:?}", notes[3]);
    assert_eq!(fast.seen.lock().unwrap().len(), 1);
    // Every request the slow merchant received is one counted attempt: none was started again
    // while it was in flight.
    let slow_attempts: u32 = notes[..3].iter().map(|n| n.attempts).sum();
    assert_eq!(accepted.load(Ordering::SeqCst), slow_attempts as usize);
    w.conserved(&[&card]);
}

/// A delivery round reads only the notifications due, earliest due first (the due index), not
/// every notification stored in the order of their payment ids.
#[test]
fn only_due_notifications_are_read_earliest_first() {
    let w = world();
    let ledger = w.srv.state.loads.ledger();
    let n = |id: &str, next: u64, delivered: Option<u64>| charging::ledger::Notification {
        payment_id: id.into(),
        url: "https://shop.example/n".into(),
        attempts: 0,
        next_attempt_ms: next,
        delivered_ms: delivered,
        last_error: None,
    };
    let stored = [
        n("pay_a", 300, None),
        n("pay_b", 100, None),
        n("pay_c", 200, None),
        n("pay_d", 10_000, None),
        n("pay_e", 50, Some(60)),
    ];
    ledger
        .transact(move |t| {
            for x in &stored {
                t.put_notification(x)?;
            }
            Ok(())
        })
        .unwrap();
    let due = |now: u64, limit: usize| -> Vec<String> {
        let r = ledger.read().unwrap();
        r.notifications_due(now, limit)
            .unwrap()
            .into_iter()
            .map(|n| n.payment_id)
            .collect()
    };
    assert_eq!(due(500, 10), ["pay_b", "pay_c", "pay_a"]);
    assert_eq!(due(150, 10), ["pay_b"]);
    assert_eq!(due(500, 2), ["pay_b", "pay_c"]);
    // A failed attempt moves it back; a delivered one leaves the index.
    ledger
        .transact(move |t| {
            t.put_notification(&n("pay_b", 400, None))?;
            t.put_notification(&n("pay_c", 200, Some(210)))
        })
        .unwrap();
    assert_eq!(due(500, 10), ["pay_a", "pay_b"]);
    assert_eq!(due(20_000, 10), ["pay_a", "pay_b", "pay_d"]);
}

/// A refund the card never collects does not stay in `refunds:pending` for ever: after
/// `refund_expiry_ms` its value goes back to the merchant (once, value conserved), it shows
/// `expired`, and the card can no longer collect it; a collected refund never expires.
#[test]
fn a_refund_never_collected_expires_back_to_the_merchant() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(20));
    let srv = common::start(&keys, |cfg| {
        cfg.tokens = vec![
            token("ops", Role::Operator, OPS),
            token("alice", Role::Cardholder, ALICE),
            token("rail-shop", Role::Merchant, SHOP),
        ];
        cfg.limits.loads_per_minute_per_client = 0;
        cfg.limits.payments.refund_expiry_ms = 60_000;
    });
    let w = World {
        srv,
        hsm: SoftwareHsm::new(&keys).unwrap(),
        keys,
    };
    let mut card = w.card(96, 5_000, "alice");
    let id = w.payment_id(SHOP, "expire-me", 1_000);
    completed(&w.pay(ALICE, &mut card, &id, "ex-p", None));
    let (code, kept) = w.refund(SHOP, &id, 300, "ex-r1");
    assert_eq!(code, 201, "{kept}");
    let (code, collected) = w.refund(SHOP, &id, 200, "ex-r2");
    assert_eq!(code, 201, "{collected}");
    let (kept, collected) = (
        kept["id"].as_str().unwrap().to_string(),
        collected["id"].as_str().unwrap().to_string(),
    );
    completed(&w.collect(&mut card, &collected, "ex-c1", None));
    assert_eq!(w.balance("refunds:pending"), 300);
    assert_eq!(w.balance("merchant:rail-shop"), 500);

    let loads = &w.srv.state.loads;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    // Within the expiry: nothing moves.
    assert!(loads.expire_refunds(now, 100).unwrap().is_empty());
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{kept}")), SHOP);
    assert_eq!(r["state"], "pending", "{r}");
    // Past it: the uncollected one goes back to the merchant, once.
    let expired = loads.expire_refunds(now + 61_000, 100).unwrap();
    assert_eq!(
        expired.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
        [kept.as_str()]
    );
    assert!(loads.expire_refunds(now + 120_000, 100).unwrap().is_empty());
    assert_eq!(w.balance("refunds:pending"), 0);
    assert_eq!(w.balance("merchant:rail-shop"), 800);
    for (path, token) in [
        (format!("/v1/merchant/refunds/{kept}"), SHOP),
        (format!("/v1/refunds/{kept}"), ALICE),
    ] {
        let (code, r) = get(&w.url(&path), token);
        assert_eq!(code, 200, "{r}");
        assert_eq!(r["state"], "expired", "{r}");
        assert!(r["expired"].is_string(), "{r}");
    }
    let (_, r) = get(&w.url(&format!("/v1/merchant/refunds/{collected}")), SHOP);
    assert_eq!(r["state"], "credited", "{r}");
    let (_, p) = get(&w.url(&format!("/v1/merchant/payments/{id}")), SHOP);
    assert_eq!(p["refunded_minor"], 200, "{p}");
    // The card can no longer collect it.
    assert_eq!(
        refused(&w.collect(&mut card, &kept, "ex-c2", None)),
        "refund_not_collectable"
    );
    assert_eq!(card.state().balance_minor, 5_000 - 1_000 + 200);
    let postings = loads
        .ledger()
        .read()
        .unwrap()
        .postings_with_prefix("refund-expired:")
        .unwrap();
    assert_eq!(postings.len(), 1, "{postings:?}");
    // Settlement: the expired refund is a `refund_expired` row, taken back out of the day's
    // refunds (the merchant is owed it again).
    let day = |ms: u64| {
        time::OffsetDateTime::from_unix_timestamp((ms / 1000) as i64)
            .unwrap()
            .date()
            .to_string()
    };
    let files =
        charging::settlement::settlement_with_fees(loads.ledger(), &day(now + 61_000), 0).unwrap();
    let rows = files
        .iter()
        .find(|f| f.name.starts_with("merchant-rail-shop-"))
        .unwrap();
    assert!(
        rows.csv.contains(&format!(
            ",refund_expired,{},",
            hex::encode_upper(card.state().uid)
        )) && rows.csv.contains(&format!(",300,refund-expired:{kept}")),
        "{}",
        rows.csv
    );
    if day(now) == day(now + 61_000) {
        let summary = files
            .iter()
            .find(|f| f.name.starts_with("merchants-"))
            .unwrap();
        assert!(
            summary.csv.contains("merchant:rail-shop,1000,200,0,800"),
            "{}",
            summary.csv
        );
    }
    w.conserved(&[&card]);
}
