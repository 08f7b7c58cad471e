//! The WAL guard: how much WAL the outbox slot may hold back before new
//! events are refused, and when to warn on the way there.
//!
//! "Retained" is the current WAL insert position minus the slot's
//! `restart_lsn`: the WAL Postgres keeps for the slot, hence the disk the
//! relay costs. It is not the events' lag (that is the confirmed position's),
//! and it moves in steps: `restart_lsn` only advances at running-xacts
//! records (every 15 s on a busy server, or at a checkpoint).

/// Fractions of the limit at which the worker warns, in percent, rising.
pub const WARN_AT: [u8; 3] = [50, 75, 90];

/// The guard's verdict for one reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// No limit set (`outbox.max_retained_wal = -1`).
    Off,
    /// Below the limit; `percent` of it is used (0..=99).
    Within { percent: u8 },
    /// At or past the limit: new events are refused.
    Exceeded,
}

/// `limit` in bytes, `None` when the guard is off.
pub fn verdict(retained: u64, limit: Option<u64>) -> Verdict {
    match limit {
        None => Verdict::Off,
        Some(l) if retained >= l => Verdict::Exceeded,
        Some(l) => Verdict::Within { percent: ((retained as u128 * 100) / l.max(1) as u128).min(99) as u8 },
    }
}

/// The warning tier a verdict falls in: 0 below the first fraction, then the
/// highest fraction of `WARN_AT` reached, 100 when exceeded.
pub fn tier(v: Verdict) -> u8 {
    match v {
        Verdict::Off => 0,
        Verdict::Exceeded => 100,
        Verdict::Within { percent } => WARN_AT.iter().rev().copied().find(|t| percent >= *t).unwrap_or(0),
    }
}

/// Remembers the last tier reported so the log says each crossing once: a
/// warning when the tier rises, one line when it is back under the first.
#[derive(Debug, Default)]
pub struct Watch {
    reported: u8,
}

/// What the worker should log after a reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    Rose(u8),
    Cleared,
}

impl Watch {
    pub fn observe(&mut self, v: Verdict) -> Change {
        let t = tier(v);
        if t > self.reported {
            self.reported = t;
            Change::Rose(t)
        } else if t == 0 && self.reported > 0 {
            self.reported = 0;
            Change::Cleared
        } else {
            // Falling between tiers is not news; it is reported only when
            // the backlog is under the first fraction again. A later rise
            // to a tier already reported stays quiet until then.
            Change::None
        }
    }
}

/// Human-readable bytes for messages: "1.5 GB", "512 kB" (Postgres' units).
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} bytes")
    } else if v < 10.0 {
        format!("{v:.1} {}", UNITS[u])
    } else {
        format!("{v:.0} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        assert_eq!(verdict(10, None), Verdict::Off);
        assert_eq!(verdict(0, Some(100)), Verdict::Within { percent: 0 });
        assert_eq!(verdict(99, Some(100)), Verdict::Within { percent: 99 });
        assert_eq!(verdict(100, Some(100)), Verdict::Exceeded);
        assert_eq!(verdict(u64::MAX, Some(u64::MAX - 1)), Verdict::Exceeded);
        // No overflow on large values.
        assert_eq!(verdict(u64::MAX / 2, Some(u64::MAX)), Verdict::Within { percent: 49 });
    }

    #[test]
    fn tiers() {
        assert_eq!(tier(Verdict::Off), 0);
        assert_eq!(tier(Verdict::Within { percent: 49 }), 0);
        assert_eq!(tier(Verdict::Within { percent: 50 }), 50);
        assert_eq!(tier(Verdict::Within { percent: 80 }), 75);
        assert_eq!(tier(Verdict::Within { percent: 95 }), 90);
        assert_eq!(tier(Verdict::Exceeded), 100);
    }

    #[test]
    fn watch_reports_each_crossing_once() {
        let mut w = Watch::default();
        let p = |percent| Verdict::Within { percent };
        assert_eq!(w.observe(p(10)), Change::None);
        assert_eq!(w.observe(p(55)), Change::Rose(50));
        assert_eq!(w.observe(p(60)), Change::None);
        assert_eq!(w.observe(p(91)), Change::Rose(90));
        assert_eq!(w.observe(Verdict::Exceeded), Change::Rose(100));
        assert_eq!(w.observe(p(80)), Change::None);
        assert_eq!(w.observe(Verdict::Exceeded), Change::None);
        assert_eq!(w.observe(p(5)), Change::Cleared);
        assert_eq!(w.observe(p(5)), Change::None);
        assert_eq!(w.observe(p(76)), Change::Rose(75));
        // Switching the guard off clears it.
        assert_eq!(w.observe(Verdict::Off), Change::Cleared);
    }

    #[test]
    fn bytes() {
        assert_eq!(format_bytes(512), "512 bytes");
        assert_eq!(format_bytes(1536), "1.5 kB");
        assert_eq!(format_bytes(64 * 1024 * 1024), "64 MB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024 / 2), "1.5 GB");
    }
}
