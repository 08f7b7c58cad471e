//! The relay: a background worker that holds the outbox slot, decodes its
//! own logical decoding stream in-process and publishes every committed
//! event to the sink (Kafka or RabbitMQ), confirming the slot only behind
//! the sink's acknowledgements. Its files follow the flow:
//!
//! - `mod.rs` (here): the worker's life: start, the loop, reloads
//! - `waits.rs`: waiting before streaming, between turns, for standbys
//! - `decode.rs`: the decoding context, the page reader, the plugin's output
//! - `deliver.rs`: each event to the sink, each report back to the ledger
//! - `settle.rs`: dead letters, row cleanup, status, confirming the slot
//! - `state.rs`: the one mode (`outbox_core::relay_state` draws the machine)
//! - `exit.rs`: closing the sink and saving the slot on every exit
//!
//! The delivery bookkeeping (`outbox_core::ledger`) and the modes
//! (`outbox_core::relay_state`) are pure and unit-tested with a fake clock.
//!
//! Each turn of the loop: read WAL up to the flush position and decode it
//! (the plugin's records go to the sink as they come out of the decoder, so
//! a large transaction is never held in memory); serve the sink's reports;
//! settle; wait on the latch, which COMMIT sets in any backend that wrote
//! an event.

mod decode;
mod deliver;
mod exit;
mod settle;
mod state;
mod waits;

use std::time::{Duration, Instant};

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::relay_state::{Input, Mode};
use outbox_core::{lsn, wal_guard};

use crate::clock;
use crate::ffi;
use crate::settings::{self, amqp::SinkKind};
use crate::shmem::{self, Shared};
use crate::sink::kafka::KafkaSink;
use crate::sink::rabbitmq::RabbitSink;
use crate::sink::Sink;
use crate::slot;
use deliver::Deliver;
use exit::SinkHandle;

/// Safety-net wake-up when nothing sets the latch: bounds the latency of
/// COMMIT PREPARED (committed by a backend that wrote no event) and keeps
/// the slot advancing on a database with no outbox traffic.
const IDLE_WAIT: Duration = Duration::from_millis(100);
/// While events are in flight, reports are polled this often, unless the
/// sink wakes the worker when it has them (Kafka).
const BUSY_WAIT: Duration = Duration::from_millis(1);

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

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn outbox_relay_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SAFETY: installs Postgres' own SIGTERM handler (see ffi::c_die) and an
    // exit callback; both are plain function pointers valid for the process.
    unsafe {
        ffi::handle_sigterm_like_a_backend();
        pg_sys::on_shmem_exit(Some(exit::on_exit), pg_sys::Datum::from(0));
    }
    let Some(shared) = shmem::shared() else {
        error!("outbox relay: shared memory is not initialised (outbox must be in shared_preload_libraries)");
    };
    shared.attach_worker();
    state::feed(Input::Waiting(Mode::Starting), None);
    let database = settings::database();
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    // SAFETY: a plain function pointer valid for the process; see
    // save_slot_at_exit for why it is registered only now.
    unsafe { pg_sys::before_shmem_exit(Some(exit::save_slot_at_exit), pg_sys::Datum::from(0)) };
    waits::pin_search_path();
    let slot = settings::slot_name();
    waits::wait_until_enabled(&slot);
    waits::wait_while_invalidated(shared, &slot);
    waits::wait_for_key(shared);
    slot::ensure_slot(&slot);
    let mut relay = Relay::start(shared, &slot);
    relay.run();
}

pub(crate) struct Relay {
    ctx: *mut pg_sys::LogicalDecodingContext,
    deliver: Box<Deliver>,
    shared: &'static Shared,
    fingerprint: String,
    confirmed: u64,
    saved: u64,
    last_save: Instant,
    last_rss: Option<Instant>,
    extension_schema: Option<String>,
    wal_watch: wal_guard::Watch,
    /// The extension's table, by OID, for deleting published rows (see
    /// settle::delete_published_rows).
    own_table: Option<pg_sys::Oid>,
    /// The latch and the sink's wake-up descriptor, when it has one.
    waiter: Option<shmem::LatchOrFd>,
    /// `outbox.tables` and `outbox.table_options` as last checked against
    /// the catalog (see `check_adopted_tables`).
    adopted_checked: Option<(String, String)>,
}

