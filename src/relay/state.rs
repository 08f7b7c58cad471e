//! The relay's mode, kept for the worker's life, moved only through
//! `outbox_core::relay_state::step` (the diagram is there and in the
//! README). Feeding an input here applies the step: the status view's
//! state and a log line when the label changes, and the exit the step
//! decides (the postmaster restarts the worker after 1 s; it resumes from
//! the slot's confirmed position).

use std::cell::Cell;

use outbox_core::lsn;
use outbox_core::relay_state::{self, Exit, Input, Mode};
use pgrx::prelude::*;

use crate::shmem::{self, State};

thread_local! {
    static MODE: Cell<Mode> = const { Cell::new(Mode::Starting) };
}

pub fn mode() -> Mode {
    MODE.with(Cell::get)
}

/// Applies `input`; `detail` goes into the log line when the state changes.
/// Does not return when the step decides an exit.
pub fn feed(input: Input, detail: Option<&str>) {
    let (next, exit) = relay_state::step(mode(), input);
    MODE.with(|m| m.set(next));
    if let Some(shared) = shmem::shared() {
        let s = state_of(next);
        if shared.set_state(s) != s {
            match detail {
                Some(d) => log!("outbox relay: {} ({d})", s.name()),
                None => log!("outbox relay: {}", s.name()),
            }
        }
    }
    if let Some(exit) = exit {
        let from = shmem::shared().map_or(0, |s| s.confirmed());
        let why = match exit {
            Exit::Retry => "restarting the stream",
            Exit::Reload => "configuration reloaded; restarting",
            Exit::Resume => "resume requested; restarting",
            Exit::BatchAgain => "past the request the broker refused; restarting to send in batches again, resuming",
        };
        log!("outbox relay: {why} from {}", lsn::format(from));
        // SAFETY: proc_exit(1) runs the exit callbacks (the sink is closed,
        // the slot saved) and asks the postmaster for a restart.
        unsafe { pgrx::pg_sys::proc_exit(1) };
    }
}

fn state_of(m: Mode) -> State {
    match m {
        Mode::Starting => State::Starting,
        Mode::Disabled => State::Disabled,
        Mode::SlotInvalidated => State::SlotInvalidated,
        Mode::KeyMissing => State::KeyMissing,
        Mode::Streaming | Mode::Restarting { .. } => State::Streaming,
        Mode::WaitingForSink => State::WaitingForBroker,
        Mode::WaitingForStandby => State::WaitingForStandby,
        Mode::Stopped => State::StoppedOnBadEvent,
    }
}
