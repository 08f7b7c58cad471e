//! Debezium's Outbox Event Router options, as a mapping from the columns of
//! a user's outbox table to an event, so that a switcher's connector
//! configuration translates line by line: `transforms.<name>.<option>=value`
//! becomes `<option>=value` (the prefix is accepted and dropped). Defaults,
//! names and semantics follow the router's (see
//! docs/design/debezium-switch-research.md, section A), with the
//! differences said where they are.
//!
//! Pure: parsing, routing and the checks a row must pass. Reading the
//! table's catalog and its rows is the shell's.

use regex::Regex;

/// Where an additional column goes (`table.fields.additional.placement`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// A message header named `alias`.
    Header { column: String, alias: String },
    /// A field of the value, which becomes `{"payload": ..., alias: ...}`.
    Envelope { column: String, alias: String },
    /// The Kafka partition (an int4 column; the router ignores an alias too).
    Partition { column: String },
}

/// What to do with an UPDATE of the table (`table.op.invalid.behavior`);
/// DELETEs are always ignored, as the router drops them silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUpdate {
    Warn,
    Error,
    Fatal,
}

/// How Kafka Connect's converter wrote the key or the value, so a
/// switcher's consumers get the same bytes (`key.converter`,
/// `value.converter` and their `schemas.enable`, from the connector's or
/// the worker's configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Converter {
    /// StringConverter or ByteArrayConverter: the column's bytes.
    Bytes,
    /// JsonConverter: the value as JSON (a string as a JSON string, a
    /// bytea as base64), wrapped in `{"schema":...,"payload":...}` when
    /// `schemas` (`schemas.enable`, JsonConverter's default true).
    Json { schemas: bool },
}

pub const STRING_CONVERTER: &str = "org.apache.kafka.connect.storage.StringConverter";
pub const BYTE_ARRAY_CONVERTER: &str = "org.apache.kafka.connect.converters.ByteArrayConverter";
pub const JSON_CONVERTER: &str = "org.apache.kafka.connect.json.JsonConverter";

/// Topic routing: `route.by.field`'s value through `route.topic.regex`
/// and `route.topic.replacement`, as Kafka's RegexRouter does it.
#[derive(Debug, Clone)]
pub struct Route {
    pub by_column: String,
    regex: Regex,
    /// The replacement in the regex crate's syntax (`${name}`, `$1`).
    replacement: String,
}

#[derive(Debug, Clone)]
pub struct Mapping {
    pub id_column: String,
    pub key_column: String,
    /// Read only where a placement or CloudEvents asks for it: the router
    /// never publishes the type by itself.
    pub type_column: String,
    pub payload_column: String,
    pub timestamp_column: Option<String>,
    pub placements: Vec<Placement>,
    /// `table.field.additional.missing = ignore`: placements of columns the
    /// table lacks are skipped rather than refused.
    pub ignore_missing: bool,
    pub route: Route,
    pub tombstone_on_empty: bool,
    pub on_update: OnUpdate,
    pub tracing_column: String,
    /// `tracing.span.context.field` was given: a table without that column
    /// is refused (the default column is read only where a table has it).
    pub tracing_named: bool,
    /// `delete.published.rows` (outbox's own option, default false): the
    /// relay deletes a row once its event is settled (published or
    /// dead-lettered), by the id column, which must be the primary key.
    pub delete_published_rows: bool,
    pub key_converter: Converter,
    pub value_converter: Converter,
}

pub const DEFAULT_REGEX: &str = "(?<routedByValue>.*)";
pub const DEFAULT_REPLACEMENT: &str = "outbox.event.${routedByValue}";

/// The router's options this mapping understands; anything else is refused
/// by name, so a misspelt option is an error rather than a silent default.
const KNOWN: [&str; 20] = [
    "delete.published.rows",
    "key.converter",
    "key.converter.schemas.enable",
    "value.converter",
    "value.converter.schemas.enable",
    "table.field.event.id",
    "table.field.event.key",
    "table.field.event.type",
    "table.field.event.payload",
    "table.field.event.timestamp",
    "table.fields.additional.placement",
    "table.field.additional.missing",
    "route.by.field",
    "route.topic.regex",
    "route.topic.replacement",
    "route.tombstone.on.empty.payload",
    "table.expand.json.payload",
    "table.op.invalid.behavior",
    "tracing.span.context.field",
    "type",
];

