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
