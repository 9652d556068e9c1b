//! Stopping training on SIGINT (Ctrl-C) or SIGTERM: the first signal asks the
//! trainer to stop at the next step boundary (keeping the last good checkpoint),
//! a second one of the same kind ends the process at once. Either way the process
//! exits with 128 + the signal's number (130, 143): a stopped run is not a
//! finished one, so `reid train ... && reid extract ...` goes no further.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};

/// The flag training polls, and which signal set it.
pub struct StopSignals {
    pub flag: Arc<AtomicBool>,
    signal: Arc<AtomicUsize>,
}

impl StopSignals {
    /// Installs the handlers of SIGINT and SIGTERM.
    pub fn install() -> anyhow::Result<Self> {
        let flag = Arc::new(AtomicBool::new(false));
        let signal = Arc::new(AtomicUsize::new(0));
        for sig in [SIGINT, SIGTERM] {
            // Registered first, so that it sees the flag as the earlier signal left it.
            signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flag.clone())?;
            signal_hook::flag::register_usize(sig, signal.clone(), sig as usize)?;
            signal_hook::flag::register(sig, flag.clone())?;
        }
        Ok(StopSignals { flag, signal })
    }

    /// The signal that stopped the run, if one did.
    pub fn received(&self) -> Option<Interrupted> {
        match self.signal.load(Ordering::SeqCst) {
            0 => None,
            signal => Some(Interrupted { signal: signal as i32 }),
        }
    }
}

/// A command stopped by a signal before it finished: the process exits with
/// 128 + `signal`.
#[derive(Debug)]
pub struct Interrupted {
    pub signal: i32,
}

impl Interrupted {
    pub fn exit_code(&self) -> u8 {
        (128 + self.signal) as u8
    }
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.signal {
            SIGINT => "SIGINT (Ctrl-C)",
            SIGTERM => "SIGTERM",
            _ => "a signal",
        };
        write!(f, "stopped by {name} before the run finished")
    }
}

impl std::error::Error for Interrupted {}
