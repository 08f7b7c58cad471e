//! `outbox.kafka_properties`: free-form librdkafka properties as
//! `key=value` pairs separated by `;` (a literal `;` in a value is written
//! `\;`), e.g. `security.protocol=SASL_SSL; sasl.mechanism=SCRAM-SHA-512`.
//! Parsed when the setting is set or reloaded, so a typo is refused there,
//! not discovered by the worker.
//!
//! `outbox.kafka_properties_file`: the same pairs one per line (`#`
//! comments), for secrets: a setting is readable by every member of
//! pg_read_all_settings (pg_monitor), a file owned by the server's OS user
//! is not.

pub fn parse(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (k, v) in pairs(s)? {
        check_name(&k, &format!("\"{k}={v}\""))?;
        if let Some((seen, _)) = out.iter().find(|(seen, _)| canonical(seen) == canonical(&k)) {
            return Err(format!("property \"{k}\" is given twice{}", same_as(seen, &k)));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// `key=value` pairs separated by `;` (`\;` is a literal one), trimmed,
/// empty items skipped; the syntax of this setting and of
/// `outbox.table_options`. A key given twice is refused.
pub fn pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut item = String::new();
    let mut items = Vec::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&';') => {
                item.push(';');
                chars.next();
            }
            ';' => items.push(std::mem::take(&mut item)),
            c => item.push(c),
        }
    }
    items.push(item);
    for item in items {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| format!("\"{item}\" is not of the form key=value"))?;
        let (k, v) = (k.trim(), v.trim());
        if k.is_empty() {
            return Err(format!("\"{item}\" has an empty property name"));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("\"{k}\" is given twice"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

fn check_name(k: &str, what: &str) -> Result<(), String> {
    if k.is_empty() {
        return Err(format!("{what} has an empty property name"));
    }
    if !k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
        return Err(format!("\"{k}\" is not a librdkafka property name"));
    }
    Ok(())
}

/// ", as \"other\"" when a property was given under another of its names.
fn same_as(seen: &str, k: &str) -> String {
    if seen == k {
        String::new()
    } else {
        format!(", also as \"{seen}\" (the same librdkafka property)")
    }
}

/// The properties file: `key=value` per line, the value verbatim after the
/// first `=` (trimmed), blank lines and lines starting with `#` ignored.
/// Errors name the line, never its value (it may be a password).
pub fn parse_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {} is not of the form key=value", n + 1))?;
        let k = k.trim();
        check_name(k, &format!("line {}", n + 1))?;
        if let Some((seen, _)) = out.iter().find(|(seen, _)| canonical(seen) == canonical(k)) {
            return Err(format!("property \"{k}\" is given twice (line {}){}", n + 1, same_as(seen, k)));
        }
        out.push((k.to_owned(), v.trim().to_owned()));
    }
    Ok(out)
}

