//! Settling: once per turn, what the sink acknowledged becomes durable
//! progress. Dead letters are written, published outbox-table rows deleted,
//! the status updated, and the slot confirmed (and now and then saved) up
//! to the ledger's contiguous settled prefix. SQL runs here, never inside
//! the decoding callbacks.

use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::relay_state::Input;
use outbox_core::wal_guard;

use super::{state, Relay};
use crate::clock;
use crate::dead_letter;
use crate::settings;
use crate::slot;
use outbox_core::ledger::AdoptedRow;

impl Relay {
    /// The step outside decoding: write dead letters, delete settled table
    /// rows, publish the status, then confirm (and now and then save) the
    /// slot's position. Rows are deleted in batches (see
    /// `outbox_core::ledger::ROW_DELETE_BATCH`), and at once with `flush` or
    /// once the stream no longer sends (it is about to end): an exit then
    /// re-sends nothing that was settled.
    pub(super) fn settle(&mut self, flush: bool) {
        // SAFETY: reading our own reader's position.
        let read_upto = unsafe { (*(*self.ctx).reader).EndRecPtr };
        if !self.deliver.dead.is_empty() {
            self.store_dead_letters();
        }
        let now = clock::now();
        let s = self.deliver.ledger.settle(read_upto, now, flush || !state::mode().sends());
        self.delete_published_rows(&s.delete_rows, &s.delete_adopted);
        // The status first, then the confirmation: whoever sees the new
        // confirmed position (outbox_drain) then sees counters and state
        // that include it.
        self.shared.set_in_flight(s.in_flight, s.oldest_commit_time);
        self.shared.add_published(s.published.0, s.published.1);
        if state::mode().sends() {
            self.shared.set_broker_up(!s.sink_silent);
        }
        if s.confirmable > self.confirmed {
            // SAFETY: we hold the slot (MyReplicationSlot).
            unsafe { pg_sys::LogicalConfirmReceivedLocation(s.confirmable) };
            self.confirmed = s.confirmable;
            self.shared.set_confirmed(s.confirmable);
        }
        if self.confirmed > self.saved && now.duration_since(self.last_save) >= settings::confirm_save_interval() {
            // PG15 writes the slot file only when restart_lsn or xmin move;
            // save the confirmed position ourselves so a server crash
            // re-sends at most outbox.confirm_save_interval's worth. Measured
            // here: fsync ~0.11 ms, so 5 saves/s cost ~0.2 % of the worker.
            // SAFETY: we hold the slot.
            unsafe {
                pg_sys::ReplicationSlotMarkDirty();
                pg_sys::ReplicationSlotSave();
            }
            self.saved = self.confirmed;
            self.last_save = now;
        }
        // Decided last, once this turn's acknowledgements are confirmed
        // (and saved when due): an exit here re-sends nothing they cover.
        let detail = format!("no acknowledgement from {}; retrying, nothing is skipped", self.deliver.sink.name());
        state::feed(
            Input::Settled { sink_silent: s.sink_silent, drained: s.drained, now },
            s.sink_silent.then_some(detail.as_str()),
        );
        if self.deliver.one_per_request && self.confirmed >= self.shared.isolating_until() && s.in_flight == 0 {
            // Past the events that shared a refused request: batch again.
            self.shared.isolate_until(0);
            state::feed(Input::PastIsolation, None);
        }
        if self.last_rss.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            self.last_rss = Some(now);
            if let Some(kb) = rss_kb() {
                self.shared.note_rss(kb);
            }
            // SAFETY: we hold the slot; restart_lsn is only moved by us.
            let restart = unsafe { (*pg_sys::MyReplicationSlot).data.restart_lsn };
            watch_wal(&mut self.wal_watch, slot::retained_since(restart));
        }
    }

    /// Writes the pending dead letters (committed), then counts their
    /// events as settled so the slot may be confirmed past them.
    fn store_dead_letters(&mut self) {
        let Some(schema) = self.schema() else {
            error!("outbox relay: cannot find the outbox extension's schema to write dead letters; is the extension installed in database \"{}\"?", settings::database());
        };
        let letters = std::mem::take(&mut self.deliver.dead);
        if let Err(e) = dead_letter::store(&schema, &letters) {
            // Restarting re-reads the events from the confirmed position.
            error!("outbox relay: could not write {} event(s) to the dead-letter table: {e}", letters.len());
        }
        for p in &letters {
            self.deliver.ledger.settled_elsewhere(p.seq, p.from_report);
        }
        self.shared.add_dead_letters(letters.len() as u64);
    }

    /// Dead letters a restarted stream may meet again (see `Deliver::dead_known`).
    pub(super) fn dead_letters_since(&mut self, confirmed: u64) -> std::collections::HashSet<([u8; 16], u64)> {
        let Some(schema) = self.schema() else { return Default::default() };
        dead_letter::known_since(&schema, confirmed)
            .unwrap_or_else(|e| error!("outbox relay: could not read the dead-letter table: {e}"))
    }

    /// The extension's schema, quoted, looked up once.
    fn schema(&mut self) -> Option<String> {
        if self.extension_schema.is_none() {
            self.extension_schema = BackgroundWorker::transaction(|| {
                Spi::connect(|c| {
                    c.select(
                        "SELECT pg_catalog.quote_ident(n.nspname::pg_catalog.text) FROM pg_catalog.pg_extension e
                           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) e.extnamespace
                          WHERE e.extname OPERATOR(pg_catalog.=) 'outbox'::pg_catalog.name",
                        Some(1),
                        &[],
                    )?
                    .first()
                    .get_one::<String>()
                })
            })
            .ok()
            .flatten();
        }
        self.extension_schema.clone()
    }

    /// Deletes the outbox-table rows whose events are settled. The table is
    /// found by extension membership once, then by its OID: `ALTER
    /// EXTENSION outbox UPDATE` from 0.1.0 moves it from the extension's
    /// schema into schema `outbox` (same OID) while the relay runs. It is
    /// locked by OID before its name is read, so an update in progress is
    /// waited for and the name is the one after it; a table gone (the
    /// extension dropped) leaves nothing to delete. (Each batch used to
    /// look both up with SQL: two more statements per delete transaction.)
    fn delete_published_rows(&mut self, ids: &[[u8; 16]], rows: &[AdoptedRow]) {
        let mut adopted: Vec<(&str, &str, Vec<&str>)> = Vec::new();
        for r in rows {
            match adopted.iter_mut().find(|(t, c, _)| *t == r.table && *c == r.column) {
                Some((_, _, list)) => list.push(&r.id),
                None => adopted.push((&r.table, &r.column, vec![&r.id])),
            }
        }
        for (table, column, list) in adopted {
            delete_adopted_rows(table, column, &list);
        }
        if ids.is_empty() || !settings::delete_published_rows() {
            return;
        }
        for chunk in ids.chunks(1000) {
            let list: Vec<String> = chunk.iter().map(outbox_core::format_uuid).collect();
            let list = list.join(",");
            let known = self.own_table;
            self.own_table = BackgroundWorker::transaction(move || -> Result<Option<pg_sys::Oid>, pgrx::spi::Error> {
                // The table's OID is kept between batches (the update moves
                // the table, same OID); its name is read after the lock,
                // from the catalog caches the lock has brought up to date.
                // An OID that names nothing any more (the extension dropped,
                // maybe made again) is looked up afresh, once.
                for fresh in [false, true] {
                    let oid = match known {
                        Some(oid) if !fresh => oid,
                        _ => match Spi::get_one::<pg_sys::Oid>(OWN_TABLE_OID)? {
                            Some(oid) => oid,
                            None => return Ok(None),
                        },
                    };
                    // SAFETY: LockRelationOid takes a lock in this transaction
                    // (released at its end, as a DELETE's own would be) and
                    // raises only through pgrx's guarded binding; an OID whose
                    // relation is gone by then is locked harmlessly.
                    unsafe { pg_sys::LockRelationOid(oid, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE) };
                    // SAFETY: syscache lookups by OID in a transaction.
                    let Some(table) = (unsafe { qualified_name(oid) }) else { continue };
                    Spi::run(&format!(
                        "DELETE FROM {table} WHERE id OPERATOR(pg_catalog.=) ANY ('{{{list}}}'::pg_catalog.uuid[])"
                    ))?;
                    return Ok(Some(oid));
                }
                Ok(None)
            })
            .unwrap_or_else(|e| error!("outbox relay: could not delete published outbox rows: {e}"));
        }
    }
}

