//! Delivery bookkeeping: every event handed to the sink until it is settled
//! (acknowledged, or dead-lettered), and what that allows: which slot
//! position may be confirmed, which rows of the outbox table may be
//! deleted, whether the sink has gone silent, whether a restart has drained.
//!
//! The relay owns one `Ledger` per stream. It is told what happens (sent,
//! acknowledged, failed, dead-lettered) and asks, once per turn of its loop,
//! [`Ledger::settle`] what to do. Time comes in as an argument (`now`), so
//! every decision here is tested with a fake clock.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::confirm::{Tracker, TxnSeq};

/// No acknowledgement for this long with events in flight: the sink is
/// reported unreachable (never acted on: the sink keeps retrying).
pub const SINK_SILENCE: Duration = Duration::from_secs(3);

/// Settled table rows are deleted in batches: once this many wait, or the
/// first has waited [`ROW_DELETE_DELAY`]. Each delete is a transaction of
/// the worker's own (a commit with its WAL flush, WAL the relay decodes
/// again); one per settle cost the table path a transaction every few
/// events. The slot is confirmed past a row only once it is deleted, so a
/// crash leaves no published row behind: it is decoded and sent again.
pub const ROW_DELETE_BATCH: usize = 1000;
pub const ROW_DELETE_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug)]
pub struct Ledger {
    tracker: Tracker,
    /// Commit times of transactions in flight, oldest first: (commit LSN, time).
    commit_times: VecDeque<(u64, i64)>,
    /// Rows of the extension's table sent, to delete once settled: (commit
    /// LSN, id). Kept apart from adopted rows and as bare ids: one entry per
    /// event of a transaction in flight, so a 200k-row transaction holds
    /// 200k of them (24 bytes each here, not the size of an adopted row).
    table_rows: VecDeque<(u64, [u8; 16])>,
    /// Rows of adopted tables (`delete.published.rows`) sent: (commit LSN, row).
    adopted_rows: VecDeque<(u64, AdoptedRow)>,
    /// Events whose delivery failed: no longer in flight at the sink, never
    /// settled (so the slot is never confirmed past them).
    failed: u64,
    /// The last acknowledgement, or when the first event went in flight.
    last_ack: Instant,
    /// Acknowledged since the last settle: (events, bytes).
    published: (u64, u64),
    /// Settled rows not deleted yet, and since when the first has waited.
    ready_rows: Vec<[u8; 16]>,
    ready_adopted: Vec<AdoptedRow>,
    ready_since: Option<Instant>,
    /// The position confirmed last; while rows wait, it is not passed.
    confirmed: u64,
}

/// A table row whose event, once settled, lets the row be deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A row of the extension's own table, by its id.
    Own([u8; 16]),
    /// A row of an adopted table with `delete.published.rows` on.
    Adopted(AdoptedRow),
}

/// A row of an adopted table to delete once its event is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdoptedRow {
    /// The table, as `outbox.tables` names it.
    pub table: String,
    /// Its id column, and the id's text.
    pub column: String,
    pub id: String,
}

/// What one settle step found.
#[derive(Debug, PartialEq, Eq)]
pub struct Settlement {
    /// The position that may be confirmed now.
    pub confirmable: u64,
    /// Ids of the extension's table rows whose events are settled up to
    /// `confirmable`.
    pub delete_rows: Vec<[u8; 16]>,
    /// Adopted tables' rows whose events are settled up to `confirmable`.
    pub delete_adopted: Vec<AdoptedRow>,
    pub in_flight: u64,
    /// Commit time of the oldest transaction not yet settled (0: none).
    pub oldest_commit_time: i64,
    /// Events in flight and no acknowledgement for [`SINK_SILENCE`].
    pub sink_silent: bool,
    /// Everything still in flight has failed: a restart loses nothing by
    /// not waiting longer.
    pub drained: bool,
    /// Acknowledged since the previous settle: (events, bytes).
    pub published: (u64, u64),
}

impl Ledger {
    pub fn new(now: Instant) -> Self {
        Ledger {
            tracker: Tracker::new(),
            commit_times: VecDeque::new(),
            table_rows: VecDeque::new(),
            adopted_rows: VecDeque::new(),
            failed: 0,
            last_ack: now,
            published: (0, 0),
            ready_rows: Vec::new(),
            ready_adopted: Vec::new(),
            ready_since: None,
            confirmed: 0,
        }
    }

    /// Registers an event before anything can fail it: an event that is
    /// never settled holds the confirmed position before its transaction,
    /// whatever stops it. `table_row` is its row id when it came from the
    /// outbox table. Returns the handle its acknowledgement carries.
    pub fn sent(&mut self, commit_lsn: u64, commit_time: i64, table_row: Option<Row>, now: Instant) -> TxnSeq {
        if self.tracker.in_flight() == 0 {
            // Silence is measured from the first event in flight.
            self.last_ack = now;
        }
        let seq = self.tracker.sent_at(commit_lsn, commit_time);
        if self.commit_times.back().map(|(l, _)| *l) != Some(commit_lsn) {
            self.commit_times.push_back((commit_lsn, commit_time));
        }
        match table_row {
            Some(Row::Own(id)) => self.table_rows.push_back((commit_lsn, id)),
            Some(Row::Adopted(row)) => self.adopted_rows.push_back((commit_lsn, row)),
            None => {}
        }
        seq
    }