/// The properties of the setting, then those of the file; a property in
/// both is an error (which one wins would be a guess).
pub fn merge(setting: Vec<(String, String)>, file: Vec<(String, String)>) -> Result<Vec<(String, String)>, String> {
    let mut out = setting;
    for (k, v) in file {
        if out.iter().any(|(seen, _)| canonical(seen) == canonical(&k)) {
            return Err(format!(
                "property \"{k}\" is in both outbox.kafka_properties and outbox.kafka_properties_file"
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

/// Where a property list comes from. The setting can be delegated with
/// `GRANT SET ON PARAMETER` and is readable by `pg_read_all_settings`; the
/// file is written by whoever administers the server's OS account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Setting,
    File,
}

/// librdkafka's alias names (every `_RK_C_ALIAS` entry of rdkafka_conf.c in
/// librdkafka 2.12): setting an alias sets the property it names, so every
/// check below goes through [`canonical`].
const ALIASES: &[(&str, &str)] = &[
    ("bootstrap.servers", "metadata.broker.list"),
    ("linger.ms", "queue.buffering.max.ms"),
    ("retries", "message.send.max.retries"),
    ("max.in.flight", "max.in.flight.requests.per.connection"),
    ("sasl.mechanism", "sasl.mechanisms"),
    ("compression.type", "compression.codec"),
    ("acks", "request.required.acks"),
    ("delivery.timeout.ms", "message.timeout.ms"),
    ("sasl.oauthbearer.client.credentials.client.id", "sasl.oauthbearer.client.id"),
    ("sasl.oauthbearer.client.credentials.client.secret", "sasl.oauthbearer.client.secret"),
    ("max.partition.fetch.bytes", "fetch.message.max.bytes"),
    ("enable.auto.commit", "auto.commit.enable"),
];

/// The name librdkafka resolves `name` to (lower-cased first: a property
/// name that differs only in case must not slip past the checks).
pub fn canonical(name: &str) -> String {
    let lower = name.to_ascii_lowercase();
    // A topic-level property may also be given with a "topic." prefix, and
    // topic-level properties set on the global configuration apply to every
    // topic (rd_kafka_conf_set falls through to the default topic conf).
    let lower = match lower.strip_prefix("topic.") {
        // ... except the global properties whose own name starts so.
        Some(rest) if !rest.starts_with("metadata.") && rest != "blacklist" => rest.to_owned(),
        _ => lower,
    };
    match ALIASES.iter().find(|(alias, _)| *alias == lower) {
        Some((_, real)) => (*real).to_owned(),
        None => lower,
    }
}

/// Properties the relay sets itself, by canonical name, with the reason a
/// user may not change them (under any name, in the setting or the file).
const RELAY_OWNED: &[(&str, &str)] = &[
    ("enable.idempotence", "the relay's producer is idempotent so retries never duplicate or reorder"),
    ("request.required.acks", "the relay needs acks=all: an event counts as published only once every in-sync replica has it"),
    ("message.timeout.ms", "the relay sets 0 (never expire): an expired event re-sent later would break per-key order"),
    ("partitioner", "the relay uses murmur2_random so keys land on the partitions Java producers choose"),
    ("delivery.report.only.error", "the slot is confirmed only behind delivery reports of successful sends"),
    ("dr_cb", "the relay owns the delivery-report callback"),
    ("dr_msg_cb", "the relay owns the delivery-report callback"),
    ("enable.gapless.guarantee", "the relay sets it so a failed send never lets later events of the partition overtake it"),
    ("transactional.id", "the relay's producer is not transactional; its guarantee comes from the slot"),
    ("allow.auto.create.topics", "topics are created only by the relay, as outbox.topic_creation says"),
    ("metadata.broker.list", "set outbox.kafka_bootstrap_servers instead"),
    ("queue.buffering.max.ms", "set outbox.linger_ms instead"),
];

/// Properties that load code, run a command or pick a crypto engine: whoever
/// may set them runs code as the server's OS user. Accepted only from the
/// file, which only the server's administrator can write.
const CODE_LOADING: &[&str] = &[
    "plugin.library.paths",
    "sasl.kerberos.kinit.cmd",
    // pasted unquoted into the kinit shell command
    "sasl.kerberos.principal",
    "sasl.kerberos.min.time.before.relogin",
    "interceptors",
    "ssl.engine.location",
    "ssl.engine.id",
    "ssl.providers",
    "ssl_engine_callback_data",
    "sasl.oauthbearer.config",
    "sasl.oauthbearer.token.endpoint.url",
    "sasl.oauthbearer.method",
    "sasl.oauthbearer.metadata.authentication.type",
    "https.ca.location",
    "https.ca.pem",
];

/// Properties that make the server read a file of the user's choosing
/// (keys, certificates, keytabs): accepted only from the file.
const FILE_READING: &[&str] = &[
    "ssl.key.location",
    "ssl.certificate.location",
    "ssl.ca.location",
    "ssl.crl.location",
    "ssl.keystore.location",
    "ssl.ca.directory",
    "sasl.kerberos.keytab",
    "sasl.oauthbearer.assertion.private.key.file",
    "sasl.oauthbearer.assertion.file",
    "offset.store.path",
    "offset.store.method",
    "sasl.oauthbearer.assertion.jwt.template.file",
];

/// Refuses, with the reason, a property list the relay must not accept from
/// `origin`. Names are compared after alias resolution and lower-casing, so
/// `delivery.timeout.ms` is caught as `message.timeout.ms`.
pub fn check(props: &[(String, String)], origin: Origin) -> Result<(), String> {
    for (k, _) in props {
        let c = canonical(k);
        let alias = if c == k.as_str() { String::new() } else { format!(" (librdkafka's name for \"{c}\")") };
        if let Some((_, why)) = RELAY_OWNED.iter().find(|(n, _)| *n == c) {
            return Err(format!("property \"{k}\"{alias} cannot be set: {why}"));
        }
        if origin == Origin::Setting && CODE_LOADING.contains(&c.as_str()) {
            return Err(format!(
                "property \"{k}\" loads code, runs a command or makes outside requests as the server's OS user, \
                 so it is accepted only in outbox.kafka_properties_file, never in a setting that can be delegated"
            ));
        }
        if origin == Origin::Setting && FILE_READING.contains(&c.as_str()) {
            return Err(format!(
                "property \"{k}\" makes the server read a file of its choosing, so it is accepted only in \
                 outbox.kafka_properties_file, never in a setting that can be delegated (use the *.pem properties \
                 or the file)"
            ));
        }
    }
    Ok(())
}

/// What the relay sets after the user's properties, whatever they said,
/// and the user's properties it overrode (for a warning): while it isolates
/// a refused batch, one event per request and one request in flight (a
/// user's `batch.num.messages` or `max.in.flight` would put innocent events
/// beside the refused one, or let later ones be written first); and a local
/// queue of at least `queue_kbytes` (a smaller one could never take the
/// largest event `outbox.max_event_bytes` allows, and decoding would wait
/// for room without end). A larger queue of the user's is kept.
pub fn relay_overrides(user: &[(String, String)], queue_kbytes: usize, one_per_request: bool) -> (Vec<(&'static str, String)>, Vec<String>) {
    let mut set = Vec::new();
    let mut overrode = Vec::new();
    let named = |name: &'static str| user.iter().filter(move |(k, _)| canonical(k) == name);
    if one_per_request {
        for (name, v) in [("batch.num.messages", "1"), ("max.in.flight.requests.per.connection", "1")] {
            overrode.extend(named(name).filter(|(_, u)| u.trim() != v).map(|(k, _)| k.clone()));
            set.push((name, v.to_owned()));
        }
    }
    let user_kb = named("queue.buffering.max.kbytes").next_back().map(|(k, v)| (k, v.trim().parse::<usize>().ok()));
    match user_kb {
        Some((_, Some(kb))) if kb >= queue_kbytes => {}
        Some((k, _)) => {
            overrode.push(k.clone());
            set.push(("queue.buffering.max.kbytes", queue_kbytes.to_string()));
        }
        None => set.push(("queue.buffering.max.kbytes", queue_kbytes.to_string())),
    }
    (set, overrode)
}

/// Whether the properties file may be trusted with what only it may hold
/// (properties that load code or run commands, see [`check`]): owned by the
/// server's user (`server_uid`) or root, and writable by no one else.
/// `outbox.kafka_properties_file` can be delegated (GRANT ALTER SYSTEM ON
/// PARAMETER), so the path alone does not say who wrote the file; as
/// PostgreSQL asks of its TLS key file, the file itself must.
pub fn check_file_ownership(owner_uid: u32, mode: u32, server_uid: u32) -> Result<(), String> {
    if owner_uid != server_uid && owner_uid != 0 {
        return Err(format!(
            "it is owned by uid {owner_uid}; it may name code for librdkafka to load, so it must be owned by the \
             server's user (uid {server_uid}) or root"
        ));
    }
    if mode & 0o022 != 0 {
        return Err(format!(
            "it is writable by its group or others (mode {:04o}); it may name code for librdkafka to load: chmod go-w",
            mode & 0o7777
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{canonical, check, check_file_ownership, merge, parse, parse_file, relay_overrides, Origin};

    #[test]
    fn relay_owned_properties_are_refused_under_every_name() {
        for (k, v) in [
            ("message.timeout.ms", "2000"),
            ("delivery.timeout.ms", "2000"),
            ("Delivery.Timeout.MS", "2000"),
            ("acks", "1"),
            ("request.required.acks", "1"),
            ("enable.idempotence", "false"),
            ("delivery.report.only.error", "true"),
            ("enable.gapless.guarantee", "false"),
            ("partitioner", "random"),
            ("transactional.id", "x"),
            ("allow.auto.create.topics", "true"),
            ("linger.ms", "50"),
            ("queue.buffering.max.ms", "50"),
            ("bootstrap.servers", "elsewhere:9092"),
            ("topic.delivery.timeout.ms", "2000"),
        ] {
            for origin in [Origin::Setting, Origin::File] {
                let e = check(&kv(&[(k, v)]), origin).unwrap_err();
                assert!(e.contains(&format!("\"{k}\"")) && e.contains("cannot be set"), "{k}: {e}");
            }
        }
        let e = check(&kv(&[("delivery.timeout.ms", "1")]), Origin::Setting).unwrap_err();
        assert!(e.contains("librdkafka's name for \"message.timeout.ms\""), "{e}");
        assert!(check(&kv(&[("compression.type", "lz4"), ("sasl.password", "x")]), Origin::Setting).is_ok());
    }

    #[test]
    fn code_loading_and_file_reading_properties_only_from_the_file() {
        // Every name by itself (not read from the lists, so that dropping
        // one from them fails here), in any case.
        let names = [
            "plugin.library.paths",
            "sasl.kerberos.kinit.cmd",
            "sasl.kerberos.principal",
            "sasl.kerberos.min.time.before.relogin",
            "interceptors",
            "ssl.engine.location",
            "ssl.engine.id",
            "SSL.Providers",
            "ssl_engine_callback_data",
            "sasl.oauthbearer.config",
            "sasl.oauthbearer.token.endpoint.url",
            "sasl.oauthbearer.method",
            "sasl.oauthbearer.metadata.authentication.type",
            "https.ca.location",
            "https.ca.pem",
            "ssl.key.location",
            "ssl.certificate.location",
            "ssl.ca.location",
            "ssl.crl.location",
            "ssl.keystore.location",
            "ssl.ca.directory",
            "sasl.kerberos.keytab",
            "sasl.oauthbearer.assertion.private.key.file",
            "sasl.oauthbearer.assertion.file",
            "offset.store.path",
            "offset.store.method",
            "sasl.oauthbearer.assertion.jwt.template.file",
        ];
        for k in names {
            let e = check(&kv(&[(k, "/tmp/x")]), Origin::Setting).unwrap_err();
            assert!(e.contains("only in outbox.kafka_properties_file"), "{k}: {e}");
            assert!(check(&kv(&[(k, "/tmp/x")]), Origin::File).is_ok(), "{k}");
        }
    }

    #[test]
    fn aliases_count_as_the_same_property() {
        assert_eq!(canonical("delivery.timeout.ms"), "message.timeout.ms");
        assert_eq!(canonical("ACKS"), "request.required.acks");
        assert_eq!(canonical("sasl.password"), "sasl.password");
        assert_eq!(canonical("topic.acks"), "request.required.acks");
        assert_eq!(canonical("topic.metadata.refresh.interval.ms"), "topic.metadata.refresh.interval.ms");
        assert!(parse("retries=1;message.send.max.retries=2").unwrap_err().contains("twice"));
        assert!(merge(kv(&[("sasl.mechanism", "PLAIN")]), kv(&[("sasl.mechanisms", "PLAIN")])).unwrap_err().contains("in both"));
    }

    #[test]
    fn file_lines_comments_and_errors_that_hide_values() {
        let text = "# credentials\n\nsasl.username = outbox\r\nsasl.password=p=a;s#s \n";
        assert_eq!(parse_file(text).unwrap(), kv(&[("sasl.username", "outbox"), ("sasl.password", "p=a;s#s")]));
        let e = parse_file("ok=1\nsecret-without-equals\n").unwrap_err();
        assert_eq!(e, "line 2 is not of the form key=value");
        let e = parse_file("bad key=hunter2").unwrap_err();
        assert!(e.contains("bad key") && !e.contains("hunter2"), "{e}");
        assert!(parse_file("a=1\na=2").unwrap_err().contains("twice (line 2)"));
        assert!(parse_file("=x").unwrap_err().contains("line 1 has an empty property name"));
    }

    #[test]
    fn merge_refuses_a_property_in_both() {
        assert_eq!(merge(kv(&[("a", "1")]), kv(&[("b", "2")])).unwrap(), kv(&[("a", "1"), ("b", "2")]));
        assert!(merge(kv(&[("a", "1")]), kv(&[("a", "2")])).unwrap_err().contains("in both"));
    }

    fn kv(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn parses_pairs_with_spaces_and_escapes() {
        assert_eq!(parse("").unwrap(), vec![]);
        assert_eq!(
            parse(" security.protocol = SASL_SSL ;sasl.password=a\\;b=c; ").unwrap(),
            kv(&[("security.protocol", "SASL_SSL"), ("sasl.password", "a;b=c")])
        );
    }

    #[test]
    fn rejects_malformed() {
        assert!(parse("linger.ms").unwrap_err().contains("key=value"));
        assert!(parse("=5").unwrap_err().contains("empty property name"));
        assert!(parse("a b=1").unwrap_err().contains("not a librdkafka property"));
        assert!(parse("acks=1;acks=all").unwrap_err().contains("twice"));
    }

    #[test]
    fn the_file_must_be_the_servers_or_roots_and_writable_by_no_one_else() {
        assert_eq!(check_file_ownership(105, 0o100600, 105), Ok(()));
        assert_eq!(check_file_ownership(0, 0o100644, 105), Ok(()), "root's, readable by all: fine");
        let other = check_file_ownership(1000, 0o100600, 105).unwrap_err();
        assert!(other.contains("owned by uid 1000") && other.contains("(uid 105) or root"), "{other}");
        let group = check_file_ownership(105, 0o100664, 105).unwrap_err();
        assert!(group.contains("mode 0664") && group.contains("chmod go-w"), "{group}");
        assert!(check_file_ownership(0, 0o100602, 105).unwrap_err().contains("mode 0602"));
    }

    #[test]
    fn isolation_and_the_queue_floor_win_over_the_users_properties() {
        let user = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>();
        let tuned = user(&[("batch.num.messages", "500"), ("max.in.flight", "5"), ("queue.buffering.max.kbytes", "1024")]);
        let (set, overrode) = relay_overrides(&tuned, 32768, true);
        assert_eq!(
            set,
            vec![
                ("batch.num.messages", "1".to_owned()),
                ("max.in.flight.requests.per.connection", "1".to_owned()),
                ("queue.buffering.max.kbytes", "32768".to_owned()),
            ]
        );
        assert_eq!(overrode, vec!["batch.num.messages", "max.in.flight", "queue.buffering.max.kbytes"]);
        let (set, overrode) = relay_overrides(&tuned, 32768, false);
        assert_eq!(set, vec![("queue.buffering.max.kbytes", "32768".to_owned())], "batching is the user's outside isolation");
        assert_eq!(overrode, vec!["queue.buffering.max.kbytes"]);
        let (set, overrode) = relay_overrides(&user(&[("queue.buffering.max.kbytes", "65536")]), 32768, false);
        assert!(set.is_empty() && overrode.is_empty(), "a larger queue is kept");
        assert_eq!(relay_overrides(&[], 40000, false).0, vec![("queue.buffering.max.kbytes", "40000".to_owned())]);
        assert_eq!(relay_overrides(&user(&[("queue.buffering.max.kbytes", "lots")]), 32768, false).1, vec!["queue.buffering.max.kbytes"]);
    }
}
