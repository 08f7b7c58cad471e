//! Log sequence numbers as Postgres prints them (`16/B374D848`).

pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn as u32)
}

#[cfg(test)]
mod tests {
    #[test]
    fn formats_like_pg_lsn() {
        assert_eq!(super::format(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::format(0x16B3748), "0/16B3748");
        assert_eq!(super::format(0), "0/0");
    }
}
