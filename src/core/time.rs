//! Postgres timestamps (µs since 2000-01-01 UTC) to what Kafka and JSON want.

/// Seconds between the Unix epoch and the Postgres epoch.
const PG_EPOCH_UNIX_SECS: i64 = 946_684_800;

pub fn pg_to_unix_micros(pg: i64) -> i64 {
    pg + PG_EPOCH_UNIX_SECS * 1_000_000
}

/// Kafka message timestamps are milliseconds since the Unix epoch.
pub fn pg_to_unix_millis(pg: i64) -> i64 {
    pg_to_unix_micros(pg).div_euclid(1000)
}

/// `2026-11-22T19:51:55.123456Z`, always six fractional digits.
pub fn format_rfc3339(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(pg_to_unix_micros(0)), "2000-01-01T00:00:00.000000Z");
        assert_eq!(format_rfc3339(951_782_400_000_001), "2000-02-29T00:00:00.000001Z");
        assert_eq!(format_rfc3339(1_795_377_115_123_456), "2026-11-22T19:51:55.123456Z");
        assert_eq!(format_rfc3339(-1), "1969-12-31T23:59:59.999999Z");
    }

    #[test]
    fn converts_between_epochs() {
        assert_eq!(pg_to_unix_millis(0), 946_684_800_000);
        assert_eq!(pg_to_unix_micros(12_345), 946_684_800_012_345);
    }
}