/// The router's class, the one transform whose options belong here.
pub const ROUTER_CLASS: &str = "io.debezium.transforms.outbox.EventRouter";

/// Lines that configure Kafka Connect rather than the router; accepted and
/// ignored so a pasted block needs no editing: the list of transforms, a
/// transform's predicate (`outbox.tables` is what selects the rows here)
/// and the predicates' own lines, the schema version and tracing's
/// operation names (no schemas and no spans here), and the JSON expansion's
/// options, which act only when `table.expand.json.payload` is true (refused).
fn connect_only(option: &str) -> bool {
    matches!(
        option,
        "transforms"
            | "predicates"
            | "predicate"
            | "negate"
            | "table.field.event.schema.version"
            | "tracing.operation.name"
            | "tracing.with.context.field.only"
    ) || option.starts_with("table.json.payload.")
        || option.starts_with("predicates.")
}

impl Mapping {
    /// Parses the router's options (`key=value` pairs; `transforms.<name>.`
    /// prefixes dropped), with the router's defaults for what is absent.
    pub fn parse(options: &[(String, String)]) -> Result<Mapping, String> {
        let mut m = Mapping {
            id_column: "id".into(),
            key_column: "aggregateid".into(),
            type_column: "type".into(),
            payload_column: "payload".into(),
            timestamp_column: None,
            placements: Vec::new(),
            ignore_missing: false,
            route: Route::new("aggregatetype", DEFAULT_REGEX, DEFAULT_REPLACEMENT)?,
            tombstone_on_empty: false,
            on_update: OnUpdate::Warn,
            tracing_column: "tracingspancontext".into(),
            tracing_named: false,
            delete_published_rows: false,
            key_converter: Converter::Bytes,
            value_converter: Converter::Bytes,
        };
        // Each converter: its class and its schemas.enable, in any order.
        let mut converters = [(None, None), (None, None)];
        let (mut regex, mut replacement, mut by) = (DEFAULT_REGEX.to_owned(), DEFAULT_REPLACEMENT.to_owned(), m.route.by_column.clone());
        for (k, v) in options {
            let k = unescape_properties(k.trim());
            let option = strip_prefix(&k);
            let v = unescape_properties(v.trim());
            let v = v.as_str();
            let column = || -> Result<String, String> {
                if v.is_empty() {
                    Err(format!("{option}: a column name is needed"))
                } else {
                    Ok(v.to_owned())
                }
            };
            match option {
                "table.field.event.id" => m.id_column = column()?,
                "table.field.event.key" => m.key_column = column()?,
                "table.field.event.type" => m.type_column = column()?,
                "table.field.event.payload" => m.payload_column = column()?,
                "table.field.event.timestamp" => m.timestamp_column = Some(column()?),
                "table.fields.additional.placement" => m.placements = placements(v)?,
                "table.field.additional.missing" => m.ignore_missing = one_of(option, v, &["error", "ignore"])? == "ignore",
                "route.by.field" => by = column()?,
                "route.topic.regex" => regex = v.to_owned(),
                "route.topic.replacement" => replacement = v.to_owned(),
                "route.tombstone.on.empty.payload" => m.tombstone_on_empty = boolean(option, v)?,
                "table.expand.json.payload" => {
                    if boolean(option, v)? {
                        return Err(format!(
                            "{option}=true is not supported: outbox publishes the payload column's JSON as stored \
                             (Debezium expands it into a record, which JsonConverter writes compacted, without null \
                             fields or empty arrays); remove the line, or set it to false"
                        ));
                    }
                }
                "type" if v != ROUTER_CLASS => {
                    return Err(format!(
                        "type={v}: outbox.table_options takes the options of {ROUTER_CLASS} only; leave other \
                         transforms' lines out"
                    ))
                }
                "type" => {}
                "table.op.invalid.behavior" => {
                    m.on_update = match one_of(option, v, &["warn", "error", "fatal"])? {
                        "warn" => OnUpdate::Warn,
                        "error" => OnUpdate::Error,
                        _ => OnUpdate::Fatal,
                    }
                }
                "tracing.span.context.field" => {
                    m.tracing_column = column()?;
                    m.tracing_named = true;
                }
                "delete.published.rows" => m.delete_published_rows = boolean(option, v)?,
                "key.converter" | "value.converter" => {
                    let json = match v {
                        STRING_CONVERTER | BYTE_ARRAY_CONVERTER => false,
                        JSON_CONVERTER => true,
                        _ => {
                            return Err(format!(
                                "{option}={v} is not supported: outbox writes keys and values as {STRING_CONVERTER}, \
                                 {BYTE_ARRAY_CONVERTER} or {JSON_CONVERTER} do"
                            ))
                        }
                    };
                    converters[(option == "value.converter") as usize].0 = Some(json);
                }
                "key.converter.schemas.enable" | "value.converter.schemas.enable" => {
                    converters[option.starts_with("value.") as usize].1 = Some(boolean(option, v)?);
                }
                o if o.starts_with("key.converter.") || o.starts_with("value.converter.") => {
                    if !o.ends_with(".schemas.cache.size") {
                        return Err(format!("{o} is not supported (of a converter's options, outbox reads schemas.enable)"));
                    }
                }
                o if connect_only(o) => {}
                o => {
                    return Err(format!(
                        "unknown outbox router option \"{o}\" (known: {})",
                        KNOWN[..KNOWN.len() - 1].join(", ")
                    ))
                }
            }
        }
        m.route = Route::new(&by, &regex, &replacement)?;
        let converter = |(json, schemas): (Option<bool>, Option<bool>)| match json {
            Some(true) => Converter::Json { schemas: schemas.unwrap_or(true) },
            _ => Converter::Bytes,
        };
        m.key_converter = converter(converters[0]);
        m.value_converter = converter(converters[1]);
        Ok(m)
    }

