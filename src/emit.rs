//! The SQL entry points that put events into the outbox: `outbox_emit()`
//! and the guard trigger on the outbox table. Both run the same checks,
//! before commit, so an event that is accepted is one the relay can publish.

use std::ffi::CStr;

use pgrx::prelude::*;
use pgrx::{pg_sys, JsonB};

use outbox_core::{message, validate, wal_guard, Event};

use crate::errors::{raise, raise_invalid};
use crate::{ffi, key, row, settings, slot};

/// Everything about the server that must hold for an event written now to be
/// published: refused loudly here rather than silently never decoded.
pub(crate) fn preflight(what: &CStr) -> &'static message::Key {
    // SAFETY: both functions only read global state and raise an ERROR
    // with the standard SQLSTATE when the transaction cannot write.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(what.as_ptr());
        pg_sys::PreventCommandDuringRecovery(what.as_ptr());
    }
    // SAFETY: wal_level is a plain global int set from postgresql.conf.
    if unsafe { pg_sys::wal_level } < pg_sys::WalLevel::WAL_LEVEL_LOGICAL as i32 {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "outbox requires wal_level = logical",
            Some("Events are published from the logical decoding stream, which this server does not write.".into()),
            Some("Set wal_level = logical in postgresql.conf and restart the server.".into()),
        );
    }
    check_database();
    check_slot();
    match key::get() {
        Ok(k) => k,
        Err(e) if crate::shmem::shared().is_none() => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "outbox is not loaded at server start",
            Some(e),
            Some("Add outbox to shared_preload_libraries in postgresql.conf and restart the server.".into()),
        ),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "outbox's message key is missing: events cannot be signed",
            Some(e),
            Some("SELECT last_error FROM outbox_status says why and what to do (README runbook: \"The message key is missing\").".into()),
        ),
    }
}

fn current_database() -> &'static str {
    static NAME: once_cell::sync::OnceCell<String> = once_cell::sync::OnceCell::new();
    NAME.get_or_init(|| {
        // SAFETY: MyDatabaseId is valid in a backend connected to a database;
        // get_database_name returns a palloc'd copy or NULL.
        unsafe {
            let p = pg_sys::get_database_name(pg_sys::MyDatabaseId);
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        }
    })
}

fn check_database() {
    let here = current_database();
    if settings::with_database(|served| served.to_bytes() == here.as_bytes()) {
        return;
    }
    let served = settings::database();
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("outbox events can only be written in database \"{served}\", not \"{here}\""),
        Some(format!(
            "The outbox relay decodes database \"{served}\" (outbox.database); events written here would never be published."
        )),
        Some("Write events in the database named by outbox.database, or change that setting and restart.".into()),
    );
}

/// The slot must exist in this database, use our plugin, be consistent
/// (events committed before that point are never decoded), be valid, and
/// hold back no more WAL than outbox.max_retained_wal.
fn check_slot() {
    let Some(info) = settings::with_slot_name(slot::find_c) else {
        let name = settings::slot_name();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("outbox replication slot \"{name}\" does not exist"),
            Some("Events written now would never be decoded, so they are refused.".into()),
            Some(format!(
                "The outbox relay worker creates the slot when it starts: check that outbox is in \
                 shared_preload_libraries and look for the worker in the server log. Without the worker: \
                 SELECT pg_create_logical_replication_slot('{name}', 'outbox');"
            )),
        );
    };
    // Error paths only: the name is copied when there is something to say.
    let name = settings::slot_name;
    if info.confirmed_flush == 0 {
        let name = name();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("outbox replication slot \"{name}\" is not ready yet"),
            Some("It is still looking for a consistent starting point; events written before it finds one would be lost.".into()),
            Some("Retry shortly. Slot creation waits for transactions open at that moment, including prepared ones, to end.".into()),
        );
    }
    // SAFETY: MyDatabaseId is a plain global.
    if info.database != unsafe { pg_sys::MyDatabaseId } || info.plugin != "outbox" {
        let name = name();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("replication slot \"{name}\" is not an outbox slot of this database"),
            Some(format!("It uses output plugin \"{}\" in database oid {}.", info.plugin, info.database.to_u32())),
            Some("Point outbox.slot_name at a slot created with plugin 'outbox' in this database, or drop this one.".into()),
        );
    }
    if info.invalidated {
        let name = name();
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("outbox replication slot \"{name}\" has been invalidated"),
            Some("Postgres removed WAL the slot still needed (max_slot_wal_keep_size); events after that point are lost to it.".into()),
            Some(format!("Drop the slot (SELECT pg_drop_replication_slot('{name}')) and let the relay recreate it; see the README's runbook.")),
        );
    }
    if let (retained, wal_guard::Verdict::Exceeded) = slot::guard(&info) {
        let relay = crate::shmem::shared().map_or("not running", |s| s.state().name());
        let name = name();
        raise(
            PgSqlErrorCode::ERRCODE_CONFIGURATION_LIMIT_EXCEEDED,
            format!(
                "outbox relay is too far behind: slot \"{name}\" retains {} of WAL, outbox.max_retained_wal allows {}",
                wal_guard::format_bytes(retained),
                wal_guard::format_bytes(settings::max_retained_wal().unwrap_or(0)),
            ),
            Some(format!(
                "New events are refused so that the slot is not invalidated and no event is lost. The relay is {relay}; \
                 events are accepted again once it has published the backlog."
            )),
            Some(
                "SELECT * FROM outbox_status shows why (broker down, relay disabled or stopped). Raising \
                 outbox.max_retained_wal, or -1 for no limit, also lifts the refusal at the risk of filling the disk."
                    .into(),
            ),
        );
    }
}

