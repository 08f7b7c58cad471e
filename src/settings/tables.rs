//! Adopted tables (`outbox.tables`, `outbox.table_options`): a user's own
//! Debezium-style outbox tables whose inserts are published as the Outbox
//! Event Router publishes them. Reloadable; the output plugin reads them
//! when it decodes (see `crate::adopt` and the README's migration guide for
//! what that means at cut-over).
//!
//! Both are checked when set: the syntax and the router options always, and
//! in a transaction (SET, ALTER SYSTEM, ALTER DATABASE) also each table
//! against the mapping, so that a table that does not exist, a missing
//! column or a column of the wrong type is refused there, with its name.

use std::ffi::{c_char, c_void, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::adopt::{self, TableName};
use outbox_core::router::Mapping;

use super::{check_failed, new_value, string};

static TABLES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static TABLE_OPTIONS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));

pub fn init() {
    // SAFETY: the check hooks are #[pg_guard] functions.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.tables",
            c"Tables of your own (schema.table, comma-separated) whose inserted rows are published as events, \
              mapped by outbox.table_options.",
            c"Reloadable. Updates and deletes of these tables are ignored, so a row inserted and deleted in one \
              transaction is published once. Checked against the tables when set in a transaction.",
            &TABLES,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_tables),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.table_options",
            c"Debezium Outbox Event Router options for outbox.tables, key=value pairs separated by ';' \
              (a transforms.<name>. prefix is accepted).",
            c"Reloadable. Unknown options are refused; router defaults apply to the rest.",
            &TABLE_OPTIONS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_table_options),
            None,
            None,
        );
    }
}

/// The raw values, for the plugin's cache key.
pub fn raw() -> (String, String) {
    (string(&TABLES), string(&TABLE_OPTIONS))
}

/// Whether the settings still have the values `raw` holds (compared in
/// place: the plugin asks for every change it decodes).
pub fn unchanged(raw: &(String, String)) -> bool {
    super::with_cstr(&TABLES, |t| t.to_bytes() == raw.0.as_bytes())
        && super::with_cstr(&TABLE_OPTIONS, |o| o.to_bytes() == raw.1.as_bytes())
}

/// Parses both settings' values (already checked when set).
pub fn parse(tables: &str, options: &str) -> Result<(Vec<TableName>, Mapping), String> {
    let tables = adopt::parse_tables(tables)?;
    let pairs = outbox_core::kafka_props::pairs(options).map_err(|e| format!("outbox.table_options: {e}"))?;
    let mapping = Mapping::parse(&pairs).map_err(|e| format!("outbox.table_options: {e}"))?;
    Ok((tables, mapping))
}

/// Checks `tables` under `options` against the catalog when a statement
/// sets them (ALTER SYSTEM run in `outbox.database`); otherwise (the
/// configuration file read at start or reload, in any process, a session
/// idle in a transaction included, or a parallel worker taking over its
/// leader's settings) only the syntax is checked here: opening the tables
/// there would lock them in sessions that never asked, and fail parallel
/// queries once a table no longer fits. The output plugin checks each
/// row's table as it decodes.
///
/// A role that is not superuser (granted ALTER SYSTEM on these settings)
/// must set them in `outbox.database`, where its rights on each table are
/// checked too (`crate::adopt::check_rights`).
fn check(tables: &str, options: &str) -> Result<(), String> {
    let (tables, mapping) = parse(tables, options)?;
    // SAFETY: reading backend globals.
    let statement = unsafe {
        pg_sys::IsTransactionState()
            && !pg_sys::ActivePortal.is_null()
            && !pg_sys::InitializingParallelWorker
            && pg_sys::ParallelWorkerNumber < 0
            && pg_sys::MyDatabaseId != pg_sys::InvalidOid
    };
    if !statement {
        return Ok(());
    }
    // SAFETY: get_database_name is a syscache lookup in the statement's
    // transaction, returning a palloc'd copy or NULL; superuser() reads the
    // current user's role (cached), in a transaction.
    let (in_outbox_db, superuser) = unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        (!name.is_null() && std::ffi::CStr::from_ptr(name).to_bytes() == super::database().as_bytes(), pg_sys::superuser())
    };
    // Deleting as each table's owner is a superuser's to ask for: a
    // delegated role could otherwise order its two ALTER SYSTEMs so that
    // each is checked against the other's old value.
    if !superuser && mapping.delete_published_rows {
        return Err("delete.published.rows deletes rows as each table's owner: while it is on, only a superuser can \
                    set outbox.tables or outbox.table_options"
            .to_owned());
    }
    // The tables live in outbox.database: from any other database (an
    // ALTER SYSTEM run there) only the syntax can be checked.
    if !in_outbox_db {
        if superuser || tables.is_empty() {
            return Ok(());
        }
        return Err(format!(
            "only a superuser can adopt tables from another database than outbox.database (\"{}\"): set it there, \
             where the tables and your rights on them are checked",
            super::database()
        ));
    }
    for t in &tables {
        // Rights first: a table the role may not read is not opened for it.
        if !superuser {
            crate::adopt::check_rights(t)?;
        }
        crate::adopt::check_table(t, &mapping, false)?;
    }
    Ok(())
}

#[pg_guard]
unsafe extern "C-unwind" fn check_tables(newval: *mut *mut c_char, _extra: *mut *mut c_void, _source: pg_sys::GucSource::Type) -> bool {
    // SAFETY: see new_value / check_failed.
    unsafe {
        match check(new_value(newval), &string(&TABLE_OPTIONS)) {
            Ok(()) => true,
            Err(e) => check_failed(&e),
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_table_options(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: see new_value / check_failed.
    unsafe {
        match check(&string(&TABLES), new_value(newval)) {
            Ok(()) => true,
            Err(e) => check_failed(&e),
        }
    }
}
