//! Decoding: the relay's own logical decoding context on its slot (created
//! once for the worker's life, as walsender does), the page reader, and the
//! output plugin's write callbacks, which hand each record to delivery.

use std::ffi::{CStr, CString};
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::lsn;

use super::deliver::Deliver;
use super::{state, waits};
use crate::ffi;
use crate::slot;

/// Acquires the slot and creates the decoding context, reading from the
/// slot's restart position; `deliver` receives what the plugin writes.
pub fn open(slot: &str, deliver: &mut Deliver) -> *mut pg_sys::LogicalDecodingContext {
    let cslot = CString::new(slot).unwrap_or_default();
    // SAFETY: the decoding context is created once, outside a
    // transaction, in TopMemoryContext so it lives as long as the
    // worker; the slot is acquired first (nowait: another holder is an
    // error, and the postmaster restarts us). The reader routine is
    // copied by XLogReaderAllocate.
    let ctx = unsafe {
        ffi::slot_acquire(&cslot);
        let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
        let opt = pg_sys::makeDefElem(
            pg_sys::pstrdup(c"format".as_ptr()),
            pg_sys::makeString(pg_sys::pstrdup(c"binary".as_ptr())).cast(),
            -1,
        );
        let options = pg_sys::lappend(std::ptr::null_mut(), opt.cast());
        let mut routine = pg_sys::XLogReaderRoutine {
            page_read: Some(read_page),
            segment_open: Some(ffi::c_wal_segment_open),
            segment_close: Some(ffi::c_wal_segment_close),
        };
        let ctx = pg_sys::CreateDecodingContext(
            0,
            options,
            false,
            &mut routine,
            Some(prepare_write),
            Some(do_write),
            None,
        );
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::XLogBeginRead((*ctx).reader, (*pg_sys::MyReplicationSlot).data.restart_lsn);
        ctx
    };
    // SAFETY: the Deliver is boxed by the caller: its address is stable
    // for as long as the relay (and so the context) lives.
    unsafe { (*ctx).output_writer_private = (deliver as *mut Deliver).cast() };
    ctx
}

/// Reads and decodes WAL up to the current flush position.
pub fn decode_pass(ctx: *mut pg_sys::LogicalDecodingContext, deliver: &mut Deliver) {
    // SAFETY: the reader belongs to our decoding context; records are
    // read sequentially with the same reader (no second XLogBeginRead),
    // each handed to the decoder, which calls our write callbacks.
    unsafe {
        let reader = (*ctx).reader;
        let flush = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
        let mut n = 0u32;
        while (*reader).EndRecPtr < flush && state::mode().sends() {
            let mut err: *mut std::ffi::c_char = std::ptr::null_mut();
            let rec = pg_sys::XLogReadRecord(reader, &mut err);
            if !err.is_null() {
                error!(
                    "outbox relay: could not read WAL at {}: {}",
                    lsn::format((*reader).EndRecPtr),
                    CStr::from_ptr(err).to_string_lossy()
                );
            }
            if rec.is_null() {
                break;
            }
            pg_sys::ffi::pg_guard_ffi_boundary(|| ffi::LogicalDecodingProcessRecord(ctx, reader));
            deliver.ledger.seal();
            n += 1;
            if n.is_multiple_of(256) {
                deliver.apply_reports(Duration::ZERO);
                pg_sys::check_for_interrupts!();
            }
        }
    }
}

/// The reader's page callback: Postgres' read_local_xlog_page, except that
/// WAL needed beyond the flush position is flushed rather than waited for.
/// The loop reads only records that begin before the flush position, but
/// one may end past it: WAL with no commit behind it (page pruning, a
/// running-xacts record) can sit in a partly filled page until something
/// flushes it, and read_local_xlog_page would sleep until then, stalling
/// delivery reports and the status for as long (seen: over 10 s on an idle
/// server). A record's whole range is reserved when it is inserted, so
/// these bytes exist; flushing them is what the next commit would do.
#[pg_guard]
unsafe extern "C-unwind" fn read_page(
    state: *mut pg_sys::XLogReaderState,
    target_page_ptr: pg_sys::XLogRecPtr,
    req_len: std::ffi::c_int,
    target_rec_ptr: pg_sys::XLogRecPtr,
    cur_page: *mut std::ffi::c_char,
) -> std::ffi::c_int {
    let needed = target_page_ptr + req_len.max(0) as u64;
    // SAFETY: GetFlushRecPtr and GetXLogInsertRecPtr read shared state;
    // XLogFlush of inserted WAL is what any commit does;
    // read_local_xlog_page gets the reader's own arguments. It raises an
    // ERROR when a segment is missing, so it is called behind the FFI
    // guard, which turns that into a Rust unwind through our frames.
    unsafe {
        if needed > pg_sys::GetFlushRecPtr(std::ptr::null_mut()) {
            pg_sys::XLogFlush(needed.min(slot::generated_wal_end()));
        }
        let n = pg_sys::ffi::pg_guard_ffi_boundary(|| {
            ffi::c_read_local_xlog_page(state, target_page_ptr, req_len, target_rec_ptr, cur_page)
        });
        // Every byte decoded comes through here, and none is decoded before
        // we return: holding what was read until the failover standbys have
        // it holds every event built from it.
        if n > 0 {
            waits::hold_for_failover_standbys(target_page_ptr + n as u64);
        }
        n
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn prepare_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
    // SAFETY: ctx->out is the context's output buffer.
    unsafe { pg_sys::resetStringInfo((*ctx).out) };
}

#[pg_guard]
unsafe extern "C-unwind" fn do_write(
    ctx: *mut pg_sys::LogicalDecodingContext,
    _lsn: pg_sys::XLogRecPtr,
    _xid: pg_sys::TransactionId,
    _last_write: bool,
) {
    // SAFETY: output_writer_private is the Deliver set in open(), alive as
    // long as the context; ctx->out holds `len` bytes the plugin wrote.
    unsafe {
        let sink = &mut *((*ctx).output_writer_private as *mut Deliver);
        let out = (*ctx).out;
        let bytes = std::slice::from_raw_parts((*out).data as *const u8, (*out).len as usize);
        sink.handle(bytes);
    }
}

