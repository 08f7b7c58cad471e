//! What the output plugin hands to whoever reads the slot: one record per
//! committed outbox event, carrying its transaction's commit position and
//! time.
//!
//! Two renderings of the same record:
//! * binary (`format 'binary'`), read by the relay worker with no parsing
//!   beyond length prefixes;
//! * JSON text (the default), for humans and tests reading a slot with
//!   `pg_logical_slot_peek_changes`.
//!
//! `commit_lsn` is the transaction's end LSN and `commit_time` its commit
//! timestamp: that is the position a reader may confirm once the event is
//! delivered. `lsn` is the event record's own position, used only to name it
//! in messages.

use crate::codec::{self, CodecError, Reader};
use crate::adopt::{PayloadKind, RowEvent};
use crate::{format_uuid, lsn, time, Event};

pub const VERSION_1: u8 = 1;
/// A row of an adopted table (`outbox.tables`): a record of its own, since
/// its message is the router's (bytes, null key or value, partition).
pub const VERSION_ADOPTED: u8 = 2;

/// How an event entered the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A logical message written by `outbox_emit()`.
    Emit = 0,
    /// A row inserted into the outbox table (Debezium style).
    Table = 1,
    /// A well-formed message with our prefix whose tag does not verify with
    /// this server's key: written under another key (the key file was
    /// replaced or restored from elsewhere) or forged. Never published; the
    /// relay handles it like a rejected event (`outbox.on_rejected_event`),
    /// so it is never confirmed past in silence.
    Unverified = 2,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Emit => "emit",
            Source::Table => "table",
            Source::Unverified => "unverified",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedEvent<'a> {
    pub source: Source,
    pub xid: u32,
    /// End LSN of the committing transaction.
    pub commit_lsn: u64,
    /// Commit time in Postgres' representation (µs since 2000-01-01 UTC).
    pub commit_time: i64,
    /// The event record's own LSN.
    pub lsn: u64,
    pub event: Event<'a>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodedError {
    #[error("unknown decoded-event version {0}")]
    UnknownVersion(u8),
    #[error("unknown event source {0}")]
    UnknownSource(u8),
    #[error("malformed decoded event: {0}")]
    Malformed(#[from] CodecError),
}

const FIXED_LEN: usize = 1 + 1 + 4 + 8 + 8 + 8;

/// Appends the binary rendering to `out` (the plugin's output buffer).
pub fn encode_binary(out: &mut Vec<u8>, d: &DecodedEvent<'_>) {
    out.reserve(FIXED_LEN + codec::event_len(&d.event));
    out.push(VERSION_1);
    out.push(d.source as u8);
    codec::put_u32(out, d.xid);
    out.extend_from_slice(&d.commit_lsn.to_le_bytes());
    out.extend_from_slice(&d.commit_time.to_le_bytes());
    out.extend_from_slice(&d.lsn.to_le_bytes());
    codec::put_event(out, &d.event);
}

pub fn decode_binary(bytes: &[u8]) -> Result<DecodedEvent<'_>, DecodedError> {
    let mut r = Reader::new(bytes);
    let [version, source] = r.array::<2>()?;
    if version != VERSION_1 {
        return Err(DecodedError::UnknownVersion(version));
    }
    let source = match source {
        0 => Source::Emit,
        1 => Source::Table,
        2 => Source::Unverified,
        other => return Err(DecodedError::UnknownSource(other)),
    };
    let xid = r.u32()?;
    let commit_lsn = r.u64()?;
    let commit_time = r.i64()?;
    let lsn = r.u64()?;
    let event = r.event()?;
    r.finish()?;
    Ok(DecodedEvent { source, xid, commit_lsn, commit_time, lsn, event })
}

/// A row of an adopted table, as the relay publishes it (see
/// `crate::adopt::RowEvent`, whose fields it borrows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedRow<'a> {
    pub xid: u32,
    pub commit_lsn: u64,
    pub commit_time: i64,
    pub lsn: u64,
    /// The table, schema-qualified.
    pub table: &'a str,
    pub id: [u8; 16],
    pub key: Option<&'a str>,
    pub value: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub payload_kind: PayloadKind,
    pub topic: &'a str,
    pub headers: Vec<(&'a str, &'a str)>,
    pub partition: Option<i32>,
    pub timestamp: Option<i64>,
    pub route_value: Option<&'a str>,
    pub event_type: Option<&'a str>,
    pub error: Option<&'a str>,
    /// The id column to delete the row by once settled (`delete.published.rows`).
    pub cleanup: Option<&'a str>,
}

