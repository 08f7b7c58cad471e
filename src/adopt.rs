//! Adopted tables, the Postgres side: which relation a name in
//! `outbox.tables` is, its columns and their types as the mapping needs
//! them (`outbox_core::adopt::plan`), and one inserted row's values. Used by
//! the settings' check (the current catalog) and by the output plugin (the
//! catalog as it was when the row was written: decoding's historic
//! snapshot).

use std::ffi::{CStr, CString};

use pgrx::pg_sys;

use outbox_core::adopt::{self, Col, ColumnType, Plan, TableName, Value};
use outbox_core::router::Mapping;

/// What does not fit the catalog in `outbox.tables` under
/// `outbox.table_options` (raw values): one line per table, empty when all
/// is well. In a transaction, in `outbox.database`.
pub fn problems(tables: &str, options: &str) -> Vec<String> {
    match crate::settings::tables::parse(tables, options) {
        Err(e) => vec![e],
        Ok((tables, mapping)) => tables.iter().filter_map(|t| check_table(t, &mapping, true).err()).collect(),
    }
}

/// The relation `t` names, if any. In a transaction.
fn relid_of(t: &TableName) -> Option<pg_sys::Oid> {
    let (schema, name) = (CString::new(t.schema.as_str()).ok()?, CString::new(t.name.as_str()).ok()?);
    // SAFETY: catalog lookups by name, missing_ok (no ERROR for a missing
    // schema), in the caller's transaction.
    unsafe {
        let ns = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        let relid = if ns == pg_sys::InvalidOid { pg_sys::InvalidOid } else { pg_sys::get_relname_relid(name.as_ptr(), ns) };
        (relid != pg_sys::InvalidOid).then_some(relid)
    }
}

/// Whether the current user may have `t` adopted: ALTER SYSTEM on
/// `outbox.tables` and `outbox.table_options` can be granted to a role
/// that is not superuser (GRANT ALTER SYSTEM ON PARAMETER), and the relay
/// reads and publishes a table's rows with rights of its own. Such a role
/// needs SELECT on the table, with no row-level security limiting what it
/// reads there: it may publish only what it could read itself
/// (`delete.published.rows` is a superuser's alone, see
/// `settings::tables`). In a transaction.
pub fn check_rights(t: &TableName) -> Result<(), String> {
    let Some(relid) = relid_of(t) else {
        return Err(format!("table {t} does not exist"));
    };
    // SAFETY: an ACL check and a row-level-security check of an existing
    // relation for the current user, in a transaction (pg_class_aclcheck
    // raises only for a relation gone meanwhile; check_enable_rls is asked
    // not to raise).
    let (select, rls) = unsafe {
        (
            pg_sys::pg_class_aclcheck(relid, pg_sys::GetUserId(), pg_sys::ACL_SELECT as pg_sys::AclMode) == pg_sys::AclResult::ACLCHECK_OK,
            pg_sys::check_enable_rls(relid, pg_sys::InvalidOid, true) as u32 != pg_sys::CheckEnableRlsResult::RLS_NONE,
        )
    };
    if !select {
        return Err(format!(
            "permission denied for table {t}: publishing its rows needs SELECT on it (the relay reads them with rights \
             of its own)"
        ));
    }
    if rls {
        return Err(format!(
            "table {t} has row-level security that applies to you: the relay would publish every row, not only those \
             you may read; only a superuser (or the table's policies' exempt roles) can adopt it"
        ));
    }
    Ok(())
}