    /// Every event decoded so far has been handed over.
    pub fn seal(&mut self) {
        self.tracker.seal();
    }

    /// The sink acknowledged `seq` (`bytes` of key and value); returns its
    /// commit time, for latency, if it was in flight.
    pub fn acked(&mut self, seq: TxnSeq, bytes: u64, now: Instant) -> Option<i64> {
        let t = self.tracker.acked(seq);
        if t.is_some() {
            self.published.0 += 1;
            self.published.1 += bytes;
        }
        self.last_ack = now;
        t
    }

    /// Settled without the sink: dead-lettered, or already in the
    /// dead-letter table from before a restart. `was_failed`: its delivery
    /// had failed (it was counted by [`Ledger::failed`]).
    pub fn settled_elsewhere(&mut self, seq: TxnSeq, was_failed: bool) {
        self.tracker.acked(seq);
        if was_failed {
            self.failed = self.failed.saturating_sub(1);
        }
    }

    /// The sink reported `seq` failed; returns its (commit LSN, commit time).
    pub fn failed(&mut self, seq: TxnSeq) -> (u64, i64) {
        self.failed += 1;
        self.tracker.commit_of(seq).unwrap_or((0, 0))
    }

    pub fn in_flight(&self) -> u64 {
        self.tracker.in_flight()
    }

    /// Silent now? (Also asked while the relay waits inside decoding.)
    pub fn sink_silent(&self, now: Instant) -> bool {
        self.tracker.in_flight() > 0 && now.saturating_duration_since(self.last_ack) >= SINK_SILENCE
    }

    /// One settle step, given that everything before `read_upto` has been
    /// decoded and handed over. Settled table rows are handed out for
    /// deletion in batches (see [`ROW_DELETE_BATCH`]), or at once with
    /// `flush` (the stream is about to end); until they are, the position
    /// confirmed stays before them.
    pub fn settle(&mut self, read_upto: u64, now: Instant, flush: bool) -> Settlement {
        let settled_upto = self.tracker.confirmable(read_upto);
        let rows = settled(&mut self.table_rows, settled_upto);
        let adopted = settled(&mut self.adopted_rows, settled_upto);
        if !rows.is_empty() || !adopted.is_empty() {
            self.ready_since.get_or_insert(now);
        }
        self.ready_rows.extend(rows);
        self.ready_adopted.extend(adopted);
        let waiting = self.ready_rows.len() + self.ready_adopted.len();
        let due = flush
            || waiting >= ROW_DELETE_BATCH
            || self.ready_since.is_some_and(|t| now.saturating_duration_since(t) >= ROW_DELETE_DELAY);
        let (confirmable, delete_rows, delete_adopted) = if waiting == 0 || due {
            self.ready_since = None;
            (settled_upto, std::mem::take(&mut self.ready_rows), std::mem::take(&mut self.ready_adopted))
        } else {
            // Rows wait: their transactions all ended after the position
            // confirmed last (they became settled after it), so it is kept.
            (self.confirmed, Vec::new(), Vec::new())
        };
        self.confirmed = self.confirmed.max(confirmable);
        while self.commit_times.front().is_some_and(|(l, _)| *l <= settled_upto) {
            self.commit_times.pop_front();
        }
        let in_flight = self.tracker.in_flight();
        Settlement {
            confirmable,
            delete_rows,
            delete_adopted,
            in_flight,
            oldest_commit_time: self.commit_times.front().map_or(0, |(_, t)| *t),
            sink_silent: self.sink_silent(now),
            drained: in_flight <= self.failed,
            published: std::mem::take(&mut self.published),
        }
    }
}

