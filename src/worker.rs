//! The relay: a background worker that holds the outbox slot, decodes its
//! own logical decoding stream in-process (one decoding context for its
//! whole life, as walsender does) and publishes every committed event to
//! Kafka, confirming the slot only behind Kafka's acknowledgements.
//!
//! ```text
//!  starting ──► streaming ◄──► waiting for broker        (acks stop for a while)
//!     │             ├◄──► waiting for standby             (17+: synchronized_standby_slots behind)
//!     │             │
//!     │             ├──► dead letter (outbox.on_rejected_event = dead_letter): written, streaming goes on
//!     │             └──► stopped on bad event ──SIGHUP──► exit(1) → restarted, resumes
//!     ├── disabled (outbox.relay_enabled = off)
//!     └── slot invalidated ──slot dropped──► creates a new slot
//!  any other failure: exit(1); the postmaster restarts the worker after 1 s and it
//!  resumes from the slot's confirmed position (re-sending what was unconfirmed).
//! ```
//!
//! Each turn of the loop: read WAL up to the flush position and decode it
//! (the output plugin's records are produced to Kafka as they come out of
//! the decoder, so a large transaction is never held in memory); serve
//! delivery reports; delete acknowledged outbox-table rows (SQL cannot run
//! inside decoding callbacks, so this is its own step); confirm the slot up
//! to the contiguous acknowledged prefix; wait on the latch, which COMMIT
//! sets in any backend that wrote an event.

use std::collections::VecDeque;
use std::rc::Rc;
use std::ffi::{CStr, CString};
use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::confirm::{Tracker, TxnSeq};
use outbox_core::decoded;
use outbox_core::topic::TopicTemplate;
use outbox_core::{kafka_errors, lsn, retry, wal_guard};

use crate::dead_letter;
use crate::ffi;
use crate::publisher::{Publisher, Rejected, SendError, TopicCreation, TopicError};
use crate::settings;
use crate::slot;
use crate::shmem::{self, Shared, State};

/// Safety-net wake-up when nothing sets the latch: bounds the latency of
/// COMMIT PREPARED (committed by a backend that wrote no event) and keeps
/// the slot advancing on a database with no outbox traffic.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// While events are in flight, delivery reports are polled this often.
const BUSY_WAIT: Duration = Duration::from_millis(1);
/// No acknowledgement for this long with events in flight: the broker is
/// considered unreachable (reported, never acted on: librdkafka retries forever).
const BROKER_SILENCE: Duration = Duration::from_secs(3);
/// After a transient delivery failure, how long in-flight events may take to
/// settle before the stream restarts anyway.
const RESTART_DRAIN: Duration = Duration::from_secs(10);