/// The sink `outbox.sink` names. A RabbitMQ server that cannot be reached
/// is waited for (the state says so, with the reason) rather than failing
/// events; a bad Kafka configuration is an ERROR, as librdkafka connects
/// lazily and retries by itself.
fn build_sink(shared: &Shared, one_per_request: bool) -> Box<dyn Sink> {
    match settings::amqp::sink() {
        SinkKind::Kafka => {
            let props = settings::kafka_properties().unwrap_or_else(|e| error!("outbox relay: {e}"));
            match KafkaSink::new(
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
                    Box::new(p)
                }
                Err(e) => error!("outbox relay: could not create the Kafka producer: {e}"),
            }
        }
        SinkKind::Rabbitmq => {
            let mut reported = String::new();
            loop {
                let url = settings::amqp::url().unwrap_or_else(|e| error!("outbox relay: {e}"));
                let mut interrupts = || {
                    pg_sys::check_for_interrupts!();
                };
                match RabbitSink::connect(&url, settings::amqp::exchange(), settings::amqp::exchange_declare(), &mut interrupts) {
                    Ok(s) => return Box::new(s),
                    Err(e) => {
                        if e.0 != reported {
                            warning!("outbox relay: {}; retrying every second, nothing is skipped", e.0);
                            shared.set_error(&e.0);
                            reported = e.0;
                        }
                        shared.add_retry();
                        shared.set_broker_up(false);
                        state::feed(Input::Waiting(Mode::WaitingForSink), Some(&reported));
                        waits::idle(1000);
                        // A reload may have fixed the URL, or chosen Kafka.
                        if settings::amqp::sink() != SinkKind::Rabbitmq || !settings::relay_enabled() {
                            state::feed(Input::Reloaded { restart_needed: true }, None);
                        }
                    }
                }
            }
        }
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
        let mut deliver = Box::new(Deliver::new(SinkHandle::new(build_sink(shared, one_per_request)), shared, one_per_request));
        deliver.sink.register();
        let ctx = decode::open(slot, &mut deliver);
        let waiter = deliver.sink.get().wake_fd().map(shmem::LatchOrFd::new);
        // SAFETY: MyReplicationSlot is ours now.
        let confirmed = unsafe { (*pg_sys::MyReplicationSlot).data.confirmed_flush };
        shared.set_confirmed(confirmed);
        let now = clock::now();
        let mut relay = Relay {
            ctx,
            deliver,
            shared,
            fingerprint: settings::producer_fingerprint(),
            confirmed,
            saved: confirmed,
            last_save: now,
            last_rss: None,
            extension_schema: None,
            wal_watch: wal_guard::Watch::default(),
            own_table: None,
            waiter,
            adopted_checked: None,
        };
        relay.deliver.dead_known = relay.dead_letters_since(confirmed);
        log!(
            "outbox relay: streaming slot \"{slot}\" from {} to {}",
            lsn::format(confirmed),
            match settings::amqp::sink() {
                SinkKind::Kafka => settings::bootstrap_servers(),
                SinkKind::Rabbitmq => format!(
                    "RabbitMQ exchange \"{}\" at {}",
                    settings::amqp::exchange(),
                    settings::amqp::url().map(|u| outbox_core::amqp::redact(&u)).unwrap_or_default()
                ),
            }
        );
        state::feed(Input::Started, None);
        shared.enable_wakeups();
        relay.check_adopted_tables();
        relay
    }

    /// The adopted tables' settings against the catalog, as the relay
    /// starts and after a reload that changed them. `ALTER SYSTEM` in
    /// `outbox.database` refuses what does not fit; a value from a
    /// configuration file, or set from another database, is checked only
    /// here: each problem is a WARNING and the status' last error, so a
    /// misspelt table (whose rows would never be decoded as events) is
    /// never silent. Publishing goes on: a table that does not fit has its
    /// rows dead-lettered with the reason.
    fn check_adopted_tables(&mut self) {
        let raw = settings::tables::raw();
        if self.adopted_checked.as_ref() == Some(&raw) {
            return;
        }
        let problems = BackgroundWorker::transaction(|| crate::adopt::problems(&raw.0, &raw.1));
        self.adopted_checked = Some(raw);
        for p in &problems {
            let msg = format!(
                "outbox.tables does not fit the catalog: {p}; rows of a table that does not exist are never decoded as \
                 events, and rows the mapping does not fit are dead-lettered with the reason"
            );
            warning!("outbox relay: {msg}");
            self.shared.set_error(&msg);
        }
    }

    fn run(&mut self) -> ! {
        loop {
            pg_sys::check_for_interrupts!();
            self.reload_if_asked();
            self.deliver.apply_reports(Duration::ZERO);
            if state::mode().sends() {
                decode::decode_pass(self.ctx, &mut self.deliver);
            }
            self.deliver.apply_reports(Duration::ZERO);
            self.settle(false);
            match &self.waiter {
                // Woken by a commit (the latch) or by reports (the sink).
                Some(w) => w.wait(IDLE_WAIT.as_millis() as i64),
                None => {
                    let wait = if self.deliver.ledger.in_flight() > 0 { BUSY_WAIT } else { IDLE_WAIT };
                    shmem::wait_latch(wait.as_millis() as i64);
                }
            }
        }
    }

    /// Resuming and rebuilding the sink both mean re-reading from the
    /// confirmed position with a fresh decoding context: exiting does
    /// exactly that (the postmaster restarts us). Only what was not yet
    /// confirmed is sent again.
    fn reload_if_asked(&mut self) {
        if self.shared.take_resume_request() {
            state::feed(Input::ResumeRequested, None);
        }
        if !waits::reload_config() {
            return;
        }
        self.deliver.reload();
        self.check_adopted_tables();
        let restart_needed = settings::producer_fingerprint() != self.fingerprint || !settings::relay_enabled();
        if restart_needed {
            // Settled rows waiting to be deleted are deleted and confirmed
            // past before the exit, so the new stream does not send them again.
            self.settle(true);
        }
        state::feed(Input::Reloaded { restart_needed }, None);
    }
}
