//! Adopted tables: a user's own Debezium-style outbox table (`outbox.tables`)
//! whose inserted rows are published as the Outbox Event Router would
//! publish them, under the router's options (`outbox.table_options`, see
//! [`crate::router`]).
//!
//! Pure: which tables are named, which columns and types a mapping needs
//! from a table (checked when the setting is set, and again by the output
//! plugin against the table as it was when the row was written), and how
//! one row's values become one message. Reading the catalog and the row is
//! the shell's (`src/adopt.rs`).
//!
//! A row that cannot become a message (a NULL route value, a NULL payload
//! without tombstones, a table that no longer fits the mapping) still
//! becomes a record, carrying the reason: the relay dead-letters it or
//! stops (`outbox.on_rejected_event`). Nothing is skipped in silence and
//! nothing raises inside decoding, where an ERROR would stop the stream at
//! that row for ever.

use sha2::{Digest, Sha256};

use crate::router::{self, Converter, Mapping, Placement, JSON_CONVERTER};

/// A table named in `outbox.tables`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: String,
    pub name: String,
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

/// An identifier as Postgres would print it: bare when it is lowercase
/// letters, digits and underscores (not starting with a digit), quoted
/// otherwise.
fn quote_ident(s: &str) -> String {
    let plain = !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// `outbox.tables`: schema-qualified names separated by commas, identifiers
/// folded to lowercase unless double-quoted, as SQL reads them.
pub fn parse_tables(s: &str) -> Result<Vec<TableName>, String> {
    let mut out: Vec<TableName> = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        let mut parts = Vec::new();
        loop {
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut ident = String::new();
            if chars.next_if_eq(&'"').is_some() {
                loop {
                    match chars.next() {
                        Some('"') if chars.next_if_eq(&'"').is_some() => ident.push('"'),
                        Some('"') => break,
                        Some(c) => ident.push(c),
                        None => return Err(format!("outbox.tables \"{s}\": an unterminated quoted identifier")),
                    }
                }
                if ident.is_empty() {
                    return Err(format!("outbox.tables \"{s}\": an empty quoted identifier"));
                }
            } else {
                while let Some(c) = chars.next_if(|c| !matches!(c, '.' | ',' | '"') && !c.is_whitespace()) {
                    ident.push(c.to_ascii_lowercase());
                }
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            parts.push(ident);
            if chars.next_if_eq(&'.').is_none() {
                break;
            }
        }
        if parts.len() == 1 && parts[0].is_empty() && chars.peek().is_none() && out.is_empty() {
            return Ok(out);
        }
        match (parts.as_slice(), chars.peek()) {
            ([schema, name], None | Some(',')) if !schema.is_empty() && !name.is_empty() => {
                let t = TableName { schema: schema.clone(), name: name.clone() };
                if out.contains(&t) {
                    return Err(format!("outbox.tables: {t} is named twice"));
                }
                out.push(t);
            }
            _ => {
                return Err(format!(
                    "outbox.tables \"{s}\": each table must be named with its schema (schema.table), separated by commas"
                ))
            }
        }
        if chars.next().is_none() {
            return Ok(out);
        }
    }
}

/// A column's type as the mapping cares about it. Domains are classified
/// by their base type (the shell resolves them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// text, varchar, bpchar, name: the value's own bytes.
    Text,
    /// json: its input text, as stored.
    Json,
    /// jsonb: its text output.
    Jsonb,
    Bytea,
    Uuid,
    Int4,
    /// timestamp without time zone, read as UTC (as Debezium reads it).
    Timestamp,
    Timestamptz,
    /// Another built-in type (or an enum): read through its output function.
    OtherBuiltin,
    /// A type with a user-defined output function: never called while
    /// decoding (it could read tables under the wrong snapshot).
    UserDefined,
}

/// The payload's kind, which decides how it is rendered where it is not
/// sent as bytes (an envelope, the plugin's JSON output, a dead letter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadKind {
    Json = 0,
    Text = 1,
    Bytes = 2,
}

impl PayloadKind {
    pub fn from_u8(b: u8) -> Option<PayloadKind> {
        match b {
            0 => Some(PayloadKind::Json),
            1 => Some(PayloadKind::Text),
            2 => Some(PayloadKind::Bytes),
            _ => None,
        }
    }
}

/// A column the mapping reads: its position in the row (0-based) and type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Col {
    pub index: usize,
    pub ty: ColumnType,
}

/// A mapping resolved against one table's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: Col,
    pub key: Col,
    pub payload: Col,
    pub payload_kind: PayloadKind,
    pub route: Col,
    /// `table.field.event.type`, when the table has it (read only for the
    /// dead-letter table; the router never publishes it by itself).
    pub event_type: Option<Col>,
    pub timestamp: Option<Col>,
    pub headers: Vec<(Col, String)>,
    pub envelope: Vec<(Col, String)>,
    pub partition: Option<Col>,
    pub tracing: Option<Col>,
    /// The key and payload columns may be NULL (JsonConverter's schemas
    /// say `"optional"`).
    pub key_optional: bool,
    pub payload_optional: bool,
}