impl<'a> DecodedRow<'a> {
    /// The record of `e`, a row of `table` in the transaction described.
    pub fn of(e: &'a RowEvent, table: &'a str, xid: u32, commit_lsn: u64, commit_time: i64, lsn: u64) -> Self {
        DecodedRow {
            xid,
            commit_lsn,
            commit_time,
            lsn,
            table,
            id: e.id,
            key: e.key.as_deref(),
            value: e.value.as_deref(),
            payload: e.payload.as_deref(),
            payload_kind: e.payload_kind,
            topic: &e.topic,
            headers: e.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            partition: e.partition,
            timestamp: e.timestamp,
            route_value: e.route_value.as_deref(),
            event_type: e.event_type.as_deref(),
            error: e.error.as_deref(),
            cleanup: e.cleanup.as_deref(),
        }
    }
}

/// One record of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    Event(DecodedEvent<'a>),
    Row(DecodedRow<'a>),
}

const ABSENT_I64: i64 = i64::MIN;

pub fn encode_row_binary(out: &mut Vec<u8>, d: &DecodedRow<'_>) {
    out.push(VERSION_ADOPTED);
    codec::put_u32(out, d.xid);
    out.extend_from_slice(&d.commit_lsn.to_le_bytes());
    out.extend_from_slice(&d.commit_time.to_le_bytes());
    out.extend_from_slice(&d.lsn.to_le_bytes());
    out.extend_from_slice(&d.id);
    out.push(d.payload_kind as u8);
    codec::put_str(out, d.table);
    codec::put_opt_str(out, d.key);
    codec::put_opt_bytes(out, d.value);
    codec::put_opt_bytes(out, d.payload);
    codec::put_str(out, d.topic);
    codec::put_headers(out, &d.headers);
    out.extend_from_slice(&d.partition.map_or(ABSENT_I64, i64::from).to_le_bytes());
    out.extend_from_slice(&d.timestamp.unwrap_or(ABSENT_I64).to_le_bytes());
    codec::put_opt_str(out, d.route_value);
    codec::put_opt_str(out, d.event_type);
    codec::put_opt_str(out, d.error);
    codec::put_opt_str(out, d.cleanup);
}

/// Either kind of record, told apart by its version byte.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, DecodedError> {
    if bytes.first() != Some(&VERSION_ADOPTED) {
        return decode_binary(bytes).map(Record::Event);
    }
    let mut r = Reader::new(&bytes[1..]);
    let xid = r.u32()?;
    let commit_lsn = r.u64()?;
    let commit_time = r.i64()?;
    let lsn = r.u64()?;
    let id = r.array()?;
    let [kind] = r.array()?;
    let payload_kind = PayloadKind::from_u8(kind).ok_or(DecodedError::UnknownSource(kind))?;
    let table = r.str()?;
    let key = r.opt_str()?;
    let value = r.opt_bytes()?;
    let payload = r.opt_bytes()?;
    let topic = r.str()?;
    let headers = r.headers()?;
    let partition = match r.i64()? {
        ABSENT_I64 => None,
        p => Some(p as i32),
    };
    let timestamp = Some(r.i64()?).filter(|t| *t != ABSENT_I64);
    let route_value = r.opt_str()?;
    let event_type = r.opt_str()?;
    let error = r.opt_str()?;
    let cleanup = r.opt_str()?;
    r.finish()?;
    Ok(Record::Row(DecodedRow {
        xid,
        commit_lsn,
        commit_time,
        lsn,
        table,
        id,
        key,
        value,
        payload,
        payload_kind,
        topic,
        headers,
        partition,
        timestamp,
        route_value,
        event_type,
        error,
        cleanup,
    }))
}

