//! A shutdown signal shared by the listeners, sweepers and demo images.

use tokio::sync::watch;

/// Fires the shutdown.
#[derive(Debug)]
pub struct Trigger(watch::Sender<bool>);

/// Resolves once the shutdown fired; cheap to clone.
#[derive(Debug, Clone)]
pub struct Signal(watch::Receiver<bool>);

/// A connected trigger and signal.
pub fn channel() -> (Trigger, Signal) {
    let (tx, rx) = watch::channel(false);
    (Trigger(tx), Signal(rx))
}

impl Trigger {
    /// Tells every signal holder to stop.
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Signal {
    /// Waits for the trigger (or for it to be dropped).
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|stop| *stop).await;
    }
}
