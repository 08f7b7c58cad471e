//! The relay's modes and the one function that moves between them.
//!
//! ```text
//!  starting ─┬─► disabled ──────────── (relay_enabled = on) ──┐
//!            ├─► slot invalidated ──── (slot dropped) ────────┤
//!            ├─► key missing ───────── (key restored) ────────┤
//!            └────────────────────────────────────────────────┴─► streaming
//!
//!  streaming ◄──► waiting for broker    sink silent 3 s with events in flight,
//!      ▲  │                             topic check unreachable, local queue full
//!      │  └──► waiting for standby      17+: synchronized_standby_slots behind
//!      │
//!      ├── transient failure ──► restarting { deadline, not_before }
//!      │                            └─ not_before passed and (drained or deadline) ─► EXIT
//!      ├── permanent rejection, on_rejected_event = stop ──► stopped on bad event
//!      │                            └─ reload or outbox_relay_resume() ─► EXIT
//!      └── reload that changes the sink's settings, or past a batch isolation ─► EXIT
//!  EXIT: the worker exits with 1; the postmaster starts it again after 1 s and
//!  it resumes from the slot's confirmed position (re-sending what was unconfirmed).
//! ```
//!
//! Decoding runs only in the streaming modes; a dead-lettered event (policy
//! `dead_letter`) does not change the mode.

use std::time::{Duration, Instant};

/// After a transient delivery failure, how long in-flight events may take to
/// settle before the stream restarts anyway.
pub const RESTART_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Starting,
    Disabled,
    SlotInvalidated,
    KeyMissing,
    Streaming,
    WaitingForSink,
    WaitingForStandby,
    /// A transient failure: nothing more is sent; exit once `not_before`
    /// (the retry backoff) has passed and everything in flight has settled
    /// or failed, or at `deadline` whatever is still in flight.
    Restarting { deadline: Instant, not_before: Instant },
    /// A permanent rejection under `on_rejected_event = stop`: the slot's
    /// position is held until a reload or `outbox_relay_resume()`.
    Stopped,
}

/// What the relay saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A pre-start wait: the relay is disabled, its slot invalidated or the
    /// key missing.
    Waiting(Mode),
    /// The decoding context exists: streaming starts.
    Started,
    /// One turn's settle step.
    Settled { sink_silent: bool, drained: bool, now: Instant },
    /// The sink cannot be reached right now (topic check, full local queue).
    SinkUnreachable,
    StandbyBehind,
    StandbyCaughtUp,
    TransientFailure { now: Instant, backoff: Duration },
    /// A permanent rejection the policy does not dead-letter.
    Rejected,
    /// A configuration reload; `restart_needed`: the sink's settings changed
    /// or the relay was disabled.
    Reloaded { restart_needed: bool },
    ResumeRequested,
    /// The events of a refused batch are settled: send in batches again.
    PastIsolation,
}

/// Why the worker exits (to be restarted by the postmaster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// After a transient failure, to re-send from the confirmed position.
    Retry,
    /// A reload changed what the stream depends on, or resumed a stop.
    Reload,
    Resume,
    /// Back to batched sending after isolating a refused batch.
    BatchAgain,
}

impl Mode {
    /// The status view's `state`.
    pub fn label(self) -> &'static str {
        match self {
            Mode::Starting => "starting",
            Mode::Disabled => "disabled",
            Mode::SlotInvalidated => "slot invalidated",
            Mode::KeyMissing => "key missing",
            Mode::Streaming => "streaming",
            Mode::WaitingForSink => "waiting for broker",
            Mode::WaitingForStandby => "waiting for standby",
            // Still streaming as far as an operator can tell: the restart is
            // a second or two away and logged.
            Mode::Restarting { .. } => "streaming",
            Mode::Stopped => "stopped on bad event",
        }
    }

    /// Whether events are decoded and sent in this mode.
    pub fn sends(self) -> bool {
        matches!(self, Mode::Streaming | Mode::WaitingForSink | Mode::WaitingForStandby)
    }
}