pub fn register() {
    BackgroundWorkerBuilder::new("outbox relay")
        .set_type("outbox relay")
        .set_library("outbox")
        .set_function("outbox_relay_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(1)))
        .load();
}

/// Runs first at every exit, while the slot is still ours: BaseInit
/// (ReplicationSlotInitialize) registers the release of the slot
/// (ReplicationSlotShmemExit) as a before_shmem_exit callback too, and such callbacks run last-registered
/// first, so this one is registered after connecting. Writing the slot here
/// (the confirmed position, one small file and its fsyncs) means a clean
/// stop, a restart for new settings or `outbox.relay_enabled = off`
/// re-sends nothing, whatever the confirm_save_interval.
#[pg_guard]
unsafe extern "C-unwind" fn save_slot_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    // SAFETY: MyReplicationSlot, if set, is the slot this process acquired;
    // marking it dirty and saving it is what the relay does on its cadence.
    unsafe {
        if !pg_sys::MyReplicationSlot.is_null() {
            pg_sys::ReplicationSlotMarkDirty();
            pg_sys::ReplicationSlotSave();
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    close_kafka_client();
    if let Some(s) = shmem::shared() {
        s.detach_worker();
    }
}

thread_local! {
    /// The live relay's sink, for the exit callback: every exit (restart,
    /// SIGTERM, an ERROR) goes through proc_exit, which runs the callbacks
    /// and never returns to the frames that own it.
    static LIVE_SINK: std::cell::Cell<*mut Sink> = const { std::cell::Cell::new(std::ptr::null_mut()) };
}

/// How long an exiting worker waits for librdkafka's threads to end.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Destroys the Kafka client before the process exits: exit-time cleanup
/// (OpenSSL's, with TLS) must not race librdkafka's threads, or the worker
/// crashes and the postmaster restarts the whole cluster.
fn close_kafka_client() {
    let sink = LIVE_SINK.with(|s| s.replace(std::ptr::null_mut()));
    if sink.is_null() {
        return;
    }
    // SAFETY: LIVE_SINK points at the Box the running Relay owns while it
    // is alive: Sink's Drop clears it before the Box is freed (an ERROR
    // unwinds through the relay's frames before proc_exit runs this). A
    // FATAL or a restart exits without unwinding, so the sink is alive
    // here. LIVE_SINK was cleared first, so the publisher is taken once.
    let publisher = unsafe { std::mem::ManuallyDrop::take(&mut (*sink).publisher) };
    close_publisher(publisher);
}

fn close_publisher(publisher: Publisher) {
    match publisher.close(CLOSE_LIMIT) {
        Some(t) => log!("outbox relay: Kafka client closed in {} ms", t.as_millis()),
        None => warning!(
            "outbox relay: the Kafka client did not close within {} s; exiting with its threads still running",
            CLOSE_LIMIT.as_secs()
        ),
    }
}

impl Drop for Sink {
    /// Reached when an ERROR unwinds through the relay's frames (a Rust
    /// panic on its way to the worker's top level), before proc_exit runs
    /// the exit callback: the client is closed here, with the same bound,
    /// and the callback then finds nothing left to close. 0.1.0 left the
    /// callback a dangling pointer, and any ERROR after the relay started
    /// crashed the whole server.
    fn drop(&mut self) {
        let me: *mut Sink = self;
        let live = LIVE_SINK.with(|s| {
            if s.get() == me {
                s.replace(std::ptr::null_mut())
            } else {
                std::ptr::null_mut()
            }
        });
        if !live.is_null() {
            // SAFETY: LIVE_SINK still pointed at this sink, so the exit
            // callback has not taken the publisher; this is its last use.
            close_publisher(unsafe { std::mem::ManuallyDrop::take(&mut self.publisher) });
        }
    }
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn outbox_relay_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: installs Postgres' own SIGTERM handler (see ffi::c_die) and an
    // exit callback; both are plain function pointers valid for the process.
    unsafe {
        ffi::handle_sigterm_like_a_backend();
        pg_sys::on_shmem_exit(Some(on_exit), pg_sys::Datum::from(0));
    }
    let Some(shared) = shmem::shared() else {
        error!("outbox relay: shared memory is not initialised (outbox must be in shared_preload_libraries)");
    };
    shared.attach_worker();
    set_state(shared, State::Starting, None);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: a plain function pointer valid for the process; see
    // save_slot_at_exit for why it is registered only now.
    unsafe { pg_sys::before_shmem_exit(Some(save_slot_at_exit), pg_sys::Datum::from(0)) };
    pin_search_path();
    let slot = settings::slot_name();
    wait_until_enabled(shared, &slot);
    wait_while_invalidated(shared, &slot);
    wait_for_key(shared);
    ensure_slot(&slot);
    let mut relay = Relay::start(shared, &slot);
    relay.run();
}

/// The worker runs SQL as the bootstrap superuser. Its search_path would
/// come from the database's and the role's settings (`"$user", public` by
/// default), where any role with CREATE on a schema could plant a better
/// match for a function or operator it calls (`quote_ident(name)`, say) and
/// run code as superuser. Pinned for the worker's life, at the highest
/// source priority, before any query; the SQL also qualifies what it calls.
fn pin_search_path() {
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
fn wait_until_enabled(shared: &Shared, slot: &str) {
    let mut watch = wal_guard::Watch::default();
    while !settings::relay_enabled() {
        set_state(shared, State::Disabled, Some("outbox.relay_enabled = off"));
        if let Some(info) = slot::find(slot) {
            watch_wal(&mut watch, slot::retained(&info));
        }
        idle(1000);
    }
}

/// A slot Postgres invalidated cannot be read from: say so once, with the
/// recovery steps, and wait until an operator drops it (a new slot is then
/// created), instead of failing and restarting every second.
fn wait_while_invalidated(shared: &Shared, slot: &str) {
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
        set_state(shared, State::SlotInvalidated, Some("waiting for the slot to be dropped"));
        idle(1000);
    }
}

/// Events are verified with `$PGDATA/outbox.key`. If it is missing while an
/// outbox slot exists, the events in that slot's WAL were signed with the
/// lost key: making a new one would fail them all and confirm past them.
/// Say so once, with the way out, and wait (decoding and confirming
/// nothing) until the file is restored or the outbox slots are dropped.
fn wait_for_key(shared: &Shared) {
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
        set_state(shared, State::KeyMissing, Some("waiting for $PGDATA/outbox.key to be restored"));
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
fn idle(ms: i64) {
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
fn reload_config() -> bool {
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
fn hold_for_failover_standbys(upto: u64) {
    // SAFETY: our slot is acquired (we are inside its decoding); the check
    // reads shared slot state under Postgres' own locks and may raise,
    // hence the guard.
    let caught_up = || unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| ffi::failover_standbys_have(upto)) };
    if caught_up() {
        return;
    }
    let started = Instant::now();
    let mut shown: Option<State> = None;
    loop {
        shmem::wait_latch(50);
        pg_sys::check_for_interrupts!();
        if reload_config() {
            RELOADED_UNSEEN.with(|r| r.set(true));
        }
        if caught_up() {
            break;
        }
        if shown.is_none() && started.elapsed() >= Duration::from_secs(1) {
            if let Some(shared) = shmem::shared() {
                shown = Some(shared.state());
                let detail = format!("synchronized_standby_slots: a standby has not flushed {} yet", lsn::format(upto));
                set_state(shared, State::WaitingForStandby, Some(&detail));
            }
        }
    }
    if let (Some(prev), Some(shared)) = (shown, shmem::shared()) {
        set_state(shared, prev, None);
    }
}

fn set_state(shared: &Shared, s: State, detail: Option<&str>) {
    let prev = shared.set_state(s);
    if prev != s {
        match detail {
            Some(d) => log!("outbox relay: {} ({d})", s.name()),
            None => log!("outbox relay: {}", s.name()),
        }
    }
}

/// Creates the slot with this library as its plugin if it is missing. A slot
/// cannot be created in a transaction that has an xid, so through a
/// read-only SELECT in a transaction of its own.
fn ensure_slot(slot: &str) {
    // Slot names are validated by the setting's check hook: lower-case
    // letters, digits and underscores only, so inlining is safe.
    let sql = format!(
        "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_replication_slots
                                  WHERE slot_name OPERATOR(pg_catalog.=) '{slot}'::pg_catalog.name) THEN false
                     ELSE (SELECT true FROM pg_catalog.pg_create_logical_replication_slot('{slot}', 'outbox'{extra})) END",
        extra = ffi::CREATE_SLOT_EXTRA_ARGS
    );
    let created = BackgroundWorker::transaction(|| {
        Spi::connect(|c| c.select(&sql, Some(1), &[])?.first().get_one::<bool>())
    });
    match created {
        Ok(Some(true)) => log!(
            "outbox relay: created logical replication slot \"{slot}\" (plugin outbox{})",
            if ffi::CREATE_SLOT_EXTRA_ARGS.is_empty() { "" } else { ", failover" }
        ),
        Ok(_) => {}
        Err(e) => error!("outbox relay: could not create slot \"{slot}\": {e}"),
    }
}

/// Everything the decoding callbacks need; reached through the context's
/// `output_writer_private`.
struct Sink {
    /// Closed (with a bound) exactly once, by Sink's Drop or the exit
    /// callback, whichever runs: see close_kafka_client.
    publisher: std::mem::ManuallyDrop<Publisher>,
    tracker: Tracker,
    shared: &'static Shared,
    /// The first event Kafka rejected; nothing after it is produced.
    stopped: Option<(Rejected, u64)>,
    /// Outbox-table rows published, to delete once acknowledged: (commit LSN, id).
    table_rows: VecDeque<(u64, [u8; 16])>,
    /// Commit times of transactions in flight, oldest first: (commit LSN, time).
    commit_times: VecDeque<(u64, i64)>,
    last_ack: Instant,
    published: u64,
    /// After a transient delivery failure: when to restart the stream at the
    /// latest (earlier once nothing is in flight).
    restart_at: Option<Instant>,
    /// The backoff after repeated transient failures of one event: no
    /// restart before this.
    restart_not_before: Option<Instant>,
    /// Events whose delivery failed: no longer in flight, never acknowledged
    /// (so the slot is never confirmed past them).
    failed: u64,
    /// Key + value bytes acknowledged since the last settle.
    published_bytes: u64,
    /// Rejected events to write to the dead-letter table at the next settle.
    dead: Vec<dead_letter::Pending>,
    /// The producer sends one event per request (after a batch rejection;
    /// until the position in `Shared::isolating_until` is confirmed).
    one_per_request: bool,
    /// Events already in the dead-letter table that this stream may decode
    /// again (committed after the confirmed position): (id, commit LSN).
    dead_known: std::collections::HashSet<([u8; 16], u64)>,
    /// `outbox.topic_template`, re-read at each reload.
    template: TopicTemplate,
    /// The last topic the template produced: (aggregate type, event type, topic).
    last_route: Option<(String, String, Rc<str>)>,
    /// Delivery reports, swapped with the producer's buffer so neither is
    /// reallocated on every poll.
    reports: Vec<crate::publisher::Report>,
}

/// Where `Sink::handle` found an event's topic.
enum Routed<'a> {
    Borrowed(&'a str),
    Cached(Rc<str>),
}

/// An event that could not be published, with what the Sink needs to
/// dead-letter it or stop before it.
struct Failure {
    seq: TxnSeq,
    rej: Rejected,
    commit_lsn: u64,
    commit_time: i64,
    /// Failed in a delivery report (it was counted in `Sink::failed`).
    from_report: bool,
}

/// The event as the dead-letter table keeps it.
fn letter_of(d: &decoded::DecodedEvent<'_>, topic: Option<&str>) -> dead_letter::Letter {
    let ev = &d.event;
    dead_letter::Letter {
        id: outbox_core::format_uuid(&ev.id),
        aggregate_type: ev.aggregate_type.to_owned(),
        aggregate_id: ev.aggregate_id.to_owned(),
        event_type: ev.event_type.to_owned(),
        payload: ev.payload.to_owned(),
        headers: ev.headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        topic: topic.map(str::to_owned),
        commit_time: d.commit_time,
    }
}

impl Sink {
    fn apply_reports(&mut self, wait: Duration) {
        let mut reports = std::mem::take(&mut self.reports);
        self.publisher.poll_into(wait, &mut reports);
        let rejected = self.acks().apply(&mut reports);
        self.reports = reports;
        for f in rejected {
            self.reject(f);
        }
    }

    fn acks(&mut self) -> Acks<'_> {
        Acks {
            tracker: &mut self.tracker,
            shared: self.shared,
            published: &mut self.published,
            bytes: &mut self.published_bytes,
            last_ack: &mut self.last_ack,
            failed: &mut self.failed,
        }
    }

    /// An event that cannot be published: a transient failure restarts the
    /// stream; a permanent one is dead-lettered or stops the relay
    /// (outbox.on_rejected_event).
    fn reject(&mut self, mut f: Failure) {
        if f.from_report && f.rej.permanent && kafka_errors::is_batch_rejection(f.rej.code) && !self.one_per_request {
            // The broker refused the batch this event was in, maybe for
            // another event of it. Resend one event per request up to here
            // (a restart of the stream), then judge each event alone.
            self.shared.isolate_until(f.commit_lsn);
            f.rej.permanent = false;
            f.rej.reason = format!(
                "{} (for the batch it was sent in; resending one event per request to find the one refused)",
                f.rej.reason
            );
        }
        if !f.rej.permanent && self.stopped.is_none() {
            // The first transient failure since the stream started decides
            // the restart: backed off, and given up after a few for the
            // same event (outbox_core::retry).
            let id = uuid::Uuid::parse_str(&f.rej.event_id).map(|u| *u.as_bytes()).unwrap_or_default();
            let (streak, next) = retry::after_transient_failure(self.shared.streak(), id);
            self.shared.set_streak(streak);
            match next {
                retry::Next::Restart { backoff } => self.restart_not_before = Some(Instant::now() + backoff),
                retry::Next::GiveUp => {
                    f.rej.permanent = true;
                    f.rej.reason = format!(
                        "{} (failed {} times in a row, each time re-sent after a restart of the stream; \
                         handled as a permanent rejection)",
                        f.rej.reason, streak.attempts
                    );
                }
            }
        }
        let dead_letter = settings::on_rejected_event() == settings::OnRejected::DeadLetter;
        if f.rej.permanent && dead_letter {
            if let Some(letter) = f.rej.letter.take() {
                let mut letter = *letter;
                if letter.commit_time == 0 {
                    letter.commit_time = f.commit_time;
                }
                let msg = format!(
                    "Kafka rejected event {} (transaction committed at {}) for topic \"{}\": {}; \
                     moved to the dead-letter table, publishing goes on",
                    f.rej.event_id,
                    lsn::format(f.commit_lsn),
                    f.rej.topic,
                    f.rej.reason
                );
                warning!("outbox relay: {msg}");
                self.shared.set_error(&msg);
                self.dead.push(dead_letter::Pending {
                    seq: f.seq,
                    commit_lsn: f.commit_lsn,
                    reason: f.rej.reason,
                    letter,
                    from_report: f.from_report,
                });
                return;
            }
        }
        self.stop(f.rej, f.commit_lsn);
    }

    fn stop(&mut self, rej: Rejected, commit_lsn: u64) {
        if self.stopped.is_none() && !rej.permanent {
            self.shared.add_retry();
            let msg = format!(
                "Kafka failed to deliver event {} (transaction committed at {}) to topic \"{}\": {}; \
                 restarting the stream from the confirmed position {} (events after it are sent again, none skipped)",
                rej.event_id,
                lsn::format(commit_lsn),
                rej.topic,
                rej.reason,
                lsn::format(self.shared.confirmed())
            );
            warning!("outbox relay: {msg}");
            self.shared.set_error(&msg);
            self.restart_at = Some(Instant::now() + RESTART_DRAIN);
            self.stopped = Some((rej, commit_lsn));
            return;
        }
        if self.stopped.is_none() {
            let msg = format!(
                "Kafka rejected event {} (transaction committed at {}) for topic \"{}\": {}",
                rej.event_id,
                lsn::format(commit_lsn),
                rej.topic,
                rej.reason
            );
            warning!("outbox relay: {msg}");
            self.shared.set_error(&msg);
            set_state(
                self.shared,
                State::StoppedOnBadEvent,
                Some("the slot's position is held; fix the cause, then reload the configuration or call outbox_relay_resume()"),
            );
            self.stopped = Some((rej, commit_lsn));
        }
    }

    /// One record from the output plugin: produce it.
    fn handle(&mut self, bytes: &[u8]) {
        if self.stopped.is_some() {
            // Not produced: the slot is not confirmed past the rejected event,
            // so this one is decoded and sent again after the restart.
            return;
        }
        let d = match decoded::decode_binary(bytes) {
            Ok(d) => d,
            Err(e) => {
                warning!("outbox relay: skipping an output record it cannot read: {e}");
                return;
            }
        };
        // A failure of this event, found here rather than in a report.
        let failure = |seq, rej| Failure { seq, rej, commit_lsn: d.commit_lsn, commit_time: d.commit_time, from_report: false };
        // Refused before Kafka saw it: retrying cannot help.
        let refused = |reason: String, topic: Option<&str>| Rejected {
            reason,
            code: 0,
            topic: topic.unwrap_or_default().to_owned(),
            event_id: outbox_core::format_uuid(&d.event.id),
            permanent: true,
            letter: Some(Box::new(letter_of(&d, topic))),
        };
        let ev = &d.event;
        // Registered before anything can fail: an event that is never
        // acknowledged holds the confirmed position before its transaction,
        // whatever stops it (a bad topic, a rejection, a crash).
        if self.tracker.in_flight() == 0 {
            // Broker silence is measured from the first event in flight.
            self.last_ack = Instant::now();
        }
        let seq = self.tracker.sent_at(d.commit_lsn, d.commit_time);
        if self.commit_times.back().map(|(l, _)| *l) != Some(d.commit_lsn) {
            self.commit_times.push_back((d.commit_lsn, d.commit_time));
        }
        if d.source == decoded::Source::Table {
            self.table_rows.push_back((d.commit_lsn, ev.id));
        }
        if self.dead_known.contains(&(ev.id, d.commit_lsn)) {
            // Dead-lettered before a restart of the stream: settled, not sent again.
            self.tracker.acked(seq);
            return;
        }
        if d.source == decoded::Source::Unverified {
            // Not signed with this server's key: never published, never
            // skipped in silence (dead-lettered or the relay stops).
            self.shared.add_unverified();
            let reason = "not verified: the event's signature does not match this server's key ($PGDATA/outbox.key); \
                          it was written under another key (the key file was replaced or restored from elsewhere) \
                          or forged with pg_logical_emit_message()"
                .to_owned();
            self.reject(failure(seq, refused(reason, ev.topic)));
            return;
        }
        // Routed per event (a reload may change the template), without an
        // allocation in the common cases: an explicit topic is borrowed from
        // the record, a template's result is kept for the next event of the
        // same aggregate type and event type.
        let hit = self
            .last_route
            .as_ref()
            .filter(|(a, t, _)| ev.topic.is_none() && a == ev.aggregate_type && t == ev.event_type)
            .map(|(_, _, r)| r.clone());
        let routed = match hit {
            Some(r) => Ok(Routed::Cached(r)),
            None => outbox_core::topic::route(&self.template, ev.topic, ev.aggregate_type, ev.event_type).map(|c| match c {
                std::borrow::Cow::Borrowed(b) => Routed::Borrowed(b),
                std::borrow::Cow::Owned(o) => {
                    let r: Rc<str> = Rc::from(o);
                    self.last_route = Some((ev.aggregate_type.to_owned(), ev.event_type.to_owned(), r.clone()));
                    Routed::Cached(r)
                }
            }),
        };
        let topic: &str = match &routed {
            Ok(Routed::Borrowed(b)) => b,
            Ok(Routed::Cached(r)) => r,
            Err(e) => {
                self.reject(failure(seq, refused(e.message.clone(), None)));
                return;
            }
        };
        let topic_limit = loop {
            // Read per topic, so a reload applies without a restart.
            let creation = TopicCreation {
                enabled: settings::topic_creation(),
                partitions: settings::topic_partitions(),
                replication_factor: settings::topic_replication_factor(),
            };
            match self.publisher.ensure_topic(topic, &creation, || {
                pg_sys::check_for_interrupts!();
            }) {
                Ok(limit) => break limit,
                Err(TopicError::Missing(reason)) => {
                    self.reject(failure(seq, refused(reason, Some(topic))));
                    return;
                }
                Err(TopicError::Unreachable(reason)) => {
                    // The broker cannot be asked: wait and ask again, never skip.
                    self.shared.add_retry();
                    self.shared.set_broker_up(false);
                    self.shared.set_error(&reason);
                    set_state(self.shared, State::WaitingForBroker, Some(&reason));
                    self.apply_reports(Duration::from_millis(500));
                    pg_sys::check_for_interrupts!();
                }
            }
        };
        if let Some(limit) = topic_limit {
            let size = outbox_core::validate::record_size(ev.aggregate_type, ev.aggregate_id, ev.event_type, &ev.headers, ev.payload);
            if size > limit {
                // Refused here, before it is sent, so nothing after it can
                // reach the partition first (see Publisher::ensure_topic).
                let reason = format!(
                    "event is too large for topic \"{topic}\": {size} bytes as a Kafka record, its max.message.bytes is {limit}"
                );
                self.reject(failure(seq, refused(reason, Some(topic))));
                return;
            }
        }
        let Sink { publisher, tracker, published, published_bytes, last_ack, failed, shared, .. } = self;
        let mut acks = Acks { tracker, shared, published, bytes: published_bytes, last_ack, failed };
        let mut pending_errors = Vec::new();
        let mut full_since: Option<Instant> = None;
        let res = publisher.send(
            seq,
            topic,
            ev.aggregate_id,
            ev.payload,
            &ev.id,
            ev.event_type,
            ev.aggregate_type,
            &ev.headers,
            d.commit_time,
            |p| {
                // The local queue is full: serve delivery reports until
                // there is room, staying responsive to SIGTERM.
                let mut reports = Vec::new();
                p.poll_into(Duration::from_millis(100), &mut reports);
                pending_errors.extend(acks.apply(&mut reports));
                // A wait inside decoding is visible in the status.
                if full_since.get_or_insert_with(Instant::now).elapsed() >= BROKER_SILENCE {
                    acks.shared.set_broker_up(false);
                    set_state(
                        acks.shared,
                        State::WaitingForBroker,
                        Some("the producer's local queue is full and Kafka acknowledges nothing; waiting, nothing is skipped"),
                    );
                }
                pg_sys::check_for_interrupts!();
            },
        );
        for f in pending_errors {
            self.reject(f);
        }
        if let Err(SendError::Rejected(rej)) = res {
            self.reject(failure(seq, rej));
        }
    }
}

/// What a delivery report changes: the tracker, the counters, the latency
/// histogram. Borrowed from the Sink so the producer can be borrowed beside it.
struct Acks<'a> {
    tracker: &'a mut Tracker,
    shared: &'static Shared,
    published: &'a mut u64,
    bytes: &'a mut u64,
    last_ack: &'a mut Instant,
    failed: &'a mut u64,
}