/// Checks that `t` exists, is a plain table, and fits `m`. In a
/// transaction. With `nowait`, a table another session holds locked
/// (ACCESS EXCLUSIVE) is not waited for: that is said instead.
pub fn check_table(t: &TableName, m: &Mapping, nowait: bool) -> Result<(), String> {
    // SAFETY: in the caller's transaction; the relation is opened with
    // AccessShareLock (try_relation_open returns NULL when it is gone) and
    // closed with the same lock before returning.
    unsafe {
        let Some(relid) = relid_of(t) else {
            return Err(format!("table {t} does not exist"));
        };
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        if nowait && !pg_sys::ConditionalLockRelationOid(relid, lock) {
            return Err(format!("table {t} is locked by another session: not checked now"));
        }
        let rel = pg_sys::try_relation_open(relid, if nowait { pg_sys::NoLock as pg_sys::LOCKMODE } else { lock });
        if rel.is_null() {
            return Err(format!("table {t} does not exist"));
        }
        let kind = (*(*rel).rd_rel).relkind as u8;
        let persistence = (*(*rel).rd_rel).relpersistence as u8;
        let r = if kind == pg_sys::RELKIND_PARTITIONED_TABLE {
            Err(format!("table {t} is partitioned: its rows are decoded as rows of its partitions; name those instead"))
        } else if kind != pg_sys::RELKIND_RELATION {
            Err(format!("{t} is not a table"))
        } else if persistence != pg_sys::RELPERSISTENCE_PERMANENT {
            Err(format!("table {t} is unlogged or temporary: its rows never reach the write-ahead log"))
        } else {
            plan_of(rel, &t.to_string(), m).and_then(|p| if m.delete_published_rows { id_is_primary_key(rel, t, m, p.id.index) } else { Ok(()) })
        };
        pg_sys::relation_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        r
    }
}

/// `delete.published.rows` deletes by the id column: it must be the
/// table's primary key, alone.
///
/// # Safety
/// `rel` must be an open relation, in a transaction.
unsafe fn id_is_primary_key(rel: pg_sys::Relation, t: &TableName, m: &Mapping, index: usize) -> Result<(), String> {
    // SAFETY: the relcache's bitmap of the primary key's columns (a copy,
    // palloc'd), offset by FirstLowInvalidHeapAttributeNumber.
    let (members, is_id) = unsafe {
        let pk = pg_sys::RelationGetIndexAttrBitmap(rel, pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_PRIMARY_KEY);
        let attno = index as i32 + 1 - pg_sys::FirstLowInvalidHeapAttributeNumber;
        (pg_sys::bms_num_members(pk), pg_sys::bms_is_member(attno, pk))
    };
    if members == 1 && is_id {
        return Ok(());
    }
    Err(format!(
        "table {t}: delete.published.rows deletes published rows by the id column \"{}\", which must be the table's \
         primary key{}",
        m.id_column,
        if members == 0 { " (the table has none)" } else { " (it is not, alone)" }
    ))
}

/// The table's schema-qualified name, as the catalog gives it (current or
/// historic, whichever is in force).
///
/// # Safety
/// `rel` must be an open relation; a syscache lookup must be allowed.
pub unsafe fn name_of(rel: pg_sys::Relation) -> TableName {
    // SAFETY: the caller's guarantee; get_namespace_name returns a palloc'd
    // copy or NULL (a namespace dropped since: the name stays unmatched).
    unsafe {
        let form = (*rel).rd_rel;
        let ns = pg_sys::get_namespace_name((*form).relnamespace);
        let schema = if ns.is_null() { String::new() } else { CStr::from_ptr(ns).to_string_lossy().into_owned() };
        let name = CStr::from_ptr((*form).relname.data.as_ptr()).to_string_lossy().into_owned();
        TableName { schema, name }
    }
}

/// Resolves the mapping against the relation's columns.
///
/// # Safety
/// `rel` must be an open relation; syscache lookups must be allowed.
pub unsafe fn plan_of(rel: pg_sys::Relation, table: &str, m: &Mapping) -> Result<Plan, String> {
    // SAFETY: rd_att is the relation's descriptor with natts attributes.
    unsafe {
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let lookup = |name: &str| -> Option<(usize, ColumnType)> {
            (0..natts).find_map(|i| {
                let a = attr(desc, i);
                let n = CStr::from_ptr((*a).attname.data.as_ptr());
                (!(*a).attisdropped && n.to_bytes() == name.as_bytes()).then(|| (i, classify((*a).atttypid)))
            })
        };
        let flags = |i: usize| {
            let a = attr(desc, i);
            adopt::ColumnFlags { not_null: (*a).attnotnull, has_default: (*a).atthasdef }
        };
        adopt::plan_with(m, table, lookup, flags)
    }
}

