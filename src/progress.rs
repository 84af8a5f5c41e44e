//! How a long run talks to whoever started it: progress as it goes, and a token that asks it
//! to stop. The library knows neither terminals nor signals; the binary implements
//! [`Progress`] with a progress bar and sets the [`Cancel`] token from its signal handlers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;

/// Progress of a run, in bytes of the file being written. Every method defaults to nothing.
pub trait Progress: Sync {
    /// The run will write `total` bytes.
    fn start(&self, _total: u64) {}
    /// `bytes` more were written.
    fn advance(&self, _bytes: u64) {}
    /// A new stage began (`fusing`, `verifying`).
    fn stage(&self, _name: &str) {}
}

/// A [`Progress`] that shows nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct Silent;

impl Progress for Silent {}

/// Asks a run to stop: long loops check it between chunks and return [`Error::Interrupted`]
/// after removing their temp files.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token nobody has set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The flag behind the token, for a signal handler to set.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.0.clone()
    }

    /// Whether a stop was asked for.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// `Err(Error::Interrupted)` once a stop was asked for.
    pub fn check(&self) -> Result<(), Error> {
        if self.is_set() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// What a run is given besides its inputs: where to report progress, and when to stop.
#[derive(Clone, Copy)]
pub struct Hooks<'a> {
    /// Progress display.
    pub progress: &'a dyn Progress,
    /// The stop token.
    pub cancel: &'a Cancel,
}

impl Hooks<'static> {
    /// No display, never cancelled.
    pub fn none() -> Self {
        static NEVER: std::sync::OnceLock<Cancel> = std::sync::OnceLock::new();
        Hooks {
            progress: &Silent,
            cancel: NEVER.get_or_init(Cancel::new),
        }
    }
}
