//! `Pkcs11Hsm` on a real SoftHSM2 token against `SoftwareHsm` on the same key set: the same
//! card keys (an emulated card personalised by the software HSM authenticates with the token),
//! the same transaction-MAC verdicts, device MACs, ceiling grants and Ed25519 signatures; and
//! the errors an operator meets (missing module, unknown token, wrong PIN, missing labels).
//!
//! SoftHSM2 must be installed (`./test.sh` installs it); these tests fail, not skip, without it.

use purse::card::{Card, Personalisation};
use purse::keys::{KdfParams, KeyKind, KeySet};
use purse::receipt::{CommitReceipt, TxClaim, TxKind};
use purse::sam::{Authenticator, CeilingGrant, Hsm, SamError, SoftwareHsm};
use purse::txn::{self, Decision, EmulatedReader, LoadOutcome};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tapgate_pkcs11::{import, PinSource, Pkcs11Error, Pkcs11Hsm, TokenSession};
use tapgate_testkit::softhsm::{self, TestToken};

fn token_with(keys: &KeySet) -> (TestToken, Pkcs11Hsm) {
    softhsm::hsm_for(keys).unwrap_or_else(|e| panic!("{e}"))
}

fn card(hsm: &SoftwareHsm, uid_byte: u8, version: u8, balance: i32) -> Card {
    let uid = [0x04, uid_byte, 0x2E, 0x21, 0x80, 0x1D, 0x80];
    let mut p = Personalisation::transit(uid, balance);
    p.key_version = version;
    Card::personalise(&p, hsm.card_keys(&uid, version).unwrap())
}

fn load<H: Hsm>(hsm: &mut H, card: &mut Card, amount: i32, seed: u64) -> LoadOutcome {
    let mut reader = EmulatedReader {
        card,
        rng: StdRng::seed_from_u64(seed),
    };
    let mut rng = StdRng::seed_from_u64(seed + 1);
    txn::load_online(&mut reader, hsm, &mut rng, |_| Decision::Apply {
        amount_minor: amount,
        record: None,
    })
    .unwrap()
}

fn loaded(o: LoadOutcome) -> CommitReceipt {
    match o {
        LoadOutcome::Loaded { proof, .. } => proof.receipt().clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn loads_through_the_token_equal_loads_through_the_software_hsm() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(1));
    let mut soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, mut hw) = token_with(&keys);

    let mut a = card(&soft, 1, 1, 1_000);
    let mut b = card(&soft, 1, 1, 1_000);
    // Same card, same randomness: the card's answers and receipts are byte-identical only
    // if the token's diversified credit key and session keys equal the software's.
    let ra = loaded(load(&mut soft, &mut a, 2_500, 7));
    let rb = loaded(load(&mut hw, &mut b, 2_500, 7));
    assert_eq!(ra, rb);
    assert_eq!(rb.balance_after_minor(), 3_500);
    assert_eq!(a.state(), b.state());

    // Each HSM accepts the other's receipts (the TMV is the card's).
    hw.verify_tmac(&ra).unwrap();
    soft.verify_tmac(&rb).unwrap();
}

#[test]
fn forged_transaction_macs_are_refused_by_both() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(2));
    let mut soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, hw) = token_with(&keys);
    let mut c = card(&soft, 2, 1, 0);
    let r = loaded(load(&mut soft, &mut c, 700, 3));
    let claim = TxClaim {
        uid: r.uid(),
        tmc: r.tmc(),
        tmv: r.tmv(),
        kind: r.kind(),
        amount_minor: r.amount_minor(),
        balance_after_minor: r.balance_after_minor(),
        key_version: r.key_version(),
        reader_id: r.reader_id(),
    };
    for (i, forged) in [
        TxClaim {
            tmv: [0; 8],
            ..claim.clone()
        },
        TxClaim {
            amount_minor: 7_000,
            ..claim.clone()
        },
        TxClaim {
            balance_after_minor: 7_000,
            ..claim.clone()
        },
        TxClaim {
            tmc: r.tmc() + 1,
            ..claim.clone()
        },
        TxClaim {
            kind: TxKind::Debit,
            ..claim.clone()
        },
        TxClaim {
            uid: [9; 7],
            ..claim.clone()
        },
        // A load made without a reader id claimed as a franchise SAM's.
        TxClaim {
            reader_id: Some(purse::sam::reader_id_of_device(7001)),
            ..claim.clone()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let mut flipped = claim.clone();
        flipped.tmv[i] ^= 0x01;
        for f in [forged, flipped] {
            assert!(
                matches!(hw.verify_claim(&f), Err(SamError::TmacMismatch { .. })),
                "case {i}"
            );
            assert!(matches!(
                soft.verify_claim(&f),
                Err(SamError::TmacMismatch { .. })
            ));
        }
    }
    // A claim of the genuine change verifies; a negative one is refused before the token.
    assert_eq!(hw.verify_claim(&claim).unwrap().receipt(), &r);
    assert!(hw
        .verify_claim(&TxClaim {
            amount_minor: -1,
            ..claim
        })
        .is_err());
}

