//! The checks an event must pass before it is accepted into the outbox, shared
//! by `outbox_emit()` and the outbox table's insert guard so the two paths
//! accept exactly the same events. Every error says what was wrong and how to
//! fix it; the SQL layer maps [`Kind`] to a SQLSTATE.

/// Header names the relay sets itself on every Kafka message.
pub const RESERVED_HEADERS: [&str; 3] = ["id", "type", "aggregatetype"];

/// Kafka's limit on topic name length.
pub const MAX_TOPIC_LEN: usize = 249;

/// Bytes Kafka and librdkafka add around one record on top of key, value and
/// headers (record framing with varints, plus the batch header a record may
/// travel alone in). An over-estimate, so that an event we accept is never
/// refused by a producer whose `message.max.bytes` follows our limit.
pub const RECORD_OVERHEAD: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// SQL NULL where a value is required.
    Null,
    /// A value of the right type but not acceptable.
    InvalidValue,
    /// The encoded event is larger than `outbox.max_event_bytes`.
    TooLarge,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub kind: Kind,
    pub message: String,
    pub hint: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (hint: {})", self.message, self.hint)
    }
}

impl std::error::Error for Invalid {}

fn invalid(kind: Kind, message: String, hint: &str) -> Invalid {
    Invalid { kind, message, hint: hint.to_owned() }
}

/// A required text field: aggregate type, aggregate id, event type.
pub fn required<'a>(field: &str, value: Option<&'a str>) -> Result<&'a str, Invalid> {
    match value {
        None => Err(invalid(
            Kind::Null,
            format!("outbox event {field} must not be NULL"),
            "Every event needs an aggregate type, an aggregate id (the Kafka key) and an event type.",
        )),
        Some("") => Err(invalid(
            Kind::InvalidValue,
            format!("outbox event {field} must not be empty"),
            "Every event needs an aggregate type, an aggregate id (the Kafka key) and an event type.",
        )),
        Some(v) => Ok(v),
    }
}

/// The payload must be present unless tombstones are on (`outbox.tombstones`:
/// SQL NULL is then published as a null value, a Kafka tombstone). JSON
/// `null` is a valid payload either way (it is published as the four bytes
/// `null`, not as a tombstone).
pub fn payload(value: Option<&str>, tombstones: bool) -> Result<Option<&str>, Invalid> {
    if value.is_none() && !tombstones {
        return Err(invalid(
            Kind::Null,
            "outbox event payload must not be NULL".into(),
            "Pass a jsonb value; the JSON value 'null'::jsonb is allowed and is published as the text null. \
             A NULL payload is a tombstone (a null value for compacted topics) where outbox.tombstones is on.",
        ));
    }
    Ok(value)
}

/// Headers arrive as a JSON document: it must be an object whose values are
/// all strings, with none of the names the relay reserves.
pub fn headers(value: Option<&serde_json::Value>) -> Result<Vec<(String, String)>, Invalid> {
    const HINT: &str =
        "Headers are a JSON object of string values, e.g. '{\"tenant\": \"t1\"}'; pass '{}' for none.";
    let obj = match value {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Object(obj)) => obj,
        Some(other) => {
            return Err(invalid(
                Kind::InvalidValue,
                format!("outbox event headers must be a JSON object, not {}", json_kind(other)),
                HINT,
            ))
        }
    };
    let mut out = Vec::with_capacity(obj.len());
    for (k, v) in obj {
        if k.is_empty() {
            return Err(invalid(Kind::InvalidValue, "outbox event header names must not be empty".into(), HINT));
        }
        if RESERVED_HEADERS.contains(&k.as_str()) {
            return Err(invalid(
                Kind::InvalidValue,
                format!("outbox event header \"{k}\" is reserved"),
                "The relay sets the headers id, type and aggregatetype itself from the event.",
            ));
        }
        match v {
            serde_json::Value::String(s) if k == "traceparent" => {
                crate::trace::check_traceparent(s).map_err(|e| {
                    invalid(Kind::InvalidValue, format!("outbox event header {e}"), "A W3C Trace Context traceparent looks like \
                     00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 (https://www.w3.org/TR/trace-context/).")
                })?;
                out.push((k.clone(), s.clone()))
            }
            serde_json::Value::String(s) => out.push((k.clone(), s.clone())),
            other => {
                return Err(invalid(
                    Kind::InvalidValue,
                    format!("outbox event header \"{k}\" must be a JSON string, not {}", json_kind(other)),
                    HINT,
                ))
            }
        }
    }
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Kafka's rules for a topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`,
/// and not `.` or `..`.
pub fn topic(name: &str) -> Result<(), Invalid> {
    const HINT: &str = "Kafka topic names are 1 to 249 characters from a-z, A-Z, 0-9, '.', '_' and '-'.";
    if name.is_empty() || name == "." || name == ".." {
        return Err(invalid(Kind::InvalidValue, format!("\"{name}\" is not a valid Kafka topic name"), HINT));
    }
    if name.len() > MAX_TOPIC_LEN {
        return Err(invalid(
            Kind::InvalidValue,
            format!("Kafka topic name is {} characters long, more than Kafka's {MAX_TOPIC_LEN}", name.len()),
            HINT,
        ));
    }
    if let Some(bad) = name.chars().find(|c| !is_topic_char(*c)) {
        return Err(invalid(
            Kind::InvalidValue,
            format!("Kafka topic name \"{name}\" contains the character {bad:?}, which Kafka rejects"),
            HINT,
        ));
    }
    Ok(())
}

