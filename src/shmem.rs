//! The relay's shared-memory status, and the wake-up at commit.
//!
//! Written by the worker, read by any backend without locks: every field is
//! an atomic, so reading the status never blocks the worker.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};

use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::shmem::PGRXSharedMemory;
use pgrx::PgAtomic;

use outbox_core::histogram;

/// The worker's states, defined once; the log says when it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum State {
    NotRunning = 0,
    Starting = 1,
    Streaming = 2,
    WaitingForBroker = 3,
    /// An event Kafka rejects for a reason retrying cannot fix; waits for
    /// SIGHUP (after the cause is fixed) with its position held.
    StoppedOnBadEvent = 4,
    /// `outbox.relay_enabled = off`.
    Disabled = 5,
    /// Postgres invalidated the slot (max_slot_wal_keep_size); the worker
    /// waits for an operator to drop it, then creates a new one.
    SlotInvalidated = 6,
    /// `$PGDATA/outbox.key` is missing while an outbox slot exists: the
    /// events in its WAL were signed with the lost key. Nothing is decoded
    /// or confirmed until the file is restored or the slots are dropped.
    KeyMissing = 7,
    /// 17+: a standby named in `synchronized_standby_slots` has not flushed
    /// the WAL to decode next; nothing is published until it has.
    WaitingForStandby = 8,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::NotRunning => "not running",
            State::Starting => "starting",
            State::Streaming => "streaming",
            State::WaitingForBroker => "waiting for broker",
            State::StoppedOnBadEvent => "stopped on bad event",
            State::Disabled => "disabled",
            State::SlotInvalidated => "slot invalidated",
            State::KeyMissing => "key missing",
            State::WaitingForStandby => "waiting for standby",
        }
    }

    fn from_u32(v: u32) -> State {
        match v {
            1 => State::Starting,
            2 => State::Streaming,
            3 => State::WaitingForBroker,
            4 => State::StoppedOnBadEvent,
            5 => State::Disabled,
            6 => State::SlotInvalidated,
            7 => State::KeyMissing,
            8 => State::WaitingForStandby,
            _ => State::NotRunning,
        }
    }
}

pub struct Shared {
    /// `pgprocno` of the worker + 1 (0: no worker), for setting its latch.
    worker_procno: AtomicI32,
    worker_pid: AtomicI32,
    state: AtomicU32,
    /// Position confirmed to the slot: everything committed before it is acknowledged by Kafka.
    confirmed_lsn: AtomicU64,
    events_published: AtomicU64,
    /// Key + value bytes of the events published.
    bytes_published: AtomicU64,
    /// Transient failures retried: stream restarts after a failed delivery,
    /// metadata requests the broker did not answer.
    retries: AtomicU64,
    /// Events moved to the dead-letter table.
    dead_letters: AtomicU64,
    /// Messages with our prefix that are not events at all (malformed, an
    /// unknown version, non-transactional): skipped, counted here.
    forged_messages: AtomicU64,
    /// Well-formed events whose tag did not verify with this server's key:
    /// handled as rejected events, counted here.
    unverified_events: AtomicU64,
    in_flight: AtomicU64,
    /// Commit time (µs since 2000) of the oldest unacknowledged commit, 0 if none.
    oldest_unacked_commit_time: AtomicI64,
    restarts: AtomicU64,
    peak_rss_kb: AtomicU64,
    broker_up: AtomicBool,
    /// Commit-to-acknowledgement latency, µs (outbox_core::histogram buckets).
    latency: [AtomicU64; histogram::BUCKETS],
    /// The last error, as UTF-8 in 8-byte words under a sequence lock: the
    /// worker is the only writer, readers retry while it writes.
    error_seq: AtomicU64,
    error_len: AtomicU64,
    error_time: AtomicI64,
    error_words: [AtomicU64; ERROR_WORDS],
    /// Set by outbox_relay_resume(): a stopped worker restarts and resumes.
    resume_requested: AtomicBool,
    /// Consecutive transient failures of one event, across worker restarts
    /// (outbox_core::retry): the event id's two halves and the attempts.
    streak_hi: AtomicU64,
    streak_lo: AtomicU64,
    streak_attempts: AtomicU32,
    /// After the broker refused a record batch for one of its events: send one
    /// event per request until the confirmed position reaches this LSN.
    isolate_until: AtomicU64,
}

const ERROR_WORDS: usize = 128; // 1 KiB of message

