//! Log sequence numbers as Postgres prints and parses them (`16/B374D848`).

pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn as u32)
}

pub fn parse(s: &str) -> Option<u64> {
    let (hi, lo) = s.split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some(((hi as u64) << 32) | lo as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_and_parses_like_pg_lsn() {
        assert_eq!(super::format(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::format(0), "0/0");
        assert_eq!(super::parse("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(super::parse("0/16B3748"), Some(0x16B3748));
        assert_eq!(super::parse("16B3748"), None);
        assert_eq!(super::parse("x/1"), None);
    }
}
