//! Transient delivery failures that keep coming back. A failure librdkafka
//! could not retry away restarts the stream from the confirmed position,
//! which re-sends everything after it; an error that is really permanent
//! for this event but not on the permanent list (say RECORD_LIST_TOO_LARGE)
//! would do that forever. So restarts for the same event back off, and after
//! [`MAX_ATTEMPTS`] the failure is treated as permanent
//! (`outbox.on_rejected_event` decides: dead letter or stop).
//!
//! The streak must outlive the worker (a restart is a new process), so the
//! shell keeps it in shared memory; the decision is made here.

use std::time::Duration;

/// Attempts at one event, the first included, before giving up.
pub const MAX_ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Consecutive transient failures of one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streak {
    pub event: [u8; 16],
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Restart the stream, not before `backoff` has passed.
    Restart { backoff: Duration },
    /// Stop retrying: handle the event as permanently rejected.
    GiveUp,
}

/// What to do after `event` failed transiently, given the streak so far.
pub fn after_transient_failure(prev: Option<Streak>, event: [u8; 16]) -> (Streak, Next) {
    let attempts = match prev {
        Some(s) if s.event == event => s.attempts.saturating_add(1),
        _ => 1,
    };
    let streak = Streak { event, attempts };
    if attempts >= MAX_ATTEMPTS {
        return (streak, Next::GiveUp);
    }
    let backoff = FIRST_BACKOFF.saturating_mul(1 << (attempts - 1).min(16)).min(MAX_BACKOFF);
    (streak, Next::Restart { backoff })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_event_backs_off_then_is_given_up() {
        let a = [1u8; 16];
        let mut streak = None;
        let mut waits = Vec::new();
        loop {
            let (s, next) = after_transient_failure(streak, a);
            streak = Some(s);
            match next {
                Next::Restart { backoff } => waits.push(backoff.as_secs()),
                Next::GiveUp => break,
            }
        }
        assert_eq!(waits, vec![1, 2, 4, 8]);
        assert_eq!(streak.map(|s| s.attempts), Some(MAX_ATTEMPTS));
    }

    #[test]
    fn another_event_starts_a_new_streak() {
        let (s, _) = after_transient_failure(Some(Streak { event: [1; 16], attempts: 4 }), [2; 16]);
        assert_eq!(s, Streak { event: [2; 16], attempts: 1 });
        let (_, next) = after_transient_failure(Some(Streak { event: [2; 16], attempts: 3 }), [2; 16]);
        assert_eq!(next, Next::Restart { backoff: Duration::from_secs(8) });
    }
}
