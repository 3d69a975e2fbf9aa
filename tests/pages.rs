//! The cardholder pages and the operator console in a real browser: Debian's chromium, headless, driven over WebDriver
//! (chromedriver) against a charging server on a loopback port. Each browser test saves a
//! screenshot under target/test-output/pages/. `./test.sh` installs chromium and
//! chromium-driver when absent. Plain HTTP checks (CSRF, sign-in limits) need no browser.

mod support;

use fantoccini::Locator;
use purse::keys::KeySet;
use purse::sam::SoftwareHsm;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{metro_rules, NIGHTBUS_CONTRADICTION};
use tapgate_testkit::browser::{csrf_of, page, sign_in_form, signed_in_agent, status, Browser};
use tapgate_testkit::charging::{self as server, ChargingServer};
use tapgate_testkit::fixtures::token;
use tapgate_testkit::http::post;
use tapgate_testkit::process::Kill;

const OPS: &str = "tg_pages_ops";
const ANN: &str = "tg_pages_ann";
const BOB: &str = "tg_pages_bob";
const ANN_PASSWORD: &str = "ann's long passphrase";
const BOB_PASSWORD: &str = "bob's long passphrase";
const ANN_CARD: &str = "04A1A1A1A1A1A1";
const BOB_CARD: &str = "04B2B2B2B2B2B2";
const OP_PASSWORD: &str = "the operator's long passphrase";

fn keys() -> KeySet {
    KeySet::generate(&mut StdRng::seed_from_u64(18))
}

/// A charging server with two cardholders (ann, bob) who may sign in to the pages, a card
/// each (5,000 and 7,000 KRW), ann's card token at the processor, and an operator (`op`) who
/// may sign in to the console.
fn world() -> (KeySet, ChargingServer) {
    let keys = keys();
    let s = server::start(&keys, |cfg| {
        cfg.tokens = vec![
            token("ops", charging::api::Role::Operator, OPS),
            token("ann", charging::api::Role::Cardholder, ANN),
            token("bob", charging::api::Role::Cardholder, BOB),
        ];
        for (name, pw) in [("ann", ANN_PASSWORD), ("bob", BOB_PASSWORD)] {
            cfg.pages
                .cardholders
                .push(charging::pages::CardholderLogin {
                    name: name.into(),
                    password_argon2: charging::pages::hash_password(pw),
                });
        }
        cfg.pages.operators.push(charging::pages::PageLogin {
            name: "op".into(),
            password_argon2: charging::pages::hash_password(OP_PASSWORD),
        });
    });
    for (uid, balance, owner) in [(ANN_CARD, 5_000, "ann"), (BOB_CARD, 7_000, "bob")] {
        let (code, body) = post(
            &format!("{}/v1/cards", s.base),
            OPS,
            serde_json::json!({"card_uid": uid, "personalised_minor": balance, "owner": owner}),
        );
        assert_eq!(code, 201, "{body}");
    }
    server::register_instrument(&s.base, ANN, "card", "tok_ann_visa");
    (keys, s)
}

/// A browser signed in by keyboard at `s` as `name`, on the page the account lands on.
async fn signed_in(s: &ChargingServer, name: &str, password: &str, landing: &str) -> Browser {
    let b = Browser::start(1000).await;
    b.sign_in_to(&s.base, name, password, landing).await;
    b
}

/// What the ledger holds of the card `uid_hex`.
fn shadow(s: &ChargingServer, uid_hex: &str) -> charging::ledger::CardShadow {
    let uid: [u8; 7] = hex::decode(uid_hex).unwrap().try_into().unwrap();
    s.state.loads.ledger().read().unwrap().card(&uid).unwrap()
}