    /// Every column the mapping reads, for the check against the table.
    pub fn columns(&self) -> Vec<&str> {
        let mut c = vec![self.id_column.as_str(), self.key_column.as_str(), self.payload_column.as_str(), self.route.by_column.as_str()];
        c.extend(self.timestamp_column.as_deref());
        for p in &self.placements {
            c.push(match p {
                Placement::Header { column, .. } | Placement::Envelope { column, .. } | Placement::Partition { column } => column,
            });
        }
        c
    }
}

/// A key or value as `java.util.Properties` reads it from the connector's
/// `.properties` file: `\\` is one backslash, `\t` `\n` `\r` `\f` and
/// `\uXXXX` the characters, and a backslash before any other character is
/// dropped. So a line pasted from that file means what it meant to Kafka
/// Connect: the regex `\\.` written there is `\.` (a literal dot) here too.
fn unescape_properties(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\u{c}'),
            Some('u') => {
                let hex: String = chars.clone().take(4).collect();
                match u32::from_str_radix(&hex, 16).ok().filter(|_| hex.len() == 4).and_then(char::from_u32) {
                    Some(ch) => {
                        out.push(ch);
                        chars.nth(3);
                    }
                    None => out.push('u'),
                }
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

fn strip_prefix(k: &str) -> &str {
    // transforms.<name>.<option>
    match k.strip_prefix("transforms.").and_then(|r| r.split_once('.')) {
        Some((_, option)) => option,
        None => k,
    }
}

fn boolean(option: &str, v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{option}: \"{v}\" is not true or false")),
    }
}

fn one_of<'a>(option: &str, v: &str, allowed: &[&'a str]) -> Result<&'a str, String> {
    let lower = v.to_ascii_lowercase();
    allowed
        .iter()
        .find(|a| **a == lower)
        .copied()
        .ok_or_else(|| format!("{option}: \"{v}\" is not one of {}", allowed.join(", ")))
}