#[test]
fn device_keys_macs_grants_and_signatures_equal_the_software_hsm() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(3));
    let soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, hw) = token_with(&keys);
    for id in [0u32, 1, 1001, 0xFFFF_FFFF] {
        assert_eq!(
            hw.device_key(id).unwrap(),
            soft.device_key(id).unwrap(),
            "device {id}"
        );
        let body = format!("tap record of device {id}").into_bytes();
        let mac = purse::crypto::mac8(&soft.device_key(id).unwrap(), &body);
        assert!(hw.verify_device_mac(id, &body, &mac).unwrap());
        let mut bad = mac;
        bad[7] ^= 0x80;
        assert!(!hw.verify_device_mac(id, &body, &bad).unwrap());
        assert!(!hw.verify_device_mac(id, &body, &mac[..7]).unwrap());
        let g: CeilingGrant = hw.ceiling_grant(id, 4, 50_000).unwrap();
        assert_eq!(g, soft.ceiling_grant(id, 4, 50_000).unwrap());
    }
    // Ed25519 is deterministic: the token's signature is the software key's signature.
    for msg in [&b""[..], b"blocklist delta 42", &[0xA5; 1000]] {
        let sig = hw.sign(msg).unwrap();
        assert_eq!(sig, soft.sign(msg).unwrap());
        let vk = ed25519_dalek::VerifyingKey::from_bytes(&hw.verifying_key()).unwrap();
        vk.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(&sig))
            .unwrap();
    }
    assert_eq!(hw.verifying_key(), keys.verifying_key);
}

#[test]
fn rotated_versions_are_all_in_the_token_and_tmac_is_never_an_auth_key() {
    let mut rng = StdRng::seed_from_u64(4);
    let mut keys = KeySet::generate(&mut rng);
    for kind in [KeyKind::App, KeyKind::Debit, KeyKind::Credit, KeyKind::Tmac] {
        assert_eq!(keys.rotate(kind, &mut rng), 2);
    }
    let mut soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, mut hw) = token_with(&keys);
    assert!(hw.holds_version(KeyKind::Credit, 1) && hw.holds_version(KeyKind::Credit, 2));
    assert!(!hw.holds_version(KeyKind::Credit, 3));
    assert!(!hw.holds_version(KeyKind::Tmac, 1));
    let mut a = card(&soft, 5, 2, 100);
    let mut b = card(&soft, 5, 2, 100);
    assert_eq!(
        loaded(load(&mut soft, &mut a, 900, 11)),
        loaded(load(&mut hw, &mut b, 900, 11))
    );
    let err = hw
        .auth_part1(KeyKind::Tmac, 1, &[1; 7], &[0; 16], &mut rng)
        .unwrap_err();
    assert!(matches!(err, SamError::NotAllowed(_)), "{err}");
    let err = hw
        .auth_part1(KeyKind::Credit, 9, &[1; 7], &[0; 16], &mut rng)
        .unwrap_err();
    assert!(
        matches!(err, SamError::KeyNotHeld { version: 9, .. }),
        "{err}"
    );
}

#[test]
fn a_card_with_other_keys_fails_authentication_with_the_token() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(5));
    let other = SoftwareHsm::new(&KeySet::generate(&mut StdRng::seed_from_u64(6))).unwrap();
    let (_t, mut hw) = token_with(&keys);
    let mut c = card(&other, 6, 1, 100);
    let before = c.state().clone();
    let mut reader = EmulatedReader {
        card: &mut c,
        rng: StdRng::seed_from_u64(1),
    };
    let err = txn::load_online(&mut reader, &mut hw, &mut StdRng::seed_from_u64(2), |_| {
        Decision::Apply {
            amount_minor: 100,
            record: None,
        }
    })
    .unwrap_err();
    assert!(err.to_string().contains("auth"), "{err}");
    assert_eq!(c.state(), &before);
}