fn check_or_raise<T>(r: Result<T, validate::Invalid>) -> T {
    r.unwrap_or_else(|e| raise_invalid(e))
}

/// `outbox_emit(aggregate_type, aggregate_id, event_type, payload, headers, topic) RETURNS uuid`
///
/// A version-1 C function rather than a `#[pg_extern]`: the payload is
/// printed once by `jsonb_out` and goes into the message as that text,
/// without a round trip through serde.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_emit(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let key = preflight(c"outbox_emit()");
    // SAFETY: called by Postgres with the arguments declared in sql/outbox.sql.
    unsafe { emit(fcinfo, 0, crate::event_id::new_v7(), key) }
}

crate::ffi::function_info_v1!(pg_finfo_outbox_emit);

/// `outbox_emit_with_id(id, aggregate_type, ...)`: `outbox_emit()` with a
/// given event id, for re-publishing a dead letter under the id consumers
/// may already have seen. Superuser-only (it could reuse any id).
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_emit_with_id(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let key = preflight(c"outbox_emit_with_id()");
    // SAFETY: argument 0 is declared uuid in sql/outbox.sql.
    let id = unsafe { pgrx::fcinfo::pg_getarg::<pgrx::Uuid>(fcinfo, 0) };
    let Some(id) = id else {
        raise(PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED, "the event id must not be NULL", None, None)
    };
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(id.as_bytes());
    // SAFETY: the remaining arguments are outbox_emit()'s, from position 1.
    unsafe { emit(fcinfo, 1, bytes, key) }
}

crate::ffi::function_info_v1!(pg_finfo_outbox_emit_with_id);

/// Validates the event in arguments `first..first + 6` (aggregate type,
/// aggregate id, event type, payload, headers, topic) and writes it as one
/// transactional logical message with `id`.
///
/// # Safety
/// `fcinfo` must carry those arguments with the declared types.
unsafe fn emit(fcinfo: pg_sys::FunctionCallInfo, first: usize, id: [u8; 16], key: &message::Key) -> pg_sys::Datum {
    // SAFETY: the caller guarantees the argument types (text, text, text,
    // jsonb, jsonb, text); pg_getarg checks for NULL and detoasts.
    let (aggregate_type, aggregate_id, event_type, payload, headers, topic) = unsafe {
        (
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, first),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, first + 1),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, first + 2),
            pgrx::fcinfo::pg_getarg_datum(fcinfo, first + 3).map(|d| row::jsonb_text(d)),
            pgrx::fcinfo::pg_getarg::<JsonB>(fcinfo, first + 4),
            pgrx::fcinfo::pg_getarg::<&str>(fcinfo, first + 5),
        )
    };
    write_event(
        key,
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        payload.as_deref(),
        headers.as_ref().map(|h| &h.0),
        topic,
    );
    pgrx::Uuid::from_bytes(id).into_datum().unwrap_or(pg_sys::Datum::from(0))
}


