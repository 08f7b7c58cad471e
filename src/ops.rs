//! SQL functions for operators: waiting until everything committed is
//! published (`outbox_drain`).

use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::errors::raise;
use crate::{settings, shmem, slot};

fn relay_shared() -> &'static shmem::Shared {
    shmem::shared().unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the outbox relay is not running",
            None,
            Some("Add outbox to shared_preload_libraries and restart the server.".into()),
        )
    })
}

/// `outbox_drain(timeout_ms integer DEFAULT 30000, upto pg_lsn DEFAULT NULL) RETURNS boolean`
///
/// Waits until every transaction committed before `upto` (default: the
/// current WAL insert position, flushed first, which covers everything
/// committed so far, asynchronous commits included) is acknowledged by
/// Kafka and confirmed to the slot. Returns
/// false on timeout. For tests, switchovers and upgrades.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_drain(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: arguments as declared in sql/outbox.sql (integer, pg_lsn);
    // pg_lsn is a by-value 64-bit datum.
    let (timeout_ms, upto) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<i32>(fcinfo, 0).unwrap_or(30_000),
            pgrx::fcinfo::pg_getarg_datum(fcinfo, 1).map(|d| d.value() as u64),
        )
    };
    let shared = relay_shared();
    let target = upto.unwrap_or_else(drain_target);
    let deadline = crate::clock::now() + Duration::from_millis(timeout_ms.max(0) as u64);
    loop {
        if shared.confirmed() >= target {
            return pg_sys::Datum::from(true);
        }
        if crate::clock::now() >= deadline {
            return pg_sys::Datum::from(false);
        }
        shared.wake_worker();
        // Cancel and statement_timeout are served right after each wait.
        shmem::wait_latch(5);
        pg_sys::check_for_interrupts!();
    }
}

crate::ffi::function_info_v1!(pg_finfo_outbox_drain);

/// Everything written so far, flushed: a commit made with
/// `synchronous_commit = off` returns before its WAL is flushed, and the
/// relay decodes only flushed WAL, so waiting for the flush position alone
/// would return before such a commit is published.
fn drain_target() -> u64 {
    // SAFETY: RecoveryInProgress reads shared state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "outbox_drain() cannot run during recovery",
            Some("The relay publishes from the primary; a standby has nothing of its own to drain.".into()),
            Some("Call outbox_drain() on the primary.".into()),
        );
    }
    let end = slot::generated_wal_end();
    // SAFETY: XLogFlush of WAL already generated is what any COMMIT does (it
    // raises on an I/O error, through pgrx's guarded binding).
    unsafe { pg_sys::XLogFlush(end) };
    end
}

/// `outbox_relay_status()`: the worker's shared-memory status (read without
/// locks, so reading it never blocks the worker) and the slot's positions.
/// The `outbox_status` view selects it.
// pgrx reads the column names from the name!() tuple in the signature, so
// the type cannot be aliased.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn outbox_relay_status(fcinfo: pg_sys::FunctionCallInfo) -> TableIterator<
    'static,
    (
        name!(pid, Option<i32>),
        name!(state, String),
        name!(slot_name, String),
        name!(confirmed_lsn, Option<String>),
        name!(lag_bytes, Option<i64>),
        name!(lag_seconds, f64),
        name!(retained_wal_bytes, Option<i64>),
        name!(max_retained_wal_bytes, Option<i64>),
        name!(events_published, i64),
        name!(bytes_published, i64),
        name!(events_in_flight, i64),
        name!(retries, i64),
        name!(dead_letters, i64),
        name!(forged_messages, i64),
        name!(unverified_events, i64),
        name!(worker_starts, i64),
        name!(peak_rss_kb, i64),
        name!(broker_reachable, bool),
        name!(last_error, Option<String>),
        name!(last_error_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(sink, String),
    ),
> {
    check_declared_columns(fcinfo, "outbox_relay_status()", &STATUS_COLUMNS);
    let shared = relay_shared();
    let s = shared.snapshot();
    // One read: message and time from the same write.
    let error = shared.last_error();
    // SAFETY: GetCurrentTimestamp only reads the clock.
    let now = unsafe { pg_sys::GetCurrentTimestamp() };
    let lag_seconds = if s.oldest_unacked_commit_time != 0 {
        (now - s.oldest_unacked_commit_time).max(0) as f64 / 1e6
    } else {
        0.0
    };
    let name = settings::slot_name();
    // The slot is the truth for positions; the worker's copy serves when
    // the slot is gone.
    let info = slot::find(&name).filter(|i| !i.invalidated);
    let confirmed = info.as_ref().map_or(s.confirmed_lsn, |i| i.confirmed_flush);
    let insert = slot::insert_lsn();
    TableIterator::once((
        (s.pid != 0).then_some(s.pid),
        s.state.name().to_owned(),
        name,
        (confirmed != 0).then(|| outbox_core::lsn::format(confirmed)),
        (confirmed != 0).then(|| insert.saturating_sub(confirmed) as i64),
        lag_seconds,
        info.as_ref().map(|i| slot::retained(i) as i64),
        settings::max_retained_wal().map(|b| b as i64),
        s.events_published as i64,
        s.bytes_published as i64,
        s.in_flight as i64,
        s.retries as i64,
        s.dead_letters as i64,
        s.forged_messages as i64,
        s.unverified_events as i64,
        s.starts as i64,
        s.peak_rss_kb as i64,
        s.broker_up,
        error.as_ref().map(|(m, _)| m.clone()),
        error.and_then(|(_, t)| pgrx::datum::TimestampWithTimeZone::try_from(t).ok()),
        settings::amqp::sink_name().to_owned(),
    ))
}

/// The types of `outbox_relay_status()`'s columns, in order.
const STATUS_COLUMNS: [pg_sys::Oid; 21] = {
    use pg_sys::{BOOLOID as B, FLOAT8OID as F, INT4OID as I, INT8OID as L, TEXTOID as T, TIMESTAMPTZOID as Z};
    [I, T, T, T, L, F, L, L, L, L, L, L, L, L, L, L, L, B, T, Z, T]
};

/// Refuses to return rows other than the ones the function's SQL
/// declaration describes. The library and the extension's SQL objects can
/// differ in version (a new library is loaded at restart, the SQL changes
/// at ALTER EXTENSION outbox UPDATE), and PostgreSQL forms the result row
/// from the declared types: a bigint where text is declared would be read
/// as a pointer and take the server down.
fn check_declared_columns(fcinfo: pg_sys::FunctionCallInfo, function: &str, ours: &[pg_sys::Oid]) {
    let mut desc: pg_sys::TupleDesc = std::ptr::null_mut();
    // SAFETY: fcinfo is this call's, from PostgreSQL; get_call_result_type
    // only reads the function's catalog entry (through pgrx's guarded
    // binding) and hands back a descriptor valid for this call, which is
    // copied (pgrx reads the copy's attributes in each major's layout).
    let declared: Vec<pg_sys::Oid> = unsafe {
        let class = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc);
        if class != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || desc.is_null() {
            Vec::new()
        } else {
            let desc = pgrx::PgTupleDesc::from_pg_copy(desc);
            (0..desc.len()).filter_map(|i| desc.get(i)).map(|a| a.atttypid).collect()
        }
    };
    if declared != ours {
        // A read-only select: Spi::get_one would assign a transaction id,
        // which a standby or a parallel worker refuses with another error.
        let installed = Spi::connect(|c| {
            c.select("SELECT extversion FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'outbox'", Some(1), &[])?
                .first()
                .get_one::<String>()
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| "unknown".into());
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "{function} of the outbox library {} does not match the extension's SQL objects (version {installed})",
                env!("CARGO_PKG_VERSION")
            ),
            Some(format!("The SQL declares {} columns, the library returns {}.", declared.len(), ours.len())),
            Some("Run ALTER EXTENSION outbox UPDATE in this database: it brings the SQL objects to the library's version.".into()),
        );
    }
}

