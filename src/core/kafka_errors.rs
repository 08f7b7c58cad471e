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

/// The broker refused a whole produce request as too large. librdkafka
/// sends several events in one request, so the event a delivery report
/// names may be an innocent neighbour of the one really too large.
pub fn is_size_rejection(code: i32) -> bool {
    matches!(code, 10 | 18) // MSG_SIZE_TOO_LARGE, RECORD_LIST_TOO_LARGE
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
    fn size_rejections_are_per_request() {
        assert!(super::is_size_rejection(10) && super::is_size_rejection(18));
        assert!(!super::is_size_rejection(29) && !super::is_size_rejection(-1));
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
