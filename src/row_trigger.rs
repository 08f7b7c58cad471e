//! `outbox_row_trigger()`: a ready AFTER ROW trigger that publishes a
//! table's inserts, updates and deletes as events.
//!
//! It runs with the rights of whoever writes the table (no SECURITY DEFINER):
//! turning the row into JSON can call user code (a type's cast to `json`, an
//! output function), and that code must never run with more rights than the
//! writer has. The part that needs the extension's trust, writing the signed
//! message, is `emit::write_event`, which takes only plain values. Who may
//! publish through a table is decided when the trigger is created: that needs
//! EXECUTE on this function, which only `outbox_producer` holds.

use std::ffi::{CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::emit;
use crate::errors::raise;

/// What a trigger call is about, read from its `TriggerData`.
struct Call {
    name: String,
    table: String,
    args: Vec<String>,
    op: Op,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Insert,
    Update,
    Delete,
    Truncate,
}

/// # Safety
/// `td` must be the `TriggerData` Postgres passed to this call.
unsafe fn call_of(td: *mut pg_sys::TriggerData) -> Call {
    // SAFETY: the caller guarantees td; the trigger, relation and their
    // names are valid for the call, tgargs holds tgnargs C strings.
    unsafe {
        let trig = (*td).tg_trigger;
        let rel = (*td).tg_relation;
        let cstr = |p: *const std::ffi::c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
        let nsp = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        let schema = if nsp.is_null() { String::from("?") } else { cstr(nsp) };
        let relname = cstr((*(*rel).rd_rel).relname.data.as_ptr());
        let nargs = (*trig).tgnargs.max(0) as usize;
        let args = (0..nargs).map(|i| cstr(*(*trig).tgargs.add(i))).collect();
        let ev = (*td).tg_event;
        let op = match ev & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => Op::Insert,
            pg_sys::TRIGGER_EVENT_UPDATE => Op::Update,
            pg_sys::TRIGGER_EVENT_DELETE => Op::Delete,
            _ => Op::Truncate,
        };
        Call { name: cstr((*trig).tgname), table: format!("{schema}.{relname}"), args, op }
    }
}

/// `to_jsonb(row)`, called through the function manager as the current
/// user, so any cast or output function it reaches runs with the writer's
/// rights.
///
/// # Safety
/// `tuple` must be a valid heap tuple of `rel`.
unsafe fn row_to_jsonb(rel: pg_sys::Relation, tuple: pg_sys::HeapTuple) -> pg_sys::Datum {
    // SAFETY: heap_copy_tuple_as_datum copies the tuple into a composite
    // datum of the relation's row type. to_jsonb is polymorphic and learns
    // its argument's type from fn_expr, so the call carries a FuncExpr whose
    // one argument is a NULL constant of that row type (as the planner
    // would build it). All of these raise Postgres ERRORs through pgrx's
    // guarded bindings.
    unsafe {
        let desc = (*rel).rd_att;
        let row = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let rowtype = (*(*rel).rd_rel).reltype;
        let arg = pg_sys::makeNullConst(rowtype, -1, pg_sys::InvalidOid);
        let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
        let expr = pg_sys::makeFuncExpr(
            pg_sys::Oid::from(pg_sys::F_TO_JSONB),
            pg_sys::JSONBOID,
            args,
            pg_sys::InvalidOid,
            pg_sys::InvalidOid,
            pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
        );
        let mut flinfo: pg_sys::FmgrInfo = std::mem::zeroed();
        pg_sys::fmgr_info(pg_sys::Oid::from(pg_sys::F_TO_JSONB), &mut flinfo);
        flinfo.fn_expr = expr.cast();
        pg_sys::FunctionCall1Coll(&mut flinfo, pg_sys::InvalidOid, row)
    }
}

/// `json ->> field`: a string without its quotes, any other value as JSON
/// text, None for a JSON null.
///
/// # Safety
/// `json` must be a jsonb datum.
unsafe fn field_text(json: pg_sys::Datum, field: &str) -> Option<String> {
    let name = CString::new(field).unwrap_or_default();
    // SAFETY: cstring_to_text pallocs a text copy; jsonb_object_field_text
    // takes (jsonb, text) and returns text or NULL; text_to_cstring copies.
    unsafe {
        let key = pg_sys::cstring_to_text(name.as_ptr());
        let v = pgrx::direct_function_call_as_datum(
            pg_sys::jsonb_object_field_text,
            &[Some(json), Some(pg_sys::Datum::from(key))],
        )?;
        let s = pg_sys::text_to_cstring(v.cast_mut_ptr());
        Some(CStr::from_ptr(s).to_string_lossy().into_owned())
    }
}