/// The one transition function: the next mode, and whether to exit.
pub fn step(mode: Mode, input: Input) -> (Mode, Option<Exit>) {
    use Input as I;
    use Mode as M;
    match (mode, input) {
        (_, I::Waiting(w)) => (w, None),
        (_, I::Started) => (M::Streaming, None),
        (M::Stopped, I::Reloaded { .. }) => (M::Stopped, Some(Exit::Reload)),
        (_, I::Reloaded { restart_needed: true }) => (mode, Some(Exit::Reload)),
        (_, I::Reloaded { restart_needed: false }) => (mode, None),
        (M::Stopped, I::ResumeRequested) => (M::Stopped, Some(Exit::Resume)),
        (_, I::ResumeRequested) => (mode, None),
        (M::Restarting { deadline, not_before }, I::Settled { drained, now, .. }) => {
            let exit = now >= not_before && (drained || now >= deadline);
            (mode, exit.then_some(Exit::Retry))
        }
        (M::Streaming | M::WaitingForSink, I::Settled { sink_silent, .. }) => {
            (if sink_silent { M::WaitingForSink } else { M::Streaming }, None)
        }
        (m, I::Settled { .. }) => (m, None),
        (M::Streaming | M::WaitingForSink, I::SinkUnreachable) => (M::WaitingForSink, None),
        (M::Streaming | M::WaitingForSink, I::StandbyBehind) => (M::WaitingForStandby, None),
        (M::WaitingForStandby, I::StandbyCaughtUp) => (M::Streaming, None),
        (m, I::SinkUnreachable | I::StandbyBehind | I::StandbyCaughtUp) => (m, None),
        (m, I::TransientFailure { now, backoff }) if m.sends() => {
            (M::Restarting { deadline: now + RESTART_DRAIN, not_before: now + backoff }, None)
        }
        (m, I::Rejected) if m.sends() => (M::Stopped, None),
        // The first failure since the stream started decides.
        (m, I::TransientFailure { .. } | I::Rejected) => (m, None),
        (m, I::PastIsolation) if m.sends() => (m, Some(Exit::BatchAgain)),
        (m, I::PastIsolation) => (m, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn silence_moves_between_streaming_and_waiting() {
        let now = Instant::now();
        let (m, e) = step(Mode::Streaming, Input::Settled { sink_silent: true, drained: false, now });
        assert_eq!((m, e), (Mode::WaitingForSink, None));
        assert_eq!(m.label(), "waiting for broker");
        let (m, _) = step(m, Input::Settled { sink_silent: false, drained: false, now });
        assert_eq!(m, Mode::Streaming);
        assert_eq!(step(m, Input::SinkUnreachable).0, Mode::WaitingForSink);
        assert_eq!(step(Mode::Stopped, Input::SinkUnreachable).0, Mode::Stopped, "a stop is not hidden");
    }

    #[test]
    fn a_transient_failure_exits_after_the_backoff_once_drained_or_at_the_deadline() {
        let t0 = Instant::now();
        let (m, e) = step(Mode::Streaming, Input::TransientFailure { now: t0, backoff: Duration::from_secs(2) });
        assert_eq!(e, None);
        assert!(!m.sends(), "nothing more is sent");
        let settled = |ms, drained| Input::Settled { sink_silent: false, drained, now: at(t0, ms) };
        assert_eq!(step(m, settled(1_999, true)).1, None, "backoff not over");
        assert_eq!(step(m, settled(2_000, true)).1, Some(Exit::Retry));
        assert_eq!(step(m, settled(5_000, false)).1, None, "still draining");
        assert_eq!(step(m, settled(10_000, false)).1, Some(Exit::Retry), "the drain deadline");
        // A second failure does not move the deadlines.
        let (m2, _) = step(m, Input::TransientFailure { now: at(t0, 9_000), backoff: Duration::from_secs(8) });
        assert_eq!(m2, m);
        let (m3, _) = step(m, Input::Rejected);
        assert_eq!(m3, m, "the first failure decides");
    }

    #[test]
    fn a_stop_holds_until_a_reload_or_a_resume() {
        let now = Instant::now();
        let (m, e) = step(Mode::WaitingForStandby, Input::Rejected);
        assert_eq!((m, e), (Mode::Stopped, None));
        assert_eq!(m.label(), "stopped on bad event");
        assert_eq!(step(m, Input::Settled { sink_silent: true, drained: true, now }), (Mode::Stopped, None));
        assert_eq!(step(m, Input::PastIsolation).1, None);
        assert_eq!(step(m, Input::Reloaded { restart_needed: false }).1, Some(Exit::Reload));
        assert_eq!(step(m, Input::ResumeRequested).1, Some(Exit::Resume));
        assert_eq!(step(Mode::Streaming, Input::ResumeRequested), (Mode::Streaming, None), "resume only a stop");
    }

    #[test]
    fn reloads_exit_only_when_the_stream_depends_on_what_changed() {
        assert_eq!(step(Mode::Streaming, Input::Reloaded { restart_needed: false }), (Mode::Streaming, None));
        assert_eq!(step(Mode::Streaming, Input::Reloaded { restart_needed: true }).1, Some(Exit::Reload));
        assert_eq!(step(Mode::Streaming, Input::PastIsolation).1, Some(Exit::BatchAgain));
    }

    #[test]
    fn the_standby_wait_returns_to_streaming() {
        let (m, _) = step(Mode::Streaming, Input::StandbyBehind);
        assert_eq!(m.label(), "waiting for standby");
        assert!(m.sends());
        assert_eq!(step(m, Input::StandbyCaughtUp).0, Mode::Streaming);
        assert_eq!(step(Mode::Stopped, Input::StandbyBehind).0, Mode::Stopped);
    }

    #[test]
    fn pre_start_waits_then_streaming() {
        let mut m = Mode::Starting;
        for w in [Mode::Disabled, Mode::SlotInvalidated, Mode::KeyMissing] {
            m = step(m, Input::Waiting(w)).0;
            assert_eq!(m, w);
            assert!(!m.sends());
        }
        assert_eq!(step(m, Input::Started).0, Mode::Streaming);
    }
}