impl Acks<'_> {
    /// Applies the reports (leaving `reports` empty, its capacity kept);
    /// returns the failed ones.
    fn apply(&mut self, reports: &mut Vec<crate::publisher::Report>) -> Vec<Failure> {
        let mut rejected = Vec::new();
        for r in reports.drain(..) {
            match r.error {
                None => {
                    note_latency(self.shared, self.tracker.acked(r.seq));
                    *self.published += 1;
                    *self.bytes += r.bytes;
                    *self.last_ack = Instant::now();
                }
                Some(rej) => {
                    *self.failed += 1;
                    let (commit_lsn, commit_time) = self.tracker.commit_of(r.seq).unwrap_or((0, 0));
                    rejected.push(Failure { seq: r.seq, rej, commit_lsn, commit_time, from_report: true });
                }
            }
        }
        rejected
    }
}

/// Commit-to-acknowledgement latency: the delivery report's arrival minus
/// the transaction's commit time, both from this server's clock.
fn note_latency(shared: &Shared, commit_time: Option<i64>) {
    if let Some(t) = commit_time.filter(|t| *t != 0) {
        // SAFETY: GetCurrentTimestamp only reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        shared.record_latency((now - t).max(0) as u64);
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
            hold_for_failover_standbys(target_page_ptr + n as u64);
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
    // SAFETY: output_writer_private is the Sink set in Relay::start, alive
    // as long as the context; ctx->out holds `len` bytes the plugin wrote.
    unsafe {
        let sink = &mut *((*ctx).output_writer_private as *mut Sink);
        let out = (*ctx).out;
        let bytes = std::slice::from_raw_parts((*out).data as *const u8, (*out).len as usize);
        sink.handle(bytes);
    }
}

struct Relay {
    ctx: *mut pg_sys::LogicalDecodingContext,
    sink: Box<Sink>,
    shared: &'static Shared,
    fingerprint: String,
    confirmed: u64,
    saved: u64,
    last_save: Instant,
    last_rss: Instant,
    extension_schema: Option<String>,
    wal_watch: wal_guard::Watch,
}

fn build_publisher(one_per_request: bool) -> Publisher {
    let props = settings::kafka_properties().unwrap_or_else(|e| error!("outbox relay: {e}"));
    match Publisher::new(
        &settings::bootstrap_servers(),
        &props,
        settings::max_event_bytes(),
        settings::linger_ms(),
        one_per_request,
    ) {
        Ok((p, ignored)) => {
            for k in ignored {
                warning!("outbox relay: ignoring \"{k}\" in outbox.kafka_properties: the relay sets it to keep its delivery guarantees");
            }
            p
        }
        Err(e) => error!("outbox relay: could not create the Kafka producer: {e}"),
    }
}

impl Relay {
    fn start(shared: &'static Shared, slot: &str) -> Relay {
        // After a batch rejection, until the events of the refused batch
        // are settled: one event per request.
        let one_per_request = slot::find(slot).is_some_and(|i| shared.isolating_until() > i.confirmed_flush);
        if one_per_request {
            log!(
                "outbox relay: sending one event per request up to {} (the broker refused a batch for one of its events)",
                lsn::format(shared.isolating_until())
            );
        }
        let mut sink = Box::new(Sink {
            publisher: std::mem::ManuallyDrop::new(build_publisher(one_per_request)),
            one_per_request,
            tracker: Tracker::new(),
            shared,
            stopped: None,
            table_rows: VecDeque::new(),
            commit_times: VecDeque::new(),
            last_ack: Instant::now(),
            published: 0,
            restart_at: None,
            restart_not_before: None,
            failed: 0,
            published_bytes: 0,
            dead: Vec::new(),
            dead_known: Default::default(),
            template: settings::topic_template(),
            last_route: None,
            reports: Vec::new(),
        });
        // Registered at once: an ERROR from here on (acquiring the slot,
        // creating the decoding context) unwinds through Sink's Drop, which
        // closes the client only if it finds itself registered.
        LIVE_SINK.with(|s| s.set(&mut *sink as *mut Sink));
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
        // SAFETY: MyReplicationSlot is ours now.
        let confirmed = unsafe { (*pg_sys::MyReplicationSlot).data.confirmed_flush };
        shared.set_confirmed(confirmed);
        let mut relay = Relay {
            ctx,
            sink,
            shared,
            fingerprint: settings::producer_fingerprint(),
            confirmed,
            saved: confirmed,
            last_save: Instant::now(),
            last_rss: Instant::now() - Duration::from_secs(10),
            extension_schema: None,
            wal_watch: wal_guard::Watch::default(),
        };
        relay.sink.dead_known = relay.dead_letters_since(confirmed);
        // SAFETY: the Box's heap address is stable while the relay lives.
        unsafe { (*ctx).output_writer_private = (&mut *relay.sink as *mut Sink).cast() };
        log!(
            "outbox relay: streaming slot \"{slot}\" from {} to {}",
            lsn::format(confirmed),
            settings::bootstrap_servers()
        );
        set_state(shared, State::Streaming, None);
        shared.enable_wakeups();
        relay
    }

    fn run(&mut self) -> ! {
        loop {
            pg_sys::check_for_interrupts!();
            self.reload_if_asked();
            self.sink.apply_reports(Duration::ZERO);
            if self.sink.stopped.is_none() {
                self.decode_pass();
            }
            self.sink.apply_reports(Duration::ZERO);
            self.settle();
            if let Some(at) = self.sink.restart_at {
                let now = Instant::now();
                let backed_off = self.sink.restart_not_before.is_none_or(|t| now >= t);
                if backed_off && (self.sink.tracker.in_flight() <= self.sink.failed || now >= at) {
                    log!("outbox relay: restarting the stream from {}", lsn::format(self.confirmed));
                    // SAFETY: proc_exit(1) asks the postmaster for a restart.
                    unsafe { pg_sys::proc_exit(1) };
                }
            }
            let wait = if self.sink.tracker.in_flight() > 0 { BUSY_WAIT } else { IDLE_WAIT };
            shmem::wait_latch(wait.as_millis() as i64);
        }
    }

    fn reload_if_asked(&mut self) {
        if self.shared.take_resume_request() && self.sink.stopped.is_some() {
            log!("outbox relay: resume requested; restarting to resume from {}", lsn::format(self.confirmed));
            // SAFETY: proc_exit(1) asks the postmaster for a restart.
            unsafe { pg_sys::proc_exit(1) };
        }
        if !reload_config() {
            return;
        }
        self.sink.template = settings::topic_template();
        self.sink.last_route = None;
        let fp = settings::producer_fingerprint();
        if self.sink.stopped.is_some() || fp != self.fingerprint || !settings::relay_enabled() {
            // Resuming and rebuilding the producer both mean re-reading from
            // the confirmed position with a fresh decoding context: exiting
            // does exactly that (the postmaster restarts us). Only what was
            // not yet confirmed is sent again.
            log!("outbox relay: configuration reloaded; restarting to resume from {}", lsn::format(self.confirmed));
            // SAFETY: proc_exit(1) asks the postmaster for a restart.
            unsafe { pg_sys::proc_exit(1) };
        }
    }

    /// Reads and decodes WAL up to the current flush position.
    fn decode_pass(&mut self) {
        // SAFETY: the reader belongs to our decoding context; records are
        // read sequentially with the same reader (no second XLogBeginRead),
        // each handed to the decoder, which calls our write callbacks.
        unsafe {
            let reader = (*self.ctx).reader;
            let flush = pg_sys::GetFlushRecPtr(std::ptr::null_mut());
            let mut n = 0u32;
            while (*reader).EndRecPtr < flush && self.sink.stopped.is_none() {
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
                pg_sys::ffi::pg_guard_ffi_boundary(|| ffi::LogicalDecodingProcessRecord(self.ctx, reader));
                self.sink.tracker.seal();
                n += 1;
                if n.is_multiple_of(256) {
                    self.sink.apply_reports(Duration::ZERO);
                    pg_sys::check_for_interrupts!();
                }
            }
        }
    }

    /// The step outside decoding: write dead letters, delete acknowledged
    /// table rows, publish the status, then confirm (and now and then save)
    /// the slot's position.
    fn settle(&mut self) {
        // SAFETY: reading our own reader's position.
        let read_upto = unsafe { (*(*self.ctx).reader).EndRecPtr };
        if !self.sink.dead.is_empty() {
            self.store_dead_letters();
        }
        let confirmable = self.sink.tracker.confirmable(read_upto);
        self.delete_published_rows(confirmable);
        // The status first, then the confirmation: whoever sees the new
        // confirmed position (outbox_drain) then sees counters and state
        // that include it.
        while self.sink.commit_times.front().is_some_and(|(l, _)| *l <= confirmable) {
            self.sink.commit_times.pop_front();
        }
        let in_flight = self.sink.tracker.in_flight();
        let oldest = self.sink.commit_times.front().map_or(0, |(_, t)| *t);
        self.shared.set_in_flight(in_flight, oldest);
        self.shared.add_published(std::mem::take(&mut self.sink.published), std::mem::take(&mut self.sink.published_bytes));
        if self.sink.stopped.is_none() {
            let silent = in_flight > 0 && self.sink.last_ack.elapsed() >= BROKER_SILENCE;
            self.shared.set_broker_up(!silent);
            if silent {
                set_state(self.shared, State::WaitingForBroker, Some("no acknowledgement from Kafka; retrying, nothing is skipped"));
            } else if in_flight == 0 || self.sink.last_ack.elapsed() < BROKER_SILENCE {
                set_state(self.shared, State::Streaming, None);
            }
        }
        if confirmable > self.confirmed {
            // SAFETY: we hold the slot (MyReplicationSlot).
            unsafe { pg_sys::LogicalConfirmReceivedLocation(confirmable) };
            self.confirmed = confirmable;
            self.shared.set_confirmed(confirmable);
        }
        if self.sink.one_per_request && self.confirmed >= self.shared.isolating_until() && in_flight == 0 {
            // Past the events that shared a refused request: batch again.
            self.shared.isolate_until(0);
            log!("outbox relay: past the request the broker refused; restarting to send in batches again");
            // SAFETY: proc_exit(1) asks the postmaster for a restart.
            unsafe { pg_sys::proc_exit(1) };
        }
        if self.confirmed > self.saved && self.last_save.elapsed() >= settings::confirm_save_interval() {
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
            self.last_save = Instant::now();
        }
        if self.last_rss.elapsed() >= Duration::from_secs(1) {
            self.last_rss = Instant::now();
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
        let letters = std::mem::take(&mut self.sink.dead);
        if let Err(e) = dead_letter::store(&schema, &letters) {
            // Restarting re-reads the events from the confirmed position.
            error!("outbox relay: could not write {} event(s) to the dead-letter table: {e}", letters.len());
        }
        for p in &letters {
            self.sink.tracker.acked(p.seq);
            if p.from_report {
                self.sink.failed = self.sink.failed.saturating_sub(1);
            }
        }
        self.shared.add_dead_letters(letters.len() as u64);
    }

    /// Dead letters a restarted stream may meet again (see `Sink::dead_known`).
    fn dead_letters_since(&mut self, confirmed: u64) -> std::collections::HashSet<([u8; 16], u64)> {
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

    fn delete_published_rows(&mut self, confirmable: u64) {
        let mut ids = Vec::new();
        while self.sink.table_rows.front().is_some_and(|(l, _)| *l <= confirmable) {
            if let Some((_, id)) = self.sink.table_rows.pop_front() {
                ids.push(id);
            }
        }
        if ids.is_empty() || !settings::delete_published_rows() {
            return;
        }
        let Some(schema) = self.schema() else { return };
        for chunk in ids.chunks(1000) {
            let list: Vec<String> = chunk.iter().map(outbox_core::format_uuid).collect();
            let sql = format!(
                "DELETE FROM {schema}.outbox WHERE id OPERATOR(pg_catalog.=) ANY ('{{{}}}'::pg_catalog.uuid[])",
                list.join(",")
            );
            BackgroundWorker::transaction(|| Spi::run(&sql)).unwrap_or_else(|e| {
                error!("outbox relay: could not delete published outbox rows: {e}")
            });
        }
    }
}

/// Logs each crossing of the WAL guard's fractions once.
fn watch_wal(watch: &mut wal_guard::Watch, retained: u64) {
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
