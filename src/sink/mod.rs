//! The boundary between the relay and where events go. The relay decodes,
//! routes and keeps the books; a sink only sends, reports what was
//! acknowledged or failed, and closes. Two sinks: Kafka (`kafka.rs`,
//! librdkafka) and RabbitMQ (`rabbitmq.rs`, AMQP 0-9-1 with publisher
//! confirms). `outbox.sink` chooses.
//!
//! A sink runs its own threads (librdkafka's, the AMQP client's runtime);
//! the relay calls it from the worker's thread only, and it never calls
//! Postgres.

use std::time::Duration;

use outbox_core::confirm::TxnSeq;

pub mod kafka;
pub mod rabbitmq;

/// One event as the sink sends it. `id`, `type` and `aggregatetype` travel
/// as headers (Kafka) or properties and headers (AMQP), with the event's own
/// headers after them.
pub struct OutEvent<'a> {
    pub seq: TxnSeq,
    pub id: &'a [u8; 16],
    /// The aggregate id: Kafka's message key (None: a null key, which only
    /// an adopted table's row can have).
    pub key: Option<&'a str>,
    /// The message's value: the payload, or with CloudEvents structured
    /// mode the event in the JSON event format (None: a null value, a
    /// tombstone).
    pub value: Option<&'a [u8]>,
    /// The event's payload, as the event carries it.
    pub payload: Option<&'a [u8]>,
    /// The relay's own `id`, `type` and `aggregatetype` go first (outbox's
    /// events); false for an adopted table's row, whose `headers` are the
    /// router's, `id` included.
    pub own_headers: bool,
    /// An explicit Kafka partition (an adopted table's partition placement).
    pub partition: Option<i32>,
    pub event_type: &'a str,
    pub aggregate_type: &'a str,
    /// The message's headers besides the relay's own (`id`, `type`,
    /// `aggregatetype`): the event's, then CloudEvents' attributes if on.
    pub headers: &'a [(&'a str, &'a str)],
    /// The event's own headers.
    pub event_headers: &'a [(&'a str, &'a str)],
    /// A Kafka topic, or an AMQP routing key.
    pub destination: &'a str,
    /// The message's timestamp, µs since 2000-01-01: the commit time, or an
    /// adopted table's timestamp column.
    pub timestamp: i64,
    /// The message's content type when it is to be said (CloudEvents): the
    /// Kafka `content-type` header, the AMQP `content_type` property (which
    /// is `application/json` otherwise).
    pub content_type: Option<&'a str>,
}

/// One acknowledgement or failure.
pub struct Report {
    pub seq: TxnSeq,
    /// Key + value bytes of the delivered message.
    pub bytes: u64,
    pub error: Option<Rejected>,
}

/// Why the sink did not take an event.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// What the sink said, for the log, the status and the dead letter.
    pub reason: String,
    pub destination: String,
    pub event_id: String,
    /// Retrying cannot fix it (`outbox.on_rejected_event` decides).
    pub permanent: bool,
    /// Kafka refused the whole batch the event was sent in: which event
    /// was at fault is not known (see `kafka_errors::is_batch_rejection`).
    pub batch: bool,
    /// The message as the sink had it, when it can give it back: the relay
    /// dead-letters it from this (the decoded event is gone by then).
    pub returned: Option<Box<Returned>>,
    /// The sink lost its connection: not this event's fault, so a restart
    /// for it is not counted against the event (see `outbox_core::retry`).
    pub connection: bool,
}

/// A message given back by the sink: the parts the relay handed it.
#[derive(Debug, Clone, Default)]
pub struct Returned {
    pub key: Option<String>,
    pub value: Option<Vec<u8>>,
    /// The headers as sent, `id`, `type` and `aggregatetype` included.
    pub headers: Vec<(String, String)>,
    /// A row of an adopted table (its headers are the router's).
    pub adopted: bool,
}

impl Returned {
    /// The event's parts as the relay hands them to a sink: `id`, `type`
    /// and `aggregatetype` first, then the event's own headers.
    pub fn of(ev: &OutEvent<'_>, id: &str) -> Returned {
        let mut headers = Vec::with_capacity(3 + ev.headers.len());
        if ev.own_headers {
            headers.extend([("id", id), ("type", ev.event_type), ("aggregatetype", ev.aggregate_type)].map(|(k, v)| (k.to_owned(), v.to_owned())));
        }
        headers.extend(ev.event_headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        // The event as it was before CloudEvents: a dead letter keeps (and
        // re-publishing sends) the event, not its form on the wire.
        Returned {
            key: ev.key.map(str::to_owned),
            value: ev.payload.map(<[u8]>::to_vec),
            headers,
            adopted: !ev.own_headers,
        }
    }
}

/// Waits for a sink's request on another thread, in 100 ms steps that call
/// `interrupts`; None when the request ended without an answer.
pub fn wait_serving<T>(rx: std::sync::mpsc::Receiver<T>, interrupts: &mut dyn FnMut()) -> Option<T> {
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => return Some(r),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => interrupts(),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// A destination could not be checked or used.
pub enum DestinationError {
    /// Worth asking again (the sink is unreachable): never skipped.
    Unreachable(String),
    /// Will not work until an operator acts (a missing topic or exchange).
    Missing(String),
}

pub trait Sink {
    /// `Kafka` or `RabbitMQ`, for messages.
    fn name(&self) -> &'static str;

    /// Makes sure `destination` can take events (a Kafka topic exists or is
    /// created); returns the largest message it takes, when known, so an
    /// event too large is refused before anything after it is sent.
    /// `interrupts` is called at least every 100 ms while it waits.
    fn prepare(&mut self, destination: &str, interrupts: &mut dyn FnMut()) -> Result<Option<usize>, DestinationError>;

    /// Hands one event over. While the sink has no room, it serves its
    /// reports into `on_full` (and interrupts through it) until it has.
    fn send(&mut self, ev: &OutEvent<'_>, on_full: &mut dyn FnMut(&mut Vec<Report>)) -> Result<(), Rejected>;

    /// Moves reports into `out` (empty on entry), waiting up to `timeout`
    /// for the first one.
    fn poll_into(&mut self, timeout: Duration, out: &mut Vec<Report>);

    /// Ends the sink's threads, waiting at most `limit`; how long it took,
    /// or None if it did not finish in time.
    fn close(self: Box<Self>, limit: Duration) -> Option<Duration>;

    /// A descriptor that becomes readable when reports wait to be polled,
    /// open as long as the sink: the worker sleeps on it instead of polling
    /// every millisecond. None: the worker polls.
    fn wake_fd(&self) -> Option<i32> {
        None
    }
}

/// Threads a sink starts inherit the creating thread's signal mask;
/// Postgres' signals must only ever reach the worker's own thread, so they
/// are blocked while those threads are created (and restored even if `f`
/// panics: an ERROR unwinds through here as a panic).
pub fn with_signals_blocked<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(libc::sigset_t);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores the mask saved below, on this same thread.
            unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
        }
    }
    // SAFETY: sigfillset/pthread_sigmask on locally owned sigset_t values.
    let _restore = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        Restore(old)
    };
    f()
}

/// Blocks every signal on the calling thread, for good: for threads a sink
/// owns (tokio's `on_thread_start`), which must never run Postgres' handlers.
pub fn block_all_signals() {
    // SAFETY: sigfillset/pthread_sigmask on a locally owned sigset_t.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
    }
}