/// Deletes published rows of an adopted table (`delete.published.rows`) by
/// their id column, as the table's owner in a security-restricted
/// operation (as PostgreSQL's own maintenance commands run a table's code):
/// its triggers, rules, policies and the id type's functions run with the
/// owner's rights and cannot take the relay's back (RESET ROLE, SET ROLE
/// and SET SESSION AUTHORIZATION are refused there). A failure (an owner's
/// trigger raising, a foreign key, the table or column renamed or dropped
/// since) is rolled back in a subtransaction and logged: the rows are the
/// application's, and their events are already settled.
fn delete_adopted_rows(table: &str, column: &str, ids: &[&str]) {
    for chunk in ids.chunks(1000) {
        let list: Vec<String> = chunk.iter().map(|s| (*s).to_owned()).collect();
        let r = BackgroundWorker::transaction(|| {
            in_subtransaction(|| -> Result<(), String> {
                let args: [pgrx::datum::DatumWithOid; 2] = [table.into(), column.into()];
                let (Some(owner), Some(delete)) =
                    Spi::get_two_with_args::<pg_sys::Oid, String>(ADOPTED_DELETE, &args).map_err(|e| e.to_string())?
                else {
                    return Err(format!("the table or its column \"{column}\" is gone"));
                };
                let ids: [pgrx::datum::DatumWithOid; 1] = [list.clone().into()];
                as_restricted(owner, || Spi::run_with_args(&delete, &ids)).map_err(|e| e.to_string())
            })
        });
        if let Err(e) = r {
            warning!("outbox relay: published rows of {table} are not deleted (delete.published.rows): {e}");
        }
    }
}

