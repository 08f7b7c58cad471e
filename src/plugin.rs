//! The library as its own logical decoding output plugin
//! (`pg_create_logical_replication_slot(name, 'outbox')`).
//!
//! It yields only outbox events: logical messages with our prefix written by
//! `outbox_emit()` (authenticated, see `outbox_core::message`) and inserts
//! into the extension's outbox table. Everything else is skipped as early as
//! possible. Each event is written as one output record
//! (`outbox_core::decoded`) carrying its transaction's commit LSN and time;
//! Postgres replays transactions at commit, in commit order, so rolled-back
//! transactions and rolled-back subtransactions never get here.
//!
//! Options: `format` = `json` (default, text) or `binary` (what the relay
//! reads).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CStr;

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgList;

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use outbox_core::adopt::{self as core_adopt, Plan, TableName};
use outbox_core::decoded::{self, DecodedEvent, DecodedRow, Source};
use outbox_core::router::{Mapping, OnUpdate};
use outbox_core::rate_limit::RateLimit;
use outbox_core::{lsn, message, Event, MESSAGE_PREFIX};

use crate::{adopt, key, row, settings};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    Binary,
}

/// Per-decoding-context state, owned by the context through
/// `output_plugin_private` from startup to shutdown.
struct State {
    format: Format,
    /// Whether a relation (by oid) is the extension's outbox table. Keyed by
    /// oid so a table dropped and recreated is looked up afresh.
    is_outbox: HashMap<pg_sys::Oid, bool>,
    /// Adopted tables (`outbox.tables`): the settings as last parsed, and
    /// per relation whether it is one and how its columns map.
    adopted: Adopted,
    /// RELCACHE_GENERATION when the per-relation maps were last valid.
    generation: u64,
    bin: Vec<u8>,
    text: String,
    /// Reset after each change and message, as test_decoding does: what a
    /// row's decoding pallocs (detoasted values, jsonb's text output) would
    /// otherwise live until the whole transaction is replayed.
    per_change: pg_sys::MemoryContext,
}

/// Runs `f` in the plugin's per-change memory context, then frees all it
/// allocated there. Output records are copied out by the write callback
/// (and ctx->out lives in the decoding context), so nothing outlives it.
///
/// # Safety
/// `ctx` must be a decoding context whose startup callback has run.
unsafe fn in_change_context<R>(ctx: *mut pg_sys::LogicalDecodingContext, f: impl FnOnce() -> R) -> R {
    // SAFETY: per_change was created in startup as a child of the decoding
    // context and lives as long as the plugin state.
    unsafe {
        let mem = state(ctx).per_change;
        let old = pg_sys::MemoryContextSwitchTo(mem);
        let r = f();
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset(mem);
        r
    }
}

#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn _PG_output_plugin_init(cb: *mut pg_sys::OutputPluginCallbacks) {
    // SAFETY: Postgres hands us a zeroed callback struct to fill in.
    unsafe {
        (*cb).startup_cb = Some(startup);
        (*cb).begin_cb = Some(begin);
        (*cb).change_cb = Some(change);
        (*cb).commit_cb = Some(commit);
        (*cb).message_cb = Some(message_cb);
        (*cb).shutdown_cb = Some(shutdown);
    }
}

unsafe fn state<'a>(ctx: *mut pg_sys::LogicalDecodingContext) -> &'a mut State {
    // SAFETY: set in startup to a leaked Box<State>, freed only in shutdown.
    unsafe { &mut *((*ctx).output_plugin_private as *mut State) }
}