/// Resolves `m` against a table whose columns `lookup` finds by name
/// (Some((index, type)) or None). Errors name the table, the column and
/// what is wrong, as a DBA reads them at SET time.
pub fn plan(m: &Mapping, table: &str, lookup: impl Fn(&str) -> Option<(usize, ColumnType)>) -> Result<Plan, String> {
    plan_with(m, table, lookup, |_| ColumnFlags::default())
}

/// What the catalog says of a column beside its type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ColumnFlags {
    pub not_null: bool,
    pub has_default: bool,
}

/// [`plan`], where `flags` says which columns (by index) are NOT NULL or
/// have a DEFAULT.
pub fn plan_with(
    m: &Mapping,
    table: &str,
    lookup: impl Fn(&str) -> Option<(usize, ColumnType)>,
    flags: impl Fn(usize) -> ColumnFlags,
) -> Result<Plan, String> {
    let need = |option: &str, column: &str| -> Result<Col, String> {
        let (index, ty) = lookup(column)
            .ok_or_else(|| format!("table {table} has no column \"{column}\" (the mapping's {option})"))?;
        if ty == ColumnType::UserDefined {
            return Err(format!(
                "column \"{column}\" of table {table} (the mapping's {option}) has a type with a user-defined output \
                 function, which decoding cannot call; use a built-in type, an enum, or a domain over one"
            ));
        }
        Ok(Col { index, ty })
    };
    let typed = |option: &str, column: &str, allowed: &[ColumnType], say: &str| -> Result<Col, String> {
        let c = need(option, column)?;
        if !allowed.contains(&c.ty) {
            return Err(format!("column \"{column}\" of table {table} (the mapping's {option}) must be {say}"));
        }
        Ok(c)
    };
    use ColumnType::*;
    let payload = typed(
        "table.field.event.payload",
        &m.payload_column,
        &[Json, Jsonb, Text, Bytea],
        "jsonb, json, text, varchar or bytea",
    )?;
    let payload_kind = match payload.ty {
        Json | Jsonb => PayloadKind::Json,
        Bytea => PayloadKind::Bytes,
        _ => PayloadKind::Text,
    };
    let mut p = Plan {
        id: need("table.field.event.id", &m.id_column)?,
        key: need("table.field.event.key", &m.key_column)?,
        payload,
        payload_kind,
        route: typed("route.by.field", &m.route.by_column, &[Text], "text, varchar or another string type")?,
        event_type: lookup(&m.type_column).is_some().then(|| need("table.field.event.type", &m.type_column)).transpose()?,
        timestamp: m
            .timestamp_column
            .as_deref()
            .map(|c| typed("table.field.event.timestamp", c, &[Timestamp, Timestamptz], "timestamp or timestamptz"))
            .transpose()?,
        headers: Vec::new(),
        envelope: Vec::new(),
        partition: None,
        key_optional: true,
        payload_optional: true,
        // The default column is read where a table has it; one named in
        // the options must be there.
        tracing: (m.tracing_named || lookup(&m.tracing_column).is_some())
            .then(|| typed("tracing.span.context.field", &m.tracing_column, &[Text], "text or varchar"))
            .transpose()?,
    };
    p.key_optional = !flags(p.key.index).not_null;
    p.payload_optional = !flags(p.payload.index).not_null;
    // Debezium's schema for a column with a DEFAULT carries that default
    // (as Debezium renders it, a placeholder for a function's): not made here.
    for (conv, option, col, column) in
        [(m.key_converter, "key", p.key, &m.key_column), (m.value_converter, "value", p.payload, &m.payload_column)]
    {
        if conv == (Converter::Json { schemas: true }) && flags(col.index).has_default {
            return Err(format!(
                "column \"{column}\" of table {table} has a DEFAULT, which Debezium's schema for it would carry: \
                 {option}.converter={JSON_CONVERTER} with {option}.converter.schemas.enable=true is not supported for it \
                 (with schemas.enable=false it is)"
            ));
        }
    }
    if m.key_converter != Converter::Bytes && ![Text, Uuid, Int4].contains(&p.key.ty) {
        return Err(format!(
            "column \"{}\" of table {table} (the mapping's table.field.event.key) must be a string type, uuid or \
             integer for key.converter={JSON_CONVERTER}",
            m.key_column
        ));
    }
    if m.value_converter != Converter::Bytes && m.placements.iter().any(|pl| matches!(pl, Placement::Envelope { .. })) {
        return Err(format!(
            "table {table}: envelope placements with value.converter={JSON_CONVERTER} are not supported yet (the \
             envelope's fields as JsonConverter writes Debezium's types); place them as headers"
        ));
    }
    for pl in &m.placements {
        let column = match pl {
            Placement::Header { column, .. } | Placement::Envelope { column, .. } | Placement::Partition { column } => column,
        };
        if m.ignore_missing && lookup(column).is_none() {
            continue;
        }
        let option = "table.fields.additional.placement";
        match pl {
            Placement::Header { alias, .. } => p.headers.push((need(option, column)?, alias.clone())),
            Placement::Envelope { alias, .. } => p.envelope.push((need(option, column)?, alias.clone())),
            Placement::Partition { .. } => {
                if p.partition.is_some() {
                    return Err(format!("table {table}: more than one partition placement"));
                }
                p.partition = Some(typed(option, column, &[Int4], "integer (int4) for a partition placement")?);
            }
        }
    }
    Ok(p)
}

