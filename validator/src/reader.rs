//! Card readers. [`Reader`] is what the gate loop needs: wait for a card, talk to it, let it go.
//! [`Crowd`] is the emulated reader for tests, the demo and load tests: emulated cards
//! presented one after another with realistic timing (exponential gaps at a configured rate),
//! kept in memory and, optionally, as card images in a directory so they survive a restart of
//! the validator process (a real card keeps its state in its own chip). An image is read again
//! at every presentation under its [`ImageLock`], held until the card leaves the field, so a
//! load made meanwhile by `tapgate charge --card` on the same image is never written away.

use crate::card_image::{write_atomic, WriteError};
use crate::image_lock::{ImageLock, ImageLockError};
use purse::card::{Card, Nvm, Personalisation};
use purse::sam::SoftwareHsm;
use purse::txn::{EmulatedReader, Transport, TransportError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// A card reader.
pub trait Reader: Send {
    /// Blocks until a card is in the field; `None` when the reader has no more cards (a
    /// scripted crowd that is done) or is shutting down.
    fn wait_card(&mut self) -> Option<&mut dyn Transport>;
    /// The card has left the field.
    fn card_removed(&mut self);
    /// Why the reader stopped, when [`Reader::wait_card`] returned `None` because of an error
    /// (not because it ran out of cards or is shutting down).
    fn failure(&self) -> Option<String> {
        None
    }
}

/// Crowd settings.
#[derive(Clone, Debug)]
pub struct CrowdConfig {
    pub cards: u32,
    pub balance_minor: i32,
    /// Taps to present in all (`None`: until shut down).
    pub taps: Option<u64>,
    /// Mean presentations per second (0: as fast as the gate takes them).
    pub rate_per_s: f64,
    pub seed: u64,
    /// Card images live here between presentations (survive a restart), if set.
    pub dir: Option<PathBuf>,
    /// Per mille of presentations where the card is pulled during its commit.
    pub tear_per_mille: u32,
}

/// Emulated cards presented one after another.
pub struct Crowd {
    cfg: CrowdConfig,
    hsm: SoftwareHsm,
    cards: Vec<Option<Card>>,
    rng: StdRng,
    card_rng: StdRng,
    presented: u64,
    current: Option<usize>,
    next_at: Instant,
    reader: Option<CardInField>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Why the crowd stopped presenting cards, if an error made it.
    failure: Option<String>,
    /// Card images in a row that were there but unusable (see `take_card`).
    unusable: u32,
}

/// The card in the field. With an image path, its NVM is written to the file after every
/// command that changed it, as a chip keeps its memory whatever happens to the reader. A write
/// that fails is a chip whose memory write did not happen: the command fails as a tear does
/// (the card leaves the field) and the card keeps the state its image holds, so no counter value
/// is spent twice.
struct CardInField {
    card: Card,
    rng: StdRng,
    image: Option<PathBuf>,
    /// The image's text as last written ("" before the first write).
    last_image: String,
    /// The NVM as the image holds it: what the card is if a write fails.
    saved: Nvm,
    /// A write of the image failed: the card answers nothing more and goes back to `saved`.
    failed: bool,
    /// The image's lock, held while the card is in the field.
    _lock: Option<ImageLock>,
}

impl CardInField {
    /// Writes the image if the card's NVM changed since the last write.
    fn persist(&mut self) -> Result<(), WriteError> {
        let Some(p) = &self.image else {
            return Ok(());
        };
        let text = serde_json::to_string(self.card.nvm()).map_err(|e| WriteError {
            step: "serialising",
            path: p.clone(),
            io: e.into(),
        })?;
        if text != self.last_image {
            write_atomic(p, text.as_bytes())?;
            self.last_image = text;
            self.saved = self.card.nvm().clone();
        }
        Ok(())
    }

    fn gone(&self) -> Result<(), TransportError> {
        match self.failed {
            true => Err(TransportError::CardGone),
            false => Ok(()),
        }
    }
}

impl Transport for CardInField {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        self.gone()?;
        EmulatedReader {
            card: &mut self.card,
            rng: &mut self.rng,
        }
        .card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        self.gone()?;
        let r = EmulatedReader {
            card: &mut self.card,
            rng: &mut self.rng,
        }
        .transmit(command);
        if let Err(e) = self.persist() {
            self.failed = true;
            tracing::error!(
                error = %e,
                "card image not written: the card keeps the state its image holds and this tap fails"
            );
            return Err(TransportError::Link(format!(
                "card image not written, the card keeps its previous state: {e}"
            )));
        }
        r
    }
}