/// Runs `f` with `owner` as the current user, in a security-restricted
/// operation, then restores the worker's user and context. An ERROR in `f`
/// unwinds past the restore; the (sub)transaction's abort restores both.
fn as_restricted<R>(owner: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: plain reads and writes of the backend's current user id and
    // security context, as ExecuteTruncate and vacuum do around a table's
    // code; `owner` is a role OID read from pg_class in this transaction.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            owner,
            context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION) as i32,
        );
    }
    let r = f();
    // SAFETY: restores what was read above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    r
}

/// Runs `f` in a subtransaction: a PostgreSQL ERROR raised in it is rolled
/// back (as PL/pgSQL's EXCEPTION blocks do) and returned as its message,
/// instead of ending the worker; an `Err` from `f` is rolled back too.
fn in_subtransaction(f: impl FnOnce() -> Result<(), String> + std::panic::UnwindSafe) -> Result<(), String> {
    // SAFETY: the subtransaction is begun and ended here, in the same
    // transaction; the memory context and resource owner of the caller are
    // restored on both paths, as PL/pgSQL does around its exception blocks.
    // pgrx's guard has copied and flushed the error state by the time the
    // catch runs.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        let r = PgTryBuilder::new(f)
            .catch_others(|e| match e {
                pgrx::pg_sys::panic::CaughtError::PostgresError(r) | pgrx::pg_sys::panic::CaughtError::ErrorReport(r) => {
                    Err(r.message().to_owned())
                }
                pgrx::pg_sys::panic::CaughtError::RustPanic { ereport, .. } => Err(ereport.message().to_owned()),
            })
            .execute();
        pg_sys::MemoryContextSwitchTo(context);
        if r.is_ok() {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        r
    }
}