impl Default for Shared {
    fn default() -> Self {
        Shared {
            worker_procno: AtomicI32::new(0),
            worker_pid: AtomicI32::new(0),
            state: AtomicU32::new(0),
            confirmed_lsn: AtomicU64::new(0),
            events_published: AtomicU64::new(0),
            bytes_published: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            forged_messages: AtomicU64::new(0),
            unverified_events: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            oldest_unacked_commit_time: AtomicI64::new(0),
            restarts: AtomicU64::new(0),
            peak_rss_kb: AtomicU64::new(0),
            broker_up: AtomicBool::new(false),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            error_seq: AtomicU64::new(0),
            error_len: AtomicU64::new(0),
            error_time: AtomicI64::new(0),
            error_words: std::array::from_fn(|_| AtomicU64::new(0)),
            resume_requested: AtomicBool::new(false),
            streak_hi: AtomicU64::new(0),
            streak_lo: AtomicU64::new(0),
            streak_attempts: AtomicU32::new(0),
            isolate_until: AtomicU64::new(0),
        }
    }
}

// SAFETY: Shared holds only atomics, valid at any address in shared memory
// and in any process that maps it.
unsafe impl PGRXSharedMemory for Shared {}

// SAFETY: the name is unique to this extension.
pub static SHARED: PgAtomic<Shared> = unsafe { PgAtomic::new(c"outbox_relay_status") };

static READY: AtomicBool = AtomicBool::new(false);

/// Called from `_PG_init` while preloading.
pub fn init() {
    pgrx::pg_shmem_init!(SHARED);
    READY.store(true, Ordering::Relaxed);
}

pub fn shared() -> Option<&'static Shared> {
    READY.load(Ordering::Relaxed).then(|| SHARED.get())
}

