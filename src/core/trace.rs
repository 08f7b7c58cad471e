//! W3C Trace Context: the `traceparent` an event carries into its message
//! headers. Checked when it is written (an invalid value is refused, not
//! published); read from `outbox_emit()`'s headers, a transaction-local
//! setting, or a Debezium-style tracing column, which holds
//! `java.util.Properties` text (`traceparent=00-...`).

/// Checks a `traceparent` (https://www.w3.org/TR/trace-context/#traceparent-header):
/// `version-traceid-parentid-flags`, lowercase hex; version `ff` is invalid;
/// for version 00 exactly 55 characters; all-zero ids are invalid. A later
/// version may append fields after a `-`.
pub fn check_traceparent(v: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid traceparent \"{}\": {why}", v.chars().take(80).collect::<String>()));
    let b = v.as_bytes();
    if b.len() < 55 {
        return bad("it must be version-traceid-parentid-flags, 55 characters for version 00");
    }
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return bad("fields must be separated by '-' (2, 32, 16 and 2 hex digits)");
    }
    if !(hex(0..2) && hex(3..35) && hex(36..52) && hex(53..55)) {
        return bad("only lowercase hexadecimal digits are allowed");
    }
    match &v[0..2] {
        "ff" => return bad("version ff is invalid"),
        "00" if b.len() != 55 => return bad("version 00 is exactly 55 characters"),
        "00" => {}
        _ if b.len() > 55 && b[55] != b'-' => return bad("fields after the flags must follow a '-'"),
        _ => {}
    }
    if b[3..35].iter().all(|c| *c == b'0') {
        return bad("the trace id is all zeros");
    }
    if b[36..52].iter().all(|c| *c == b'0') {
        return bad("the parent id is all zeros");
    }
    Ok(())
}

/// The `traceparent` in `java.util.Properties` text, as Quarkus and the
/// Debezium tracing integration write the span-context column: `key=value`,
/// `key:value` or `key value` lines, `#` and `!` comments.
pub fn traceparent_in_properties(text: &str) -> Option<&str> {
    text.lines().map(str::trim_start).filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('!')).find_map(|l| {
        let end = l.find(['=', ':', ' ', '\t']).unwrap_or(l.len());
        let (k, rest) = l.split_at(end);
        let v = rest.trim_start_matches([' ', '\t']);
        let v = v.strip_prefix(['=', ':']).unwrap_or(v).trim();
        (k == "traceparent").then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specs_example_passes_and_each_rule_refuses() {
        assert!(check_traceparent(OK).is_ok());
        let err = |v: &str| check_traceparent(v).unwrap_err();
        assert!(err(&OK.to_uppercase()).contains("lowercase"));
        assert!(err(&OK.replace("00-4bf", "ff-4bf")).contains("version ff"));
        assert!(err(&format!("{OK}-x")).contains("exactly 55"));
        assert!(err(&OK[..54]).contains("55 characters"));
        assert!(err("00-00000000000000000000000000000000-00f067aa0ba902b7-01").contains("trace id"));
        assert!(err("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01").contains("parent id"));
        assert!(err(&OK.replace('-', "_")).contains("separated"));
        assert!(check_traceparent(&format!("{}-later", OK.replacen("00", "01", 1))).is_ok(), "a later version may add fields");
    }

    #[test]
    fn found_in_properties_text() {
        let text = format!("#Mon Nov 23 19:00:00 UTC 2026\ntracestate=x\ntraceparent={OK}\n");
        assert_eq!(traceparent_in_properties(&text), Some(OK));
        assert_eq!(traceparent_in_properties(&format!("traceparent : {OK}")), Some(OK));
        assert_eq!(traceparent_in_properties("# traceparent=nope\n"), None);
        assert_eq!(traceparent_in_properties(""), None);
    }
}