/// `outbox_relay_resume()`: a relay stopped on a bad event restarts and
/// resumes with that event (once its cause is fixed). Same as a reload.
#[pg_extern(volatile, parallel_unsafe)]
fn outbox_relay_resume() -> bool {
    let shared = relay_shared();
    let stopped = shared.state() == shmem::State::StoppedOnBadEvent;
    shared.request_resume();
    stopped
}

/// `outbox_relay_latency()`: commit-to-acknowledgement latency percentiles
/// since the last reset, in microseconds (within 12.5 %).
#[allow(clippy::type_complexity)] // as outbox_relay_status()
#[pg_extern(volatile, parallel_safe)]
fn outbox_relay_latency(fcinfo: pg_sys::FunctionCallInfo) -> TableIterator<
    'static,
    (
        name!(samples, i64),
        name!(p50_us, Option<i64>),
        name!(p95_us, Option<i64>),
        name!(p99_us, Option<i64>),
        name!(max_us, Option<i64>),
    ),
> {
    check_declared_columns(fcinfo, "outbox_relay_latency()", &[pg_sys::INT8OID; 5]);
    let counts = shmem::shared().map(|s| s.latency_counts()).unwrap_or_default();
    let q = |p: f64| outbox_core::histogram::quantile(&counts, p).map(|v| v as i64);
    TableIterator::once((counts.iter().sum::<u64>() as i64, q(0.5), q(0.95), q(0.99), q(1.0)))
}

/// `outbox_relay_latency_reset()`: starts a new latency measurement.
#[pg_extern(volatile, parallel_safe)]
fn outbox_relay_latency_reset() {
    if let Some(s) = shmem::shared() {
        s.reset_latency();
    }
}

extension_sql!(
    r#"
REVOKE ALL ON FUNCTION outbox_relay_resume() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_relay_latency_reset() FROM PUBLIC;

-- The operations view. Readable by superusers and pg_monitor: it holds no
-- secret (no settings values besides the slot name and the WAL limit), but
-- errors name topics and event ids.
CREATE VIEW outbox_status AS SELECT * FROM outbox_relay_status();
COMMENT ON VIEW outbox_status IS 'The outbox relay: state, lag, counters, last error (from shared memory, lock-free)';
REVOKE ALL ON FUNCTION outbox_relay_status() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_relay_latency() FROM PUBLIC;
REVOKE ALL ON outbox_status FROM PUBLIC;
GRANT USAGE ON SCHEMA @extschema@ TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox_relay_status() TO pg_monitor;
GRANT EXECUTE ON FUNCTION outbox_relay_latency() TO pg_monitor;
GRANT SELECT ON outbox_status TO pg_monitor;
"#,
    name = "ops_privileges",
    finalize
);
