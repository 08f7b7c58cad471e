//! The first write of a new producer to each partition, one at a time.
//!
//! An idempotent Kafka producer numbers its batches per partition, and the
//! broker refuses a batch whose number does not follow the last one it
//! wrote (librdkafka's gapless guarantee then stops the producer): that is
//! what keeps a refused batch from being overtaken by the ones queued after
//! it. But the broker knows nothing of a producer until one of its batches
//! is written to the partition, and accepts the first one it sees whatever
//! its number. A new producer (every stream restart makes one) sending a
//! backlog puts several requests for a partition in flight at once; if the
//! broker refuses the first (a timestamp outside the topic's window, a
//! limit lowered since the relay read it), the second is written as the
//! producer's first, ahead of the event that must come before it.
//!
//! So until the broker has written one record of this producer to a
//! partition, the partition has at most one event in flight: the next
//! waits for its report. After that first acknowledgement the broker's
//! sequence check does the rest. The cost is one round trip per partition
//! per producer.
//!
//! The broker forgets an idle producer after `producer.id.expiration.ms`
//! (a day by default); a partition that idle is not made cold again here.

use std::collections::{HashMap, HashSet};

/// Which partitions this producer has written to, and the one event in
/// flight for each it has not.
#[derive(Debug, Default)]
pub struct FirstWrites {
    /// Partitions written to, by topic.
    warm: HashMap<String, HashSet<i32>>,
    /// Events sent to a partition not yet warm: (seq, topic, partition). At
    /// most one per partition.
    first: Vec<(u64, String, i32)>,
}

impl FirstWrites {
    pub fn new() -> Self {
        Self::default()
    }

    /// The broker has written a record of this producer to the partition.
    pub fn is_warm(&self, topic: &str, partition: i32) -> bool {
        self.warm.get(topic).is_some_and(|w| w.contains(&partition))
    }

    /// Whether an event for the partition may be handed to the producer
    /// now: it is warm, or nothing is in flight for it.
    pub fn may_send(&self, topic: &str, partition: i32) -> bool {
        self.is_warm(topic, partition) || !self.first.iter().any(|(_, t, p)| *p == partition && t == topic)
    }

    /// Event `seq` was handed to the producer for the partition.
    pub fn sent(&mut self, seq: u64, topic: &str, partition: i32) {
        if !self.is_warm(topic, partition) {
            self.first.push((seq, topic.to_owned(), partition));
        }
    }

    /// Whether anything is waiting for its first acknowledgement: reports
    /// need looking at only then.
    pub fn waiting(&self) -> bool {
        !self.first.is_empty()
    }

    /// The report for `seq`: written (`ok`) makes its partition warm; a
    /// failure leaves it cold, with nothing in flight.
    pub fn reported(&mut self, seq: u64, ok: bool) {
        if let Some(i) = self.first.iter().position(|(s, _, _)| *s == seq) {
            let (_, topic, partition) = self.first.swap_remove(i);
            if ok {
                self.warm.entry(topic).or_default().insert(partition);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cold_partition_takes_one_event_until_it_is_acknowledged() {
        let mut f = FirstWrites::new();
        assert!(f.may_send("t", 0));
        f.sent(1, "t", 0);
        assert!(!f.may_send("t", 0), "the second event waits for the first report");
        assert!(f.may_send("t", 1) && f.may_send("u", 0), "other partitions are not held");
        assert!(f.waiting());
        f.reported(1, true);
        assert!(f.is_warm("t", 0) && !f.waiting());
        f.sent(2, "t", 0);
        f.sent(3, "t", 0);
        assert!(f.may_send("t", 0), "a warm partition is not held");
        assert!(!f.waiting(), "events to a warm partition are not tracked");
    }

    #[test]
    fn a_failed_first_write_leaves_the_partition_cold_and_free() {
        let mut f = FirstWrites::new();
        f.sent(7, "t", 2);
        f.reported(8, true);
        assert!(!f.may_send("t", 2), "another event's report changes nothing");
        f.reported(7, false);
        assert!(f.may_send("t", 2) && !f.is_warm("t", 2));
        f.sent(9, "t", 2);
        assert!(!f.may_send("t", 2), "the next event is the partition's first again");
        f.reported(9, true);
        assert!(f.is_warm("t", 2));
    }
}
