//! Log sequence numbers as Postgres prints them (`16/B374D848`).

pub fn format(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn as u32)
}

/// WAL page header sizes (access/xlog_internal.h): a short header on every
/// page, a long one on the first page of each segment.
const SHORT_PAGE_HEADER: u64 = 24;
const LONG_PAGE_HEADER: u64 = 40;

/// The WAL insert position as a record's end. Postgres reports the insert
/// position past the next page's header when the last record ended exactly
/// at a page boundary; a reader's end-of-record pointer is then the
/// boundary itself. Waiting for a confirmation at or past the insert
/// position must use this, or it waits for a record that is not there.
pub fn insert_as_record_end(insert: u64, page_size: u64, segment_size: u64) -> u64 {
    if page_size == 0 || segment_size == 0 {
        return insert;
    }
    if insert % segment_size == LONG_PAGE_HEADER {
        insert - LONG_PAGE_HEADER
    } else if insert % page_size == SHORT_PAGE_HEADER {
        insert - SHORT_PAGE_HEADER
    } else {
        insert
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn insert_position_after_a_page_header_is_the_boundary() {
        let (page, seg) = (8192, 16 << 20);
        assert_eq!(super::insert_as_record_end(0x0100_0018 + 8192, page, seg), 0x0100_0000 + 8192);
        assert_eq!(super::insert_as_record_end(0x0100_0028, page, seg), 0x0100_0000, "segment start: long header");
        assert_eq!(super::insert_as_record_end(0x0100_2030, page, seg), 0x0100_2030, "mid-page: unchanged");
        assert_eq!(super::insert_as_record_end(0x0100_2028, page, seg), 0x0100_2028, "40 bytes into a page that is not a segment's first");
    }

    #[test]
    fn formats_like_pg_lsn() {
        assert_eq!(super::format(0x16_B374_D848), "16/B374D848");
        assert_eq!(super::format(0x16B3748), "0/16B3748");
        assert_eq!(super::format(0), "0/0");
    }
}
