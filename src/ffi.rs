//! Postgres functions pgrx does not bind (their headers are not in its
//! binding set), declared by hand with the signatures of PostgreSQL 15.
//! Call them through `pg_guard_ffi_boundary` so a Postgres ERROR inside
//! unwinds correctly through Rust frames.

use std::ffi::c_char;

use pgrx::pg_sys;

#[cfg(feature = "pg15")]
extern "C-unwind" {
    /// replication/message.h
    pub fn LogLogicalMessage(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;
}

// Raw C symbols for callback slots: `pg_sys::foo` are Rust wrappers, and a
// C struct field needs the C function itself.
#[cfg(feature = "pg15")]
extern "C-unwind" {
    /// replication/decode.h
    pub fn LogicalDecodingProcessRecord(ctx: *mut pg_sys::LogicalDecodingContext, record: *mut pg_sys::XLogReaderState);

    #[link_name = "read_local_xlog_page"]
    pub fn c_read_local_xlog_page(
        state: *mut pg_sys::XLogReaderState,
        target_page_ptr: pg_sys::XLogRecPtr,
        req_len: std::ffi::c_int,
        target_rec_ptr: pg_sys::XLogRecPtr,
        cur_page: *mut c_char,
    ) -> std::ffi::c_int;

    #[link_name = "wal_segment_open"]
    pub fn c_wal_segment_open(
        state: *mut pg_sys::XLogReaderState,
        next_seg_no: pg_sys::XLogSegNo,
        tli_p: *mut pg_sys::TimeLineID,
    );

    #[link_name = "wal_segment_close"]
    pub fn c_wal_segment_close(state: *mut pg_sys::XLogReaderState);

    /// tcop/tcopprot.h: Postgres' own SIGTERM handler, which makes the next
    /// CHECK_FOR_INTERRUPTS exit wherever it is, even deep inside decoding.
    #[link_name = "die"]
    pub fn c_die(signo: std::ffi::c_int);
}

/// Declares the `pg_finfo_<name>` function Postgres looks up to learn that
/// `<name>` uses the version-1 calling convention (PG_FUNCTION_INFO_V1).
macro_rules! function_info_v1 {
    ($finfo:ident) => {
        #[no_mangle]
        pub extern "C" fn $finfo() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            static V1: ::pgrx::pg_sys::Pg_finfo_record = ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}
pub(crate) use function_info_v1;