impl Shared {
    pub fn attach_worker(&self) {
        // SAFETY: MyProcPid is set for any process attached to shared memory.
        self.worker_pid.store(unsafe { pg_sys::MyProcPid }, Ordering::Relaxed);
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// From now on COMMITs that wrote an event set the worker's latch. Only
    /// while streaming: a disabled relay is not woken for nothing.
    pub fn enable_wakeups(&self) {
        // SAFETY: MyProc is set for any process attached to shared memory.
        self.worker_procno.store(unsafe { crate::ffi::my_proc_number() } + 1, Ordering::Release);
    }

    pub fn detach_worker(&self) {
        self.worker_procno.store(0, Ordering::Release);
        self.worker_pid.store(0, Ordering::Relaxed);
        self.set_state(State::NotRunning);
    }

    /// Sets the state; returns the previous one.
    pub fn set_state(&self, s: State) -> State {
        State::from_u32(self.state.swap(s as u32, Ordering::Relaxed))
    }

    pub fn state(&self) -> State {
        State::from_u32(self.state.load(Ordering::Relaxed))
    }

    pub fn set_confirmed(&self, lsn: u64) {
        self.confirmed_lsn.store(lsn, Ordering::Release);
    }

    pub fn confirmed(&self) -> u64 {
        self.confirmed_lsn.load(Ordering::Acquire)
    }

    pub fn add_published(&self, events: u64, bytes: u64) {
        self.events_published.fetch_add(events, Ordering::Relaxed);
        self.bytes_published.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_retry(&self) {
        self.retries.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add_dead_letters(&self, n: u64) {
        self.dead_letters.fetch_add(n, Ordering::Relaxed);
    }

    pub fn add_forged(&self) -> u64 {
        self.forged_messages.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn add_unverified(&self) {
        self.unverified_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the calling process is the relay worker.
    pub fn is_worker(&self) -> bool {
        // SAFETY: MyProcPid is a plain global.
        self.worker_pid.load(Ordering::Relaxed) == unsafe { pg_sys::MyProcPid }
    }

    pub fn set_in_flight(&self, n: u64, oldest_commit_time: i64) {
        self.in_flight.store(n, Ordering::Relaxed);
        self.oldest_unacked_commit_time.store(oldest_commit_time, Ordering::Relaxed);
    }

    pub fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
    }

    /// Records the last error (truncated to 1 KiB) with the current time.
    pub fn set_error(&self, msg: &str) {
        let mut bytes = msg.as_bytes();
        if bytes.len() > ERROR_WORDS * 8 {
            let mut end = ERROR_WORDS * 8;
            while !msg.is_char_boundary(end) {
                end -= 1;
            }
            bytes = &bytes[..end];
        }
        self.error_seq.fetch_add(1, Ordering::AcqRel); // odd: writing
        for (i, chunk) in bytes.chunks(8).enumerate() {
            let mut w = [0u8; 8];
            w[..chunk.len()].copy_from_slice(chunk);
            self.error_words[i].store(u64::from_le_bytes(w), Ordering::Relaxed);
        }
        self.error_len.store(bytes.len() as u64, Ordering::Relaxed);
        // SAFETY: GetCurrentTimestamp only reads the clock.
        self.error_time.store(unsafe { pg_sys::GetCurrentTimestamp() }, Ordering::Relaxed);
        self.error_seq.fetch_add(1, Ordering::AcqRel); // even: stable
    }

    /// The last error and its time (µs since 2000), if any.
    pub fn last_error(&self) -> Option<(String, i64)> {
        for _ in 0..100 {
            let before = self.error_seq.load(Ordering::Acquire);
            if before % 2 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let len = (self.error_len.load(Ordering::Relaxed) as usize).min(ERROR_WORDS * 8);
            let mut bytes = Vec::with_capacity(len + 8);
            for w in self.error_words.iter().take(len.div_ceil(8)) {
                bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
            }
            bytes.truncate(len);
            let time = self.error_time.load(Ordering::Relaxed);
            if self.error_seq.load(Ordering::Acquire) == before {
                return (len > 0).then(|| (String::from_utf8_lossy(&bytes).into_owned(), time));
            }
        }
        None
    }

    /// The current streak of transient failures; only the worker writes it.
    pub fn streak(&self) -> Option<outbox_core::retry::Streak> {
        let attempts = self.streak_attempts.load(Ordering::Relaxed);
        (attempts > 0).then(|| {
            let mut event = [0u8; 16];
            event[..8].copy_from_slice(&self.streak_hi.load(Ordering::Relaxed).to_be_bytes());
            event[8..].copy_from_slice(&self.streak_lo.load(Ordering::Relaxed).to_be_bytes());
            outbox_core::retry::Streak { event, attempts }
        })
    }

    pub fn set_streak(&self, s: outbox_core::retry::Streak) {
        let (hi, lo) = s.event.split_at(8);
        self.streak_hi.store(u64::from_be_bytes(hi.try_into().unwrap_or_default()), Ordering::Relaxed);
        self.streak_lo.store(u64::from_be_bytes(lo.try_into().unwrap_or_default()), Ordering::Relaxed);
        self.streak_attempts.store(s.attempts, Ordering::Relaxed);
    }

    /// Raises the isolation mark to `lsn`; 0 clears it.
    pub fn isolate_until(&self, lsn: u64) {
        if lsn == 0 {
            self.isolate_until.store(0, Ordering::Relaxed);
        } else {
            self.isolate_until.fetch_max(lsn, Ordering::Relaxed);
        }
    }

    pub fn isolating_until(&self) -> u64 {
        self.isolate_until.load(Ordering::Relaxed)
    }

    pub fn request_resume(&self) {
        self.resume_requested.store(true, Ordering::Release);
        self.wake_worker();
    }

    pub fn take_resume_request(&self) -> bool {
        self.resume_requested.swap(false, Ordering::AcqRel)
    }

    pub fn record_latency(&self, us: u64) {
        self.latency[histogram::bucket(us)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn latency_counts(&self) -> Vec<u64> {
        self.latency.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    pub fn reset_latency(&self) {
        for c in &self.latency {
            c.store(0, Ordering::Relaxed);
        }
    }

    pub fn note_rss(&self, kb: u64) {
        self.peak_rss_kb.fetch_max(kb, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            pid: self.worker_pid.load(Ordering::Relaxed),
            state: self.state(),
            confirmed_lsn: self.confirmed(),
            events_published: self.events_published.load(Ordering::Relaxed),
            bytes_published: self.bytes_published.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            dead_letters: self.dead_letters.load(Ordering::Relaxed),
            forged_messages: self.forged_messages.load(Ordering::Relaxed),
            unverified_events: self.unverified_events.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            oldest_unacked_commit_time: self.oldest_unacked_commit_time.load(Ordering::Relaxed),
            starts: self.restarts.load(Ordering::Relaxed),
            peak_rss_kb: self.peak_rss_kb.load(Ordering::Relaxed),
            broker_up: self.broker_up.load(Ordering::Relaxed),
        }
    }

    /// Wakes the worker (sets its latch), if there is one.
    pub fn wake_worker(&self) {
        let procno = self.worker_procno.load(Ordering::Acquire);
        if procno > 0 {
            // SAFETY: allProcs has an entry for every pgprocno; setting any
            // process's latch is safe, at worst a spurious wake-up.
            unsafe {
                let proc_ = (*pg_sys::ProcGlobal).allProcs.add((procno - 1) as usize);
                pg_sys::SetLatch(&mut (*proc_).procLatch);
            }
        }
    }
}

pub struct Snapshot {
    pub pid: i32,
    pub state: State,
    pub confirmed_lsn: u64,
    pub events_published: u64,
    pub bytes_published: u64,
    pub retries: u64,
    pub dead_letters: u64,
    pub forged_messages: u64,
    pub unverified_events: u64,
    pub in_flight: u64,
    pub oldest_unacked_commit_time: i64,
    pub starts: u64,
    pub peak_rss_kb: u64,
    pub broker_up: bool,
}

thread_local! {
    static CALLBACK_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    static WAKE_AT_COMMIT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Makes this transaction's COMMIT wake the worker, so its events are
/// published within milliseconds instead of at the next idle timeout.
pub fn wake_at_commit() {
    if shared().is_none() {
        return;
    }
    WAKE_AT_COMMIT.with(|w| w.set(true));
    CALLBACK_REGISTERED.with(|r| {
        if !r.get() {
            // SAFETY: registers a plain function for the backend's life.
            unsafe { pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut()) };
            r.set(true);
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT
            if WAKE_AT_COMMIT.with(|w| w.replace(false)) => {
                if let Some(s) = shared() {
                    s.wake_worker();
                }
            }
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => WAKE_AT_COMMIT.with(|w| w.set(false)),
        _ => {}
    }
}

/// Waits on this process's latch for at most `timeout_ms`, exiting if the
/// postmaster dies, then resets it. Interrupts are for the caller to serve.
pub fn wait_latch(timeout_ms: i64) {
    // SAFETY: MyLatch is this process's own latch, valid for its life.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            timeout_ms as std::ffi::c_long,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

/// A wait on this process's latch and on one more file descriptor (a
/// sink's wake-up pipe, readable when it has reports), built once for the
/// worker's life: `WaitLatchOrSocket` would build and free an epoll set on
/// every call.
pub struct LatchOrFd {
    set: *mut pg_sys::WaitEventSet,
    fd: i32,
}

impl LatchOrFd {
    /// `fd` must stay open for as long as this is used.
    pub fn new(fd: i32) -> Self {
        // SAFETY: a set of three events allocated in TopMemoryContext (PG15
        // and 16 take the context; 17 and later allocate there when given no
        // resource owner), never freed: one per worker process. The latch is
        // this process's own; WL_EXIT_ON_PM_DEATH makes the wait exit the
        // process when the postmaster dies, as wait_latch does.
        unsafe {
            #[cfg(any(feature = "pg15", feature = "pg16"))]
            let set = pg_sys::CreateWaitEventSet(pg_sys::TopMemoryContext, 3);
            #[cfg(not(any(feature = "pg15", feature = "pg16")))]
            let set = pg_sys::CreateWaitEventSet(std::ptr::null_mut(), 3);
            let none = std::ptr::null_mut();
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_LATCH_SET, pg_sys::PGINVALID_SOCKET, pg_sys::MyLatch, none);
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_EXIT_ON_PM_DEATH, pg_sys::PGINVALID_SOCKET, std::ptr::null_mut(), none);
            pg_sys::AddWaitEventToSet(set, pg_sys::WL_SOCKET_READABLE, fd, std::ptr::null_mut(), none);
            LatchOrFd { set, fd }
        }
    }

    /// Waits for the latch, the descriptor or `timeout_ms`, then resets
    /// the latch and empties the descriptor (a pipe in non-blocking mode).
    pub fn wait(&self, timeout_ms: i64) {
        // SAFETY: the set was built in new() and lives as long as the
        // process; `events` has room for the three it may report; the
        // descriptor is open (see new) and read into a local buffer.
        unsafe {
            let mut events = [pg_sys::WaitEvent::default(); 3];
            let n = pg_sys::WaitEventSetWait(
                self.set,
                timeout_ms as std::ffi::c_long,
                events.as_mut_ptr(),
                3,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            if events.iter().take(n.max(0) as usize).any(|e| e.events & pg_sys::WL_SOCKET_READABLE != 0) {
                let mut buf = [0u8; 64];
                while libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) > 0 {}
            }
        }
    }
}
