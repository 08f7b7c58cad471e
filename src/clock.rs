//! The shell's one clock. Decisions about time are made in the core
//! (`outbox_core::ledger`, `outbox_core::relay_state`) with `now` passed in,
//! and tested there with a fake clock; the shell reads the real one here.

use std::time::Instant;

pub fn now() -> Instant {
    Instant::now()
}
