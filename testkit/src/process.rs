//! Child processes a test starts (daemons, brokers) that must not outlive it.

use std::process::Child;

/// Kills (and reaps) the child when dropped, so a failing test leaves no daemon behind.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Kill {
    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
