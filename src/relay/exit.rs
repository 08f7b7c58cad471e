//! How the worker ends: the slot's position saved, and the sink's client
//! closed exactly once, whichever way the exit comes (a restart, SIGTERM,
//! a FATAL, or an ERROR unwinding through the relay's frames).

use std::cell::Cell;
use std::mem::ManuallyDrop;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem;
use crate::sink::Sink;

/// How long an exiting worker waits for the sink's threads to end.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// The relay's sink, closed (with a bound) exactly once: by its Drop or by
/// the exit callback, whichever runs.
pub struct SinkHandle {
    sink: ManuallyDrop<Box<dyn Sink>>,
}

thread_local! {
    /// The live relay's sink, for the exit callback: every exit (restart,
    /// SIGTERM, an ERROR) goes through proc_exit, which runs the callbacks
    /// and never returns to the frames that own it.
    static LIVE_SINK: Cell<*mut SinkHandle> = const { Cell::new(std::ptr::null_mut()) };
}

impl SinkHandle {
    pub fn new(sink: Box<dyn Sink>) -> Self {
        SinkHandle { sink: ManuallyDrop::new(sink) }
    }

    /// Registers the handle for the exit callback. Called once it sits at
    /// its final address (inside the relay's Box), at once: an ERROR from
    /// then on (acquiring the slot, creating the decoding context) unwinds
    /// through Drop, which closes the client only if it finds itself
    /// registered.
    pub fn register(&mut self) {
        LIVE_SINK.with(|s| s.set(self as *mut SinkHandle));
    }

    pub fn get(&mut self) -> &mut dyn Sink {
        &mut **self.sink
    }

    pub fn name(&self) -> &'static str {
        self.sink.name()
    }
}

impl Drop for SinkHandle {
    /// Reached when an ERROR unwinds through the relay's frames (a Rust
    /// panic on its way to the worker's top level), before proc_exit runs
    /// the exit callback: the client is closed here, with the same bound,
    /// and the callback then finds nothing left to close. 0.1.0 left the
    /// callback a dangling pointer, and any ERROR after the relay started
    /// crashed the whole server.
    fn drop(&mut self) {
        let me: *mut SinkHandle = self;
        let live = LIVE_SINK.with(|s| if s.get() == me { s.replace(std::ptr::null_mut()) } else { std::ptr::null_mut() });
        if !live.is_null() {
            // SAFETY: LIVE_SINK still pointed at this handle, so the exit
            // callback has not taken the sink; this is its last use.
            close(unsafe { ManuallyDrop::take(&mut self.sink) });
        }
    }
}

/// Destroys the sink's client before the process exits: exit-time cleanup
/// (OpenSSL's, with TLS) must not race its threads, or the worker crashes
/// and the postmaster restarts the whole cluster.
fn close_live_sink() {
    let handle = LIVE_SINK.with(|s| s.replace(std::ptr::null_mut()));
    if handle.is_null() {
        return;
    }
    // SAFETY: LIVE_SINK points at the handle the running relay owns while
    // it is alive: its Drop clears it before it is freed (an ERROR unwinds
    // through the relay's frames before proc_exit runs this). A FATAL or a
    // restart exits without unwinding, so the handle is alive here.
    // LIVE_SINK was cleared first, so the sink is taken once.
    close(unsafe { ManuallyDrop::take(&mut (*handle).sink) });
}

fn close(sink: Box<dyn Sink>) {
    let kind = sink.name();
    match sink.close(CLOSE_LIMIT) {
        Some(t) => log!("outbox relay: {kind} client closed in {} ms", t.as_millis()),
        None => warning!(
            "outbox relay: the {kind} client did not close within {} s; exiting with its threads still running",
            CLOSE_LIMIT.as_secs()
        ),
    }
}

/// Runs first at every exit, while the slot is still ours: BaseInit
/// (ReplicationSlotInitialize) registers the release of the slot
/// (ReplicationSlotShmemExit) as a before_shmem_exit callback too, and such
/// callbacks run last-registered first, so this one is registered after
/// connecting. Writing the slot here (the confirmed position, one small
/// file and its fsyncs) means a clean stop, a restart for new settings or
/// `outbox.relay_enabled = off` re-sends nothing, whatever the
/// confirm_save_interval.
#[pg_guard]
pub unsafe extern "C-unwind" fn save_slot_at_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
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
pub unsafe extern "C-unwind" fn on_exit(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    close_live_sink();
    if let Some(s) = shmem::shared() {
        s.detach_worker();
    }
}