#[test]
fn the_hsm_works_from_several_threads_behind_a_mutex() {
    use std::sync::{Arc, Mutex};
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(7));
    let soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, hw) = token_with(&keys);
    let hsm = Arc::new(Mutex::new(hw));
    let handles: Vec<_> = (0..4u8)
        .map(|i| {
            let hsm = hsm.clone();
            let mut c = card(&soft, 10 + i, 1, 0);
            std::thread::spawn(move || {
                let mut last = None;
                for n in 0..5 {
                    let mut g = hsm.lock().unwrap();
                    let r = loaded(load(&mut *g, &mut c, 10, u64::from(i) * 100 + n));
                    g.verify_tmac(&r).unwrap();
                    last = Some(r);
                }
                (c.state().balance_minor, last.unwrap())
            })
        })
        .collect();
    let mut receipts = Vec::new();
    for h in handles {
        let (balance, r) = h.join().unwrap();
        assert_eq!(balance, 50);
        receipts.push(r);
    }
    // What the charging server holds: `Mutex<Box<dyn Hsm + Send>>`.
    let hw = Arc::try_unwrap(hsm).unwrap().into_inner().unwrap();
    let boxed: Mutex<Box<dyn Hsm + Send>> = Mutex::new(Box::new(hw));
    for r in &receipts {
        boxed.lock().unwrap().verify_tmac(r).unwrap();
    }
}

#[test]
fn import_refuses_existing_labels_unless_replace_and_prints_check_values() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(8));
    let (t, _hw) = token_with(&keys);
    let ts = TokenSession::open(&t.config).unwrap();
    let err = import::import_keyset(&ts, &keys, "tapgate", false).unwrap_err();
    assert!(
        matches!(err, Pkcs11Error::Exists { ref label } if label == "tapgate/KM_APP/v1"),
        "{err}"
    );

    // A rotated set first, then a set without the rotation: --replace leaves no stale v2.
    let mut rotated = keys.clone();
    rotated.rotate(KeyKind::Credit, &mut StdRng::seed_from_u64(14));
    import::import_keyset(&ts, &rotated, "tapgate", true).unwrap();
    assert_eq!(
        ts.find(
            cryptoki::object::ObjectClass::SECRET_KEY,
            "tapgate/KM_CREDIT/v2"
        )
        .unwrap()
        .len(),
        1
    );
    let newer = KeySet::generate(&mut StdRng::seed_from_u64(9));
    let out = import::import_keyset(&ts, &newer, "tapgate", true).unwrap();
    assert!(ts
        .find(
            cryptoki::object::ObjectClass::SECRET_KEY,
            "tapgate/KM_CREDIT/v2"
        )
        .unwrap()
        .is_empty());
    let labels: Vec<_> = out.iter().map(|i| i.label.as_str()).collect();
    assert_eq!(
        labels,
        [
            "tapgate/KM_APP/v1",
            "tapgate/KM_DEBIT/v1",
            "tapgate/KM_CREDIT/v1",
            "tapgate/KM_TMAC/v1",
            "tapgate/KM_DEVICE/v1",
            "tapgate/SIGN",
            "tapgate/params",
        ]
    );
    let credit = newer.get(KeyKind::Credit, 1).unwrap();
    assert_eq!(out[2].check, format!("kcv {}", import::kcv(credit)));
    // The check value is AES-ECB(K, 0) truncated, never the key.
    let mut block = [0u8; 16];
    purse::crypto::cbc_encrypt(credit, &[0; 16], &mut block).unwrap();
    assert_eq!(import::kcv(credit), hex::encode_upper(&block[..3]));
    assert!(!out
        .iter()
        .any(|i| i.check.contains(&hex::encode_upper(credit.expose_secret()))));
    // A reopened HSM holds the replacement: cards of the new key set load.
    drop(ts);
    let mut hw = Pkcs11Hsm::open(&t.config).unwrap();
    assert!(!hw.holds_version(KeyKind::Credit, 2));
    let soft = SoftwareHsm::new(&newer).unwrap();
    let mut c = card(&soft, 20, 1, 0);
    assert_eq!(loaded(load(&mut hw, &mut c, 5, 1)).balance_after_minor(), 5);
}