#[pg_guard]
unsafe extern "C-unwind" fn startup(
    ctx: *mut pg_sys::LogicalDecodingContext,
    opt: *mut pg_sys::OutputPluginOptions,
    _is_init: bool,
) {
    let mut format = Format::Json;
    // SAFETY: output_plugin_options is a List of DefElem built by Postgres
    // from the slot function's or the worker's options.
    unsafe {
        let options = PgList::<pg_sys::DefElem>::from_pg((*ctx).output_plugin_options);
        for elem in options.iter_ptr() {
            let name = CStr::from_ptr((*elem).defname).to_string_lossy();
            let value = if (*elem).arg.is_null() {
                String::new()
            } else {
                CStr::from_ptr(pg_sys::defGetString(elem)).to_string_lossy().into_owned()
            };
            format = match (name.as_ref(), value.as_str()) {
                ("format", "json") => Format::Json,
                ("format", "binary") => Format::Binary,
                ("format", other) => error!("outbox output plugin: unknown format \"{other}\" (use json or binary)"),
                (other, _) => error!("outbox output plugin: unknown option \"{other}\" (known: format)"),
            };
        }
        (*opt).output_type = match format {
            Format::Json => pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_TEXTUAL_OUTPUT,
            Format::Binary => pg_sys::OutputPluginOutputType::OUTPUT_PLUGIN_BINARY_OUTPUT,
        };
        (*opt).receive_rewrites = false;
        let per_change = pg_sys::AllocSetContextCreateExtended(
            (*ctx).context,
            c"outbox per-change".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        );
        register_relcache_callback();
        let st = Box::new(State {
            format,
            is_outbox: HashMap::new(),
            adopted: Adopted::default(),
            generation: RELCACHE_GENERATION.load(Ordering::Relaxed),
            bin: Vec::new(),
            text: String::new(),
            per_change,
        });
        (*ctx).output_plugin_private = Box::into_raw(st).cast();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shutdown(ctx: *mut pg_sys::LogicalDecodingContext) {
    // SAFETY: the pointer came from Box::into_raw in startup; nulled so a
    // second shutdown cannot double-free.
    unsafe {
        let p = (*ctx).output_plugin_private as *mut State;
        if !p.is_null() {
            drop(Box::from_raw(p));
            (*ctx).output_plugin_private = std::ptr::null_mut();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn begin(_ctx: *mut pg_sys::LogicalDecodingContext, _txn: *mut pg_sys::ReorderBufferTXN) {}

#[pg_guard]
unsafe extern "C-unwind" fn commit(
    _ctx: *mut pg_sys::LogicalDecodingContext,
    _txn: *mut pg_sys::ReorderBufferTXN,
    _commit_lsn: pg_sys::XLogRecPtr,
) {
}

/// Writes one output record for an event of the transaction being replayed.
unsafe fn emit(ctx: *mut pg_sys::LogicalDecodingContext, d: DecodedEvent<'_>) {
    // SAFETY: as write_record's.
    unsafe { write_record(ctx, |b| decoded::encode_binary(b, &d), |t| decoded::encode_json(t, &d)) }
}

/// Writes one output record for a row of an adopted table.
unsafe fn emit_row(ctx: *mut pg_sys::LogicalDecodingContext, d: DecodedRow<'_>) {
    // SAFETY: as write_record's.
    unsafe { write_record(ctx, |b| decoded::encode_row_binary(b, &d), |t| decoded::encode_row_json(t, &d)) }
}

/// Writes one output record, rendered by `binary` or `json` as the
/// context's format asks.
unsafe fn write_record(ctx: *mut pg_sys::LogicalDecodingContext, binary: impl FnOnce(&mut Vec<u8>), json: impl FnOnce(&mut String)) {
    // SAFETY: called from a decoding callback, where ctx->out is the
    // context's output buffer and Prepare/Write bracket one record.
    unsafe {
        let st = state(ctx);
        let (ptr, len) = match st.format {
            Format::Binary => {
                st.bin.clear();
                binary(&mut st.bin);
                (st.bin.as_ptr(), st.bin.len())
            }
            Format::Json => {
                st.text.clear();
                json(&mut st.text);
                (st.text.as_ptr(), st.text.len())
            }
        };
        pg_sys::OutputPluginPrepareWrite(ctx, true);
        pg_sys::appendBinaryStringInfo((*ctx).out, ptr.cast(), len as i32);
        pg_sys::OutputPluginWrite(ctx, true);
    }
}

/// Commit position and time come from the transaction (set before replay
/// starts), never from the record's own LSN.
unsafe fn commit_info(txn: *mut pg_sys::ReorderBufferTXN) -> (u32, u64, i64) {
    // SAFETY: txn is the transaction being replayed at its commit.
    unsafe { ((*txn).xid.into_inner(), (*txn).end_lsn, (*txn).xact_time.commit_time) }
}

#[pg_guard]
unsafe extern "C-unwind" fn message_cb(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    message_lsn: pg_sys::XLogRecPtr,
    transactional: bool,
    prefix: *const std::ffi::c_char,
    message_size: pg_sys::Size,
    message: *const std::ffi::c_char,
) {
    // SAFETY: prefix is a NUL-terminated string and message points to
    // message_size bytes, both owned by the reorder buffer for this call.
    unsafe { in_change_context(ctx, || {
        if CStr::from_ptr(prefix).to_bytes() != MESSAGE_PREFIX.as_bytes() {
            return;
        }
        if !transactional || txn.is_null() {
            not_an_event(message_lsn, "non-transactional (outbox_emit() writes only transactional messages)");
            return;
        }
        let bytes = std::slice::from_raw_parts(message.cast::<u8>(), message_size);
        let key = match key::get() {
            Ok(k) => k,
            Err(e) => error!("outbox: cannot verify events: {e}"),
        };
        let (source, event) = match message::decode(key, bytes) {
            Ok(ev) => (Source::Emit, ev),
            // Well formed but not signed with this server's key: kept and
            // handed on as unverified (the relay dead-letters it or stops,
            // outbox.on_rejected_event), never dropped in silence.
            Err(message::MessageError::BadTag) => match message::decode_unverified(bytes) {
                Ok(ev) => (Source::Unverified, ev),
                Err(e) => {
                    not_an_event(message_lsn, &e.to_string());
                    return;
                }
            },
            Err(e) => {
                not_an_event(message_lsn, &e.to_string());
                return;
            }
        };
        let (xid, commit_lsn, commit_time) = commit_info(txn);
        emit(ctx, DecodedEvent { source, xid, commit_lsn, commit_time, lsn: message_lsn, event });
    }) }
}

/// A message with our prefix that is no event at all (any role can write one
/// with pg_logical_emit_message()): skipped, counted in the relay's status,
/// and logged at most once a minute per process so it cannot flood the log.
fn not_an_event(at: pg_sys::XLogRecPtr, why: &str) {
    thread_local! { static LIMIT: RefCell<RateLimit> = const { RefCell::new(RateLimit::new(60_000)) }; }
    if let Some(s) = crate::shmem::shared().filter(|s| s.is_worker()) {
        s.add_forged();
    }
    once_a_minute(&LIMIT, |more| {
        warning!(
            "outbox: skipping a message with prefix \"{MESSAGE_PREFIX}\" at LSN {} that is not an outbox event: {why}{more}; \
             such messages are counted in outbox_status.forged_messages and logged at most once a minute",
            lsn::format(at)
        )
    });
}

/// Calls `say` with the " (N more since the last such line)" suffix when
/// `limit` lets a line through now (each kind of line has its own limit,
/// once a minute per process).
fn once_a_minute(limit: &'static std::thread::LocalKey<RefCell<RateLimit>>, say: impl FnOnce(&str)) {
    // SAFETY: GetCurrentTimestamp only reads the clock.
    let now_ms = (unsafe { pg_sys::GetCurrentTimestamp() } / 1000).max(0) as u64;
    if let Some(unsaid) = limit.with(|l| l.borrow_mut().note(now_ms)) {
        let more = if unsaid > 0 { format!(" ({unsaid} more since the last such line)") } else { String::new() };
        say(&more);
    }
}

/// Whether a relation is the extension's own table: named `outbox` and a
/// member of the extension (pg_depend), read in the historic snapshot of the
/// change. Membership, not the schema: 0.2.0 moved the table from the
/// extension's schema into schema `outbox` (same OID), so rows committed
/// before `ALTER EXTENSION outbox UPDATE` and rows committed after it are
/// recognised alike, and a user's own table named `outbox` is not ours.
unsafe fn is_outbox_table(st: &mut State, relation: pg_sys::Relation) -> bool {
    // SAFETY: relation is the open relation of the change being replayed;
    // get_extension_oid and getExtensionOfObject are catalog scans (by name
    // on pg_extension, by object on pg_depend, each with its index) that
    // decoding allows in a change callback (the historic snapshot is the
    // catalog snapshot). An ERROR from them crosses pgrx's FFI guard as a
    // Rust panic that the callback's #[pg_guard] raises again as the ERROR.
    unsafe {
        let relid = (*relation).rd_id;
        if let Some(&known) = st.is_outbox.get(&relid) {
            return known;
        }
        let form = (*relation).rd_rel;
        let name = CStr::from_ptr((*form).relname.data.as_ptr());
        let yes = name.to_bytes() == b"outbox" && {
            let ext = pg_sys::get_extension_oid(c"outbox".as_ptr(), true);
            ext != pg_sys::InvalidOid && pg_sys::getExtensionOfObject(pg_sys::RelationRelationId, relid) == ext
        };
        st.is_outbox.insert(relid, yes);
        yes
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn change(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
) {
    // SAFETY: all pointers are the reorder buffer's for this change.
    unsafe { in_change_context(ctx, || {
        forget_stale_relations(state(ctx));
        if (*change).action != pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_INSERT {
            if (*change).action == pg_sys::ReorderBufferChangeType::REORDER_BUFFER_CHANGE_UPDATE {
                if let Some((table, Ok(_))) = adopted_plan(state(ctx), relation) {
                    updated_adopted_row(ctx, txn, change, &table);
                }
            }
            return;
        }
        if !is_outbox_table(state(ctx), relation) {
            if let Some((table, plan)) = adopted_plan(state(ctx), relation) {
                adopted_row(ctx, txn, relation, change, &table, plan);
            }
            return;
        }
        let tuple = crate::ffi::insert_new_tuple(change);
        if tuple.is_null() {
            return;
        }
        let at = lsn::format((*change).lsn);
        let r = match row::read(tuple, (*relation).rd_att) {
            Ok(r) => r,
            Err(e) => {
                warning!("outbox: skipping outbox table row at LSN {at}: {e}");
                return;
            }
        };
        let (Some(id), Some(aggregate_type), Some(aggregate_id), Some(event_type), Some(payload)) =
            (r.id, r.aggregate_type.as_deref(), r.aggregate_id.as_deref(), r.event_type.as_deref(), r.payload.as_deref())
        else {
            warning!("outbox: skipping outbox table row at LSN {at}: a required column is NULL (were the table's constraints dropped?)");
            return;
        };
        let headers = match outbox_core::validate::headers(r.headers.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                warning!("outbox: skipping outbox table row at LSN {at}: {}", e.message);
                return;
            }
        };
        let event = Event {
            id,
            aggregate_type,
            aggregate_id,
            event_type,
            topic: None,
            headers: headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            payload: Some(payload),
        };
        let (xid, commit_lsn, commit_time) = commit_info(txn);
        emit(ctx, DecodedEvent { source: Source::Table, xid, commit_lsn, commit_time, lsn: (*change).lsn, event });
    }) }
}

/// Bumped by every relcache invalidation this process receives, decoding's
/// replay of a decoded transaction's catalog changes included (as pgoutput
/// keeps its relation cache): an ALTER TABLE of an adopted table is seen by
/// the rows written after it.
static RELCACHE_GENERATION: AtomicU64 = AtomicU64::new(0);

#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    RELCACHE_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// Registers `relcache_changed` once per process (callbacks cannot be
/// removed; there is a fixed number of slots).
fn register_relcache_callback() {
    thread_local! { static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) }; }
    if !DONE.with(|d| d.replace(true)) {
        // SAFETY: a plain registration of a #[pg_guard] callback.
        unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0)) };
    }
}

/// Drops what is known about relations when a relcache invalidation came
/// in since it was learnt.
fn forget_stale_relations(st: &mut State) {
    let now = RELCACHE_GENERATION.load(Ordering::Relaxed);
    if now != st.generation {
        st.generation = now;
        st.is_outbox.clear();
        st.adopted.plans.clear();
    }
}

/// The parsed settings: the tables and their mapping, or why they do not parse.
type Config = Result<Rc<(Vec<TableName>, Mapping)>, String>;
/// An adopted table's name and plan, or why the mapping does not fit it.
type Entry = (String, Result<Rc<Plan>, String>);

#[derive(Default)]
struct Adopted {
    /// `outbox.tables` and `outbox.table_options` as last read.
    raw: (String, String),
    config: Option<Config>,
    /// None: not an adopted table. Some: its name and plan, or why the
    /// mapping does not fit it.
    plans: HashMap<pg_sys::Oid, Option<Entry>>,
}

/// The relation's name and plan when it is an adopted table.
unsafe fn adopted_plan(st: &mut State, relation: pg_sys::Relation) -> Option<Entry> {
    let a = &mut st.adopted;
    if a.config.is_none() || !settings::tables::unchanged(&a.raw) {
        a.raw = settings::tables::raw();
        a.config = Some(settings::tables::parse(&a.raw.0, &a.raw.1).map(Rc::new));
        a.plans.clear();
    }
    // SAFETY: relation is the change's open relation.
    let relid = unsafe { (*relation).rd_id };
    if let Some(known) = a.plans.get(&relid) {
        return known.clone();
    }
    let entry = match a.config.as_ref() {
        Some(Ok(c)) if !c.0.is_empty() => {
            // SAFETY: syscache lookups under the historic snapshot.
            let name = unsafe { adopt::name_of(relation) };
            c.0.contains(&name).then(|| {
                let table = name.to_string();
                // SAFETY: as above.
                let plan = unsafe { adopt::plan_of(relation, &table, &c.1) }.map(Rc::new);
                (table, plan)
            })
        }
        _ => None,
    };
    a.plans.insert(relid, entry.clone());
    entry
}

/// An inserted row of an adopted table: one record, the router's message
/// or the reason it cannot be one.
unsafe fn adopted_row(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    relation: pg_sys::Relation,
    change: *mut pg_sys::ReorderBufferChange,
    table: &str,
    plan: Result<Rc<Plan>, String>,
) {
    // SAFETY: the change's pointers, valid for this callback.
    unsafe {
        let tuple = crate::ffi::insert_new_tuple(change);
        if tuple.is_null() {
            return;
        }
        let at = lsn::format((*change).lsn);
        let Some(Ok(config)) = state(ctx).adopted.config.clone() else { return };
        let e = match plan {
            Ok(plan) => {
                let desc = (*relation).rd_att;
                core_adopt::row_event(&config.1, &plan, table, &at, |c| adopt::value(tuple, desc, c))
            }
            Err(why) => unreadable_row(table, &at, why),
        };
        if let Some(why) = &e.trace_dropped {
            thread_local! { static LIMIT: RefCell<RateLimit> = const { RefCell::new(RateLimit::new(60_000)) }; }
            once_a_minute(&LIMIT, |more| {
                warning!("outbox: {why}; the event is published without a traceparent (logged at most once a minute{more})")
            });
        }
        let (xid, commit_lsn, commit_time) = commit_info(txn);
        emit_row(ctx, DecodedRow::of(&e, table, xid, commit_lsn, commit_time, (*change).lsn));
    }
}

/// A row of a table the mapping no longer fits (it was altered after the
/// setting was checked): a record carrying the reason.
fn unreadable_row(table: &str, at: &str, why: String) -> core_adopt::RowEvent {
    core_adopt::RowEvent {
        id: core_adopt::derived_id(table, &format!("row at {at}")),
        key: None,
        value: None,
        payload: None,
        payload_kind: core_adopt::PayloadKind::Bytes,
        topic: String::new(),
        headers: Vec::new(),
        partition: None,
        timestamp: None,
        route_value: None,
        event_type: None,
        error: Some(format!("row of {table} at {at} cannot be read: {why}")),
        trace_dropped: None,
        cleanup: None,
    }
}

/// An UPDATE of an adopted table: not an event (as the router's
/// `table.op.invalid.behavior`): logged (warn, error) at most once a minute,
/// or with `fatal` a record that stops the relay there (or is dead-lettered,
/// as `outbox.on_rejected_event` says).
unsafe fn updated_adopted_row(
    ctx: *mut pg_sys::LogicalDecodingContext,
    txn: *mut pg_sys::ReorderBufferTXN,
    change: *mut pg_sys::ReorderBufferChange,
    table: &str,
) {
    thread_local! { static LIMIT: RefCell<RateLimit> = const { RefCell::new(RateLimit::new(60_000)) }; }
    // SAFETY: the change's pointers, valid for this callback.
    unsafe {
        let at = lsn::format((*change).lsn);
        let Some(Ok(config)) = state(ctx).adopted.config.clone() else { return };
        if config.1.on_update == OnUpdate::Fatal {
            let e = unreadable_row(table, &at, "an UPDATE, and table.op.invalid.behavior is fatal".to_owned());
            let (xid, commit_lsn, commit_time) = commit_info(txn);
            emit_row(ctx, DecodedRow::of(&e, table, xid, commit_lsn, commit_time, (*change).lsn));
            return;
        }
        once_a_minute(&LIMIT, |more| {
            warning!(
                "outbox: ignoring an UPDATE of adopted table {table} at LSN {at}: only inserted rows are events \
                 (table.op.invalid.behavior); logged at most once a minute{more}"
            )
        });
    }
}
