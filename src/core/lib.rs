//! The part of outbox that needs no server: the bytes `outbox_emit()` writes
//! into the WAL, the bytes the output plugin hands to its reader, the checks
//! an event must pass before it is accepted, topic routing and the parsing of
//! settings. Everything here is covered by `cargo test -p outbox-core`; the
//! extension crate is a thin Postgres shell around it.
#![forbid(unsafe_code)]

pub mod adopt;
pub mod amqp;
pub mod cloudevents;
pub mod codec;
pub mod confirm;
pub mod decoded;
pub mod first_writes;
pub mod histogram;
pub mod kafka_errors;
pub mod kafka_props;
pub mod ledger;
pub mod lsn;
pub mod rate_limit;
pub mod relay_state;
pub mod retry;
pub mod router;
pub mod message;
pub mod time;
pub mod topic;
pub mod trace;
pub mod validate;
pub mod wal_guard;

/// The prefix of the transactional logical decoding messages `outbox_emit()` writes.
pub const MESSAGE_PREFIX: &str = "outbox";

/// One outbox event, borrowed from whatever buffer it was decoded from.
///
/// The field names follow Debezium's outbox table (`aggregatetype`,
/// `aggregateid`, `type`, `payload`) because those are what users already
/// write and what consumers already read in headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// Stable event id: the Kafka header `id` consumers de-duplicate on.
    pub id: [u8; 16],
    pub aggregate_type: &'a str,
    /// Becomes the Kafka message key, so per-aggregate order is kept.
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    /// A per-event topic that overrides the routing template.
    pub topic: Option<&'a str>,
    /// The event's own Kafka headers, in the order they were given.
    pub headers: Vec<(&'a str, &'a str)>,
    /// The payload as JSON text, exactly as Postgres printed the jsonb
    /// value; None: a tombstone (SQL NULL, with `outbox.tombstones` on),
    /// published as a null value.
    pub payload: Option<&'a str>,
}

/// Formats a 16-byte id the way Postgres prints a `uuid`.
pub fn format_uuid(id: &[u8; 16]) -> String {
    format_uuid_into(id, &mut [0; 36]).to_owned()
}

/// [`format_uuid`] into a caller's buffer: the relay formats one id per
/// event, and this keeps that off the allocator.
pub fn format_uuid_into<'b>(id: &[u8; 16], buf: &'b mut [u8; 36]) -> &'b str {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = 0;
    for (i, b) in id.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf[at] = b'-';
            at += 1;
        }
        buf[at] = HEX[(b >> 4) as usize];
        buf[at + 1] = HEX[(b & 0xf) as usize];
        at += 2;
    }
    // Only ASCII hex digits and dashes were written.
    std::str::from_utf8(buf).unwrap_or_default()
}

/// Percent-encodes `s` for a URI component: RFC 3986's unreserved bytes,
/// and the ones in `also_kept`, stay as they are; every other byte becomes
/// `%XX` (uppercase hex, UTF-8 bytes).
pub fn percent_encode(s: &str, also_kept: &[u8]) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || also_kept.contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_formatting_matches_postgres() {
        let id = [
            0x01, 0x93, 0x4b, 0x2e, 0x7c, 0x00, 0x7a, 0xbc, 0x8d, 0xef, 0x01, 0x23, 0x45, 0x67,
            0x89, 0xab,
        ];
        assert_eq!(format_uuid(&id), "01934b2e-7c00-7abc-8def-0123456789ab");
    }
}
