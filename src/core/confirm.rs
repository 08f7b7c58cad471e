//! Which position of the slot may be confirmed.
//!
//! Kafka acknowledges out of order across partitions, so the slot may be
//! confirmed only up to the end LSN of the last transaction T such that T and
//! every transaction committed before it are fully acknowledged. Confirming
//! further would lose the unacknowledged events on a restart, because
//! decoding resumes after the confirmed position.
//!
//! The tracker keeps one entry per transaction with events in flight, in
//! commit order. A transaction is *sealed* once all its events have been
//! handed to the producer (its commit record has been fully replayed); only
//! sealed transactions can be confirmed, so a large transaction whose first
//! events are acknowledged while later ones are still being decoded is not
//! confirmed early.

use std::collections::VecDeque;

#[derive(Debug)]
struct Txn {
    commit_lsn: u64,
    commit_time: i64,
    outstanding: u64,
    sealed: bool,
}

/// A handle naming one transaction in the tracker, carried through the
/// producer as the delivery report's opaque value.
pub type TxnSeq = u64;

#[derive(Debug, Default)]
pub struct Tracker {
    txns: VecDeque<Txn>,
    /// Sequence number of `txns[0]`.
    base: TxnSeq,
    /// End LSN of the last transaction known fully acknowledged.
    confirmable: u64,
    in_flight: u64,
}