pub fn is_topic_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// Size of the Kafka record the relay will produce for an event: key
/// (aggregate id), value (payload), all headers (ours and the event's), plus
/// [`RECORD_OVERHEAD`].
pub fn record_size(
    aggregate_type: &str,
    aggregate_id: &str,
    event_type: &str,
    headers: &[(impl AsRef<str>, impl AsRef<str>)],
    payload: &str,
) -> usize {
    // Our own headers: id (36-char uuid text), type, aggregatetype.
    let own = 2 + 36 + 4 + event_type.len() + 13 + aggregate_type.len();
    let theirs: usize = headers.iter().map(|(k, v)| k.as_ref().len() + v.as_ref().len()).sum();
    RECORD_OVERHEAD + aggregate_id.len() + payload.len() + own + theirs + 10 * headers.len()
}

pub fn size(record_size: usize, max_event_bytes: usize) -> Result<(), Invalid> {
    if record_size > max_event_bytes {
        return Err(invalid(
            Kind::TooLarge,
            format!(
                "outbox event is {record_size} bytes as a Kafka record, more than outbox.max_event_bytes ({max_event_bytes})"
            ),
            "Make the payload smaller (publish a reference to large data instead of the data), or raise \
             outbox.max_event_bytes together with the broker's and topic's message.max.bytes.",
        ));
    }
    Ok(())
}

/// Postgres' rule for replication slot names (`ReplicationSlotValidateName`):
/// 1 to 63 characters from lower-case letters, digits and `_`.
pub fn slot_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 {
        return Err(format!("replication slot name \"{name}\" must be 1 to 63 characters long"));
    }
    if !name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err(format!(
            "replication slot name \"{name}\" may contain only lower-case letters, digits and underscores"
        ));
    }
    Ok(())
}

/// An event that passed every check, ready to be encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub payload: Option<&'a str>,
    pub headers: Vec<(String, String)>,
    /// The explicit topic, if one was given (else the relay routes by template).
    pub topic: Option<&'a str>,
    /// Where the event goes under the template in force now.
    pub routed_topic: std::borrow::Cow<'a, str>,
}

