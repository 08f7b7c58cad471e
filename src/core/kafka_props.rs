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
        check_name(k, &format!("\"{item}\""))?;
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("property \"{k}\" is given twice"));
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
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("property \"{k}\" is given twice (line {})", n + 1));
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
        if out.iter().any(|(seen, _)| *seen == k) {
            return Err(format!(
                "property \"{k}\" is in both outbox.kafka_properties and outbox.kafka_properties_file"
            ));
        }
        out.push((k, v));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::{merge, parse, parse_file};

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
}