/// Validates one event given as plain values and writes it as a
/// transactional logical message. It runs no user code: every value is
/// already text or parsed JSON, so it is what a caller's rights reach,
/// nothing more (`outbox_row_trigger` builds the row's JSON first, as the
/// caller).
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_event(
    key: &message::Key,
    id: [u8; 16],
    aggregate_type: Option<&str>,
    aggregate_id: Option<&str>,
    event_type: Option<&str>,
    payload: Option<&str>,
    headers: Option<&serde_json::Value>,
    topic: Option<&str>,
) {
    let checked = check_or_raise(settings::with_topic_template(|t| {
        validate::event(t, settings::max_event_bytes(), settings::tombstones(), aggregate_type, aggregate_id, event_type, payload, headers, topic)
            .map(|c| (c.aggregate_type, c.aggregate_id, c.event_type, c.headers, c.topic))
    }));
    let (aggregate_type, aggregate_id, mut headers, topic) = (checked.0, checked.1, checked.3, checked.4);
    let event_type = checked.2;
    if !headers.iter().any(|(k, _)| k == "traceparent") {
        // The transaction's trace context (SET LOCAL outbox.traceparent),
        // checked when it was set.
        let added = settings::with_traceparent(|t| {
            if !t.is_empty() {
                headers.push(("traceparent".to_owned(), t.to_owned()));
            }
            !t.is_empty()
        });
        if added {
            let size = validate::record_size(aggregate_type, aggregate_id, event_type, &headers, payload.unwrap_or(""));
            check_or_raise(validate::size(size, settings::max_event_bytes()));
        }
    }
    let ev = Event {
        id,
        aggregate_type,
        aggregate_id,
        event_type,
        topic,
        headers: headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
        payload,
    };
    let bytes = message::encode(key, &ev);
    crate::shmem::wake_at_commit();
    // SAFETY: prefix and message point to live buffers of the given sizes;
    // LogLogicalMessage copies them into WAL. The boundary guard turns a
    // Postgres ERROR inside it into a Rust unwind.
    unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            ffi::log_transactional_message(c"outbox", bytes.as_ptr().cast(), bytes.len())
        });
    }
}


/// The call's `TriggerData`, or a trigger-protocol ERROR naming `function`
/// when it is not called as a trigger.
///
/// # Safety
/// `fcinfo` must be Postgres' call frame for this call.
pub(crate) unsafe fn trigger_data(fcinfo: pg_sys::FunctionCallInfo, function: &str) -> *mut pg_sys::TriggerData {
    // SAFETY: the context is checked to be a TriggerData before it is
    // used as one.
    unsafe {
        let ctx = (*fcinfo).context;
        if ctx.is_null() || (*ctx).type_ != pg_sys::NodeTag::T_TriggerData {
            raise(
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                format!("{function} must be called as a trigger"),
                None,
                None,
            );
        }
        ctx as *mut pg_sys::TriggerData
    }
}

/// BEFORE INSERT row trigger on the outbox table: the same checks as
/// `outbox_emit()`, so a row the relay could not publish is refused at
/// INSERT instead of being discovered later.
#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_table_guard(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is Postgres' call frame.
    let td = unsafe { trigger_data(fcinfo, "outbox_table_guard()") };
    // SAFETY: td is this call's TriggerData.
    unsafe {
        let tuple = (*td).tg_trigtuple;
        let desc = (*(*td).tg_relation).rd_att;
        preflight(c"INSERT INTO the outbox table");
        let r = row::read(tuple, desc).unwrap_or_else(|e| {
            raise(PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION, e, None, None)
        });
        crate::shmem::wake_at_commit();
        check_or_raise(settings::with_topic_template(|t| {
            validate::event(
                t,
                settings::max_event_bytes(),
                false,
                r.aggregate_type.as_deref(),
                r.aggregate_id.as_deref(),
                r.event_type.as_deref(),
                r.payload.as_deref(),
                r.headers.as_ref(),
                None,
            )
            .map(|_| ())
        }));
        pg_sys::Datum::from(tuple)
    }
}

crate::ffi::function_info_v1!(pg_finfo_outbox_table_guard);
