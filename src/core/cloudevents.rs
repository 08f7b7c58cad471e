//! CloudEvents 1.0 for the events the relay publishes (`outbox.cloudevents`):
//! the attributes an outbox event maps to, and the two content modes of the
//! Kafka and AMQP protocol bindings.
//!
//! - **binary**: the value stays the event's JSON payload; each attribute is
//!   a header named with the binding's prefix (`ce_` on Kafka; on RabbitMQ
//!   `cloudEvents_` by default, the AMQP binding's, or `ce-`, the one
//!   RabbitMQ's 0-9-1 SDKs read), and `datacontenttype` is the protocol's
//!   content type (the Kafka `content-type` header, the AMQP `content_type`
//!   property).
//! - **structured**: the value is the event in the JSON event format, with
//!   the payload as `data` (a JSON value, not a string), and the content type
//!   `application/cloudevents+json; charset=UTF-8`.
//!
//! In both modes the message key and the outbox headers (`id`, `type`,
//! `aggregatetype`, the event's own) stay as they are: consumers that read
//! them keep working while others move to CloudEvents.
//!
//! Attributes: `id` the event id, `source` the setting (default
//! `/outbox/<database>`), `type` the event type, `subject` the aggregate id,
//! `time` the commit time (RFC 3339, UTC, microseconds), `datacontenttype`
//! `application/json`, the `partitionkey` extension (the aggregate id, the
//! record's key), and the distributed-tracing extension's `traceparent` and
//! `tracestate` when the event carries those headers.

use crate::time;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Binary,
    Structured,
}

pub const SPEC_VERSION: &str = "1.0";
pub const DATA_CONTENT_TYPE: &str = "application/json";
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";
/// The Kafka binding's prefix for attribute headers.
pub const KAFKA_PREFIX: &str = "ce_";
/// The header that carries `datacontenttype` in Kafka's binary mode.
pub const KAFKA_CONTENT_TYPE: &str = "content-type";
/// The prefixes `outbox.cloudevents_amqp_prefix` accepts: the AMQP
/// binding's two, and the one of RabbitMQ's 0-9-1 SDKs (knative's).
pub const AMQP_PREFIXES: [&str; 3] = ["cloudEvents_", "cloudEvents:", "ce-"];

/// One event's attributes, borrowed from the event being sent.
#[derive(Debug, Clone, Copy)]
pub struct Attributes<'a> {
    /// The event id as text (a UUID).
    pub id: &'a str,
    pub source: &'a str,
    pub event_type: &'a str,
    /// The aggregate id: `subject` and `partitionkey`.
    pub subject: &'a str,
    /// Commit time, µs since 2000-01-01 UTC.
    pub commit_time: i64,
    pub traceparent: Option<&'a str>,
    pub tracestate: Option<&'a str>,
}

impl<'a> Attributes<'a> {
    /// The attributes other than `datacontenttype`, in the spec's order.
    fn pairs(&self) -> Vec<(&'static str, std::borrow::Cow<'a, str>)> {
        let mut v: Vec<(&'static str, std::borrow::Cow<'a, str>)> = vec![
            ("specversion", SPEC_VERSION.into()),
            ("id", self.id.into()),
            ("source", self.source.into()),
            ("type", self.event_type.into()),
            ("subject", self.subject.into()),
            ("time", time::format_rfc3339(time::pg_to_unix_micros(self.commit_time)).into()),
            ("partitionkey", self.subject.into()),
        ];
        if let Some(t) = self.traceparent {
            v.push(("traceparent", t.into()));
        }
        if let Some(t) = self.tracestate {
            v.push(("tracestate", t.into()));
        }
        v
    }

    /// Binary mode's headers: every attribute but `datacontenttype`, each
    /// named `<prefix><attribute>` (the content type travels as the
    /// protocol's own).
    pub fn binary_headers(&self, prefix: &str) -> Vec<(String, String)> {
        self.pairs().into_iter().map(|(k, v)| (format!("{prefix}{k}"), v.into_owned())).collect()
    }