/// A payload rendered as JSON: JSON as it is, text as a string, bytes as a
/// base64 string.
fn json_payload(out: &mut String, b: Option<&[u8]>, kind: PayloadKind) {
    match (b, kind) {
        (None, _) => out.push_str("null"),
        (Some(b), PayloadKind::Json) => out.push_str(&String::from_utf8_lossy(b)),
        (Some(b), PayloadKind::Text) => json_str(out, &String::from_utf8_lossy(b)),
        (Some(b), PayloadKind::Bytes) => json_str(out, &crate::adopt::base64(b)),
    }
}

/// The JSON text rendering of an adopted row's record.
pub fn encode_row_json(out: &mut String, d: &DecodedRow<'_>) {
    let opt = |out: &mut String, s: Option<&str>| match s {
        Some(s) => json_str(out, s),
        None => out.push_str("null"),
    };
    json_position(out, &d.id, "adopted", d.xid, d.commit_lsn, d.commit_time, d.lsn);
    out.push_str(",\"table\":");
    json_str(out, d.table);
    out.push_str(",\"topic\":");
    json_str(out, d.topic);
    out.push_str(",\"key\":");
    opt(out, d.key);
    out.push_str(",\"partition\":");
    out.push_str(&d.partition.map_or("null".to_owned(), |p| p.to_string()));
    out.push_str(",\"timestamp\":");
    match d.timestamp {
        Some(t) => json_str(out, &time::format_rfc3339(time::pg_to_unix_micros(t))),
        None => out.push_str("null"),
    }
    out.push_str(",\"headers\":[");
    for (i, (k, v)) in d.headers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('[');
        json_str(out, k);
        out.push(',');
        json_str(out, v);
        out.push(']');
    }
    out.push_str("],\"error\":");
    opt(out, d.error);
    out.push_str(",\"value\":");
    // The value is the payload, or the envelope (JSON).
    let kind = if d.value.is_some() && d.value != d.payload { PayloadKind::Json } else { d.payload_kind };
    json_payload(out, d.value, kind);
    out.push('}');
}

/// Opens a record's JSON with its id, source and where it sits in the WAL:
/// `{"id":…,"source":…,"xid":…,"commit_lsn":…,"commit_time":…,"lsn":…`.
fn json_position(out: &mut String, id: &[u8; 16], source: &str, xid: u32, commit_lsn: u64, commit_time: i64, lsn: u64) {
    out.push_str("{\"id\":\"");
    out.push_str(&format_uuid(id));
    out.push_str("\",\"source\":\"");
    out.push_str(source);
    out.push_str("\",\"xid\":");
    out.push_str(&xid.to_string());
    out.push_str(",\"commit_lsn\":\"");
    out.push_str(&lsn::format(commit_lsn));
    out.push_str("\",\"commit_time\":\"");
    out.push_str(&time::format_rfc3339(time::pg_to_unix_micros(commit_time)));
    out.push_str("\",\"lsn\":\"");
    out.push_str(&lsn::format(lsn));
    out.push('"');
}

fn json_str(out: &mut String, s: &str) {
    // serde_json's string escaping is exactly JSON's; writing into a String
    // cannot fail.
    out.push_str(&serde_json::Value::from(s).to_string());
}