/// Takes the rows of transactions up to `confirmable` off the front.
fn settled<T>(rows: &mut VecDeque<(u64, T)>, confirmable: u64) -> Vec<T> {
    let n = rows.iter().take_while(|(l, _)| *l <= confirmable).count();
    rows.drain(..n).map(|(_, r)| r).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn rows_are_deleted_only_once_their_transaction_is_confirmable() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        let a = l.sent(100, 1, Some(Row::Own([1; 16])), t0);
        let b = l.sent(200, 2, Some(Row::Own([2; 16])), t0);
        l.seal();
        l.acked(b, 10, t0);
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.delete_rows.len(), s.oldest_commit_time), (0, 0, 1));
        assert_eq!(s.published, (1, 10), "b counted once acknowledged");
        l.acked(a, 10, t0);
        let s = l.settle(300, t0, true);
        assert_eq!(s.confirmable, 300);
        assert_eq!(s.delete_rows, vec![[1; 16], [2; 16]]);
        assert_eq!(s.published, (1, 10));
        assert_eq!(l.settle(300, t0, true).published, (0, 0), "counted once");
    }

    #[test]
    fn silence_is_measured_from_the_first_event_in_flight_and_reset_by_an_ack() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        assert!(!l.settle(0, at(t0, 10_000), true).sink_silent, "nothing in flight is never silence");
        let a = l.sent(100, 0, None, at(t0, 10_000));
        assert!(!l.settle(0, at(t0, 12_999), true).sink_silent);
        assert!(l.settle(0, at(t0, 13_000), true).sink_silent);
        let b = l.sent(200, 0, None, at(t0, 13_000));
        l.acked(a, 0, at(t0, 14_000));
        assert!(!l.settle(0, at(t0, 16_999), true).sink_silent);
        assert!(l.settle(0, at(t0, 17_000), true).sink_silent, "b still unacknowledged 3 s after the last ack");
        l.acked(b, 0, at(t0, 17_001));
        assert!(!l.settle(300, at(t0, 60_000), true).sink_silent);
    }

    #[test]
    fn a_failed_event_holds_the_position_and_counts_toward_draining() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        let a = l.sent(100, 5, None, t0);
        let b = l.sent(200, 6, None, t0);
        l.seal();
        assert_eq!(l.failed(a), (100, 5));
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.drained), (0, false), "b is still in flight");
        l.acked(b, 1, t0);
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.drained), (0, true), "never confirmed past the failed event");
        // Dead-lettered: settled, and no longer counted as failed.
        l.settled_elsewhere(a, true);
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.in_flight), (300, 0));
    }

    #[test]
    fn an_event_known_dead_before_a_restart_is_settled_without_the_sink() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        let a = l.sent(100, 0, Some(Row::Own([7; 16])), t0);
        l.settled_elsewhere(a, false);
        l.seal();
        let s = l.settle(150, t0, true);
        assert_eq!(s.confirmable, 150);
        assert_eq!(s.delete_rows, vec![[7; 16]]);
        assert_eq!(s.published, (0, 0), "not counted as published");
    }

    #[test]
    fn adopted_rows_are_released_with_their_transaction_beside_own_rows() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        let row = |id: &str| AdoptedRow { table: "app.outbox".into(), column: "id".into(), id: id.into() };
        let a = l.sent(100, 0, Some(Row::Adopted(row("1"))), t0);
        let b = l.sent(100, 0, Some(Row::Own([3; 16])), t0);
        let c = l.sent(200, 0, Some(Row::Adopted(row("2"))), t0);
        l.seal();
        for s in [a, b] {
            l.acked(s, 1, t0);
        }
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.delete_rows, s.delete_adopted), (100, vec![[3; 16]], vec![row("1")]));
        l.acked(c, 1, t0);
        let s = l.settle(300, t0, true);
        assert_eq!((s.confirmable, s.delete_rows, s.delete_adopted), (300, vec![], vec![row("2")]));
        let s = l.settle(300, t0, true);
        assert!(s.delete_rows.is_empty() && s.delete_adopted.is_empty(), "released once");
    }

    #[test]
    fn settled_rows_are_deleted_in_batches_and_the_position_waits_for_them() {
        let t0 = Instant::now();
        let mut l = Ledger::new(t0);
        let a = l.sent(100, 1, None, t0);
        l.seal();
        l.acked(a, 1, t0);
        assert_eq!(l.settle(150, t0, false).confirmable, 150, "no rows: confirmed at once");
        let b = l.sent(200, 2, Some(Row::Own([2; 16])), t0);
        let c = l.sent(300, 3, None, t0);
        l.seal();
        l.acked(b, 1, t0);
        l.acked(c, 1, t0);
        let s = l.settle(350, at(t0, 10), false);
        assert_eq!((s.confirmable, s.delete_rows.len()), (150, 0), "the row waits, and the position before it");
        let d = l.sent(400, 4, Some(Row::Own([4; 16])), at(t0, 50));
        l.seal();
        l.acked(d, 1, at(t0, 50));
        assert_eq!(l.settle(450, at(t0, 109), false).confirmable, 150, "still within the delay of the first row");
        let s = l.settle(450, at(t0, 110), false);
        assert_eq!((s.confirmable, s.delete_rows), (450, vec![[2; 16], [4; 16]]), "due: every waiting row, then the position");
        assert_eq!(l.settle(450, at(t0, 120), false).delete_rows.len(), 0, "handed out once");

        let mut l = Ledger::new(t0);
        for i in 0..ROW_DELETE_BATCH as u64 {
            let s = l.sent(100 + i, 0, Some(Row::Own([1; 16])), t0);
            l.acked(s, 1, t0);
        }
        l.seal();
        assert_eq!(l.settle(5000, t0, false).delete_rows.len(), ROW_DELETE_BATCH, "a full batch goes at once");

        let mut l = Ledger::new(t0);
        let e = l.sent(100, 0, Some(Row::Adopted(AdoptedRow { table: "t".into(), column: "id".into(), id: "7".into() })), t0);
        l.seal();
        l.acked(e, 1, t0);
        let s = l.settle(150, t0, true);
        assert_eq!((s.confirmable, s.delete_adopted.len()), (150, 1), "flush: at once (the stream is ending)");
    }
}