    /// Structured mode's value: the JSON event format with `payload` (JSON
    /// text, as the event carries it) as `data`, verbatim.
    pub fn structured(&self, payload: &str) -> String {
        let mut out = String::with_capacity(payload.len() + 320);
        out.push('{');
        for (k, v) in self.pairs() {
            out.push_str(&serde_json::to_string(k).expect("a string serialises"));
            out.push(':');
            out.push_str(&serde_json::to_string(&v).expect("a string serialises"));
            out.push(',');
        }
        out.push_str("\"datacontenttype\":\"");
        out.push_str(DATA_CONTENT_TYPE);
        out.push_str("\",\"data\":");
        out.push_str(payload);
        out.push('}');
        out
    }
}

/// What a structured value's `data` is: the payload the event carried, as
/// `Attributes::structured` put it (the inverse, for a message a sink gives
/// back). None if `value` is not such a value. The marker cannot occur
/// earlier: attribute values are JSON strings, whose quotes are escaped.
pub fn payload_of_structured(value: &str) -> Option<&str> {
    let marker = concat!(",\"datacontenttype\":\"", "application/json", "\",\"data\":");
    let start = value.find(marker)? + marker.len();
    value.strip_suffix('}')?.get(start..)
}

/// Whether an event's own header would collide with CloudEvents in a
/// message: `content-type` (the binding's data content type) or a name
/// with the attribute prefix, compared as the SDKs do (ignoring case).
pub fn header_collides(name: &str, prefix: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower == KAFKA_CONTENT_TYPE || lower.starts_with(&prefix.to_ascii_lowercase())
}

/// Checks a `source` value: a non-empty URI-reference (RFC 3986: unreserved,
/// reserved and percent-encoded characters only; the spec recommends an
/// absolute URI, which is not required).
pub fn check_source(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("a CloudEvents source must not be empty".into());
    }
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            if !(i + 2 < b.len() && b[i + 1].is_ascii_hexdigit() && b[i + 2].is_ascii_hexdigit()) {
                return Err(format!("a CloudEvents source is a URI-reference: \"%\" at byte {i} is not followed by two hex digits"));
            }
            i += 3;
            continue;
        }
        if !(c.is_ascii_alphanumeric() || b"-._~:/?#[]@!$&'()*+,;=".contains(&c)) {
            let ch = s[i..].chars().next().unwrap_or('?');
            return Err(format!("a CloudEvents source is a URI-reference; it cannot contain {ch:?} (percent-encode it)"));
        }
        i += 1;
    }
    Ok(())
}

