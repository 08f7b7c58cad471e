//! The outbox slot: its state read from shared memory, for the checks
//! `outbox_emit()` makes, the WAL guard and the status view; and its
//! creation by the relay.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::wal_guard;

use crate::settings;

pub struct SlotInfo {
    pub database: pg_sys::Oid,
    /// Borrowed (no copy) in the usual case, our own plugin.
    pub plugin: std::borrow::Cow<'static, str>,
    pub confirmed_flush: u64,
    pub restart_lsn: u64,
    /// Postgres removed WAL the slot needed (max_slot_wal_keep_size).
    pub invalidated: bool,
}

/// The slot named `name`, if it exists.
pub fn find(name: &str) -> Option<SlotInfo> {
    find_c(&CString::new(name).ok()?)
}

/// [`find`] for a name that is already a C string (no copy).
pub fn find_c(cname: &CStr) -> Option<SlotInfo> {
    // SAFETY: SearchNamedReplicationSlot takes the control lock itself
    // (need_lock = true). The returned slot lives in shared memory for the
    // server's life; we read word-sized fields without its spinlock, which
    // can only give a stale answer, never a torn one. Callers use it for
    // checks and reports, never for the delivery guarantee (the relay holds
    // the slot and reads its own fields).
    unsafe {
        let slot = pg_sys::SearchNamedReplicationSlot(cname.as_ptr(), true);
        if slot.is_null() {
            return None;
        }
        let d = &(*slot).data;
        Some(SlotInfo {
            database: d.database,
            plugin: match CStr::from_ptr(d.plugin.data.as_ptr()) {
                p if p == c"outbox" => std::borrow::Cow::Borrowed("outbox"),
                p => std::borrow::Cow::Owned(p.to_string_lossy().into_owned()),
            },
            confirmed_flush: d.confirmed_flush,
            restart_lsn: d.restart_lsn,
            invalidated: crate::ffi::slot_is_invalidated(d),
        })
    }
}

/// The current WAL insert position (what a slot must eventually read up to).
pub fn insert_lsn() -> u64 {
    // SAFETY: reads shared WAL state under its own lock; valid in any
    // backend. During recovery it is the replay position's neighbour and
    // only used for reports.
    unsafe { pg_sys::GetXLogInsertRecPtr() }
}

/// The end of the WAL generated so far, as a record's end (the insert
/// position, moved back from behind a page header: see
/// `outbox_core::lsn::insert_as_record_end`). WAL up to it can be flushed;
/// XLogFlush past it raises "xlog flush request ... is not satisfied".
pub fn generated_wal_end() -> u64 {
    // SAFETY: XLOG_BLCKSZ is a constant and wal_segment_size a plain global
    // set at startup.
    let segment = unsafe { pg_sys::wal_segment_size } as u64;
    outbox_core::lsn::insert_as_record_end(insert_lsn(), pg_sys::XLOG_BLCKSZ as u64, segment)
}

/// WAL the slot holds back: insert position minus restart_lsn.
pub fn retained(info: &SlotInfo) -> u64 {
    retained_since(info.restart_lsn)
}

/// WAL kept for a slot whose restart_lsn is `restart_lsn` (0: none yet).
pub fn retained_since(restart_lsn: u64) -> u64 {
    if restart_lsn == 0 {
        return 0;
    }
    insert_lsn().saturating_sub(restart_lsn)
}

/// The guard's verdict for the slot now.
pub fn guard(info: &SlotInfo) -> (u64, wal_guard::Verdict) {
    let r = retained(info);
    (r, wal_guard::verdict(r, settings::max_retained_wal()))
}

/// Creates the slot with this library as its plugin if it is missing. A slot
/// cannot be created in a transaction that has an xid, so through a
/// read-only SELECT in a transaction of its own.
pub fn ensure_slot(slot: &str) {
    // Slot names are validated by the setting's check hook: lower-case
    // letters, digits and underscores only, so inlining is safe.
    let sql = format!(
        "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_replication_slots
                                  WHERE slot_name OPERATOR(pg_catalog.=) '{slot}'::pg_catalog.name) THEN false
                     ELSE (SELECT true FROM pg_catalog.pg_create_logical_replication_slot('{slot}', 'outbox'{extra})) END",
        extra = crate::ffi::CREATE_SLOT_EXTRA_ARGS
    );
    let created = pgrx::bgworkers::BackgroundWorker::transaction(|| {
        Spi::connect(|c| c.select(&sql, Some(1), &[])?.first().get_one::<bool>())
    });
    match created {
        Ok(Some(true)) => log!(
            "outbox relay: created logical replication slot \"{slot}\" (plugin outbox{})",
            if crate::ffi::CREATE_SLOT_EXTRA_ARGS.is_empty() { "" } else { ", failover" }
        ),
        Ok(_) => {}
        Err(e) => error!("outbox relay: could not create slot \"{slot}\": {e}"),
    }
}
