//! `tapgate card serve`: an emulated card image presented to PC/SC through vsmartcard's vpcd
//! (the protocol and the virtual card: `validator::vpcd`). This file reads the flags, the key
//! set and the image, saves the image atomically as the card changes, stops on Ctrl-C /
//! SIGTERM, and prints what happens.

use crate::card_image::{lock_image, read_image, write_image};
use crate::cli_util::input_err;
use crate::keys_cmd::load_keyset;
use anyhow::{Context, Result};
use purse::sam::SoftwareHsm;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use validator::vpcd::{self, Event, PullAt, Served, VirtualCard};

/// What `tapgate card serve` was asked.
pub struct ServeOpts {
    /// The card image.
    pub card: PathBuf,
    /// The issuer key set.
    pub keys: PathBuf,
    /// Where the key set's passphrase is (default: the environment).
    pub passphrase_file: Option<PathBuf>,
    /// vpcd's HOST:PORT.
    pub vpcd: String,
    /// Fault injection: the card leaves the field at this command, after executing it and
    /// before its answer reaches the reader. The process then ends.
    pub pull_at: Option<PullAt>,
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| input_err(format!("--vpcd {addr:?}: {e} (expected HOST:PORT)")))?
        .next()
        .ok_or_else(|| input_err(format!("--vpcd {addr:?}: no address")))
}

/// Sets `stop` on Ctrl-C / SIGTERM.
fn stop_on_signal(stop: Arc<AtomicBool>) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal handler")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            rt.block_on(crate::cli_util::shutdown_signal());
            stop.store(true, Ordering::Relaxed);
        })
        .context("starting the signal handler")?;
    Ok(())
}

/// Runs `tapgate card serve` until Ctrl-C / SIGTERM (or the pull of `--pull-at`).
pub fn run(o: ServeOpts) -> Result<()> {
    let addr = resolve(&o.vpcd)?;
    let ks = load_keyset(&o.keys, o.passphrase_file.as_deref())?;
    let hsm = SoftwareHsm::new(&ks)?;
    // The card is in this reader until the serve ends: no other process may change it.
    let _lock = lock_image(&o.card)?;
    let nvm = read_image(&o.card)?;
    let image = o.card.clone();
    let save: vpcd::Saver =
        Box::new(move |nvm| write_image(&image, nvm).map_err(|e| format!("{e:#}")));
    let mut card = VirtualCard::open(nvm, hsm, save)?;
    let uid = hex::encode_upper(card.uid());
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone())?;
    let served = vpcd::serve(addr, &mut card, &stop, o.pull_at, &mut |event| {
        match event {
        Event::Unreachable { why } => eprintln!(
            "card {uid}: vpcd is not reachable at {addr} ({why}); is pcscd running with vsmartcard-vpcd? retrying"
        ),
        Event::InField => println!("card {uid} in the field of vpcd {addr}"),
        Event::Quiet => eprintln!(
            "connected, but vpcd has said nothing for 3 s: is another virtual card in this reader slot?"
        ),
        Event::UnknownControl(c) => eprintln!("vpcd: unknown control byte {c:#04x} ignored"),
        Event::Reconnecting { why } => eprintln!("card {uid}: {why}; reconnecting"),
    }
    })?;
    let how = match served {
        Served::Stopped => "stopped",
        Served::Pulled => "pulled",
    };
    let st = card.card().state();
    println!(
        "card {uid} {how} after {} commands: balance_minor={} tmc={}",
        card.commands(),
        st.balance_minor,
        st.tmc
    );
    Ok(())
}