/// One column's value as the shell read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// Text, json, jsonb (its output), and any other type's output text.
    Text(String),
    Bytes(Vec<u8>),
    Uuid([u8; 16]),
    Int4(i32),
    /// timestamp or timestamptz, µs since 2000-01-01 (UTC for timestamp).
    Timestamp(i64),
}

impl Value {
    /// The value as a header or key carries it; None for NULL.
    fn text(&self) -> Option<String> {
        Some(match self {
            Value::Null => return None,
            Value::Text(s) => s.clone(),
            Value::Bytes(b) => String::from_utf8_lossy(b).into_owned(),
            Value::Uuid(u) => crate::format_uuid(u),
            Value::Int4(i) => i.to_string(),
            Value::Timestamp(t) => crate::time::format_rfc3339(crate::time::pg_to_unix_micros(*t)),
        })
    }
}

/// One row as a message, or as much of it as could be read and why it
/// cannot be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowEvent {
    /// The event id the relay's books and the dead-letter table use: the
    /// id column if it is a uuid, else derived from the topic and the id's
    /// text (so the same row gets the same id each time it is decoded).
    pub id: [u8; 16],
    /// The Kafka key; None: a null key (a NULL key column, as the router).
    pub key: Option<String>,
    /// The value; None: a null value (a tombstone).
    pub value: Option<Vec<u8>>,
    /// The payload column's bytes (None when NULL), for a dead letter.
    pub payload: Option<Vec<u8>>,
    pub payload_kind: PayloadKind,
    /// Empty when the row has no topic (`error` says why).
    pub topic: String,
    /// `id`, the header placements in order, then `traceparent`.
    pub headers: Vec<(String, String)>,
    pub partition: Option<i32>,
    /// The timestamp column (µs since 2000-01-01); None: the commit time.
    pub timestamp: Option<i64>,
    /// The route value and the event type, as the dead-letter table keeps them.
    pub route_value: Option<String>,
    pub event_type: Option<String>,
    /// Why the row cannot be published (it is dead-lettered or the relay stops).
    pub error: Option<String>,
    /// Why the tracing column gave no `traceparent` although it held a
    /// value: the row is published without one, and the shell logs this.
    pub trace_dropped: Option<String>,
    /// With `delete.published.rows`: the id column to delete the
    /// row by once its event is settled; None when off or the id is NULL.
    pub cleanup: Option<String>,
}

