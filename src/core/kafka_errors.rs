//! Which Kafka errors retrying cannot fix.
//!
//! librdkafka retries retriable errors itself, forever with
//! `message.timeout.ms=0`, so an error that reaches a delivery report is one
//! it gave up on. Some of those are about the event (too large, a topic name
//! the broker refuses, no authorization): the relay stops on the event and
//! names it. The rest are about the broker having a bad moment (it answered
//! "unknown server error", a request failed mid-way): the relay restarts its
//! stream from the confirmed position, which re-sends, never skips.

/// librdkafka/Kafka error codes (`rd_kafka_resp_err_t`) that no retry fixes.
const PERMANENT: &[i32] = &[
    4,    // INVALID_MSG_SIZE
    10,   // MSG_SIZE_TOO_LARGE (broker, and librdkafka's own check)
    17,   // TOPIC_EXCEPTION: invalid topic name
    29,   // TOPIC_AUTHORIZATION_FAILED
    31,   // CLUSTER_AUTHORIZATION_FAILED
    44,   // POLICY_VIOLATION
    87,   // INVALID_RECORD
    32,   // INVALID_TIMESTAMP: the commit time is outside the topic's
          // message.timestamp.*.max.ms window; re-sending cannot change it
    3,    // UNKNOWN_TOPIC_OR_PART: the topic does not exist (creation off)
    -188, // _UNKNOWN_TOPIC (local)
    -190, // _UNKNOWN_PARTITION (local)
    -186, // _INVALID_ARG (local)
];

pub fn is_permanent(code: i32) -> bool {
    PERMANENT.contains(&code)
}

/// A refusal the broker makes for a whole record batch because of one
/// record in it (too large, a timestamp outside the topic's window, a
/// record it finds invalid or against policy). librdkafka sends several
/// events in one batch, so the event a delivery report names may be an
/// innocent neighbour of the one really refused.
pub fn is_batch_rejection(code: i32) -> bool {
    matches!(
        code,
        4     // INVALID_MSG_SIZE
        | 10  // MSG_SIZE_TOO_LARGE
        | 18  // RECORD_LIST_TOO_LARGE
        | 32  // INVALID_TIMESTAMP
        | 44  // POLICY_VIOLATION
        | 87  // INVALID_RECORD
    )
}

/// Answers to an admin request (topic creation) that say "not now" rather
/// than "no": asking again later can succeed.
const TRANSIENT_ADMIN: &[i32] = &[
    5,    // LEADER_NOT_AVAILABLE
    7,    // REQUEST_TIMED_OUT
    8,    // BROKER_NOT_AVAILABLE
    13,   // NETWORK_EXCEPTION
    41,   // NOT_CONTROLLER
    89,   // THROTTLING_QUOTA_EXCEEDED
    -185, // _TIMED_OUT (local)
    -187, // _ALL_BROKERS_DOWN (local)
    -195, // _TRANSPORT (local)
];

pub fn is_transient_admin(code: i32) -> bool {
    TRANSIENT_ADMIN.contains(&code)
}

#[cfg(test)]
mod tests {
    use super::{is_permanent, is_transient_admin};

    #[test]
    fn batch_rejections_may_name_innocent_neighbours() {
        assert!(super::is_batch_rejection(10) && super::is_batch_rejection(18) && super::is_batch_rejection(32));
        assert!(!super::is_batch_rejection(29), "not authorised: the whole topic, not one record");
        assert!(!super::is_batch_rejection(-1));
    }

    #[test]
    fn topic_creation_answers_worth_retrying() {
        assert!(is_transient_admin(7), "request timed out");
        assert!(is_transient_admin(41), "not controller");
        assert!(is_transient_admin(-185), "local timeout");
        assert!(!is_transient_admin(38), "invalid replication factor: ask an operator");
        assert!(!is_transient_admin(29), "not authorized");
        assert!(!is_transient_admin(44), "policy violation");
    }

    #[test]
    fn classification() {
        assert!(is_permanent(10), "too large");
        assert!(is_permanent(-188), "unknown topic");
        assert!(is_permanent(29), "not authorized");
        assert!(is_permanent(32), "timestamp outside the topic's window");
        assert!(!is_permanent(-1), "unknown server error: the broker's bad moment");
        assert!(!is_permanent(-195), "transport failure");
        assert!(!is_permanent(7), "request timed out");
        assert!(!is_permanent(6), "not leader");
    }
}