/// The UID of crowd card `i`.
pub fn crowd_uid(i: u32) -> [u8; 7] {
    let b = i.to_be_bytes();
    [0x04, 0xC0, 0x0D, b[0], b[1], b[2], b[3]]
}

impl Crowd {
    /// A crowd of `cfg.cards` cards issued under `hsm` (the issuer's keys: emulated cards are
    /// personalised with their diversified keys, as at the card bureau).
    pub fn new(
        cfg: CrowdConfig,
        hsm: SoftwareHsm,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> std::io::Result<Self> {
        if let Some(d) = &cfg.dir {
            std::fs::create_dir_all(d)?;
        }
        Ok(Self {
            cards: (0..cfg.cards).map(|_| None).collect(),
            rng: StdRng::seed_from_u64(cfg.seed),
            card_rng: StdRng::seed_from_u64(cfg.seed ^ 0x5eed),
            presented: 0,
            current: None,
            next_at: Instant::now(),
            reader: None,
            hsm,
            cfg,
            stop,
            failure: None,
            unusable: 0,
        })
    }

    /// Taps presented so far.
    pub fn presented(&self) -> u64 {
        self.presented
    }

    fn image_path(&self, i: usize) -> Option<PathBuf> {
        self.cfg
            .dir
            .as_ref()
            .map(|d| d.join(format!("{}.json", hex(&crowd_uid(i as u32)))))
    }

    /// Card `i`: from its image when there is one (read again every time: another process
    /// may have loaded the card since), else from memory, else newly personalised. An image
    /// that is there but cannot be read, parsed, validated or keyed is an error: the card is
    /// not made up anew from memory or personalisation, which would spend its counters again.
    fn take_card(&mut self, i: usize) -> Result<Card, String> {
        let cached = self.cards[i].take();
        let uid = crowd_uid(i as u32);
        if let Some(p) = self.image_path(i) {
            match std::fs::read_to_string(&p) {
                Ok(text) => {
                    let unusable =
                        |why: String| format!("card image {} is unusable: {why}", p.display());
                    let nvm =
                        serde_json::from_str::<Nvm>(&text).map_err(|e| unusable(e.to_string()))?;
                    nvm.validate().map_err(|e| unusable(e.to_string()))?;
                    let k = self
                        .hsm
                        .card_keys_of(&nvm.main)
                        .map_err(|e| unusable(e.to_string()))?;
                    return Ok(Card::power_on(nvm, k));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(format!("card image {}: {e}", p.display())),
            }
        }
        if let Some(c) = cached {
            return Ok(c);
        }
        let mut p = Personalisation::transit(uid, self.cfg.balance_minor);
        p.upper_limit_minor = p.upper_limit_minor.max(self.cfg.balance_minor);
        let k = self
            .hsm
            .card_keys(&uid, p.key_version)
            .expect("the issuer holds version-1 keys");
        Ok(Card::personalise(&p, k))
    }

    /// Puts card `i` back after a presentation; writes its image unless it holds `last_image`
    /// already (a failure is logged: the image keeps the card's last written state, which the
    /// next presentation reads).
    fn put_card(&mut self, i: usize, mut card: Card, last_image: &str) {
        if card.is_torn() {
            let nvm = card.nvm().clone();
            if let Ok(k) = self.hsm.card_keys_of(&nvm.main) {
                card = Card::power_on(nvm, k);
            }
        }
        card.tear_after_writes(None);
        card.remove_from_field();
        if let Some(p) = self.image_path(i) {
            match serde_json::to_string(card.nvm()) {
                Ok(text) if text == last_image => {}
                Ok(text) => {
                    if let Err(e) = write_atomic(&p, text.as_bytes()) {
                        tracing::error!(error = %e, "card image not written");
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, image = %p.display(), "card image not written")
                }
            }
        }
        self.cards[i] = Some(card);
    }

    /// Card `i`'s image lock (`None` without a directory). A card whose image another process
    /// holds past [`IMAGE_WAIT`] is not presented: `Err` with the reason.
    fn lock_card(&self, i: usize) -> Result<Option<ImageLock>, ImageLockError> {
        match self.image_path(i) {
            Some(p) => ImageLock::acquire(&p, IMAGE_WAIT).map(Some),
            None => Ok(None),
        }
    }

    /// The cards' balances now (for conservation checks).
    pub fn balances(&mut self) -> Vec<([u8; 7], i32)> {
        (0..self.cards.len())
            .filter_map(|i| {
                let _lock = self.lock_card(i).ok().flatten();
                match self.take_card(i) {
                    Ok(c) => {
                        let out = (c.state().uid, c.state().balance_minor);
                        self.cards[i] = Some(c);
                        Some(out)
                    }
                    Err(e) => {
                        tracing::error!("{e}; its balance is not reported");
                        None
                    }
                }
            })
            .collect()
    }
}

/// How long a presentation waits for an image another process holds (a `tapgate charge` of
/// the same card takes a few round trips).
pub const IMAGE_WAIT: Duration = Duration::from_secs(10);

/// Consecutive images that could not be locked for an error other than another holder (a
/// missing directory, no permission) before the crowd gives up.
pub const LOCK_ATTEMPTS: u32 = 8;

/// The pause after the `n`-th consecutive lock error (n ≥ 1): 10 ms doubling, at most 1 s.
fn lock_backoff(n: u32) -> Duration {
    Duration::from_millis(10u64 << n.saturating_sub(1).min(10)).min(Duration::from_secs(1))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Reader for Crowd {
    /// Presents a random card. A card whose image another process holds past [`IMAGE_WAIT`]
    /// is not presented and another is drawn; an image that cannot be locked at all (its
    /// directory gone, no permission) is retried after a bounded back-off, and after
    /// [`LOCK_ATTEMPTS`] such errors in a row the crowd stops with [`Reader::failure`] set.
    fn wait_card(&mut self) -> Option<&mut dyn Transport> {
        let mut errors = 0;
        let (i, lock, mut card) = loop {
            let (i, lock) = loop {
                if self.cfg.taps.is_some_and(|n| self.presented >= n) || self.cards.is_empty() {
                    return None;
                }
                // Realistic gaps: exponential inter-arrival at the configured rate.
                if self.cfg.rate_per_s > 0.0 {
                    let now = Instant::now();
                    if !self.sleep_until(self.next_at) {
                        return None;
                    }
                    let u: f64 = self.rng.gen_range(1e-9..1.0);
                    let gap = -u.ln() / self.cfg.rate_per_s;
                    self.next_at = now.max(self.next_at) + Duration::from_secs_f64(gap);
                }
                if self.stopped() {
                    return None;
                }
                let i = self.rng.gen_range(0..self.cards.len());
                match self.lock_card(i) {
                    Ok(l) => break (i, l),
                    Err(e @ ImageLockError::Busy { .. }) => {
                        tracing::warn!("{e}; the card is not presented");
                    }
                    Err(e) => {
                        errors += 1;
                        if errors >= LOCK_ATTEMPTS {
                            let msg = format!(
                                "the crowd stops: {errors} card images in a row could not be locked; the last: {e}"
                            );
                            tracing::error!("{msg}");
                            self.failure = Some(msg);
                            return None;
                        }
                        tracing::warn!("{e}; the card is not presented");
                        if !self.sleep_until(Instant::now() + lock_backoff(errors)) {
                            return None;
                        }
                    }
                }
            };
            match self.take_card(i) {
                Ok(card) => break (i, lock, card),
                Err(e) => {
                    // Not presented; the image is left as it is for the operator to look at. A
                    // crowd whose images all fail stops as one whose images cannot be locked.
                    self.unusable += 1;
                    if self.unusable >= LOCK_ATTEMPTS {
                        let msg = format!(
                            "the crowd stops: {} card images in a row were unusable; the last: {e}",
                            self.unusable
                        );
                        tracing::error!("{msg}");
                        self.failure = Some(msg);
                        return None;
                    }
                    tracing::error!("{e}; the card is not presented");
                }
            }
        };
        self.unusable = 0;
        if self.cfg.tear_per_mille > 0 && self.rng.gen_range(0..1000) < self.cfg.tear_per_mille {
            card.tear_after_writes(Some(self.rng.gen_range(0..6)));
        }
        self.presented += 1;
        self.current = Some(i);
        let rng = StdRng::seed_from_u64(self.card_rng.gen());
        let image = self.image_path(i);
        self.reader = Some(CardInField {
            saved: card.nvm().clone(),
            card,
            rng,
            image,
            last_image: String::new(),
            failed: false,
            _lock: lock,
        });
        self.reader.as_mut().map(|r| r as &mut dyn Transport)
    }

    fn card_removed(&mut self) {
        if let (Some(i), Some(r)) = (self.current.take(), self.reader.take()) {
            // The image is written before the lock is let go.
            let CardInField {
                card,
                saved,
                failed,
                last_image,
                _lock: lock,
                ..
            } = r;
            if failed {
                // The chip's write did not happen: the card is as its image holds it.
                match self.hsm.card_keys_of(&saved.main) {
                    Ok(k) => self.put_card(i, Card::power_on(saved, k), &last_image),
                    // (Cannot happen: the card was powered on with these keys.) The next
                    // presentation reads the image.
                    Err(_) => self.cards[i] = None,
                }
            } else {
                self.put_card(i, card, &last_image);
            }
            drop(lock);
        }
    }

    fn failure(&self) -> Option<String> {
        self.failure.clone()
    }
}

impl Crowd {
    fn stopped(&self) -> bool {
        self.stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sleeps until `t` in short steps; `false` if shutdown was asked meanwhile.
    fn sleep_until(&self, t: Instant) -> bool {
        loop {
            if self.stopped() {
                return false;
            }
            let now = Instant::now();
            if now >= t {
                return true;
            }
            std::thread::sleep((t - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    fn issuer() -> purse::keys::KeySet {
        purse::keys::KeySet::generate(&mut StdRng::seed_from_u64(7))
    }

    /// Another process (here: this test) changes the image between two presentations: the
    /// crowd presents the card as the image has it, not as it last saw it.
    #[test]
    fn an_image_is_read_again_at_every_presentation() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CrowdConfig {
            cards: 1,
            balance_minor: 1_000,
            taps: Some(2),
            rate_per_s: 0.0,
            seed: 1,
            dir: Some(dir.path().to_path_buf()),
            tear_per_mille: 0,
        };
        let ks = issuer();
        let hsm = SoftwareHsm::new(&ks).unwrap();
        let mut crowd = Crowd::new(
            cfg,
            SoftwareHsm::new(&ks).unwrap(),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap();
        assert!(crowd.wait_card().is_some());
        let image = crowd.image_path(0).unwrap();
        // While the card is in the field, its image is locked.
        assert!(ImageLock::acquire(&image, Duration::ZERO).is_err());
        crowd.card_removed();
        let uid = crowd_uid(0);
        let loaded = Card::personalise(
            &Personalisation::transit(uid, 3_000),
            hsm.card_keys(&uid, 1).unwrap(),
        );
        {
            let _held = ImageLock::acquire(&image, Duration::ZERO).unwrap();
            std::fs::write(&image, serde_json::to_string(loaded.nvm()).unwrap()).unwrap();
        }
        assert!(crowd.wait_card().is_some());
        let in_field = crowd.reader.as_ref().unwrap();
        assert_eq!(in_field.card.state().balance_minor, 3_000);
        crowd.card_removed();
        assert_eq!(crowd.balances(), vec![(uid, 3_000)]);
    }

    fn crowd_in(dir: &std::path::Path, ks: &purse::keys::KeySet) -> Crowd {
        let cfg = CrowdConfig {
            cards: 1,
            balance_minor: 1_000,
            taps: Some(10),
            rate_per_s: 0.0,
            seed: 1,
            dir: Some(dir.to_path_buf()),
            tear_per_mille: 0,
        };
        Crowd::new(
            cfg,
            SoftwareHsm::new(ks).unwrap(),
            Arc::new(AtomicBool::new(false)),
        )
        .unwrap()
    }

    /// A load of 100 on the card in the field; `before_commit` runs when the server decides.
    fn load(
        crowd: &mut Crowd,
        hsm: &mut SoftwareHsm,
        before_commit: impl FnOnce(),
    ) -> Result<purse::txn::LoadOutcome, purse::txn::TxError> {
        let t = crowd.wait_card().expect("a card");
        let out = purse::txn::load_online(t, hsm, &mut StdRng::seed_from_u64(3), |_| {
            before_commit();
            purse::txn::Decision::Apply {
                amount_minor: 100,
                record: None,
            }
        });
        crowd.card_removed();
        out
    }

    /// The image cannot be written at the commit (here its temporary file's place is taken,
    /// which stops root too): the commit fails as a tear, with the reason, and the card is what
    /// its unchanged image says — the next value change uses the counter value again, which no
    /// proof of the failed one holds. Before, the failure was ignored: the load was answered,
    /// the image kept the old counter, and the next change reused it (a clone in clearing).
    #[test]
    fn an_image_that_cannot_be_written_fails_the_commit_and_stays_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let ks = issuer();
        let mut hsm = SoftwareHsm::new(&ks).unwrap();
        let mut crowd = crowd_in(dir.path(), &ks);
        let image = crowd.image_path(0).unwrap();
        assert!(matches!(
            load(&mut crowd, &mut hsm, || {}),
            Ok(purse::txn::LoadOutcome::Loaded { .. })
        ));
        let before = std::fs::read_to_string(&image).unwrap();
        let blocker = dir.path().join(format!(
            ".{}.tmp",
            image.file_name().unwrap().to_str().unwrap()
        ));
        let err = load(&mut crowd, &mut hsm, || {
            std::fs::create_dir(&blocker).unwrap()
        })
        .expect_err("a commit whose image was not written is not answered");
        assert!(
            matches!(&err, purse::txn::TxError::Transport(TransportError::Link(m)) if m.contains("card image not written") && m.contains(".tmp")),
            "{err}"
        );
        assert_eq!(std::fs::read_to_string(&image).unwrap(), before);
        let uid = crowd_uid(0);
        assert_eq!(crowd.balances(), vec![(uid, 1_100)]);

        std::fs::remove_dir(&blocker).unwrap();
        assert!(matches!(
            load(&mut crowd, &mut hsm, || {}),
            Ok(purse::txn::LoadOutcome::Loaded { .. })
        ));
        let nvm: Nvm = serde_json::from_str(&std::fs::read_to_string(&image).unwrap()).unwrap();
        assert_eq!((nvm.main.balance_minor, nvm.main.tmc), (1_200, 2));
        assert_eq!(crowd.balances(), vec![(uid, 1_200)]);
    }

    /// The images' directory is gone while the card is in the field: the dialogue fails, no
    /// image appears, and the crowd, unable to lock any image, gives up after a bounded number
    /// of tries with the reason (before, it retried by recursing without end).
    #[test]
    fn a_missing_directory_fails_the_tap_and_the_crowd_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let images = dir.path().join("cards");
        let ks = issuer();
        let mut hsm = SoftwareHsm::new(&ks).unwrap();
        let mut crowd = crowd_in(&images, &ks);
        let image = crowd.image_path(0).unwrap();
        let t = crowd.wait_card().expect("a card");
        std::fs::remove_dir_all(&images).unwrap();
        let out = purse::txn::load_online(t, &mut hsm, &mut StdRng::seed_from_u64(3), |_| {
            purse::txn::Decision::Apply {
                amount_minor: 100,
                record: None,
            }
        });
        assert!(
            matches!(&out, Err(purse::txn::TxError::Transport(TransportError::Link(m))) if m.contains("card image not written")),
            "{out:?}"
        );
        crowd.card_removed();
        assert!(!image.exists());
        assert!(crowd.failure().is_none());

        let started = Instant::now();
        assert!(crowd.wait_card().is_none());
        let why = crowd.failure().expect("the reason the crowd stopped");
        assert!(why.contains("could not be locked"), "{why}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// An image that is there but cannot be used (here: not JSON) is not replaced by a card
    /// made up from memory or personalised anew (that card would spend counters the real one
    /// already spent): the card is not presented, its image is left as it was, and a crowd
    /// whose images are all unusable stops with the reason.
    #[test]
    fn an_unusable_image_is_never_replaced_by_a_made_up_card() {
        let dir = tempfile::tempdir().unwrap();
        let ks = issuer();
        let mut crowd = crowd_in(dir.path(), &ks);
        let image = crowd.image_path(0).unwrap();
        // A first presentation writes the card's image and keeps the card in memory.
        assert!(crowd.wait_card().is_some());
        crowd.card_removed();
        std::fs::write(&image, b"{ torn").unwrap();

        assert!(crowd.wait_card().is_none(), "a card was made up");
        let why = crowd.failure().expect("the reason the crowd stopped");
        assert!(why.contains("unusable"), "{why}");
        assert_eq!(std::fs::read(&image).unwrap(), b"{ torn");
        assert!(crowd.balances().is_empty());
    }
}