unsafe fn attr(desc: pg_sys::TupleDesc, i: usize) -> *const pg_sys::FormData_pg_attribute {
    // SAFETY: i < natts (callers'), and TupleDescAttr is this on every major.
    unsafe { crate::ffi::tuple_desc_attr(desc, i) }
}

/// A column type as the mapping sees it: domains by their base type.
unsafe fn classify(typid: pg_sys::Oid) -> ColumnType {
    // SAFETY: syscache lookups of a type that exists (it is a column's).
    unsafe {
        let base = pg_sys::getBaseType(typid);
        match base {
            // Not `name`: a fixed 64-byte type with no length header, read
            // through its output function (OtherBuiltin) like other types.
            pg_sys::TEXTOID | pg_sys::VARCHAROID | pg_sys::BPCHAROID => ColumnType::Text,
            pg_sys::JSONOID => ColumnType::Json,
            pg_sys::JSONBOID => ColumnType::Jsonb,
            pg_sys::BYTEAOID => ColumnType::Bytea,
            pg_sys::UUIDOID => ColumnType::Uuid,
            pg_sys::INT4OID => ColumnType::Int4,
            pg_sys::TIMESTAMPOID => ColumnType::Timestamp,
            pg_sys::TIMESTAMPTZOID => ColumnType::Timestamptz,
            b if b.to_u32() < pg_sys::FirstNormalObjectId => ColumnType::OtherBuiltin,
            b if pg_sys::get_typtype(b) as u8 == pg_sys::TYPTYPE_ENUM => ColumnType::OtherBuiltin,
            _ => ColumnType::UserDefined,
        }
    }
}

/// One column of an inserted row.
///
/// # Safety
/// `tuple` must be a complete heap tuple of `desc` (an INSERT's new tuple:
/// its toasted values are reachable, see DESIGN.md) and `col` come from a
/// plan of that descriptor; runs in a memory context that is reset soon.
pub unsafe fn value(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc, col: Col) -> Value {
    // SAFETY: the caller's guarantees; each arm reads the datum as the type
    // the plan classified it as (domains have their base type's layout).
    unsafe {
        let Some(d) = pgrx::heap_getattr_raw(tuple, std::num::NonZeroUsize::new(col.index + 1).expect("1-based"), desc)
        else {
            return Value::Null;
        };
        let bytes = |d: pg_sys::Datum| -> Vec<u8> {
            let v = pg_sys::pg_detoast_datum_packed(d.cast_mut_ptr());
            std::slice::from_raw_parts(pgrx::varlena::vardata_any(v).cast::<u8>(), pgrx::varlena::varsize_any_exhdr(v)).to_vec()
        };
        match col.ty {
            ColumnType::Text | ColumnType::Json => Value::Text(String::from_utf8_lossy(&bytes(d)).into_owned()),
            ColumnType::Jsonb => Value::Text(crate::row::jsonb_text(d)),
            ColumnType::Bytea => Value::Bytes(bytes(d)),
            ColumnType::Uuid => {
                let mut b = [0u8; 16];
                b.copy_from_slice(std::slice::from_raw_parts(d.cast_mut_ptr::<u8>(), 16));
                Value::Uuid(b)
            }
            ColumnType::Int4 => Value::Int4(d.value() as i32),
            ColumnType::Timestamp | ColumnType::Timestamptz => Value::Timestamp(d.value() as i64),
            ColumnType::OtherBuiltin | ColumnType::UserDefined => {
                // Built-in output functions only (the plan refuses others).
                let typid = (*attr(desc, col.index)).atttypid;
                let (mut out, mut varlena) = (pg_sys::InvalidOid, false);
                pg_sys::getTypeOutputInfo(typid, &mut out, &mut varlena);
                let s = pg_sys::OidOutputFunctionCall(out, d);
                Value::Text(CStr::from_ptr(s).to_string_lossy().into_owned())
            }
        }
    }
}