#[no_mangle]
#[pg_guard]
pub unsafe extern "C-unwind" fn outbox_row_trigger(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: fcinfo is Postgres' call frame.
    let td = unsafe { emit::trigger_data(fcinfo, "outbox_row_trigger()") };
    // SAFETY: td is this call's TriggerData.
    let (call, event) = unsafe { (call_of(td), (*td).tg_event) };
    let after = event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_AFTER;
    let row_level = event & pg_sys::TRIGGER_EVENT_ROW != 0;
    if !after || !row_level || call.op == Op::Truncate {
        let when = match event & pg_sys::TRIGGER_EVENT_TIMINGMASK {
            pg_sys::TRIGGER_EVENT_BEFORE => "BEFORE",
            pg_sys::TRIGGER_EVENT_INSTEAD => "INSTEAD OF",
            _ => "AFTER",
        };
        let level = if row_level { "ROW" } else { "STATEMENT" };
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            format!(
                "outbox_row_trigger() must be fired AFTER ... FOR EACH ROW, not {when} ... FOR EACH {level} (trigger \"{}\" on {})",
                call.name, call.table
            ),
            None,
            Some(
                "A BEFORE trigger can publish an event for a row that a later trigger or ON CONFLICT DO NOTHING then \
                 skips. Use CREATE TRIGGER ... AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW."
                    .into(),
            ),
        );
    }
    if !(2..=5).contains(&call.args.len()) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!(
                "outbox_row_trigger() takes 2 to 5 arguments, trigger \"{}\" on {} gives {}",
                call.name,
                call.table,
                call.args.len()
            ),
            None,
            Some(
                "Arguments: aggregate type, key column[, insert event type[, update event type[, delete event type]]], \
                 e.g. outbox_row_trigger('Order', 'id')."
                    .into(),
            ),
        );
    }
    // SAFETY: td is this call's TriggerData; for an AFTER ROW trigger
    // tg_trigtuple is the inserted or deleted row, tg_newtuple the updated one.
    let (rel, tuple) = unsafe {
        let tuple = if call.op == Op::Update { (*td).tg_newtuple } else { (*td).tg_trigtuple };
        ((*td).tg_relation, tuple)
    };
    let key_column = &call.args[1];
    let ckey = CString::new(key_column.as_str()).unwrap_or_default();
    // SAFETY: the relation's descriptor, valid for the call.
    let attno = unsafe { pg_sys::SPI_fnumber((*rel).rd_att, ckey.as_ptr()) };
    if attno <= 0 {
        raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            format!("outbox_row_trigger(): table {} has no column \"{key_column}\" (trigger \"{}\")", call.table, call.name),
            None,
            Some("The second argument names the column whose value becomes the aggregate id (the Kafka key).".into()),
        );
    }
    let key = emit::preflight(c"outbox_row_trigger()");
    // SAFETY: tuple is a row of rel (see above).
    let json = unsafe { row_to_jsonb(rel, tuple) };
    // SAFETY: json is the jsonb datum to_jsonb returned.
    let (payload, aggregate_id) = unsafe { (crate::row::jsonb_text(json), field_text(json, key_column)) };
    let aggregate_type = call.args[0].as_str();
    let default_type = |suffix: &str| format!("{aggregate_type}{suffix}");
    let event_type = match call.op {
        Op::Insert => call.args.get(2).cloned().unwrap_or_else(|| default_type("Created")),
        Op::Update => call.args.get(3).cloned().unwrap_or_else(|| default_type("Updated")),
        _ => call.args.get(4).cloned().unwrap_or_else(|| default_type("Deleted")),
    };
    emit::write_event(
        key,
        crate::event_id::new_v7(),
        Some(aggregate_type),
        aggregate_id.as_deref(),
        Some(&event_type),
        Some(&payload),
        None,
        None,
    );
    // The return value of an AFTER trigger is ignored.
    pg_sys::Datum::from(0)
}

crate::ffi::function_info_v1!(pg_finfo_outbox_row_trigger);