/// The 16-byte id of a row whose id column is not a uuid: a name-based
/// UUID (version 8) of a scope (the row's topic) and the id's text.
pub fn derived_id(scope: &str, id_text: &str) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(scope.as_bytes());
    h.update([0]);
    h.update(id_text.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id[6] = (id[6] & 0x0f) | 0x80;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

/// The 16-byte id of an adopted row from its id's text: the UUID itself
/// when the text is one in the canonical form (a `uuid` column, or a text
/// column holding `UUID.toString()`), else [`derived_id`]. Decoding and a
/// sink's delivery report (which has only the `id` header's text) both use
/// this, so a row dead-lettered from a report is known again by the id
/// decoding gives it after a restart.
pub fn id_of_text(scope: &str, id_text: &str) -> [u8; 16] {
    parse_canonical_uuid(id_text).unwrap_or_else(|| derived_id(scope, id_text))
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (hex, either case), as
/// PostgreSQL's uuid output and Java's `UUID.toString()` write it.
fn parse_canonical_uuid(t: &str) -> Option<[u8; 16]> {
    let b = t.as_bytes();
    if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
        return None;
    }
    let hex: Vec<u8> = b.iter().copied().filter(|&c| c != b'-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in hex.chunks(2).enumerate() {
        let d = |c: u8| (c as char).to_digit(16);
        out[i] = (d(pair[0])? * 16 + d(pair[1])?) as u8;
    }
    Some(out)
}

/// Builds the message for one row. `get` gives a column's value; `at` names
/// the row (its LSN) for an id when the id column is NULL.
pub fn row_event(m: &Mapping, plan: &Plan, table: &str, at: &str, get: impl Fn(Col) -> Value) -> RowEvent {
    let route_value = get(plan.route).text();
    let topic = m.route.topic(route_value.as_deref());
    let idv = get(plan.id);
    let id_text = idv.text();
    // Derived from the topic, which a sink's delivery report also names, so
    // a row refused by the broker is dead-lettered under the id decoding
    // gives it again after a restart.
    let scope = topic.as_deref().unwrap_or(table);
    let id = match (&idv, &id_text) {
        (Value::Uuid(u), _) => *u,
        (_, Some(t)) => id_of_text(scope, t),
        (_, None) => derived_id(table, &format!("NULL at {at}")),
    };
    let payload = match get(plan.payload) {
        Value::Null => None,
        Value::Bytes(b) => Some(b),
        other => other.text().map(String::into_bytes),
    };
    let mut e = RowEvent {
        id,
        key: get(plan.key).text(),
        value: None,
        payload,
        payload_kind: plan.payload_kind,
        topic: String::new(),
        headers: Vec::with_capacity(2 + plan.headers.len()),
        partition: None,
        timestamp: None,
        route_value,
        event_type: plan.event_type.and_then(|c| get(c).text()),
        error: None,
        trace_dropped: None,
        cleanup: (m.delete_published_rows && id_text.is_some()).then(|| m.id_column.clone()),
    };
    let mut errors = Vec::new();
    match &id_text {
        Some(t) => e.headers.push(("id".to_owned(), t.clone())),
        None => errors.push(format!("the id column \"{}\" is NULL", m.id_column)),
    }
    for (c, alias) in &plan.headers {
        // A NULL column gives a header without a value in the router; Kafka
        // headers here always have one, so it is left out instead.
        if let Some(v) = get(*c).text() {
            e.headers.push((alias.clone(), v));
        }
    }
    if let Some(text) = plan.tracing.and_then(|c| get(c).text()).filter(|t| !t.trim().is_empty()) {
        let tp = crate::trace::traceparent_in_properties(&text).unwrap_or(text.trim());
        match crate::trace::check_traceparent(tp) {
            Ok(()) => e.headers.push(("traceparent".to_owned(), tp.to_owned())),
            Err(why) => {
                e.trace_dropped =
                    Some(format!("row of {table} at {at}: the tracing column \"{}\" holds no valid traceparent ({why})", m.tracing_column))
            }
        }
    }
    match topic {
        Ok(t) => e.topic = t,
        Err(why) => errors.push(why),
    }
    if let Some(c) = plan.partition {
        match get(c) {
            Value::Int4(p) if p >= 0 => e.partition = Some(p),
            Value::Int4(p) => errors.push(format!("the partition column \"{}\" holds {p}, below 0", partition_column(m))),
            _ => {}
        }
    }
    if let Some(c) = plan.timestamp {
        if let Value::Timestamp(t) = get(c) {
            e.timestamp = Some(t);
        }
    }
    let tombstone = m.tombstone_on_empty && router::is_tombstone(e.payload.as_deref(), plan.payload_kind == PayloadKind::Text);
    // A tombstone whatever the placements, as the router: it sends one for
    // an empty payload before it builds any envelope.
    if tombstone {
        e.value = None;
    } else if e.payload.is_none() && plan.envelope.is_empty() {
        errors.push(format!(
            "the payload column \"{}\" is NULL and route.tombstone.on.empty.payload is off",
            m.payload_column
        ));
    } else if plan.envelope.is_empty() {
        e.value = e.payload.clone();
    } else {
        e.value = Some(envelope(plan, e.payload.as_deref(), &get).into_bytes());
    }
    if !errors.is_empty() {
        e.error = Some(format!("row of {table} at {at}: {}", errors.join("; ")));
    }
    if let Converter::Json { schemas } = m.key_converter {
        e.key = json_key(plan, get(plan.key), schemas);
    }
    if let Converter::Json { schemas } = m.value_converter {
        // A tombstone has no schema in the router: JsonConverter writes no
        // bytes for it, schemas or not.
        if let Some(v) = &e.value {
            e.value = Some(json_value(plan, v, schemas).into_bytes());
        }
    }
    e
}

/// The key as JsonConverter writes the router's key (the column's value
/// with Debezium's schema for its type): a string or uuid as a JSON
/// string, an integer as a number; with `schemas`, in the
/// `{"schema":...,"payload":...}` envelope.
fn json_key(plan: &Plan, v: Value, schemas: bool) -> Option<String> {
    let optional = plan.key_optional;
    let (schema, payload) = match (&v, plan.key.ty) {
        (Value::Int4(i), _) => (connect_schema("int32", optional, None), Some(i.to_string())),
        (_, ColumnType::Uuid) => (connect_schema("string", optional, Some("io.debezium.data.Uuid")), v.text().map(|t| connect_json_string(&t))),
        (_, ColumnType::Int4) => (connect_schema("int32", optional, None), None),
        _ => (connect_schema("string", optional, None), v.text().map(|t| connect_json_string(&t))),
    };
    let payload = payload.unwrap_or_else(|| "null".to_owned());
    // A NULL key has the key column's schema still, so JsonConverter writes
    // `null`, not no bytes (and the partitioner hashes those four bytes).
    Some(if schemas { format!("{{\"schema\":{schema},\"payload\":{payload}}}") } else { payload })
}

/// The value as JsonConverter writes the router's value, the payload column
/// with Debezium's schema for its type: json and jsonb are
/// `io.debezium.data.Json` strings (the JSON text as a JSON string), text a
/// string, bytea base64 (`bytes`).
fn json_value(plan: &Plan, payload: &[u8], schemas: bool) -> String {
    let optional = plan.payload_optional;
    let (schema, value) = match plan.payload_kind {
        PayloadKind::Json => (connect_schema("string", optional, Some("io.debezium.data.Json")), connect_json_string(&String::from_utf8_lossy(payload))),
        PayloadKind::Text => (connect_schema("string", optional, None), connect_json_string(&String::from_utf8_lossy(payload))),
        PayloadKind::Bytes => (connect_schema("bytes", optional, None), connect_json_string(&base64(payload))),
    };
    if schemas {
        format!("{{\"schema\":{schema},\"payload\":{value}}}")
    } else {
        value
    }
}

/// A Kafka Connect schema as JsonConverter writes it: type, optional, then
/// Debezium's logical name and version 1 when it has one.
fn connect_schema(ty: &str, optional: bool, name: Option<&str>) -> String {
    match name {
        Some(n) => format!("{{\"type\":\"{ty}\",\"optional\":{optional},\"name\":\"{n}\",\"version\":1}}"),
        None => format!("{{\"type\":\"{ty}\",\"optional\":{optional}}}"),
    }
}

/// A JSON string as Jackson (JsonConverter's serializer) writes it: `"`
/// and `\` escaped, the short escapes for backspace, tab, newline, form
/// feed and carriage return, other control characters as `\u00XX` in
/// upper case, everything else (non-ASCII included) as it is.
fn connect_json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn partition_column(m: &Mapping) -> &str {
    m.placements
        .iter()
        .find_map(|p| match p {
            Placement::Partition { column } => Some(column.as_str()),
            _ => None,
        })
        .unwrap_or_default()
}

/// The value with envelope placements: `{"payload": ..., alias: ...}`. A
/// JSON payload is nested as it is, text becomes a JSON string, bytea a
/// base64 string (as Kafka Connect's JsonConverter writes bytes).
fn envelope(plan: &Plan, payload: Option<&[u8]>, get: &impl Fn(Col) -> Value) -> String {
    let mut out = String::from("{\"payload\":");
    match (payload, plan.payload_kind) {
        (None, _) => out.push_str("null"),
        (Some(b), PayloadKind::Json) => out.push_str(&String::from_utf8_lossy(b)),
        (Some(b), PayloadKind::Text) => out.push_str(&serde_json::Value::from(String::from_utf8_lossy(b)).to_string()),
        (Some(b), PayloadKind::Bytes) => out.push_str(&serde_json::Value::from(base64(b)).to_string()),
    }
    for (c, alias) in &plan.envelope {
        out.push(',');
        out.push_str(&serde_json::Value::from(alias.as_str()).to_string());
        out.push(':');
        let v = get(*c);
        match (&v, c.ty) {
            (Value::Null, _) => out.push_str("null"),
            (Value::Int4(i), _) => out.push_str(&i.to_string()),
            (Value::Text(s), ColumnType::Json | ColumnType::Jsonb) => out.push_str(s),
            (Value::Bytes(b), _) => out.push_str(&serde_json::Value::from(base64(b)).to_string()),
            _ => out.push_str(&serde_json::Value::from(v.text().unwrap_or_default()).to_string()),
        }
    }
    out.push('}');
    out
}

/// Standard base64 with padding (RFC 4648, section 4).
pub fn base64(b: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(b.len().div_ceil(3) * 4);
    for chunk in b.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, x)| n | (u32::from(*x) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ColumnType::*;

    fn t(schema: &str, name: &str) -> TableName {
        TableName { schema: schema.into(), name: name.into() }
    }

    #[test]
    fn table_names_fold_like_sql_and_need_a_schema() {
        assert_eq!(parse_tables("").unwrap(), vec![]);
        assert_eq!(parse_tables("  ").unwrap(), vec![]);
        assert_eq!(parse_tables("public.OutboxEvent").unwrap(), vec![t("public", "outboxevent")]);
        assert_eq!(
            parse_tables(" app . \"Outbox.Events\" , \"My\"\"Schema\".x").unwrap(),
            vec![t("app", "Outbox.Events"), t("My\"Schema", "x")]
        );
        assert_eq!(t("My\"Schema", "Outbox").to_string(), "\"My\"\"Schema\".\"Outbox\"");
        let err = |s: &str| parse_tables(s).unwrap_err();
        assert!(err("outboxevent").contains("with its schema"));
        assert!(err("a.b.c").contains("with its schema"));
        assert!(err("a.b,,c.d").contains("with its schema"));
        assert!(err("a.\"b").contains("unterminated"));
        assert!(err("a.b, A.B").contains("named twice"));
    }

    fn debezium_table(name: &str) -> Option<(usize, ColumnType)> {
        let cols = [
            ("id", Uuid),
            ("aggregatetype", Text),
            ("aggregateid", Text),
            ("type", Text),
            ("payload", Jsonb),
            ("tracingspancontext", Text),
            ("created", Timestamp),
            ("shard", Int4),
            ("money", UserDefined),
        ];
        cols.iter().position(|(n, _)| *n == name).map(|i| (i, cols[i].1))
    }

    fn mapping(pairs: &[(&str, &str)]) -> Mapping {
        Mapping::parse(&pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn a_plan_resolves_columns_and_refuses_by_name() {
        let m = mapping(&[("table.fields.additional.placement", "type:header:eventType,shard:partition")]);
        let p = plan(&m, "public.outboxevent", debezium_table).unwrap();
        assert_eq!((p.id.index, p.key.index, p.payload.index, p.route.index), (0, 2, 4, 1));
        assert_eq!(p.payload_kind, PayloadKind::Json);
        assert_eq!(p.headers, vec![(Col { index: 3, ty: Text }, "eventType".to_owned())]);
        assert_eq!(p.partition, Some(Col { index: 7, ty: Int4 }));
        assert_eq!(p.tracing, Some(Col { index: 5, ty: Text }));
        let err = |pairs: &[(&str, &str)]| plan(&mapping(pairs), "public.outboxevent", debezium_table).unwrap_err();
        assert_eq!(
            err(&[("table.field.event.payload", "body")]),
            "table public.outboxevent has no column \"body\" (the mapping's table.field.event.payload)"
        );
        assert!(err(&[("table.field.event.payload", "shard")]).contains("must be jsonb, json, text, varchar or bytea"));
        assert!(err(&[("route.by.field", "shard")]).contains("\"shard\" of table public.outboxevent (the mapping's route.by.field) must be text"));
        assert!(err(&[("table.fields.additional.placement", "type:partition")]).contains("integer (int4)"));
        assert!(err(&[("table.field.event.timestamp", "type")]).contains("timestamp or timestamptz"));
        assert!(err(&[("table.field.event.key", "money")]).contains("user-defined output function"));
        assert!(err(&[("table.fields.additional.placement", "nope:header")]).contains("no column \"nope\""));
        assert_eq!(
            err(&[("tracing.span.context.field", "trace")]),
            "table public.outboxevent has no column \"trace\" (the mapping's tracing.span.context.field)",
            "a tracing column named in the options must exist"
        );
        let without_tracing = |name: &str| debezium_table(name).filter(|_| name != "tracingspancontext");
        assert_eq!(plan(&mapping(&[]), "t", without_tracing).unwrap().tracing, None, "the default one is read where it is");
        let lenient = mapping(&[("table.fields.additional.placement", "nope:header"), ("table.field.additional.missing", "ignore")]);
        assert!(plan(&lenient, "t", debezium_table).unwrap().headers.is_empty());
    }

    fn row(v: &[Value]) -> impl Fn(Col) -> Value + '_ {
        move |c| v[c.index].clone()
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn sample() -> Vec<Value> {
        vec![
            Value::Uuid([0x11; 16]),
            Value::Text("Order".into()),
            Value::Text("42".into()),
            Value::Text("OrderPlaced".into()),
            Value::Text(r#"{"total": 1}"#.into()),
            Value::Text(format!("#Tue Nov 24 01:00:00 UTC 2026\ntraceparent={TP}\n")),
            Value::Timestamp(1_000_000),
            Value::Int4(2),
            Value::Null,
        ]
    }

    #[test]
    fn a_row_becomes_the_routers_message() {
        let m = mapping(&[("table.fields.additional.placement", "type:header:eventType,shard:partition")]);
        let p = plan(&m, "public.outboxevent", debezium_table).unwrap();
        let v = sample();
        let e = row_event(&m, &p, "public.outboxevent", "0/1", row(&v));
        assert_eq!(e.error, None);
        assert_eq!(e.id, [0x11; 16]);
        assert_eq!(e.topic, "outbox.event.Order");
        assert_eq!(e.key.as_deref(), Some("42"));
        assert_eq!(e.value.as_deref(), Some(&br#"{"total": 1}"#[..]));
        assert_eq!(
            e.headers,
            vec![
                ("id".to_owned(), "11111111-1111-1111-1111-111111111111".to_owned()),
                ("eventType".to_owned(), "OrderPlaced".to_owned()),
                ("traceparent".to_owned(), TP.to_owned()),
            ]
        );
        assert_eq!(e.partition, Some(2));
        assert_eq!(e.timestamp, None, "no timestamp column mapped: the commit time");
        let m2 = mapping(&[("table.field.event.timestamp", "created")]);
        let p2 = plan(&m2, "t", debezium_table).unwrap();
        assert_eq!(row_event(&m2, &p2, "t", "0/1", row(&v)).timestamp, Some(1_000_000));
    }

    #[test]
    fn nulls_follow_the_router_or_are_refused_with_the_reason() {
        let m = mapping(&[]);
        let p = plan(&m, "t", debezium_table).unwrap();
        let mut v = sample();
        v[2] = Value::Null;
        v[5] = Value::Text("not a traceparent".into());
        let e = row_event(&m, &p, "t", "0/1", row(&v));
        assert_eq!((e.key, e.error), (None, None), "a NULL key is a null Kafka key");
        assert_eq!(e.headers.len(), 1, "an invalid traceparent is left out, the event still goes");
        let dropped = e.trace_dropped.unwrap();
        assert!(
            dropped.starts_with("row of t at 0/1: the tracing column \"tracingspancontext\" holds no valid traceparent (invalid traceparent"),
            "said, for the log: {dropped}"
        );
        v[5] = Value::Text(" ".into());
        assert_eq!(row_event(&m, &p, "t", "0/1", row(&v)).trace_dropped, None, "a blank column is no trace context, not a bad one");
        v[5] = Value::Null;
        assert_eq!(row_event(&m, &p, "t", "0/1", row(&v)).trace_dropped, None);
        v[1] = Value::Null;
        v[4] = Value::Null;
        let e = row_event(&m, &p, "t", "0/9", row(&v));
        let why = e.error.unwrap();
        assert!(why.starts_with("row of t at 0/9: "), "{why}");
        assert!(why.contains("route column \"aggregatetype\" is NULL"), "{why}");
        assert!(why.contains("payload column \"payload\" is NULL and route.tombstone.on.empty.payload is off"), "{why}");
        let tomb = mapping(&[("route.tombstone.on.empty.payload", "true")]);
        let mut v = sample();
        v[4] = Value::Null;
        let e = row_event(&tomb, &plan(&tomb, "t", debezium_table).unwrap(), "t", "0/1", row(&v));
        assert_eq!((e.value, e.error, e.key.as_deref()), (None, None, Some("42")));
    }

    #[test]
    fn ids_that_are_not_uuids_get_a_stable_derived_one() {
        let u = "01a20c64-9aff-74f6-99bc-976099350492";
        assert_eq!(crate::format_uuid(&id_of_text("t", u)), u, "a text id holding a UUID is that UUID");
        assert_eq!(id_of_text("t", &u.to_uppercase()), id_of_text("t", u));
        assert_eq!(id_of_text("t", "7"), derived_id("t", "7"));
        assert_eq!(id_of_text("t", "01a20c64-9aff-74f6-99bc-97609935049g"), derived_id("t", "01a20c64-9aff-74f6-99bc-97609935049g"));
        assert_eq!(id_of_text("t", "01a20c649aff74f699bc976099350492"), derived_id("t", "01a20c649aff74f699bc976099350492"));
        let a = derived_id("public.t", "7");
        assert_eq!(a, derived_id("public.t", "7"));
        assert_ne!(a, derived_id("public.u", "7"));
        assert_eq!(a[6] >> 4, 8, "version 8");
        assert_eq!(a[8] >> 6, 2, "RFC 4122 variant");
    }

    #[test]
    fn envelopes_nest_json_and_quote_the_rest() {
        let m = mapping(&[("table.fields.additional.placement", "type:envelope:eventType,shard:envelope")]);
        let p = plan(&m, "t", debezium_table).unwrap();
        let e = row_event(&m, &p, "t", "0/1", row(&sample()));
        assert_eq!(String::from_utf8(e.value.unwrap()).unwrap(), r#"{"payload":{"total": 1},"eventType":"OrderPlaced","shard":2}"#);
        let tomb = mapping(&[("table.fields.additional.placement", "type:envelope"), ("route.tombstone.on.empty.payload", "true")]);
        let mut v = sample();
        v[4] = Value::Null;
        let e = row_event(&tomb, &plan(&tomb, "t", debezium_table).unwrap(), "t", "0/1", row(&v));
        assert_eq!((e.value, e.error), (None, None), "a tombstone, envelope or not (the router sends it before any envelope)");
    }

    #[test]
    fn json_converter_output_is_debeziums() {
        let json = |schemas: &str| {
            mapping(&[
                ("key.converter", JSON_CONVERTER),
                ("key.converter.schemas.enable", schemas),
                ("value.converter", JSON_CONVERTER),
                ("value.converter.schemas.enable", schemas),
                ("route.tombstone.on.empty.payload", "true"),
            ])
        };
        let plain = json("false");
        let p = plan(&plain, "t", debezium_table).unwrap();
        let e = row_event(&plain, &p, "t", "0/1", row(&sample()));
        assert_eq!(e.key.as_deref(), Some("\"42\""), "the key as a JSON string");
        assert_eq!(String::from_utf8(e.value.unwrap()).unwrap(), r#""{\"total\": 1}""#, "jsonb: its text as a JSON string");
        assert_eq!(e.payload.as_deref(), Some(&br#"{"total": 1}"#[..]), "a dead letter keeps the payload itself");
        let mut v = sample();
        v[2] = Value::Null;
        v[4] = Value::Null;
        let e = row_event(&plain, &p, "t", "0/1", row(&v));
        assert_eq!((e.key.as_deref(), e.value), (Some("null"), None), "a NULL key is JSON null; a tombstone no bytes");

        let enveloped = json("true");
        let flags = |i: usize| ColumnFlags { not_null: i == 0 || i == 2, has_default: i == 0 };
        let p = plan_with(&enveloped, "t", debezium_table, flags).unwrap();
        let e = row_event(&enveloped, &p, "t", "0/1", row(&sample()));
        assert_eq!(e.key.as_deref(), Some(r#"{"schema":{"type":"string","optional":false},"payload":"42"}"#));
        assert_eq!(
            String::from_utf8(e.value.unwrap()).unwrap(),
            r#"{"schema":{"type":"string","optional":true,"name":"io.debezium.data.Json","version":1},"payload":"{\"total\": 1}"}"#
        );
        let e = row_event(&enveloped, &plan(&enveloped, "t", debezium_table).unwrap(), "t", "0/1", row(&v));
        assert_eq!(e.key.as_deref(), Some(r#"{"schema":{"type":"string","optional":true},"payload":null}"#), "schemas: a null key in the envelope");
        assert_eq!(e.value, None, "a tombstone has no schema: no bytes");

        let by = |key: &str| mapping(&[("key.converter", JSON_CONVERTER), ("key.converter.schemas.enable", "false"), ("table.field.event.key", key)]);
        let uuid_key = by("id");
        let e = row_event(&uuid_key, &plan(&uuid_key, "t", debezium_table).unwrap(), "t", "0/1", row(&sample()));
        assert_eq!(e.key.as_deref(), Some("\"11111111-1111-1111-1111-111111111111\""));
        let int_key = mapping(&[("key.converter", JSON_CONVERTER), ("table.field.event.key", "shard")]);
        let e = row_event(&int_key, &plan(&int_key, "t", debezium_table).unwrap(), "t", "0/1", row(&sample()));
        assert_eq!(e.key.as_deref(), Some(r#"{"schema":{"type":"int32","optional":true},"payload":2}"#));
        assert!(plan(&by("created"), "t", debezium_table).unwrap_err().contains("must be a string type, uuid or integer"));
        let defaulted = |i: usize| ColumnFlags { not_null: true, has_default: i == 4 };
        assert!(plan_with(&enveloped, "t", debezium_table, defaulted).unwrap_err().contains("has a DEFAULT"));
        assert!(plan_with(&plain, "t", debezium_table, defaulted).is_ok(), "without schemas a default changes nothing");
        let env = mapping(&[("value.converter", JSON_CONVERTER), ("table.fields.additional.placement", "type:envelope")]);
        assert!(plan(&env, "t", debezium_table).unwrap_err().contains("envelope placements with value.converter"));
    }

    #[test]
    fn json_strings_are_escaped_as_jackson_does() {
        assert_eq!(connect_json_string("a\"b\\c"), r#""a\"b\\c""#);
        assert_eq!(connect_json_string("\u{8}\t\n\u{c}\r"), r#""\b\t\n\f\r""#);
        assert_eq!(connect_json_string("\u{1}\u{1f}\u{7f}/é東"), "\"\\u0001\\u001F\u{7f}/é東\"", "upper-case hex; DEL, / and non-ASCII as they are");
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("foobar", "Zm9vYmFy")] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
