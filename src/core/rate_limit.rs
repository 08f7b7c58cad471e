//! Logging that cannot flood the server log: the first occurrence is said at
//! once, later ones at most once per interval, with how many were not said.
//! The clock is the caller's (milliseconds from any fixed origin), so the
//! decisions are tested without waiting.

#[derive(Debug, Clone)]
pub struct RateLimit {
    interval_ms: u64,
    last_ms: Option<u64>,
    unsaid: u64,
}

impl RateLimit {
    pub const fn new(interval_ms: u64) -> Self {
        RateLimit { interval_ms, last_ms: None, unsaid: 0 }
    }

    /// One more occurrence at `now_ms`. `Some(n)`: log now, mentioning the
    /// `n` occurrences before this one that were not logged; `None`: stay quiet.
    pub fn note(&mut self, now_ms: u64) -> Option<u64> {
        let due = match self.last_ms {
            None => true,
            Some(last) => now_ms.saturating_sub(last) >= self.interval_ms,
        };
        if due {
            self.last_ms = Some(now_ms);
            Some(std::mem::take(&mut self.unsaid))
        } else {
            self.unsaid += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::RateLimit;

    #[test]
    fn first_at_once_then_once_per_interval_with_the_unsaid_count() {
        let mut r = RateLimit::new(60_000);
        assert_eq!(r.note(1_000), Some(0));
        for t in 1_001..1_101 {
            assert_eq!(r.note(t), None);
        }
        assert_eq!(r.note(60_999), None);
        assert_eq!(r.note(61_000), Some(101));
        assert_eq!(r.note(61_001), None);
        assert_eq!(r.note(200_000), Some(1));
    }
}