/// For an adopted table (its name as `outbox.tables` gives it) and its id
/// column: the table's owner, and the DELETE of the rows whose id is in
/// `$1` (text values, cast to the column's type); one row always, NULLs
/// when either is gone. Every function and operator is named with its schema; the table
/// and type names are printed qualified (the worker's search_path is
/// pg_catalog alone).
const ADOPTED_DELETE: &str = "SELECT x.owner, x.del FROM (SELECT) AS one LEFT JOIN LATERAL (
  SELECT c.relowner AS owner,
         pg_catalog.format('DELETE FROM %s WHERE %I OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]::%s[])',
                           c.oid::pg_catalog.regclass, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)) AS del
    FROM pg_catalog.pg_class c
    JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) c.oid
   WHERE c.oid OPERATOR(pg_catalog.=) pg_catalog.to_regclass($1)
     AND a.attname OPERATOR(pg_catalog.=) $2::pg_catalog.name
     AND NOT a.attisdropped) AS x ON true";

/// The OID of the extension's own table, or NULL: the member of extension
/// `outbox` named `outbox` (the plugin recognises its rows the same way).
/// One row always (a scalar subquery), so "no table" is NULL, not an error.
/// Every function and operator is named with its schema.
const OWN_TABLE_OID: &str = "SELECT (SELECT c.oid
       FROM pg_catalog.pg_extension e
       JOIN pg_catalog.pg_depend d ON d.refobjid OPERATOR(pg_catalog.=) e.oid
        AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
        AND d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
        AND d.deptype OPERATOR(pg_catalog.=) 'e'::pg_catalog.\"char\"
       JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) d.objid
      WHERE e.extname OPERATOR(pg_catalog.=) 'outbox'::pg_catalog.name
        AND c.relname OPERATOR(pg_catalog.=) 'outbox'::pg_catalog.name
        AND c.relkind OPERATOR(pg_catalog.=) 'r'::pg_catalog.\"char\")";

/// A table's name, schema-qualified and quoted, by OID; NULL when it is gone.
/// A relation's schema-qualified, quoted name from the catalog caches; None
/// when the OID names no relation.
///
/// # Safety
/// In a transaction (syscache lookups).
unsafe fn qualified_name(oid: pg_sys::Oid) -> Option<String> {
    // SAFETY: get_rel_name and get_namespace_name return palloc'd copies or
    // NULL; quote_identifier returns its argument or a palloc'd copy; all
    // are read before the transaction ends.
    unsafe {
        let rel = pg_sys::get_rel_name(oid);
        if rel.is_null() {
            return None;
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(oid));
        if nsp.is_null() {
            return None;
        }
        let q = |p: *const std::ffi::c_char| std::ffi::CStr::from_ptr(pg_sys::quote_identifier(p)).to_string_lossy().into_owned();
        Some(format!("{}.{}", q(nsp), q(rel)))
    }
}

/// Logs each crossing of the WAL guard's fractions once.
pub fn watch_wal(watch: &mut wal_guard::Watch, retained: u64) {
    let limit = settings::max_retained_wal();
    let change = watch.observe(wal_guard::verdict(retained, limit));
    if change == wal_guard::Change::None {
        return;
    }
    let (r, l) = (wal_guard::format_bytes(retained), wal_guard::format_bytes(limit.unwrap_or(0)));
    match change {
        wal_guard::Change::Rose(100) => warning!(
            "outbox relay: the slot retains {r} of WAL, past outbox.max_retained_wal ({l}): new events are refused \
             until the backlog is published"
        ),
        wal_guard::Change::Rose(p) => warning!(
            "outbox relay: the slot retains {r} of WAL, {p} % of outbox.max_retained_wal ({l}); at 100 % new events are refused"
        ),
        wal_guard::Change::Cleared => log!("outbox relay: the slot retains {r} of WAL, back under half of outbox.max_retained_wal"),
        wal_guard::Change::None => {}
    }
}

fn rss_kb() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