impl Tracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one event of the transaction committing at `commit_lsn`
    /// handed to the producer; returns the handle its acknowledgement must
    /// carry. Events arrive in commit order.
    pub fn sent(&mut self, commit_lsn: u64) -> TxnSeq {
        self.sent_at(commit_lsn, 0)
    }

    /// [`Tracker::sent`], remembering the transaction's commit time.
    pub fn sent_at(&mut self, commit_lsn: u64, commit_time: i64) -> TxnSeq {
        match self.txns.back_mut() {
            Some(t) if t.commit_lsn == commit_lsn && !t.sealed => t.outstanding += 1,
            _ => {
                debug_assert!(self.txns.back().is_none_or(|t| t.commit_lsn < commit_lsn));
                self.txns.push_back(Txn { commit_lsn, commit_time, outstanding: 1, sealed: false });
            }
        }
        self.in_flight += 1;
        self.base + self.txns.len() as u64 - 1
    }

    /// Every event decoded so far has been handed to the producer: the
    /// transactions seen so far are complete.
    pub fn seal(&mut self) {
        for t in self.txns.iter_mut().rev() {
            if t.sealed {
                break;
            }
            t.sealed = true;
        }
        self.advance();
    }

    /// One event of transaction `seq` was acknowledged by Kafka; returns
    /// its transaction's commit time (for latency), if it was in flight.
    pub fn acked(&mut self, seq: TxnSeq) -> Option<i64> {
        let idx = seq.checked_sub(self.base)?;
        let mut time = None;
        if let Some(t) = self.txns.get_mut(idx as usize) {
            if t.outstanding > 0 {
                t.outstanding -= 1;
                self.in_flight -= 1;
                time = Some(t.commit_time);
            }
        }
        self.advance();
        time
    }

    fn advance(&mut self) {
        while let Some(t) = self.txns.front() {
            if !(t.sealed && t.outstanding == 0) {
                break;
            }
            self.confirmable = self.confirmable.max(t.commit_lsn);
            self.txns.pop_front();
            self.base += 1;
        }
    }

    /// Events handed to the producer and not yet acknowledged.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// The position that may be confirmed, given that the decoder has read
    /// (and handed to the producer) everything before `read_upto`: with
    /// nothing in flight, that is the read position itself, so a database with
    /// no outbox traffic does not retain WAL.
    pub fn confirmable(&self, read_upto: u64) -> u64 {
        if self.txns.is_empty() {
            self.confirmable.max(read_upto)
        } else {
            self.confirmable
        }
    }

    /// Commit LSN of the oldest transaction not yet fully acknowledged.
    pub fn oldest_unacked(&self) -> Option<u64> {
        self.txns.front().map(|t| t.commit_lsn)
    }

    /// Commit LSN and commit time of transaction `seq`, while it is tracked.
    pub fn commit_of(&self, seq: TxnSeq) -> Option<(u64, i64)> {
        seq.checked_sub(self.base).and_then(|i| self.txns.get(i as usize)).map(|t| (t.commit_lsn, t.commit_time))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_order_acks_confirm_only_a_contiguous_prefix() {
        let mut t = Tracker::new();
        let a = t.sent(100);
        let a2 = t.sent(100);
        let b = t.sent(200);
        let c = t.sent(300);
        t.seal();
        assert_eq!(t.confirmable(400), 0);
        t.acked(c); // a later transaction first: nothing may be confirmed
        t.acked(b);
        assert_eq!(t.confirmable(400), 0);
        t.acked(a);
        assert_eq!(t.confirmable(400), 0, "a has a second event in flight");
        t.acked(a2);
        assert_eq!(t.confirmable(400), 400, "everything acknowledged: the read position");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn prefix_stops_at_the_first_unacknowledged_transaction() {
        let mut t = Tracker::new();
        let a = t.sent(100);
        let _b = t.sent(200);
        let c = t.sent_at(300, 77);
        t.seal();
        assert_eq!(t.acked(c), Some(77));
        assert_eq!(t.acked(c), None, "a duplicate report is ignored");
        t.acked(a);
        t.acked(c);
        assert_eq!(t.confirmable(999), 100);
        assert_eq!(t.oldest_unacked(), Some(200));
    }

    #[test]
    fn an_unsealed_transaction_is_not_confirmed_even_if_acked() {
        let mut t = Tracker::new();
        let a = t.sent(100);
        t.acked(a); // acked while its transaction is still being replayed
        assert_eq!(t.confirmable(150), 0);
        let a2 = t.sent(100);
        t.seal();
        assert_eq!(t.confirmable(150), 0);
        t.acked(a2);
        assert_eq!(t.confirmable(150), 150);
    }

    #[test]
    fn idle_stream_confirms_the_read_position() {
        let t = Tracker::new();
        assert_eq!(t.confirmable(12345), 12345);
    }

    #[test]
    fn stale_or_duplicate_acks_are_ignored() {
        let mut t = Tracker::new();
        let a = t.sent(100);
        t.seal();
        t.acked(a);
        t.acked(a);
        t.acked(a + 10);
        assert_eq!(t.in_flight(), 0);
        assert_eq!(t.confirmable(100), 100);
        let b = t.sent(200);
        assert_eq!(t.commit_of(b).map(|(l, _)| l), Some(200));
        assert_eq!(t.commit_of(a), None);
    }

    /// Exhaustive check against a simple model: for every order of acks of a
    /// small workload, the confirmed position never passes an
    /// unacknowledged transaction and ends at the read position.
    #[test]
    fn never_confirms_past_an_unacknowledged_event_in_any_ack_order() {
        let events: Vec<u64> = vec![10, 10, 20, 30, 30, 30];
        let n = events.len();
        let mut order: Vec<usize> = (0..n).collect();
        // Heap's algorithm over all permutations of ack order.
        let mut c = vec![0usize; n];
        let check = |order: &[usize]| {
            let mut t = Tracker::new();
            let seqs: Vec<TxnSeq> = events.iter().map(|&l| t.sent(l)).collect();
            t.seal();
            let mut acked = vec![false; n];
            for &i in order {
                t.acked(seqs[i]);
                acked[i] = true;
                let conf = t.confirmable(40);
                for (j, &l) in events.iter().enumerate() {
                    if !acked[j] {
                        assert!(conf < l, "confirmed {conf} past unacked event at {l}");
                    }
                }
            }
            assert_eq!(t.confirmable(40), 40);
        };
        check(&order);
        let mut i = 0;
        while i < n {
            if c[i] < i {
                if i % 2 == 0 { order.swap(0, i) } else { order.swap(c[i], i) }
                check(&order);
                c[i] += 1;
                i = 0;
            } else {
                c[i] = 0;
                i += 1;
            }
        }
    }
}
