//! Card readers. [`Reader`] is what the gate loop needs: wait for a card, talk to it, let it go.
//! [`Crowd`] is the emulated reader for tests, the demo and load tests: emulated cards
//! presented one after another with realistic timing (exponential gaps at a configured rate),
//! kept in memory and, optionally, as card images in a directory so they survive a restart of
//! the validator process (a real card keeps its state in its own chip). An image is read again
//! at every presentation under its [`ImageLock`], held until the card leaves the field, so a
//! load made meanwhile by `tapgate charge --card` on the same image is never written away.

use crate::image_lock::ImageLock;
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
}

/// The card in the field. With an image path, its NVM is written to the file after every
/// command that changed it, as a chip keeps its memory whatever happens to the reader.
struct CardInField {
    card: Card,
    rng: StdRng,
    image: Option<PathBuf>,
    last_image: String,
    /// The image's lock, held while the card is in the field.
    _lock: Option<ImageLock>,
}

impl CardInField {
    fn persist(&mut self) {
        let Some(p) = &self.image else { return };
        let Ok(text) = serde_json::to_string(self.card.nvm()) else {
            return;
        };
        if text != self.last_image {
            let tmp = p.with_extension("tmp");
            if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, p).is_ok() {
                self.last_image = text;
            }
        }
    }
}

impl Transport for CardInField {
    fn card_uid(&mut self) -> Result<[u8; 7], TransportError> {
        EmulatedReader {
            card: &mut self.card,
            rng: &mut self.rng,
        }
        .card_uid()
    }
    fn transmit(&mut self, command: &[u8]) -> Result<Vec<u8>, TransportError> {
        let r = EmulatedReader {
            card: &mut self.card,
            rng: &mut self.rng,
        }
        .transmit(command);
        self.persist();
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
    /// may have loaded the card since), else from memory, else newly personalised.
    fn take_card(&mut self, i: usize) -> Card {
        let cached = self.cards[i].take();
        let uid = crowd_uid(i as u32);
        let keys = |v| self.hsm.card_keys(&uid, v);
        if let Some(p) = self.image_path(i) {
            if let Ok(text) = std::fs::read_to_string(&p) {
                if let Ok(nvm) = serde_json::from_str::<Nvm>(&text) {
                    if let Ok(k) = keys(nvm.main.key_version) {
                        return Card::power_on(nvm, k);
                    }
                }
            }
        }
        if let Some(c) = cached {
            return c;
        }
        let mut p = Personalisation::transit(uid, self.cfg.balance_minor);
        p.upper_limit_minor = p.upper_limit_minor.max(self.cfg.balance_minor);
        let k = keys(p.key_version).expect("the issuer holds version-1 keys");
        Card::personalise(&p, k)
    }

    fn put_card(&mut self, i: usize, mut card: Card) {
        if card.is_torn() {
            let uid = card.state().uid;
            let nvm = card.nvm().clone();
            if let Ok(k) = self.hsm.card_keys(&uid, nvm.main.key_version) {
                card = Card::power_on(nvm, k);
            }
        }
        card.tear_after_writes(None);
        card.remove_from_field();
        if let Some(p) = self.image_path(i) {
            if let Ok(text) = serde_json::to_string(card.nvm()) {
                let tmp = p.with_extension("tmp");
                if std::fs::write(&tmp, text).is_ok() {
                    let _ = std::fs::rename(&tmp, &p);
                }
            }
        }
        self.cards[i] = Some(card);
    }

    /// Card `i`'s image lock (`None` without a directory). A card whose image another process
    /// holds past [`IMAGE_WAIT`] is not presented: `Err` with the reason.
    fn lock_card(&self, i: usize) -> Result<Option<ImageLock>, crate::image_lock::ImageLockError> {
        match self.image_path(i) {
            Some(p) => ImageLock::acquire(&p, IMAGE_WAIT).map(Some),
            None => Ok(None),
        }
    }

    /// The cards' balances now (for conservation checks).
    pub fn balances(&mut self) -> Vec<([u8; 7], i32)> {
        (0..self.cards.len())
            .map(|i| {
                let _lock = self.lock_card(i).ok().flatten();
                let c = self.take_card(i);
                let out = (c.state().uid, c.state().balance_minor);
                self.cards[i] = Some(c);
                out
            })
            .collect()
    }
}

/// How long a presentation waits for an image another process holds (a `tapgate charge` of
/// the same card takes a few round trips).
pub const IMAGE_WAIT: Duration = Duration::from_secs(10);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Reader for Crowd {
    fn wait_card(&mut self) -> Option<&mut dyn Transport> {
        if self.cfg.taps.is_some_and(|n| self.presented >= n) || self.cards.is_empty() {
            return None;
        }
        // Realistic gaps: exponential inter-arrival at the configured rate.
        if self.cfg.rate_per_s > 0.0 {
            let now = Instant::now();
            while Instant::now() < self.next_at {
                if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return None;
                }
                std::thread::sleep((self.next_at - Instant::now()).min(Duration::from_millis(50)));
            }
            let u: f64 = self.rng.gen_range(1e-9..1.0);
            let gap = -u.ln() / self.cfg.rate_per_s;
            self.next_at = now.max(self.next_at) + Duration::from_secs_f64(gap);
        }
        if self.stop.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        let i = self.rng.gen_range(0..self.cards.len());
        let lock = match self.lock_card(i) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e}; the card is not presented");
                return self.wait_card();
            }
        };
        let mut card = self.take_card(i);
        if self.cfg.tear_per_mille > 0 && self.rng.gen_range(0..1000) < self.cfg.tear_per_mille {
            card.tear_after_writes(Some(self.rng.gen_range(0..6)));
        }
        self.presented += 1;
        self.current = Some(i);
        let rng = StdRng::seed_from_u64(self.card_rng.gen());
        let image = self.image_path(i);
        self.reader = Some(CardInField {
            card,
            rng,
            image,
            last_image: String::new(),
            _lock: lock,
        });
        self.reader.as_mut().map(|r| r as &mut dyn Transport)
    }

    fn card_removed(&mut self) {
        if let (Some(i), Some(r)) = (self.current.take(), self.reader.take()) {
            // The image is written before the lock is let go.
            let CardInField {
                card, _lock: lock, ..
            } = r;
            self.put_card(i, card);
            drop(lock);
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
}