/// The default `source`: `/outbox/<database>`, the database percent-encoded
/// where a URI path segment needs it.
pub fn default_source(database: &str) -> String {
    // A path segment also keeps sub-delims, ':' and '@' (RFC 3986 pchar).
    format!("/outbox/{}", crate::percent_encode(database, b"!$&'()*+,;=:@"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs() -> Attributes<'static> {
        Attributes {
            id: "01a20a5e-9295-78f4-bd4a-ecedcd22cda4",
            source: "/outbox/shop",
            event_type: "OrderPlaced",
            subject: "order-42",
            // 2026-11-22T19:51:55.123456Z
            commit_time: 1_795_377_115_123_456 - 946_684_800_000_000,
            traceparent: None,
            tracestate: None,
        }
    }

    #[test]
    fn binary_headers_carry_every_attribute_with_the_prefix() {
        let h = attrs().binary_headers(KAFKA_PREFIX);
        let got: Vec<(&str, &str)> = h.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(
            got,
            [
                ("ce_specversion", "1.0"),
                ("ce_id", "01a20a5e-9295-78f4-bd4a-ecedcd22cda4"),
                ("ce_source", "/outbox/shop"),
                ("ce_type", "OrderPlaced"),
                ("ce_subject", "order-42"),
                ("ce_time", "2026-11-22T19:51:55.123456Z"),
                ("ce_partitionkey", "order-42"),
            ]
        );
        let amqp = attrs().binary_headers("cloudEvents_");
        assert_eq!(amqp[0], ("cloudEvents_specversion".to_owned(), "1.0".to_owned()));
    }

    #[test]
    fn trace_context_becomes_the_tracing_extension() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let a = Attributes { traceparent: Some(tp), tracestate: Some("congo=t61rcWkgMzE"), ..attrs() };
        let h = a.binary_headers("ce-");
        assert!(h.contains(&("ce-traceparent".to_owned(), tp.to_owned())));
        assert!(h.contains(&("ce-tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned())));
        let v: serde_json::Value = serde_json::from_str(&a.structured("{}")).unwrap();
        assert_eq!(v["traceparent"], tp);
    }

    #[test]
    fn structured_nests_the_payload_as_data() {
        let payload = r#"{"total": 4200, "lines": [{"sku": "a\"b"}], "note": null}"#;
        let s = attrs().structured(payload);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "01a20a5e-9295-78f4-bd4a-ecedcd22cda4");
        assert_eq!(v["source"], "/outbox/shop");
        assert_eq!(v["type"], "OrderPlaced");
        assert_eq!(v["subject"], "order-42");
        assert_eq!(v["time"], "2026-11-22T19:51:55.123456Z");
        assert_eq!(v["datacontenttype"], "application/json");
        assert_eq!(v["partitionkey"], "order-42");
        assert_eq!(v["data"], serde_json::from_str::<serde_json::Value>(payload).unwrap());
        assert!(v.get("traceparent").is_none());
        // Scalars and arrays are JSON values too.
        let v: serde_json::Value = serde_json::from_str(&attrs().structured("[1,2]")).unwrap();
        assert_eq!(v["data"], serde_json::json!([1, 2]));
    }

    #[test]
    fn attribute_values_are_escaped_in_the_structured_form() {
        let a = Attributes { subject: "a\"b\\c\u{1}", event_type: "tÿpe", ..attrs() };
        let v: serde_json::Value = serde_json::from_str(&a.structured("1")).unwrap();
        assert_eq!(v["subject"], "a\"b\\c\u{1}");
        assert_eq!(v["type"], "tÿpe");
    }

    #[test]
    fn the_payload_comes_back_out_of_a_structured_value() {
        for payload in [r#"{"a": 1}"#, "[1, 2]", "null", "\"s\"", r#"{"data": {"x": "}"}}"#] {
            // A subject that looks like the marker stays inside its string.
            let a = Attributes { subject: r#"x","datacontenttype":"application/json","data":1}"#, ..attrs() };
            assert_eq!(payload_of_structured(&a.structured(payload)), Some(payload));
        }
        assert_eq!(payload_of_structured(r#"{"a": 1}"#), None);
        assert_eq!(payload_of_structured(""), None);
    }

    #[test]
    fn headers_that_collide_with_cloudevents() {
        assert!(header_collides("content-type", KAFKA_PREFIX));
        assert!(header_collides("Content-Type", KAFKA_PREFIX));
        assert!(header_collides("ce_id", KAFKA_PREFIX));
        assert!(header_collides("CE_tenant", KAFKA_PREFIX));
        assert!(header_collides("cloudevents_x", "cloudEvents_"));
        assert!(header_collides("ce-x", "ce-"));
        assert!(!header_collides("tenant", KAFKA_PREFIX));
        assert!(!header_collides("cex", KAFKA_PREFIX));
        assert!(!header_collides("ce_x", "ce-"));
    }

    #[test]
    fn sources() {
        assert!(check_source("/outbox/shop").is_ok());
        assert!(check_source("https://example.com/orders").is_ok());
        assert!(check_source("urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66").is_ok());
        assert!(check_source("/orders%20eu?x=1#f").is_ok());
        assert!(check_source("").unwrap_err().contains("empty"));
        assert!(check_source("/a b").unwrap_err().contains("' '"));
        assert!(check_source("/a\nb").is_err());
        for bad in ["/ä", "/a<b", "/a\"b", "/a{b}", "/a\\b", "/a^b", "/a|b", "/a`b"] {
            assert!(check_source(bad).unwrap_err().contains("cannot contain"), "{bad}");
        }
        for bad in ["/a%", "/a%2", "/a%zz"] {
            assert!(check_source(bad).unwrap_err().contains("two hex digits"), "{bad}");
        }
        assert_eq!(default_source("shop"), "/outbox/shop");
        assert_eq!(default_source("my db/ä"), "/outbox/my%20db%2F%C3%A4");
    }
}