#[test]
fn masters_in_the_token_are_sensitive_and_never_extractable() {
    use cryptoki::object::{Attribute, AttributeType, ObjectClass};
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(10));
    let (t, _hw) = token_with(&keys);
    let ts = TokenSession::open(&t.config).unwrap();
    for label in [
        "tapgate/KM_CREDIT/v1",
        "tapgate/KM_TMAC/v1",
        "tapgate/KM_DEVICE/v1",
    ] {
        let h = ts.find(ObjectClass::SECRET_KEY, label).unwrap()[0];
        let attrs = ts
            .session
            .get_attributes(
                h,
                &[
                    AttributeType::Sensitive,
                    AttributeType::Extractable,
                    AttributeType::Encrypt,
                    AttributeType::Sign,
                ],
            )
            .unwrap();
        assert!(attrs.contains(&Attribute::Sensitive(true)), "{label}");
        assert!(attrs.contains(&Attribute::Extractable(false)), "{label}");
        assert!(attrs.contains(&Attribute::Encrypt(false)), "{label}");
        assert!(attrs.contains(&Attribute::Sign(false)), "{label}");
        // The value cannot be read.
        let v = ts.session.get_attributes(h, &[AttributeType::Value]);
        assert!(
            !matches!(v, Ok(ref a) if a.iter().any(|x| matches!(x, Attribute::Value(_)))),
            "{label}: {v:?}"
        );
    }
    let h = ts.find(ObjectClass::PRIVATE_KEY, "tapgate/SIGN").unwrap()[0];
    let attrs = ts
        .session
        .get_attributes(h, &[AttributeType::Sensitive, AttributeType::Extractable])
        .unwrap();
    assert!(attrs.contains(&Attribute::Sensitive(true)));
    assert!(attrs.contains(&Attribute::Extractable(false)));
}

#[test]
fn operator_errors_are_clear() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(11));
    let (t, _hw) = token_with(&keys);

    let mut cfg = t.config.clone();
    cfg.module = "/nonexistent/libpkcs11.so".into();
    let e = Pkcs11Hsm::open(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("/nonexistent/libpkcs11.so") && e.contains("no such file"),
        "{e}"
    );

    let mut cfg = t.config.clone();
    cfg.token_label = Some("no-such-token".into());
    let e = Pkcs11Hsm::open(&cfg).unwrap_err().to_string();
    assert!(
        e.contains("no-such-token") && e.contains(t.config.token_label.as_deref().unwrap()),
        "{e}"
    );

    // A wrong PIN, on a token no session of this process is logged in to (PKCS#11 keeps one
    // login state per application and token: a second C_Login answers "already logged in").
    let lone = softhsm::new_token("lone").unwrap();
    let dir = tempfile::tempdir().unwrap();
    tapgate_secrets::write_file(&dir.path().join("pin"), "wrong-pin").unwrap();
    let mut cfg = lone.config.clone();
    cfg.pin = PinSource::File(dir.path().join("pin"));
    let e = Pkcs11Hsm::open(&cfg).unwrap_err();
    assert!(matches!(e, Pkcs11Error::WrongPin { .. }), "{e}");
    assert!(!e.to_string().contains("wrong-pin"));
    // A PIN file other users may read is refused before any login is tried.
    use std::os::unix::fs::PermissionsExt;
    let pin_path = dir.path().join("pin");
    std::fs::set_permissions(&pin_path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = Pkcs11Hsm::open(&cfg).unwrap_err();
    assert!(matches!(e, Pkcs11Error::Pin(_)), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chmod 600 {}", pin_path.display())),
        "{e}"
    );

    let mut cfg = t.config.clone();
    cfg.pin = PinSource::Env("TAPGATE_TEST_PIN_NOT_SET".into());
    let e = Pkcs11Hsm::open(&cfg).unwrap_err().to_string();
    assert!(e.contains("$TAPGATE_TEST_PIN_NOT_SET"), "{e}");

    // A token without tapgate's objects names the first label it misses.
    let empty = softhsm::new_token("empty").unwrap();
    let e = Pkcs11Hsm::open(&empty.config).unwrap_err();
    assert!(
        matches!(e, Pkcs11Error::MissingKey { ref label, .. } if label == "tapgate/params"),
        "{e}"
    );
    assert!(e.to_string().contains("import-hsm"), "{e}");

    // Another prefix on the same token: nothing there yet.
    let mut cfg = t.config.clone();
    cfg.prefix = "other".into();
    let e = Pkcs11Hsm::open(&cfg).unwrap_err();
    assert!(matches!(e, Pkcs11Error::MissingKey { .. }), "{e}");
}

