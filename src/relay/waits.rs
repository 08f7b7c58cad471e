//! Where the relay waits: before streaming (disabled, slot invalidated, key
//! missing), on the latch between turns, and, on 17+, for the failover
//! standbys inside the page reader. Each wait serves SIGTERM and reloads.

use std::time::Duration;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::relay_state::{Input, Mode};
use outbox_core::{lsn, wal_guard};

use super::settle::watch_wal;
use super::state;
use crate::clock;
use crate::ffi;
use crate::settings;
use crate::shmem::{self, Shared};
use crate::slot;

/// The worker runs SQL as the bootstrap superuser. Its search_path would
/// come from the database's and the role's settings (`"$user", public` by
/// default), where any role with CREATE on a schema could plant a better
/// match for a function or operator it calls (`quote_ident(name)`, say) and
/// run code as superuser. Pinned for the worker's life, at the highest
/// source priority, before any query; the SQL also qualifies what it calls.
pub fn pin_search_path() {
    // SAFETY: SetConfigOption raises an ERROR for a bad value (this one is
    // fixed and valid) and is what Postgres' own processes use to force a
    // setting; pgrx's binding runs it behind the FFI guard.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        );
    }
}

/// With `outbox.relay_enabled = off` the worker stays up but touches
/// nothing (the slot is free for maintenance) until a reload turns it on.
/// It still warns when the WAL the slot holds back nears the guard's limit.
pub fn wait_until_enabled(slot: &str) {
    let mut watch = wal_guard::Watch::default();
    while !settings::relay_enabled() {
        state::feed(Input::Waiting(Mode::Disabled), Some("outbox.relay_enabled = off"));
        if let Some(info) = slot::find(slot) {
            watch_wal(&mut watch, slot::retained(&info));
        }
        idle(1000);
    }
}

/// A slot Postgres invalidated cannot be read from: say so once, with the
/// recovery steps, and wait until an operator drops it (a new slot is then
/// created), instead of failing and restarting every second.
pub fn wait_while_invalidated(shared: &Shared, slot: &str) {
    let mut reported = false;
    while slot::find(slot).is_some_and(|i| i.invalidated) {
        if !reported {
            let msg = format!(
                "replication slot \"{slot}\" has been invalidated: Postgres removed WAL it still needed \
                 (max_slot_wal_keep_size), so events committed after its last confirmed position cannot be \
                 decoded any more. Follow the README's runbook (\"The slot was invalidated\"), then \
                 SELECT pg_drop_replication_slot('{slot}'); the relay creates a new slot and publishes what \
                 commits from then on"
            );
            warning!("outbox relay: {msg}");
            shared.set_error(&msg);
            reported = true;
        }
        state::feed(Input::Waiting(Mode::SlotInvalidated), Some("waiting for the slot to be dropped"));
        idle(1000);
    }
}

/// Events are verified with `$PGDATA/outbox.key`. If it is missing while an
/// outbox slot exists, the events in that slot's WAL were signed with the
/// lost key: making a new one would fail them all and confirm past them.
/// Say so once, with the way out, and wait (decoding and confirming
/// nothing) until the file is restored or the outbox slots are dropped.
pub fn wait_for_key(shared: &Shared) {
    let mut reported = false;
    loop {
        let err = match crate::key::get() {
            Ok(_) => return,
            Err(e) => e,
        };
        let slots = outbox_slots();
        if slots.is_empty() {
            match crate::key::create() {
                Ok(_) => {
                    log!("outbox relay: created a new message key ($PGDATA/outbox.key); no outbox slot existed");
                    return;
                }
                Err(e) => error!("outbox relay: {e}"),
            }
        }
        if !reported {
            let list = slots.join("\", \"");
            let msg = format!(
                "the message key is missing ({err}) but replication slot(s) \"{list}\" use the outbox plugin: \
                 events still in their WAL were signed with that key, and a new key would fail them all. \
                 Restore outbox.key from the backup this data directory came from (same owner, mode 0600); \
                 the relay resumes by itself. Only if it is lost for good: drop those slots, accepting that \
                 events they had not published are lost (see the README's runbook, \"The message key is missing\")"
            );
            warning!("outbox relay: {msg}");
            shared.set_error(&msg);
            reported = true;
        }
        state::feed(Input::Waiting(Mode::KeyMissing), Some("waiting for $PGDATA/outbox.key to be restored"));
        idle(1000);
    }
}

/// Names of the replication slots (any database) that use the outbox plugin.
fn outbox_slots() -> Vec<String> {
    BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            let rows = c.select(
                "SELECT slot_name::pg_catalog.text FROM pg_catalog.pg_replication_slots
                  WHERE plugin OPERATOR(pg_catalog.=) 'outbox'::pg_catalog.name ORDER BY 1",
                None,
                &[],
            )?;
            let mut names = Vec::new();
            for r in rows {
                if let Some(n) = r.get::<String>(1)? {
                    names.push(n);
                }
            }
            Ok::<_, pgrx::spi::Error>(names)
        })
    })
    .unwrap_or_else(|e| error!("outbox relay: could not list replication slots: {e}"))
}

/// Waits on the latch (SIGHUP and SIGTERM set it), then serves interrupts
/// and a configuration reload.
pub fn idle(ms: i64) {
    shmem::wait_latch(ms);
    pg_sys::check_for_interrupts!();
    reload_config();
}

thread_local! {
    /// A reload done where the relay could not act on it (inside the wait
    /// for failover standbys, in the page reader): acted on at the next
    /// reload_config().
    static RELOADED_UNSEEN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Re-reads the configuration if SIGHUP asked for it; says whether it did
/// (or did while the relay could not act on it).
pub fn reload_config() -> bool {
    let unseen = RELOADED_UNSEEN.with(|r| r.replace(false));
    // SAFETY: ConfigReloadPending is a sig_atomic_t set by the SIGHUP
    // handler; clearing it and reloading is what every Postgres main loop does.
    unsafe {
        if pg_sys::ConfigReloadPending == 0 {
            return unseen;
        }
        pg_sys::ConfigReloadPending = 0;
        pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
    }
    true
}

/// 17+: holds the bytes the page reader returned until every standby in
/// `synchronized_standby_slots` has flushed them, as walsender holds a
/// failover slot's changes. A loop of our own rather than
/// WaitForStandbyConfirmation, which would consume SIGHUPs the relay must
/// act on (relay_enabled, producer settings): a reload here is done at once
/// (the standby list may be what changed) and remembered for the relay.
/// The state shows the wait once it lasts.
pub fn hold_for_failover_standbys(upto: u64) {
    // SAFETY: our slot is acquired (we are inside its decoding); the check
    // reads shared slot state under Postgres' own locks and may raise,
    // hence the guard.
    let caught_up = || unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| ffi::failover_standbys_have(upto)) };
    if caught_up() {
        return;
    }
    let started = clock::now();
    let mut shown = false;
    loop {
        shmem::wait_latch(50);
        pg_sys::check_for_interrupts!();
        if reload_config() {
            RELOADED_UNSEEN.with(|r| r.set(true));
        }
        if caught_up() {
            break;
        }
        if !shown && started.elapsed() >= Duration::from_secs(1) {
            shown = true;
            let detail = format!("synchronized_standby_slots: a standby has not flushed {} yet", lsn::format(upto));
            state::feed(Input::StandbyBehind, Some(&detail));
        }
    }
    if shown {
        state::feed(Input::StandbyCaughtUp, None);
    }
}