/// All of an event's checks, in the order a user would fix them.
#[allow(clippy::too_many_arguments)]
pub fn event<'a>(
    template: &crate::topic::TopicTemplate,
    max_event_bytes: usize,
    tombstones: bool,
    aggregate_type: Option<&'a str>,
    aggregate_id: Option<&'a str>,
    event_type: Option<&'a str>,
    payload_json: Option<&'a str>,
    headers_json: Option<&serde_json::Value>,
    topic: Option<&'a str>,
) -> Result<Checked<'a>, Invalid> {
    let aggregate_type = required("aggregate type", aggregate_type)?;
    let aggregate_id = required("aggregate id", aggregate_id)?;
    let event_type = required("event type", event_type)?;
    let payload_json = payload(payload_json, tombstones)?;
    let headers = headers(headers_json)?;
    let routed_topic = crate::topic::route(template, topic, aggregate_type, event_type)?;
    size(record_size(aggregate_type, aggregate_id, event_type, &headers, payload_json.unwrap_or("")), max_event_bytes)?;
    Ok(Checked { aggregate_type, aggregate_id, event_type, payload: payload_json, headers, topic, routed_topic })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn required_fields() {
        assert_eq!(required("aggregate id", Some("42")).unwrap(), "42");
        assert_eq!(required("aggregate id", None).unwrap_err().kind, Kind::Null);
        let e = required("event type", Some("")).unwrap_err();
        assert_eq!(e.kind, Kind::InvalidValue);
        assert_eq!(e.message, "outbox event event type must not be empty");
    }

    #[test]
    fn payload_null_vs_json_null() {
        assert_eq!(payload(None, false).unwrap_err().kind, Kind::Null);
        assert_eq!(payload(None, true).unwrap(), None, "a tombstone");
        assert_eq!(payload(Some("null"), false).unwrap(), Some("null"));
    }

    #[test]
    fn a_traceparent_header_must_be_valid() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(headers(Some(&json!({"traceparent": ok}))).unwrap(), vec![("traceparent".to_owned(), ok.to_owned())]);
        let e = headers(Some(&json!({"traceparent": "00-abc"}))).unwrap_err();
        assert_eq!(e.kind, Kind::InvalidValue);
        assert!(e.message.starts_with("outbox event header invalid traceparent \"00-abc\""), "{}", e.message);
    }

    #[test]
    fn headers_must_be_object_of_strings() {
        assert_eq!(headers(None).unwrap(), vec![]);
        assert_eq!(headers(Some(&json!({}))).unwrap(), vec![]);
        assert_eq!(
            headers(Some(&json!({"a": "1", "b": "2"}))).unwrap(),
            vec![("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]
        );
        let e = headers(Some(&json!([1]))).unwrap_err();
        assert_eq!(e.message, "outbox event headers must be a JSON object, not an array");
        let e = headers(Some(&json!({"n": 1}))).unwrap_err();
        assert_eq!(e.message, "outbox event header \"n\" must be a JSON string, not a number");
        let e = headers(Some(&json!({"id": "x"}))).unwrap_err();
        assert_eq!(e.message, "outbox event header \"id\" is reserved");
        assert!(headers(Some(&json!({"": "x"}))).is_err());
    }

    #[test]
    fn topic_names() {
        for ok in ["orders", "outbox.event.Order", "a-b_c.D9", &"x".repeat(249)] {
            topic(ok).unwrap();
        }
        for bad in ["", ".", "..", "a b", "ordres/1", "é", &"x".repeat(250)] {
            assert_eq!(topic(bad).unwrap_err().kind, Kind::InvalidValue, "{bad:?}");
        }
    }

    #[test]
    fn record_size_counts_everything() {
        let none: [(&str, &str); 0] = [];
        let base = record_size("Order", "42", "Placed", &none, "{}");
        assert_eq!(base, 128 + 2 + 2 + (2 + 36 + 4 + 6 + 13 + 5));
        assert_eq!(record_size("Order", "42", "Placed", &[("k", "vv")], "{}"), base + 3 + 10);
        assert!(size(base, base).is_ok());
        let e = size(base + 1, base).unwrap_err();
        assert_eq!(e.kind, Kind::TooLarge);
        assert!(e.message.contains("outbox.max_event_bytes"));
    }

    #[test]
    fn slot_names() {
        slot_name("outbox").unwrap();
        slot_name("outbox_2").unwrap();
        assert!(slot_name("").is_err());
        assert!(slot_name("Outbox").unwrap_err().contains("lower-case"));
        assert!(slot_name(&"a".repeat(64)).unwrap_err().contains("63"));
    }

    #[test]
    fn whole_event_checks_in_order() {
        let t = crate::topic::TopicTemplate::parse(crate::topic::DEFAULT_TEMPLATE).unwrap();
        let h = json!({"trace": "x"});
        let ok = event(&t, 10_000, false, Some("Order"), Some("1"), Some("Placed"), Some("{}"), Some(&h), None).unwrap();
        assert_eq!(ok.routed_topic, "outbox.event.Order");
        assert_eq!(ok.headers, vec![("trace".to_string(), "x".to_string())]);
        let e = event(&t, 10_000, false, None, None, Some(""), None, None, None).unwrap_err();
        assert!(e.message.contains("aggregate type"));
        let e = event(&t, 10_000, false, Some("A"), Some("1"), Some("T"), None, None, None).unwrap_err();
        assert!(e.message.contains("payload"));
        let e = event(&t, 10_000, false, Some("A b"), Some("1"), Some("T"), Some("1"), None, None).unwrap_err();
        assert!(e.message.contains("topic"));
        let big = "x".repeat(10_000);
        let e = event(&t, 10_000, false, Some("A"), Some("1"), Some("T"), Some(&big), None, None).unwrap_err();
        assert_eq!(e.kind, Kind::TooLarge);
    }
}
