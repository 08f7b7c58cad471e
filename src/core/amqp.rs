//! AMQP settings checked without a server: the URI, the credentials file,
//! and the routing key (an AMQP short string: at most 255 bytes).

/// Checks an AMQP URI as far as the relay relies on it: scheme, host, and
/// percent-encoding of the parts that carry it.
pub fn check_url(url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("amqp://")
        .or_else(|| url.strip_prefix("amqps://"))
        .ok_or_else(|| format!("\"{}\" is not an AMQP URI: it must start with amqp:// or amqps://", redact(url)))?;
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    let host_only = host.rsplit_once(':').map_or(host, |(h, _)| h);
    if host_only.is_empty() {
        return Err(format!("\"{}\" names no host", redact(url)));
    }
    let vhost = rest.split_once('/').map_or("", |(_, v)| v.split('?').next().unwrap_or_default());
    if percent_decoded_len(vhost) > 255 {
        return Err(format!("\"{}\": the virtual host is longer than the 255 bytes AMQP allows", redact(url)));
    }
    if let Some((_, port)) = host.rsplit_once(':') {
        if !host.ends_with(']') && port.parse::<u16>().is_err() {
            return Err(format!("\"{}\": the port \"{port}\" is not a number", redact(url)));
        }
    }
    Ok(())
}

/// Bytes of `s` once `%XX` escapes are decoded.
fn percent_decoded_len(s: &str) -> usize {
    s.len() - 2 * s.matches('%').count()
}

/// The URI with its password replaced by `***`, for messages.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{path}")
        }
        None => url.to_owned(),
    }
}

/// `username=...` and `password=...` lines (`#` comments, blank lines).
pub fn parse_properties(text: &str) -> Result<(Option<String>, Option<String>), String> {
    let (mut user, mut password) = (None, None);
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line.split_once('=').ok_or_else(|| format!("line {}: expected key=value", n + 1))?;
        match k.trim() {
            "username" => user = Some(v.trim().to_owned()),
            "password" => password = Some(v.trim().to_owned()),
            other => return Err(format!("line {}: unknown key \"{other}\" (known: username, password)", n + 1)),
        }
    }
    Ok((user, password))
}

/// The URI with `user` and `password` (when given) in place of its own,
/// percent-encoded.
pub fn with_credentials(url: &str, user: Option<&str>, password: Option<&str>) -> Result<String, String> {
    check_url(url)?;
    if user.is_none() && password.is_none() {
        return Ok(url.to_owned());
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("amqp", url));
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let (old_user, old_pass, host) = match authority.rsplit_once('@') {
        Some((ui, h)) => match ui.split_once(':') {
            Some((u, p)) => (u.to_owned(), Some(p.to_owned()), h),
            None => (ui.to_owned(), None, h),
        },
        None => ("guest".to_owned(), None, authority),
    };
    let user = user.map(|u| crate::percent_encode(u, b"")).unwrap_or(old_user);
    let pass = password.map(|p| crate::percent_encode(p, b"")).or(old_pass);
    Ok(match pass {
        Some(p) => format!("{scheme}://{user}:{p}@{host}{path}"),
        None => format!("{scheme}://{user}@{host}{path}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_and_redacted() {
        assert!(check_url("amqp://localhost:5672/%2f").is_ok());
        assert!(check_url("amqps://u:p@mq.example.com/vh").is_ok());
        assert!(check_url("http://localhost").unwrap_err().contains("amqp://"));
        assert!(check_url("amqp://u:secret@:5672/").unwrap_err().contains("no host"));
        let e = check_url("amqp://u:secret@h:port/").unwrap_err();
        assert!(e.contains("not a number") && !e.contains("secret"), "{e}");
        assert_eq!(redact("amqp://u:secret@h:1/v"), "amqp://u:***@h:1/v");
        assert!(check_url(&format!("amqp://h/{}", "v".repeat(256))).unwrap_err().contains("255 bytes"));
        assert!(check_url(&format!("amqp://h/{}", "%2f".repeat(255))).is_ok());
    }

    #[test]
    fn the_file_s_credentials_replace_the_url_s() {
        let (u, p) = parse_properties("# creds\nusername = app\npassword=p@ss:w/rd\n").unwrap();
        assert_eq!((u.as_deref(), p.as_deref()), (Some("app"), Some("p@ss:w/rd")));
        let url = with_credentials("amqp://guest:guest@h:5672/%2f", u.as_deref(), p.as_deref()).unwrap();
        assert_eq!(url, "amqp://app:p%40ss%3Aw%2Frd@h:5672/%2f");
        assert_eq!(with_credentials("amqp://h/v", None, Some("x")).unwrap(), "amqp://guest:x@h/v");
        assert!(parse_properties("token=1").unwrap_err().contains("unknown key"));
        assert!(parse_properties("password").unwrap_err().contains("line 1"));
    }
}
