//! `outbox.kafka_properties`: free-form librdkafka properties as
//! `key=value` pairs separated by `;` (a literal `;` in a value is written
//! `\;`), e.g. `security.protocol=SASL_SSL; sasl.mechanism=SCRAM-SHA-512`.
//! Parsed when the setting is set or reloaded, so a typo is refused there,
//! not discovered by the worker.

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
        if k.is_empty() {
            return Err(format!("\"{item}\" has an empty property name"));
        }
        if !k.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
            return Err(format!("\"{k}\" is not a librdkafka property name"));
        }
        if out.iter().any(|(seen, _)| seen == k) {
            return Err(format!("property \"{k}\" is given twice"));
        }
        out.push((k.to_owned(), v.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::parse;

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