/// `column:placement[:alias],...` with placement `header`, `envelope` or
/// `partition` (case-insensitive, as the router matches them).
fn placements(v: &str) -> Result<Vec<Placement>, String> {
    let mut out = Vec::new();
    for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let f: Vec<&str> = part.split(':').map(str::trim).collect();
        if !(2..=3).contains(&f.len()) || f.iter().any(|x| x.is_empty()) {
            return Err(format!(
                "table.fields.additional.placement: \"{part}\" must be column:placement or column:placement:alias"
            ));
        }
        let column = f[0].to_owned();
        let alias = f.get(2).map_or(column.clone(), |a| (*a).to_owned());
        out.push(match f[1].to_ascii_lowercase().as_str() {
            "header" => Placement::Header { column, alias },
            "envelope" => Placement::Envelope { column, alias },
            "partition" => Placement::Partition { column },
            other => {
                return Err(format!(
                    "table.fields.additional.placement: \"{other}\" in \"{part}\" is not header, envelope or partition"
                ))
            }
        });
    }
    Ok(out)
}

impl Route {
    /// A Java `Matcher` replacement (`${name}`, `$n`, `\x` escapes) checked
    /// against the regex and translated to the regex crate's syntax.
    pub fn new(by_column: &str, regex: &str, replacement: &str) -> Result<Route, String> {
        // Kafka's RegexRouter needs the whole value to match.
        let anchored = format!("^(?:{regex})$");
        let re = Regex::new(&anchored).map_err(|e| format!("route.topic.regex \"{regex}\": {e}"))?;
        let mut out = String::with_capacity(replacement.len());
        let mut chars = replacement.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some('$') => out.push_str("$$"),
                    Some(x) => out.push(x),
                    None => return Err(format!("route.topic.replacement \"{replacement}\": ends with an escape")),
                },
                '$' => match chars.peek() {
                    Some('{') => {
                        chars.next();
                        let name: String = chars.by_ref().take_while(|c| *c != '}').collect();
                        if !re.capture_names().flatten().any(|n| n == name) {
                            return Err(format!(
                                "route.topic.replacement \"{replacement}\": route.topic.regex has no group named \"{name}\""
                            ));
                        }
                        out.push_str(&format!("${{{name}}}"));
                    }
                    Some(d) if d.is_ascii_digit() => {
                        let n: String = std::iter::from_fn(|| chars.next_if(|c| c.is_ascii_digit())).collect();
                        if n.parse::<usize>().map_or(true, |i| i >= re.captures_len()) {
                            return Err(format!("route.topic.replacement \"{replacement}\": no group {n}"));
                        }
                        out.push_str(&format!("${{{n}}}"));
                    }
                    _ => {
                        return Err(format!(
                            "route.topic.replacement \"{replacement}\": a lone $ (write \\$ for a literal one)"
                        ))
                    }
                },
                c => out.push(c),
            }
        }
        Ok(Route { by_column: by_column.to_owned(), regex: re, replacement: out })
    }

    /// The topic for a row whose route-by column holds `value`: the
    /// replacement when the regex matches it whole, else the value itself
    /// (Kafka's RegexRouter). A NULL route value has no topic: the router
    /// fails the task there; the relay dead-letters the row.
    pub fn topic(&self, value: Option<&str>) -> Result<String, String> {
        let v = value.ok_or_else(|| format!("the route column \"{}\" is NULL: no topic", self.by_column))?;
        Ok(if self.regex.is_match(v) { self.regex.replace(v, self.replacement.as_str()).into_owned() } else { v.to_owned() })
    }
}