/// Appends the JSON text rendering. The payload is inserted verbatim: it is
/// already JSON, printed by Postgres' jsonb output function; a tombstone's
/// is `null` (and `"tombstone":true` says which null it is).
pub fn encode_json(out: &mut String, d: &DecodedEvent<'_>) {
    let ev = &d.event;
    json_position(out, &ev.id, d.source.name(), d.xid, d.commit_lsn, d.commit_time, d.lsn);
    out.push_str(",\"aggregatetype\":");
    json_str(out, ev.aggregate_type);
    out.push_str(",\"aggregateid\":");
    json_str(out, ev.aggregate_id);
    out.push_str(",\"type\":");
    json_str(out, ev.event_type);
    out.push_str(",\"topic\":");
    match ev.topic {
        Some(t) => json_str(out, t),
        None => out.push_str("null"),
    }
    out.push_str(",\"headers\":{");
    for (i, (k, v)) in ev.headers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        json_str(out, k);
        out.push(':');
        json_str(out, v);
    }
    if ev.payload.is_none() {
        out.push_str("},\"tombstone\":true,\"payload\":null");
    } else {
        out.push_str("},\"payload\":");
        out.push_str(ev.payload.unwrap_or("null"));
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DecodedEvent<'static> {
        DecodedEvent {
            source: Source::Table,
            xid: 741,
            commit_lsn: 0x016B_3748,
            // 2026-11-22T19:51:55.123456Z
            commit_time: (1_795_377_115 - 946_684_800) * 1_000_000 + 123_456,
            lsn: 0x016B_3600,
            event: Event {
                id: [0xab; 16],
                aggregate_type: "Order",
                aggregate_id: "4\"2",
                event_type: "OrderPlaced",
                topic: Some("orders"),
                headers: vec![("trace", "t\n1")],
                payload: Some(r#"{"total": 4200}"#),
            },
        }
    }

    #[test]
    fn golden_json() {
        let mut s = String::new();
        encode_json(&mut s, &sample());
        assert_eq!(
            s,
            concat!(
                r#"{"id":"abababab-abab-abab-abab-abababababab","source":"table","xid":741,"#,
                r#""commit_lsn":"0/16B3748","commit_time":"2026-11-22T19:51:55.123456Z","lsn":"0/16B3600","#,
                r#""aggregatetype":"Order","aggregateid":"4\"2","type":"OrderPlaced","topic":"orders","#,
                r#""headers":{"trace":"t\n1"},"payload":{"total": 4200}}"#
            )
        );
        let parsed: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(parsed["payload"]["total"], 4200);
    }

    #[test]
    fn golden_binary_round_trip() {
        let mut out = Vec::new();
        encode_binary(&mut out, &sample());
        assert_eq!(&out[..FIXED_LEN], &[
            1, 1, // version, source
            0xe5, 0x02, 0, 0, // xid 741
            0x48, 0x37, 0x6b, 0x01, 0, 0, 0, 0, // commit lsn
            0x00, 0x6f, 0xf7, 0x93, 0xe1, 0x03, 0x03, 0x00, // commit time
            0x00, 0x36, 0x6b, 0x01, 0, 0, 0, 0, // lsn
        ][..]);
        assert_eq!(decode_binary(&out).unwrap(), sample());
        assert_eq!(decode_binary(&out[..out.len() - 1]).map(|_| ()), Err(DecodedError::Malformed(CodecError::Truncated { offset: out.len() - 15, needed: 1 })));
    }

    fn row() -> RowEvent {
        RowEvent {
            id: [0xcd; 16],
            key: None,
            value: Some(vec![0, 159, 146, 150]),
            payload: Some(vec![0, 159, 146, 150]),
            payload_kind: PayloadKind::Bytes,
            topic: "outbox.event.Order".into(),
            headers: vec![("id".into(), "7".into()), ("eventType".into(), "Placed".into())],
            partition: Some(3),
            timestamp: None,
            route_value: Some("Order".into()),
            event_type: None,
            error: None,
            trace_dropped: None,
            cleanup: Some("\"Id\"".into()),
        }
    }

    #[test]
    fn adopted_rows_round_trip_and_every_truncation_is_an_error() {
        let e = row();
        let d = DecodedRow::of(&e, "public.outboxevent", 9, 0x200, 5, 0x100);
        let mut out = Vec::new();
        encode_row_binary(&mut out, &d);
        assert_eq!(decode_record(&out).unwrap(), Record::Row(d.clone()));
        for cut in 0..out.len() {
            assert!(decode_record(&out[..cut]).is_err(), "cut at {cut}");
        }
        let mut s = String::new();
        encode_row_json(&mut s, &d);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!((v["key"].is_null(), v["partition"].as_i64(), v["value"].as_str()), (true, Some(3), Some("AJ+Slg==")));
        assert_eq!(v["headers"][1][0], "eventType");
        let mut ev = Vec::new();
        encode_binary(&mut ev, &sample());
        assert_eq!(decode_record(&ev).unwrap(), Record::Event(sample()), "version 1 records still read");
    }

    #[test]
    fn rejects_unknown_versions_and_sources() {
        let mut out = Vec::new();
        encode_binary(&mut out, &sample());
        let mut v3 = out.clone();
        v3[0] = 3;
        assert_eq!(decode_binary(&v3), Err(DecodedError::UnknownVersion(3)));
        let mut s9 = out.clone();
        s9[1] = 9;
        assert_eq!(decode_binary(&s9), Err(DecodedError::UnknownSource(9)));
    }
}
