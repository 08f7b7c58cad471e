//! The FFI layer's version seam. Postgres functions pgrx does not bind
//! (their headers are not in its binding set), declared by hand, and the
//! few calls and fields that differ between PostgreSQL 15, 16, 17 and 18,
//! each behind one small function so the logic above never sees a `cfg`.
//! Call the externs through `pg_guard_ffi_boundary` so a Postgres ERROR
//! inside unwinds correctly through Rust frames.
//!
//! Checked against each major's headers (15.20, 16 via pgrx's 16.13
//! bindings, 17.12, 18.6): the signatures below are the same in all four
//! unless a shim says otherwise.

use std::ffi::{c_char, CStr};

use pgrx::pg_sys;

extern "C-unwind" {
    /// replication/message.h, 15 and 16.
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    #[link_name = "LogLogicalMessage"]
    fn c_log_logical_message(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
    ) -> pg_sys::XLogRecPtr;

    /// replication/message.h, 17+: a `flush` flag, read only for
    /// non-transactional messages.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    #[link_name = "LogLogicalMessage"]
    fn c_log_logical_message(
        prefix: *const c_char,
        message: *const c_char,
        size: usize,
        transactional: bool,
        flush: bool,
    ) -> pg_sys::XLogRecPtr;
}

/// Writes a transactional logical message.
///
/// # Safety
/// `message` must point to `size` readable bytes; inside a transaction;
/// call through `pg_guard_ffi_boundary`.
pub unsafe fn log_transactional_message(prefix: &CStr, message: *const c_char, size: usize) -> pg_sys::XLogRecPtr {
    // SAFETY: the caller's contract; the declarations above match each
    // major's header (flush is read only for non-transactional messages).
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        return c_log_logical_message(prefix.as_ptr(), message, size, true);
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        return c_log_logical_message(prefix.as_ptr(), message, size, true, false);
    }
}

/// Acquires a replication slot for this process (nowait: another holder
/// is an ERROR). On 18 an invalidated slot is refused here (walsender's
/// choice); before 18 CreateDecodingContext refuses it.
///
/// # Safety
/// Outside any other slot; may raise ERROR.
pub unsafe fn slot_acquire(name: &CStr) {
    // SAFETY: the caller's contract; name is a live C string.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true);
        #[cfg(feature = "pg18")]
        pg_sys::ReplicationSlotAcquire(name.as_ptr(), true, true);
    }
}

/// Whether a slot's persistent data says it was invalidated (by any cause:
/// WAL removed, the catalog horizon, wal_level, 18's idle timeout).
pub fn slot_is_invalidated(d: &pg_sys::ReplicationSlotPersistentData) -> bool {
    #[cfg(feature = "pg15")]
    return d.restart_lsn == 0 && d.invalidated_at != 0;
    #[cfg(not(feature = "pg15"))]
    return d.invalidated != pg_sys::ReplicationSlotInvalidationCause::RS_INVAL_NONE;
}

/// The new tuple of an INSERT change, or null.
///
/// # Safety
/// `change` is a live INSERT change of the reorder buffer.
pub unsafe fn insert_new_tuple(change: *mut pg_sys::ReorderBufferChange) -> pg_sys::HeapTuple {
    // SAFETY: an INSERT change uses the `tp` arm of the union; the caller
    // vouches for the pointer.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        {
            let buf = (*change).data.tp.newtuple;
            if buf.is_null() {
                return std::ptr::null_mut();
            }
            &mut (*buf).tuple
        }
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        {
            (*change).data.tp.newtuple
        }
    }
}

/// A tuple descriptor's attribute `i` (TupleDescAttr): an array member on
/// 15–17; on 18 the full attributes follow the `natts` compact ones.
///
/// # Safety
/// `desc` is a valid descriptor and `i < natts`.
pub unsafe fn tuple_desc_attr(desc: pg_sys::TupleDesc, i: usize) -> *const pg_sys::FormData_pg_attribute {
    // SAFETY: the caller's; the layouts are those of each major's tupdesc.h.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        {
            (*desc).attrs.as_ptr().add(i)
        }
        #[cfg(feature = "pg18")]
        {
            let full = (*desc).compact_attrs.as_ptr().add((*desc).natts as usize).cast::<pg_sys::FormData_pg_attribute>();
            full.add(i)
        }
    }
}

/// This process's number in the PGPROC array (for SetLatch from others).
///
/// # Safety
/// In a process attached to shared memory.
pub unsafe fn my_proc_number() -> i32 {
    // SAFETY: set once at process start, read by this process only.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16"))]
        return (*pg_sys::MyProc).pgprocno;
        #[cfg(any(feature = "pg17", feature = "pg18"))]
        return pg_sys::MyProcNumber;
    }
}

/// 17+: whether the standbys named in `synchronized_standby_slots` have
/// flushed up to `lsn` (true without failover standbys, and before 17).
///
/// # Safety
/// With our slot acquired; call through `pg_guard_ffi_boundary`.
pub unsafe fn failover_standbys_have(lsn: pg_sys::XLogRecPtr) -> bool {
    // SAFETY: the caller's contract; a read of shared slot state under
    // Postgres' own locks. DEBUG1: the relay polls this while it waits and
    // says so itself (state `waiting for standby`, one log line); Postgres'
    // reasons (a listed slot missing, logical or invalidated) are at DEBUG1.
    #[cfg(any(feature = "pg17", feature = "pg18"))]
    unsafe {
        if pg_sys::MyReplicationSlot.is_null() || !(*pg_sys::MyReplicationSlot).data.failover {
            return true;
        }
        pg_sys::StandbySlotsHaveCaughtup(lsn, pg_sys::DEBUG1 as i32)
    }
    #[cfg(any(feature = "pg15", feature = "pg16"))]
    {
        let _ = lsn;
        true
    }
}

/// The arguments after (slot name, plugin) that pg_create_logical_replication_slot
/// gets: on 17+ (temporary, two-phase, failover) = (false, false, true).
#[cfg(any(feature = "pg15", feature = "pg16"))]
pub const CREATE_SLOT_EXTRA_ARGS: &str = "";
#[cfg(any(feature = "pg17", feature = "pg18"))]
pub const CREATE_SLOT_EXTRA_ARGS: &str = ", false, false, true";

/// Installs Postgres' own SIGTERM handler (`die`) in this process.
///
/// # Safety
/// In a background worker, before signals are unblocked.
pub unsafe fn handle_sigterm_like_a_backend() {
    // SAFETY: die is Postgres' own handler for exactly this signal.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::pqsignal(libc::SIGTERM, Some(c_die));
        // 18's backend pqsignal is a macro for pqsignal_be.
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(libc::SIGTERM, Some(c_die));
    }
}

// Raw C symbols for callback slots: `pg_sys::foo` are Rust wrappers, and a
// C struct field needs the C function itself.
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