/// Whether a payload is a tombstone under `route.tombstone.on.empty.payload`:
/// NULL, or text that is empty or only whitespace, as the router tests it.
pub fn is_tombstone(payload: Option<&[u8]>, is_text: bool) -> bool {
    match payload {
        None => true,
        Some(b) => is_text && b.iter().all(u8::is_ascii_whitespace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn defaults_are_the_routers() {
        let m = Mapping::parse(&[]).unwrap();
        assert_eq!((m.id_column.as_str(), m.key_column.as_str(), m.payload_column.as_str()), ("id", "aggregateid", "payload"));
        assert_eq!(m.route.by_column, "aggregatetype");
        assert_eq!(m.route.topic(Some("Order")).unwrap(), "outbox.event.Order");
        assert_eq!((m.tombstone_on_empty, m.on_update), (false, OnUpdate::Warn));
        assert_eq!((m.tracing_column.as_str(), m.tracing_named), ("tracingspancontext", false));
        assert_eq!(m.columns(), vec!["id", "aggregateid", "payload", "aggregatetype"]);
    }

    #[test]
    fn a_connector_block_translates_line_by_line() {
        let m = Mapping::parse(&opts(&[
            ("transforms", "outbox"),
            ("transforms.outbox.type", "io.debezium.transforms.outbox.EventRouter"),
            ("transforms.outbox.predicate", "isOutbox"),
            ("transforms.outbox.negate", "false"),
            ("predicates", "isOutbox"),
            ("predicates.isOutbox.type", "org.apache.kafka.connect.transforms.predicates.TopicNameMatches"),
            ("predicates.isOutbox.pattern", "app\\.outboxevent"),
            ("transforms.outbox.table.expand.json.payload", "false"),
            ("transforms.outbox.table.field.event.id", "event_id"),
            ("transforms.outbox.table.field.event.key", "agg_id"),
            ("transforms.outbox.table.field.event.payload", "body"),
            ("transforms.outbox.table.field.event.timestamp", "created_at"),
            ("transforms.outbox.table.fields.additional.placement", "type:header:eventType, version:envelope , shard:PARTITION:ignored"),
            ("transforms.outbox.route.by.field", "agg_type"),
            ("transforms.outbox.route.topic.replacement", "${routedByValue}.events"),
            ("transforms.outbox.route.tombstone.on.empty.payload", "true"),
            ("transforms.outbox.table.op.invalid.behavior", "fatal"),
            ("transforms.outbox.table.json.payload.null.behavior", "ignore"),
            ("delete.published.rows", "true"),
        ]))
        .unwrap();
        assert_eq!(m.key_column, "agg_id");
        assert_eq!(m.timestamp_column.as_deref(), Some("created_at"));
        assert_eq!(
            m.placements,
            vec![
                Placement::Header { column: "type".into(), alias: "eventType".into() },
                Placement::Envelope { column: "version".into(), alias: "version".into() },
                Placement::Partition { column: "shard".into() },
            ]
        );
        assert_eq!(m.route.topic(Some("Customer")).unwrap(), "Customer.events");
        assert!(m.tombstone_on_empty && m.on_update == OnUpdate::Fatal && m.delete_published_rows);
        assert_eq!(m.columns(), vec!["event_id", "agg_id", "body", "agg_type", "created_at", "type", "version", "shard"]);
    }

    #[test]
    fn values_are_read_as_a_properties_file_reads_them() {
        assert_eq!(unescape_properties(r"(?<kind>[a-z]+)\\.v1"), r"(?<kind>[a-z]+)\.v1");
        assert_eq!(unescape_properties(r"a\.b\tc\u00e9\:d"), "a.b\tcé:d", "an unknown escape drops its backslash, as Java's");
        assert_eq!(unescape_properties(r"\u12"), "u12");
        assert_eq!(unescape_properties("plain"), "plain");
        let m = Mapping::parse(&opts(&[("transforms.outbox.route.topic.regex", r"(?<kind>[a-z]+)\\.v1"),
                                        ("transforms.outbox.route.topic.replacement", "t.${kind}")])).unwrap();
        assert_eq!(m.route.topic(Some("invoice.v1")).unwrap(), "t.invoice");
        assert_eq!(m.route.topic(Some("invoiceXv1")).unwrap(), "invoiceXv1", "the dot is a literal dot");
    }

    #[test]
    fn converters_come_from_the_connectors_lines() {
        let m = Mapping::parse(&opts(&[])).unwrap();
        assert_eq!((m.key_converter, m.value_converter), (Converter::Bytes, Converter::Bytes), "pass-through by default");
        let m = Mapping::parse(&opts(&[
            ("value.converter.schemas.enable", "false"),
            ("key.converter", JSON_CONVERTER),
            ("value.converter", JSON_CONVERTER),
            ("value.converter.schemas.cache.size", "1000"),
        ]))
        .unwrap();
        assert_eq!(m.key_converter, Converter::Json { schemas: true }, "JsonConverter's default: schemas on");
        assert_eq!(m.value_converter, Converter::Json { schemas: false }, "schemas.enable before the class");
        let m = Mapping::parse(&opts(&[("key.converter", STRING_CONVERTER), ("key.converter.schemas.enable", "true")])).unwrap();
        assert_eq!(m.key_converter, Converter::Bytes);
        let err = |pairs: &[(&str, &str)]| Mapping::parse(&opts(pairs)).unwrap_err();
        assert!(err(&[("value.converter", "io.confluent.connect.avro.AvroConverter")]).contains("is not supported"));
        assert!(err(&[("value.converter.decimal.format", "NUMERIC")]).contains("value.converter.decimal.format is not supported"));
        assert!(err(&[("key.converter.schemas.enable", "maybe")]).contains("not true or false"));
    }

    #[test]
    fn routing_follows_kafkas_regex_router() {
        let r = Route::new("aggregatetype", "(?<kind>[a-z]+)-(\\d+)", "t.${kind}.$2").unwrap();
        assert_eq!(r.topic(Some("orders-7")).unwrap(), "t.orders.7");
        assert_eq!(r.topic(Some("xorders-7!")).unwrap(), "xorders-7!", "no whole match: the value itself");
        assert_eq!(r.topic(Some("Orders-7")).unwrap(), "Orders-7");
        assert!(r.topic(None).unwrap_err().contains("NULL"));
        let lit = Route::new("a", DEFAULT_REGEX, "cost\\$.${routedByValue}").unwrap();
        assert_eq!(lit.topic(Some("x")).unwrap(), "cost$.x");
        assert_eq!(Route::new("a", ".*", "fixed").unwrap().topic(Some("anything")).unwrap(), "fixed");
    }

    #[test]
    fn mistakes_are_refused_with_the_option_named() {
        let err = |pairs: &[(&str, &str)]| Mapping::parse(&opts(pairs)).unwrap_err();
        assert!(err(&[("table.field.event.idd", "x")]).contains("unknown outbox router option \"table.field.event.idd\""));
        assert!(err(&[("route.topic.regex", "(unclosed")]).contains("route.topic.regex"));
        assert!(err(&[("route.topic.replacement", "a.${nope}")]).contains("no group named \"nope\""));
        assert!(err(&[("route.topic.replacement", "a.$")]).contains("lone $"));
        assert!(err(&[("route.topic.replacement", "a.$3")]).contains("no group 3"));
        assert!(err(&[("table.fields.additional.placement", "type:body")]).contains("not header, envelope or partition"));
        assert!(err(&[("table.fields.additional.placement", "type")]).contains("column:placement"));
        assert!(err(&[("route.tombstone.on.empty.payload", "yes")]).contains("not true or false"));
        assert!(err(&[("table.op.invalid.behavior", "skip")]).contains("warn, error, fatal"));
        assert!(err(&[("table.field.event.key", " ")]).contains("a column name is needed"));
        let expand = err(&[("transforms.outbox.table.expand.json.payload", "true")]);
        assert!(expand.contains("table.expand.json.payload=true is not supported") && expand.contains("remove the line"), "{expand}");
        let other = err(&[("transforms.unwrap.type", "io.debezium.transforms.ExtractNewRecordState")]);
        assert!(other.contains("type=io.debezium.transforms.ExtractNewRecordState") && other.contains(ROUTER_CLASS), "{other}");
        assert!(Mapping::parse(&opts(&[("tracing.span.context.field", "trace")])).unwrap().tracing_named);
    }

    #[test]
    fn tombstones_are_null_or_blank_text() {
        assert!(is_tombstone(None, false));
        assert!(is_tombstone(Some(b" \n"), true));
        assert!(is_tombstone(Some(b""), true));
        assert!(!is_tombstone(Some(b""), false), "bytea is never blank to the router");
        assert!(!is_tombstone(Some(b"{}"), true));
    }
}