/// Ann's card at a reader: a load of `amount` from her card token relayed in process with
/// `key` (what `tapgate charge` does).
async fn load_in_process(
    keys: &KeySet,
    s: &ChargingServer,
    amount: i32,
    key: String,
) -> charging::load::Reply {
    let hsm = SoftwareHsm::new(keys).unwrap();
    let uid: [u8; 7] = hex::decode(ANN_CARD).unwrap().try_into().unwrap();
    let mut card = tapgate_testkit::fixtures::transit_card(&hsm, uid, 5_000);
    let svc = s.state.loads.clone();
    tokio::task::spawn_blocking(move || {
        let mut now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let first = svc
            .start(
                "ann",
                charging::load::LoadRequest {
                    uid,
                    amount_minor: amount,
                    funding_source: "card".into(),
                    instrument: "tok_ann_visa".into(),
                    idempotency_key: key,
                },
                now,
            )
            .expect("the load starts");
        server::relay_in_process(&svc, "ann", &mut card, first, &mut now, 5, None)
            .expect("the load runs")
            .0
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cardholder_signs_in_and_sees_their_cards_balance() {
    let (_, s) = world();
    let b = signed_in(&s, "ann", ANN_PASSWORD, "/cards").await;
    assert_eq!(b.text("#holder").await, "ann");
    let list = b.text("ul.cards").await;
    assert!(
        list.contains(ANN_CARD) && list.contains("5,000 KRW"),
        "{list}"
    );
    assert!(!list.contains(BOB_CARD), "only her own cards: {list}");
    b.client
        .find(Locator::Css("a.card-link"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    b.wait_url(ANN_CARD).await;
    assert_eq!(b.text("#balance").await, "5,000 KRW");
    let history = b.text("#history").await;
    assert!(
        history.contains("issue") && history.contains("5,000 KRW"),
        "{history}"
    );
    b.screenshot("card_balance").await;
    b.close().await;
}

/// A fare tapped at a validator and cleared by the back office (as a gateway forwards it, with
/// its stop and route): the holder's page shows the balance after it and the trip.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cardholder_sees_the_right_balance_after_a_tap() {
    use charging::clearing::{clear_batch, ClearingBatch, ClearingTap};
    let (keys, s) = world();
    let hsm = SoftwareHsm::new(&keys).unwrap();
    let uid: [u8; 7] = hex::decode(ANN_CARD).unwrap().try_into().unwrap();
    let mut card = tapgate_testkit::fixtures::transit_card(&hsm, uid, 5_000);
    let mut sam = purse::sam::SoftwareSam::validator(&keys, 1001).unwrap();
    let fare = tapgate_testkit::fixtures::value_tx(
        &mut sam,
        &mut card,
        purse::keys::KeyKind::Debit,
        purse::apdu::ins::DEBIT,
        1_400,
    )
    .unwrap();
    let tap = ClearingTap {
        stop_id: Some(12),
        route_id: Some(3),
        fare_flags: Some(0),
        ..tapgate_testkit::fixtures::clearing_tap(&fare, 1)
    };
    let svc = s.state.loads.clone();
    let out = tokio::task::spawn_blocking(move || {
        let batch = ClearingBatch {
            batch_id: "gw-1-1".into(),
            taps: vec![tap],
        };
        clear_batch(svc.ledger(), svc.hsm(), batch, 1_700_000_000_000).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(out.cleared, 1, "{out:?}");

    let b = signed_in(&s, "ann", ANN_PASSWORD, "/cards").await;
    assert!(b.text("ul.cards").await.contains("3,600 KRW"));
    b.goto(&format!("{}/cards/{ANN_CARD}", s.base)).await;
    assert_eq!(b.text("#balance").await, "3,600 KRW");
    let history = b.text("#history").await;
    assert!(
        history.contains("trip") && history.contains("metro, stop 12, route 3"),
        "{history}"
    );
    assert!(history.contains("1,400 KRW"), "{history}");
    b.screenshot("card_balance_after_a_tap").await;
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_holders_card_is_refused() {
    let (_, s) = world();
    let b = signed_in(&s, "ann", ANN_PASSWORD, "/cards").await;
    for path in ["", "/topup", "/report", "/receipts/month/2026-01"] {
        b.goto(&format!("{}/cards/{BOB_CARD}{path}", s.base)).await;
        let page = b.client.source().await.unwrap();
        assert!(
            page.contains("You have no card with that number") && !page.contains("7,000"),
            "{path}: {page}"
        );
    }
    b.screenshot("another_holders_card").await;
    b.close().await;
    // The same refusal over plain HTTP is a 404, as for a card that does not exist.
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    for uid in [BOB_CARD, "04FFFFFFFFFFFF"] {
        let r = agent
            .get(&format!("{}/cards/{uid}", s.base))
            .set("Cookie", &cookie)
            .call();
        assert!(matches!(r, Err(ureq::Error::Status(404, _))), "{uid}");
    }
}

/// The figure a blocked card's page polls every 2 seconds (`block.json`: the block's version
/// and how far it reached) is the holder's alone: another cardholder gets the 404 a card that
/// does not exist gets, the console's figure answers a cardholder 403, and a caller not signed
/// in is sent to sign in; none of them learns anything of the block.
#[test]
fn another_holders_block_figure_is_refused_and_tells_nothing() {
    let (_, s) = world();
    // Bob reports his card stolen: his card page now polls its block's figure.
    let (bob, bob_cookie) = signed_in_agent(&s.base, "bob", BOB_PASSWORD);
    let report = format!("{}/cards/{BOB_CARD}/report", s.base);
    let csrf = csrf_of(&page(&bob, &report, &bob_cookie));
    let r = bob
        .post(&report)
        .set("Cookie", &bob_cookie)
        .send_form(&[("csrf", &csrf), ("reason", "stolen")])
        .unwrap();
    assert_eq!(r.status(), 303);
    let figure = format!("/cards/{BOB_CARD}/block.json");
    let own: serde_json::Value =
        serde_json::from_str(&page(&bob, &format!("{}{figure}", s.base), &bob_cookie)).unwrap();
    assert_eq!(
        (own["version"].as_u64(), own["action"].as_str()),
        (Some(1), Some("block"))
    );

    let (ann, ann_cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let get = |path: &str, cookie: Option<&str>| {
        let mut req = ann.get(&format!("{}{path}", s.base));
        if let Some(c) = cookie {
            req = req.set("Cookie", c);
        }
        match req.call() {
            Ok(r) => (
                r.status(),
                r.header("location").unwrap_or_default().to_string(),
                r.into_string().unwrap_or_default(),
            ),
            Err(ureq::Error::Status(c, r)) => (c, String::new(), r.into_string().unwrap()),
            Err(e) => panic!("{path}: {e}"),
        }
    };
    let tells_nothing = |what: &str, body: &str| {
        for leak in [
            "stolen",
            "\"version\"",
            "\"action\"",
            "validators",
            "blocked",
        ] {
            assert!(!body.contains(leak), "{what} tells {leak}: {body}");
        }
    };
    let bobs = get(&figure, Some(&ann_cookie));
    assert_eq!(bobs.0, 404, "{}", bobs.2);
    tells_nothing("bob's figure to ann", &bobs.2);
    let unknown = get("/cards/04FFFFFFFFFFFF/block.json", Some(&ann_cookie));
    assert_eq!(bobs, unknown, "answered as a card that does not exist");
    let console = get(
        &format!("/console/cards/{BOB_CARD}/block.json"),
        Some(&ann_cookie),
    );
    assert_eq!(console.0, 403, "{}", console.2);
    tells_nothing("the console's figure to ann", &console.2);
    // Not signed in: to the sign-in page, nothing else.
    for path in [
        figure.clone(),
        format!("/console/cards/{BOB_CARD}/block.json"),
    ] {
        let (code, to, body) = get(&path, None);
        assert_eq!((code, to.as_str()), (303, "/login"), "{path}: {body}");
        tells_nothing(&path, &body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_up_is_pending_until_the_card_proves_the_load() {
    let (keys, s) = world();
    let b = signed_in(&s, "ann", ANN_PASSWORD, "/cards").await;
    b.goto(&format!("{}/cards/{ANN_CARD}", s.base)).await;
    b.click("top-up").await;
    b.wait_url("/topup").await;
    b.retype("amount", "3,000").await;
    b.client
        .find(Locator::Id("funding"))
        .await
        .unwrap()
        .select_by_value("card:tok_ann_visa")
        .await
        .unwrap();
    b.click("ask-top-up").await;
    b.wait_text("#topup-state", "pending", 10, false).await;
    let command = b.text("#charge-command").await;
    assert!(
        command.contains("--amount 3000") && command.contains("--funding card:tok_ann_visa"),
        "{command}"
    );
    b.screenshot("top_up_pending").await;
    let key = command
        .split_whitespace()
        .skip_while(|w| *w != "--idempotency-key")
        .nth(1)
        .expect("the command carries the top-up's idempotency key")
        .to_string();

    // The card at a reader: the load relayed with the top-up's key (what `tapgate charge`
    // does), in process.
    let reply = load_in_process(&keys, &s, 3_000, key).await;
    assert!(
        matches!(reply, charging::load::Reply::Completed { .. }),
        "{reply:?}"
    );
    // The page refreshes itself: the top-up is completed, the balance 8,000.
    b.wait_text("#topup-state", "completed", 20, false).await;
    b.goto(&format!("{}/cards/{ANN_CARD}", s.base)).await;
    assert_eq!(b.text("#balance").await, "8,000 KRW");
    assert!(b.text("#loads").await.contains("completed"));
    b.screenshot("top_up_completed").await;
    b.close().await;
}

/// A top-up paid now and added at the card's next tap: the page makes an action-list order
/// (what `POST /v1/orders` does), which every validator is told of; the top-up is pending
/// until the card taps, and says so.
#[test]
fn a_top_up_paid_now_waits_for_the_cards_next_tap() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let url = format!("{}/cards/{ANN_CARD}/topup", s.base);
    let form = page(&agent, &url, &cookie);
    assert!(form.contains("Pay now, add it at my next tap"), "{form}");
    let csrf = csrf_of(&form);
    let r = agent
        .post(&url)
        .set("Cookie", &cookie)
        .send_form(&[
            ("csrf", &csrf),
            ("amount", "3000"),
            ("funding", "card:tok_ann_visa"),
            ("how", "pickup"),
        ])
        .unwrap();
    assert_eq!(r.status(), 303);
    let to = r.header("location").unwrap().to_string();
    let state = page(&agent, &format!("{}{to}", s.base), &cookie);
    assert!(
        state.contains(r#"id="topup-state" class="state pending""#)
            && state.contains("next tap")
            && !state.contains("tapgate charge"),
        "{state}"
    );
    // Paid now: the order waits on the action list for the card.
    let o = s.state.loads.order(1).unwrap();
    assert_eq!(
        (o.card_uid.as_str(), o.amount_minor, o.caller.as_str()),
        (ANN_CARD, 3_000, "ann")
    );
    assert!(matches!(o.state, charging::load::OrderState::Open));
    let card = page(&agent, &format!("{}/cards/{ANN_CARD}", s.base), &cookie);
    assert!(card.contains(r#"class="state pending">pending"#), "{card}");
    // A blocked card takes no top-up either way.
    let report = format!("{}/cards/{ANN_CARD}/report", s.base);
    let csrf = csrf_of(&page(&agent, &report, &cookie));
    agent
        .post(&report)
        .set("Cookie", &cookie)
        .send_form(&[("csrf", &csrf), ("reason", "lost")])
        .unwrap();
    let (code, body) = status(agent.post(&url).set("Cookie", &cookie).send_form(&[
        ("csrf", &csrf),
        ("amount", "1000"),
        ("funding", "card:tok_ann_visa"),
        ("how", "pickup"),
    ]));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("blocked"), "{body}");
    assert!(s.state.loads.order(2).is_err(), "no second order");
}

/// The value of a form's hidden field `name`.
fn hidden_field(html: &str, name: &str) -> String {
    let at = format!("name=\"{name}\" value=\"");
    let from = html
        .find(&at)
        .unwrap_or_else(|| panic!("no {name} field: {html}"));
    html[from + at.len()..]
        .split('"')
        .next()
        .unwrap()
        .to_string()
}

/// The top-up form's token names the top-up: the same form posted twice is one top-up, one
/// order and one record; an order made by a post whose record was never written (the server
/// stopped between the two writes) is found by posting the form again, with no second order;
/// and the token sent with another amount is refused.
#[test]
fn a_top_up_form_posted_twice_is_one_order_and_one_record() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let url = format!("{}/cards/{ANN_CARD}/topup", s.base);
    let form = page(&agent, &url, &cookie);
    let (csrf, token) = (csrf_of(&form), hidden_field(&form, "token"));
    // The answer's status, where it redirects to, and its body.
    let send = |token: &str, amount: &str| {
        let r = agent.post(&url).set("Cookie", &cookie).send_form(&[
            ("csrf", &csrf),
            ("amount", amount),
            ("funding", "card:tok_ann_visa"),
            ("how", "pickup"),
            ("token", token),
        ]);
        let to = r.as_ref().ok().and_then(|r| r.header("location"));
        let to = to.unwrap_or_default().to_string();
        let (code, body) = status(r);
        (code, to, body)
    };
    let post_ok = |token: &str, amount: &str| {
        let (code, to, body) = send(token, amount);
        assert_eq!(code, 303, "{body}");
        to
    };
    let records = |id: &str| -> Vec<serde_json::Value> {
        let list = s
            .state
            .loads
            .ledger()
            .read()
            .unwrap()
            .idempotent("pages-topups:ann")
            .unwrap()
            .unwrap_or_default();
        let list = list.as_array().cloned().unwrap_or_default();
        list.into_iter().filter(|t| t["id"] == id).collect()
    };
    let first = post_ok(&token, "3000");
    assert_eq!(post_ok(&token, "3000"), first, "the same top-up");
    assert_eq!(first, format!("/cards/{ANN_CARD}/topups/{token}"));
    assert_eq!(s.state.loads.order(1).unwrap().amount_minor, 3_000);
    assert!(s.state.loads.order(2).is_err(), "one order");
    let made = records(&token);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0]["order_id"], 1);
    let (code, _, body) = send(&token, "4000");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("sent already"), "{body}");
    assert!(s.state.loads.order(2).is_err(), "still one order");

    // The server stopped after a form's order and before its record: the order alone.
    let token2 = hidden_field(&page(&agent, &url, &cookie), "token");
    assert_ne!(token2, token);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let loads = &s.state.loads;
    let orphan = loads
        .create_order(
            "ann",
            loads.order_limits(),
            charging::load::OrderRequest {
                uid: hex::decode(ANN_CARD).unwrap().try_into().unwrap(),
                amount_minor: 2_000,
                funding_source: "card".into(),
                instrument: "tok_ann_visa".into(),
                idempotency_key: format!("page-topup-{token2}"),
            },
            now,
        )
        .unwrap();
    assert_eq!(orphan.id, 2);
    assert!(records(&token2).is_empty());
    // The form posted again: that order, now recorded; no other.
    post_ok(&token2, "2000");
    let made = records(&token2);
    assert_eq!(made.len(), 1, "{made:?}");
    assert_eq!(made[0]["order_id"], 2);
    assert!(s.state.loads.order(3).is_err(), "no second order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reporting_a_card_lost_blocks_it_after_a_confirmation() {
    let (_, s) = world();
    let b = signed_in(&s, "ann", ANN_PASSWORD, "/cards").await;
    b.goto(&format!("{}/cards/{ANN_CARD}/report", s.base)).await;
    b.screenshot("report_confirmation").await;
    b.click("reason-lost").await;
    b.click("confirm-block").await;
    b.wait_url(ANN_CARD).await;
    let state = b.text("#block-state").await;
    assert!(
        state.contains("Blocked: lost") && state.contains("version"),
        "{state}"
    );
    // How far the block reached is the gateways' figure: none reports to this server, and
    // the page says so (tests/gateway_console.rs follows one to its validator).
    assert!(b
        .text("#reach-summary")
        .await
        .contains("No gateway has reported version"));
    b.screenshot("card_blocked").await;
    b.close().await;
    let shadow = shadow(&s, ANN_CARD);
    assert!(shadow.blocked);
    assert_eq!(shadow.block_reason.as_deref(), Some("lost"));
}

#[test]
fn a_form_posted_without_its_csrf_token_is_refused() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let csrf = csrf_of(&page(
        &agent,
        &format!("{}/cards/{ANN_CARD}/report", s.base),
        &cookie,
    ));
    let report = |fields: &[(&str, &str)]| {
        status(
            agent
                .post(&format!("{}/cards/{ANN_CARD}/report", s.base))
                .set("Cookie", &cookie)
                .send_form(fields),
        )
    };
    // Without the token, and with another one: refused, nothing blocked.
    let (code, body) = report(&[("reason", "lost")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Form refused"), "{body}");
    assert_eq!(
        report(&[("reason", "lost"), ("csrf", &"0".repeat(64))]).0,
        403
    );
    let top_up = status(
        agent
            .post(&format!("{}/cards/{ANN_CARD}/topup", s.base))
            .set("Cookie", &cookie)
            .send_form(&[("amount", "1000"), ("funding", "card:tok_ann_visa")]),
    );
    assert_eq!(top_up.0, 403);
    assert!(!shadow(&s, ANN_CARD).blocked);
    // With it: the card is blocked.
    assert_eq!(report(&[("reason", "lost"), ("csrf", &csrf)]).0, 303);
    assert!(shadow(&s, ANN_CARD).blocked);
    // The sign-in form too: without its cookie's token, refused.
    let (code, _) = status(agent.post(&format!("{}/login", s.base)).send_form(&[
        ("name", "ann"),
        ("password", ANN_PASSWORD),
        ("csrf", "x"),
    ]));
    assert_eq!(code, 403);
    // Signed out, a private page sends the browser to sign in.
    let r = agent.get(&format!("{}/cards", s.base)).call().unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.header("location"), Some("/login"));
}

#[test]
fn sign_in_is_rate_limited_per_account_with_a_clear_message() {
    let (_, s) = world();
    let agent = ureq::AgentBuilder::new().redirects(0).build();
    let attempt = |password: &str| {
        let (pre, csrf) = sign_in_form(&agent, &s.base);
        status(
            agent
                .post(&format!("{}/login", s.base))
                .set("Cookie", &pre)
                .send_form(&[("name", "bob"), ("password", password), ("csrf", &csrf)]),
        )
    };
    for _ in 0..5 {
        let (code, body) = attempt("wrong");
        assert_eq!(code, 401);
        assert!(body.contains("do not match"), "{body}");
    }
    // Locked now, even with the right password.
    let (code, body) = attempt(BOB_PASSWORD);
    assert_eq!(code, 429);
    assert!(
        body.contains("Too many failed sign-ins for this account. Try again in 15 minutes."),
        "{body}"
    );
    // Another account from the same address still signs in.
    let (_agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    assert!(cookie.starts_with("tg_session="));
}

#[test]
fn the_demo_serves_the_pages_and_keeps_serving_until_interrupted() {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args([
            "demo",
            "--taps",
            "200",
            "--cards",
            "10",
            "--validators",
            "2",
            "--keep-serving",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("tapgate demo");
    let pid = child.id();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let _kill = Kill(child);
    let (mut console, mut login, mut operator) = (None, None, None);
    let mut gateway_console = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(url) = line.strip_prefix("gateway console: ") {
            gateway_console = Some(url.to_string());
        }
        if let Some(url) = line.strip_prefix("console: ") {
            console = Some(url.trim_end_matches('/').to_string());
        }
        if let Some(l) = line.strip_prefix("cardholder login: ") {
            let (name, pw) = l.split_once(' ').unwrap();
            login = Some((name.to_string(), pw.to_string()));
        }
        if let Some(l) = line.strip_prefix("operator login: ") {
            let (name, pw) = l.split_once(' ').unwrap();
            operator = Some((name.to_string(), pw.to_string()));
        }
        if line.starts_with("the day is over; the pages stay up at ") {
            break;
        }
    }
    let base = console.expect("a console: URL line");
    let (name, password) = login.expect("a cardholder login: NAME PASSWORD line");
    // After the day: the printed login signs in and sees its card.
    let (agent, cookie) = signed_in_agent(&base, &name, &password);
    let cards = page(&agent, &format!("{base}/cards"), &cookie);
    assert!(cards.contains("class=\"card-link\""), "{cards}");
    // The printed operator login opens the console: the day's revenue charted, its
    // settlement files listed.
    let (op_name, op_password) = operator.expect("an operator login: NAME PASSWORD line");
    let (op_agent, op_cookie) = signed_in_agent(&base, &op_name, &op_password);
    let page = |path: &str| {
        op_agent
            .get(&format!("{base}{path}"))
            .set("Cookie", &op_cookie)
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    };
    let traffic = page("/console/traffic");
    let revenue =
        &traffic[traffic.find("id=\"revenue\"").unwrap()..traffic.find("id=\"taps\"").unwrap()];
    assert!(revenue.contains("<rect"), "{revenue}");
    let settlement = page("/console/settlement");
    let at = settlement
        .find("/console/settlement?day=")
        .expect("a day with postings");
    let day = &settlement[at + 24..at + 34];
    assert!(
        page(&format!("/console/settlement?day={day}")).contains("operator-"),
        "{day}"
    );
    // The printed gateway console: the same operator login, the metro's validators listed.
    let gw = gateway_console.expect("a gateway console: URL line");
    let gw_base = gw.strip_suffix("/console").expect("…/console");
    let (gw_agent, gw_cookie) = signed_in_agent(gw_base, &op_name, &op_password);
    let devices = gw_agent
        .get(&gw)
        .set("Cookie", &gw_cookie)
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        devices.contains("id=\"device-1000\"") && devices.contains("id=\"serving\">metro<"),
        "{devices}"
    );
    // The console with the day's numbers, in the browser.
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(async {
            let b = Browser::start(1000).await;
            b.sign_in_to(&base, &op_name, &op_password, "/console")
                .await;
            b.goto(&format!("{base}/console/traffic")).await;
            assert!(b.text("#revenue").await.contains("KRW"));
            b.screenshot("console_traffic_demo").await;
            b.close().await;
        });
    // Ctrl-C ends it.
    Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    tapgate_testkit::wait::wait_until("the demo to stop", Duration::from_secs(20), || {
        agent.get(&format!("{base}/healthz")).call().is_err()
    });
}

/// `tapgate charging page-login ARGS` with `passphrase` on standard input: the entry it
/// printed, read back as configuration.
fn page_login(args: &[&str], passphrase: &str) -> (String, charging::server::ServerConfig) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["charging", "page-login"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(format!("{passphrase}\n").as_bytes())
        .unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let entry = String::from_utf8(out.stdout).unwrap();
    let cfg = charging::server::ServerConfig::from_toml(&format!("data_dir = \"/tmp/x\"\n{entry}"))
        .expect("the entry is configuration");
    (entry, cfg)
}

#[test]
fn charging_page_login_prints_a_config_entry_with_the_passwords_argon2id_hash() {
    let (entry, cfg) = page_login(&["--name", "rider-7"], "a long passphrase");
    let login = &cfg.pages.cardholders[0];
    assert_eq!(login.name, "rider-7");
    assert!(charging::pages::verify_password(
        &login.password_argon2,
        "a long passphrase"
    ));
    assert!(!entry.contains("a long passphrase"));
}

// ---- The operator console ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_blocks_a_card_and_sees_it_blocked_then_unblocks_it() {
    let (_, s) = world();
    let b = signed_in(&s, "op", OP_PASSWORD, "/console").await;
    assert_eq!(b.text("#operator").await, "op");
    assert_eq!(b.text("#blocklist-version").await, "0");
    // Find the card by its number, by keyboard.
    let find = b.client.find(Locator::Id("find-uid")).await.unwrap();
    find.send_keys(ANN_CARD).await.unwrap();
    find.send_keys("\u{E007}").await.unwrap(); // Enter
    b.wait_url(ANN_CARD).await;
    assert!(b.text("#block-state").await.contains("Not blocked"));
    b.retype("block-reason", "stolen").await;
    b.click("block").await;
    b.wait_query("blocklist_version=1").await;
    let state = b.text("#block-state").await;
    assert!(
        state.contains("Blocked: stolen") && state.contains("blocklist version 1"),
        "{state}"
    );
    let changes = b.text("table.block-changes").await;
    assert!(
        changes.contains("block") && changes.contains("stolen"),
        "{changes}"
    );
    b.screenshot("console_card_blocked").await;
    let held = || shadow(&s, ANN_CARD);
    assert!(held().blocked);
    assert_eq!(held().block_reason.as_deref(), Some("stolen"));
    // The blocks page lists it, with the version.
    b.goto(&format!("{}/console/blocks", s.base)).await;
    assert_eq!(b.text("#blocklist-version").await, "1");
    let blocked = b.text("#blocked").await;
    assert!(
        blocked.contains(ANN_CARD) && blocked.contains("stolen"),
        "{blocked}"
    );
    assert!(!blocked.contains(BOB_CARD));
    b.screenshot("console_blocks").await;
    // Unblock: version 2.
    b.goto(&format!("{}/console/cards/{ANN_CARD}", s.base))
        .await;
    b.click("unblock").await;
    b.wait_query("blocklist_version=2").await;
    assert!(b.text("#block-state").await.contains("Not blocked"));
    assert!(!held().blocked);
    b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_show_beside_the_cards_history_and_traffic_is_charted() {
    let (keys, s) = world();
    // A clone reported against bob's card, and a load onto ann's (relayed in process).
    s.state
        .loads
        .ledger()
        .transact(|t| {
            t.record_anomaly(&charging::clearing::Anomaly {
                kind: "clone".into(),
                card_uid: BOB_CARD.into(),
                tmc: 4,
                device_id: 7,
                device_seq: 99,
                detail: "counter 4 seen twice with different balances".into(),
            })
        })
        .unwrap();
    load_in_process(&keys, &s, 2_000, "console-load".into()).await;
    let b = signed_in(&s, "op", OP_PASSWORD, "/console").await;
    b.goto(&format!("{}/console/anomalies", s.base)).await;
    let list = b.text("#anomalies").await;
    assert!(list.contains("clone") && list.contains(BOB_CARD), "{list}");
    // The newest is shown beside its card: the detail, the card's balance and history.
    let beside = b.text("#beside").await;
    assert!(
        beside.contains("counter 4 seen twice")
            && beside.contains("7,000 KRW")
            && beside.contains("issue"),
        "{beside}"
    );
    b.screenshot("console_anomalies").await;
    b.goto(&format!("{}/console/traffic", s.base)).await;
    let loads = b.text("#loads").await;
    assert!(loads.contains("funding:card"), "{loads}");
    let bars = b
        .client
        .find_all(Locator::Css("#loads svg rect"))
        .await
        .unwrap();
    assert_eq!(bars.len(), 1);
    assert!(b.text("#anomaly-kinds").await.contains("clone"));
    b.screenshot("console_traffic").await;
    b.close().await;
}

#[test]
fn a_cardholder_cannot_reach_the_console_nor_an_operator_the_cards() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let get = |path: &str, cookie: &str| {
        status(
            agent
                .get(&format!("{}{path}", s.base))
                .set("Cookie", cookie)
                .call(),
        )
    };
    for path in [
        "/console".to_string(),
        "/console/blocks".into(),
        "/console/anomalies".into(),
        "/console/traffic".into(),
        "/console/settlement".into(),
        "/console/fares".into(),
        format!("/console/cards/{ANN_CARD}"),
        format!("/console/card?uid={BOB_CARD}"),
    ] {
        let (code, body) = get(&path, &cookie);
        assert_eq!(code, 403, "{path}: {body}");
        assert!(body.contains("The console is an operator"), "{body}");
    }
    // Not even with the session's own CSRF token.
    let csrf = csrf_of(&page(
        &agent,
        &format!("{}/cards/{ANN_CARD}/report", s.base),
        &cookie,
    ));
    let (code, _) = status(
        agent
            .post(&format!("{}/console/cards/{BOB_CARD}/block", s.base))
            .set("Cookie", &cookie)
            .send_form(&[("reason", "fraud"), ("csrf", &csrf)]),
    );
    assert_eq!(code, 403);
    assert!(!shadow(&s, BOB_CARD).blocked);
    // An operator signs in on the same form and lands on the console; the cards are not theirs.
    let (_, op) = signed_in_agent(&s.base, "op", OP_PASSWORD);
    assert_eq!(get("/console", &op).0, 200);
    let (code, body) = get("/cards", &op);
    assert_eq!(code, 403, "{body}");
}

#[test]
fn a_console_form_without_its_csrf_token_is_refused() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "op", OP_PASSWORD);
    let csrf = csrf_of(&page(
        &agent,
        &format!("{}/console/cards/{BOB_CARD}", s.base),
        &cookie,
    ));
    let post_form = |path: &str, fields: &[(&str, &str)]| {
        status(
            agent
                .post(&format!("{}{path}", s.base))
                .set("Cookie", &cookie)
                .send_form(fields),
        )
    };
    let block = format!("/console/cards/{BOB_CARD}/block");
    let (code, body) = post_form(&block, &[("reason", "fraud")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Form refused"), "{body}");
    assert_eq!(
        post_form(&block, &[("reason", "fraud"), ("csrf", &"0".repeat(64))]).0,
        403
    );
    assert_eq!(
        post_form("/console/blocks", &[("uid", BOB_CARD), ("reason", "fraud")]).0,
        403
    );
    let blocked = || shadow(&s, BOB_CARD).blocked;
    assert!(!blocked(), "nothing blocked without the token");
    // With it: blocked, the redirect names the blocklist version.
    let r = agent
        .post(&format!("{}{block}", s.base))
        .set("Cookie", &cookie)
        .send_form(&[("reason", "fraud"), ("csrf", &csrf)])
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.header("location"),
        Some(format!("/console/cards/{BOB_CARD}?blocklist_version=1").as_str())
    );
    assert!(blocked());
    // Unblocking needs it too.
    let unblock = format!("/console/cards/{BOB_CARD}/unblock");
    assert_eq!(post_form(&unblock, &[("reason", "found")]).0, 403);
    assert!(blocked());
}

#[test]
fn the_days_settlement_csv_downloads_from_the_console() {
    let (_, s) = world();
    let (agent, cookie) = signed_in_agent(&s.base, "op", OP_PASSWORD);
    let page = page(&agent, &format!("{}/console/settlement", s.base), &cookie);
    // The server's day (UTC) by default.
    let at = page.find("id=\"day\">").expect("the day") + 9;
    let today = page[at..at + 10].to_string();
    assert_eq!(today.as_bytes()[4], b'-');
    let file = format!("summary-{today}.csv");
    assert!(page.contains(&file), "{page}");
    let r = agent
        .get(&format!("{}/console/settlement/{today}/{file}", s.base))
        .set("Cookie", &cookie)
        .call()
        .unwrap();
    assert_eq!(r.header("content-type"), Some("text/csv; charset=utf-8"));
    assert_eq!(
        r.header("content-disposition"),
        Some(format!("attachment; filename=\"{file}\"").as_str())
    );
    let csv = r.into_string().unwrap();
    // The same bytes as `tapgate charging settlement` writes.
    let files = charging::settlement::settlement(s.state.loads.ledger(), &today).unwrap();
    assert_eq!(csv, files.iter().find(|f| f.name == file).unwrap().csv);
    assert!(csv.starts_with("party,loads_minor,payments_minor,debits_minor,net_minor\n"));
    // Only the day's own files: no other name, no path.
    for bad in ["../../etc/passwd", "summary-2020-01-01.csv", "x.csv"] {
        let (code, _) = status(
            agent
                .get(&format!("{}/console/settlement/{today}/{bad}", s.base))
                .set("Cookie", &cookie)
                .call(),
        );
        assert_eq!(code, 404, "{bad}");
    }
    let (code, _) = status(
        agent
            .get(&format!("{}/console/settlement/not-a-day/{file}", s.base))
            .set("Cookie", &cookie)
            .call(),
    );
    assert_eq!(code, 400);
}

#[test]
fn charging_page_login_role_operator_prints_a_pages_operators_entry() {
    let (entry, cfg) = page_login(
        &["--name", "duty-officer", "--role", "operator"],
        "the console's passphrase",
    );
    assert!(entry.contains("[[pages.operators]]"), "{entry}");
    assert!(cfg.pages.cardholders.is_empty());
    let login = &cfg.pages.operators[0];
    assert_eq!(login.name, "duty-officer");
    assert!(charging::pages::verify_password(
        &login.password_argon2,
        "the console's passphrase"
    ));
    // Another role is refused by the command line.
    let bad = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["charging", "page-login", "--name", "x", "--role", "partner"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!bad.success());
}

// ---- Fare tables: the console and `tapgate fare publish`, one operation ----

/// `tapgate fare publish RULES --server BASE` with the operator's token: exit code and output.
fn fare_publish(base: &str, rules: &std::path::Path) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_tapgate"))
        .args(["fare", "publish"])
        .arg(rules)
        .args(["--server", base])
        .env("TAPGATE_TOKEN", OPS)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.code().unwrap_or(-1), text)
}

/// A multipart form (`fields`: name, file name if a file, bytes) as `(content type, body)`.
fn multipart(fields: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let b = "tg-test-boundary-7f3a";
    let mut body = Vec::new();
    for (name, file, bytes) in fields {
        body.extend_from_slice(
            format!("--{b}\r\nContent-Disposition: form-data; name=\"{name}\"").as_bytes(),
        );
        if let Some(f) = file {
            body.extend_from_slice(format!("; filename=\"{f}\"").as_bytes());
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{b}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={b}"), body)
}

#[test]
fn fare_publish_and_the_consoles_upload_publish_alike_and_refuse_alike() {
    let (keys, s) = world();
    let dir = tempfile::tempdir().unwrap();
    let snapshot = || {
        let r = ureq::get(&format!("{}/v1/fares/signed/snapshot", s.base))
            .set("Authorization", &format!("Bearer {OPS}"))
            .call()
            .unwrap();
        let version = r.header("x-tapgate-fares-version").map(str::to_string);
        let mut bytes = Vec::new();
        std::io::Read::read_to_end(&mut r.into_reader(), &mut bytes).unwrap();
        (version, bytes)
    };
    // A contradiction: the CLI prints the finding, exits 1, and nothing is published.
    let bad = metro_rules(dir.path(), "bad.toml", 2, NIGHTBUS_CONTRADICTION);
    let (code, out) = fare_publish(&s.base, &bad);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("contradicts") && out.contains("nothing published"),
        "{out}"
    );
    assert_eq!(snapshot(), (None, Vec::new()));

    // The console's form: refused without the session's CSRF token, and to a cardholder.
    let good = metro_rules(dir.path(), "metro-v2.toml", 2, "");
    let rules = std::fs::read(&good).unwrap();
    let (op_agent, op) = signed_in_agent(&s.base, "op", OP_PASSWORD);
    let post = |agent: &ureq::Agent, cookie: &str, csrf: &str| {
        let (ct, body) = multipart(&[
            ("csrf", None, csrf.as_bytes()),
            ("rules", Some("metro-v2.toml"), &rules),
            ("action", None, b"publish"),
        ]);
        status(
            agent
                .post(&format!("{}/console/fares", s.base))
                .set("Cookie", cookie)
                .set("Content-Type", &ct)
                .send_bytes(&body),
        )
    };
    let (code, body) = post(&op_agent, &op, "");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("Form refused"), "{body}");
    let (ann_agent, ann) = signed_in_agent(&s.base, "ann", ANN_PASSWORD);
    let ann_csrf = csrf_of(&page(&ann_agent, &format!("{}/cards", s.base), &ann));
    assert_eq!(post(&ann_agent, &ann, &ann_csrf).0, 403);
    assert_eq!(snapshot(), (None, Vec::new()), "nothing published");

    // The CLI publishes version 2: signed by the back office's key, shown on the console.
    let (code, out) = fare_publish(&s.base, &good);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("published version 2"), "{out}");
    let (version, bytes) = snapshot();
    assert_eq!(version.as_deref(), Some("2"));
    let key = purse::sam::Hsm::verifying_key(&SoftwareHsm::new(&keys).unwrap());
    let table = fare_rules::signed::verify(&bytes, &key).expect("signed by the back office");
    assert_eq!(table.table().meta.version, 2);
    let console = page(&op_agent, &format!("{}/console/fares", s.base), &op);
    assert!(
        console.contains("id=\"published-version\">2<") && console.contains("metro-v2.toml"),
        "{console}"
    );
    // The same table again, from the console with its token: not newer, nothing changes.
    let csrf = csrf_of(&console);
    let (code, body) = post(&op_agent, &op, &csrf);
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("is not newer than the published version 2"),
        "{body}"
    );
    let (code, out) = fare_publish(&s.base, &good);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("not newer"), "{out}");
    assert_eq!(snapshot().1, bytes);
}