#[test]
fn a_sealed_key_set_round_trips_into_the_token() {
    // The path `tapgate keys import-hsm` takes: sealed file → unseal → import → open.
    let mut rng = StdRng::seed_from_u64(12);
    let keys = KeySet::generate(&mut rng);
    let sealed = keys
        .seal(b"passphrase", KdfParams::INSECURE_FOR_TESTS, &mut rng)
        .unwrap();
    let opened = KeySet::unseal(&sealed, b"passphrase").unwrap();
    let (_t, hw) = token_with(&opened);
    assert_eq!(hw.verifying_key(), keys.verifying_key);
}

#[test]
fn a_lost_login_is_no_verdict_and_the_next_operation_reopens_the_session() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(13));
    let mut soft = SoftwareHsm::new(&keys).unwrap();
    let (t, mut hw) = token_with(&keys);
    let mut c = card(&soft, 30, 1, 0);
    let r = loaded(load(&mut soft, &mut c, 300, 1));
    hw.verify_tmac(&r).unwrap();

    // C_Logout on any session logs the whole application out of the token (what a token
    // restart or an expired login looks like from here).
    TokenSession::open(&t.config)
        .unwrap()
        .session
        .logout()
        .unwrap();
    let e = hw.verify_tmac(&r).unwrap_err();
    assert!(matches!(e, SamError::Hsm(_)), "{e}");
    // The next operation logs in again on a new session: verdicts are back, forgeries still
    // refused, loads work.
    hw.verify_tmac(&r).unwrap();
    let claim = TxClaim {
        uid: r.uid(),
        tmc: r.tmc(),
        tmv: [0; 8],
        kind: r.kind(),
        amount_minor: r.amount_minor(),
        balance_after_minor: r.balance_after_minor(),
        key_version: r.key_version(),
        reader_id: r.reader_id(),
    };
    assert!(matches!(
        hw.verify_claim(&claim),
        Err(SamError::TmacMismatch { .. })
    ));
    assert_eq!(
        loaded(load(&mut hw, &mut c, 200, 2)).balance_after_minor(),
        500
    );
    assert!(hw.verify_device_mac(5, b"x", &[0; 8]).is_ok());
}

#[test]
fn a_pin_refused_at_reopening_is_not_retried() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(15));
    let mut soft = SoftwareHsm::new(&keys).unwrap();
    let (t, hw) = token_with(&keys);
    let mut c = card(&soft, 31, 1, 0);
    let r = loaded(load(&mut soft, &mut c, 300, 1));
    let PinSource::File(pin_file) = &t.config.pin else {
        panic!("test tokens read their PIN from a file")
    };
    std::fs::write(pin_file, "not-the-pin\n").unwrap();
    // This session's C_Login meets the HSM's login (the PIN is not checked then); its logout
    // logs the application out, so the HSM's next operation fails and the one after reopens.
    TokenSession::open(&t.config)
        .unwrap()
        .session
        .logout()
        .unwrap();
    let e = hw.verify_tmac(&r).unwrap_err();
    assert!(matches!(e, SamError::Hsm(_)), "{e}");
    let e = hw.verify_tmac(&r).unwrap_err().to_string();
    assert!(
        e.contains("refused the PIN") && e.contains("not retried"),
        "{e}"
    );
    // Even with the right PIN back, no further login is attempted by this HSM object (each
    // attempt could count towards a token's lockout): the server must be restarted.
    std::fs::write(pin_file, format!("{}\n", t.pin)).unwrap();
    let e = hw.verify_tmac(&r).unwrap_err().to_string();
    assert!(e.contains("not retried"), "{e}");
    assert!(Pkcs11Hsm::open(&t.config).unwrap().verify_tmac(&r).is_ok());
}

#[test]
fn action_list_wrapped_keys_and_grants_equal_the_software_hsm() {
    let keys = KeySet::generate(&mut StdRng::seed_from_u64(19));
    let soft = SoftwareHsm::new(&keys).unwrap();
    let (_t, hw) = token_with(&keys);
    let uid = [0x04, 0x19, 0x2E, 0x21, 0x80, 0x1D, 0x80];
    assert_eq!(
        hw.wrap_order_key(&uid, 1).unwrap(),
        soft.wrap_order_key(&uid, 1).unwrap()
    );
    assert!(
        hw.wrap_order_key(&uid, 9).is_err(),
        "a version the token lacks"
    );
    assert_eq!(
        hw.action_grant(1001, 3, 50_000).unwrap(),
        soft.action_grant(1001, 3, 50_000).unwrap()
    );
}
