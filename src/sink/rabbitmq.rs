//! The RabbitMQ sink: AMQP 0-9-1 through lapin, on a tokio runtime of its
//! own (one worker thread, plus lapin's I/O thread, all with signals
//! blocked), with publisher confirms as the acknowledgement.
//!
//! One channel. The relay's thread hands events to a bounded queue; one
//! task publishes them in that order (delivery tags in the order the server
//! sees them), within a bound on unconfirmed messages; another awaits their
//! confirms in the same order. Messages are persistent and published with
//! `mandatory`: an event no queue is bound for comes back (basic.return,
//! 312 NO_ROUTE) and is a rejection, as is a negative confirm; both follow
//! `outbox.on_rejected_event`. lapin hands a return to whichever confirm
//! completes next, which with a multiple ack may be a later message's, so a
//! positive confirm is reported only after a short hold during which a
//! return naming it (by message id, oldest first) would be seen. A lost
//! connection fails what was in flight as a connection failure (the relay
//! restarts the stream; not charged to the event); a channel the server
//! closes because of a message is charged to the event, like a transient
//! Kafka failure.
//!
//! RabbitMQ promises that messages published on one channel reach each
//! queue in publish order, and that a confirm means the message is on disk
//! in every queue it was routed to (persistent messages, durable queues).
//! It does not promise order across several consumers of a queue or after a
//! consumer requeues.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};


use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use outbox_core::{format_uuid_into, time};

use super::{block_all_signals, wait_serving, with_signals_blocked, DestinationError, OutEvent, Rejected, Report, Returned, Sink};

/// Events handed over and not yet published (the relay's side of the queue).
const QUEUE: usize = 10_000;
/// Unconfirmed messages at most, in KiB of body (each at least 1).
const UNCONFIRMED_KIB: usize = 32 * 1024;
/// How long a positive confirm is held for a return that names it: lapin
/// resolves the confirms of one multiple ack in one loop on its I/O thread,
/// microseconds long; this covers that loop being preempted.
const RETURN_GRACE: Duration = Duration::from_millis(2);
/// Acknowledged messages kept for a return that comes later still.
const RECENT: usize = 1024;
/// Bound on connecting and on each request to the server.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);

/// A message on its way to the publishing task.
struct Outgoing {
    kept: Kept,
    routing_key: ShortString,
    body: Vec<u8>,
    props: BasicProperties,
}

/// A message until it is reported: its copy, for a dead letter.
struct Kept {
    seq: u64,
    id: String,
    destination: String,
    parts: Returned,
    bytes: u64,
}

/// The unconfirmed messages, by publish number, and the reports for the
/// relay's thread.
#[derive(Default)]
struct Shared {
    reports: Mutex<Vec<Report>>,
    ready: Condvar,
    in_flight: Mutex<BTreeMap<u64, (Kept, Option<OwnedSemaphorePermit>)>>,
    /// The last acknowledged messages (see `returned`).
    recent: Mutex<VecDeque<Kept>>,
}

impl Shared {
    /// Reports message `n` once: acknowledged, or failed with `why`.
    fn report(&self, n: u64, why: Option<(String, bool, bool)>) {
        let Some((k, _permit)) = self.in_flight.lock().ok().and_then(|mut f| f.remove(&n)) else { return };
        if why.is_none() {
            let report = Report { seq: k.seq, bytes: k.bytes, error: None };
            if let Ok(mut r) = self.recent.lock() {
                if r.len() >= RECENT {
                    r.pop_front();
                }
                r.push_back(k);
            }
            self.push(report);
            return;
        }
        self.push(Self::failed(k, why));
    }

    fn failed(k: Kept, why: Option<(String, bool, bool)>) -> Report {
        let error = why.map(|(reason, permanent, connection)| Rejected {
            reason,
            destination: k.destination,
            event_id: k.id,
            permanent,
            batch: false,
            returned: Some(Box::new(k.parts)),
            connection,
        });
        Report { seq: k.seq, bytes: 0, error }
    }

    fn push(&self, r: Report) {
        if let Ok(mut v) = self.reports.lock() {
            v.push(r);
        }
        self.ready.notify_one();
    }

    /// The oldest unreported message with this event id.
    fn by_id(&self, id: &str) -> Option<u64> {
        let f = self.in_flight.lock().ok()?;
        f.iter().find(|(_, (k, _))| k.id == id).map(|(n, _)| *n)
    }
}

pub struct RabbitSink {
    rt: tokio::runtime::Runtime,
    conn: Arc<Connection>,
    tx: mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    exchange: String,
    declare: bool,
    exchange_ready: bool,
    url_shown: String,
}

/// A connection failure, for the relay's status.
pub struct ConnectError(pub String);

/// Runs `fut` on the sink's runtime while the calling thread waits in
/// 100 ms steps, serving `interrupts`; None if it did not finish in `limit`.
fn wait_for<T: Send + 'static>(
    rt: &tokio::runtime::Runtime,
    limit: Duration,
    fut: impl Future<Output = T> + Send + 'static,
    interrupts: &mut dyn FnMut(),
) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        if let Ok(v) = tokio::time::timeout(limit, fut).await {
            let _ = tx.send(v);
        }
    });
    wait_serving(rx, interrupts)
}

impl RabbitSink {
    /// Connects, opens the channel and turns on publisher confirms, within
    /// 10 s, serving `interrupts`; the relay retries a failure.
    pub fn connect(url: &str, exchange: String, declare: bool, interrupts: &mut dyn FnMut()) -> Result<Self, ConnectError> {
        let shown = outbox_core::amqp::redact(url);
        let fail = |e: String| ConnectError(format!("could not connect to RabbitMQ at {shown}: {e}"));
        if exchange.len() > 255 {
            return Err(fail(format!("outbox.amqp_exchange is {} bytes, AMQP allows 255", exchange.len())));
        }
        // Every thread of the runtime, however it is started (lapin's I/O
        // thread and the blocking pool are started from them), keeps
        // Postgres' signals away.
        let rt = with_signals_blocked(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(2)
                .thread_name("outbox-amqp")
                .on_thread_start(block_all_signals)
                .enable_all()
                .build()
        })
        .map_err(|e| fail(e.to_string()))?;
        let lrt = async_rs::Runtime::tokio_with_handle(rt.handle().clone());
        let props = ConnectionProperties::default().with_connection_name("outbox relay".into());
        let owned_url = url.to_owned();
        let opened = wait_for(
            &rt,
            REQUEST_LIMIT,
            async move {
                let conn = Connection::connect_with_runtime(&owned_url, props, lrt).await.map_err(|e| e.to_string())?;
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, channel))
            },
            interrupts,
        );
        let (conn, channel) = match opened {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                rt.shutdown_timeout(Duration::from_secs(1));
                return Err(fail(e));
            }
            None => {
                rt.shutdown_timeout(Duration::from_secs(1));
                return Err(fail(format!("no answer within {} s", REQUEST_LIMIT.as_secs())));
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let (ctx, crx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared::default());
        let permits = Arc::new(Semaphore::new(UNCONFIRMED_KIB));
        rt.spawn(publish_loop(channel, exchange.clone(), rx, ctx, Arc::clone(&shared), permits));
        rt.spawn(confirm_loop(crx, Arc::clone(&shared)));
        Ok(RabbitSink { rt, conn: Arc::new(conn), tx, shared, exchange, declare, exchange_ready: false, url_shown: shown })
    }

    /// Declares the exchange (durable, topic) or, with declaring off,
    /// checks that it exists, on a channel of its own (a failed check
    /// closes the channel it ran on).
    fn check_exchange(&mut self, interrupts: &mut dyn FnMut()) -> Result<(), DestinationError> {
        let (name, declare, url) = (self.exchange.clone(), self.declare, self.url_shown.clone());
        let conn = Arc::clone(&self.conn);
        let checked = wait_for(
            &self.rt,
            REQUEST_LIMIT,
            async move {
                let probe = conn.create_channel().await?;
                let opts = ExchangeDeclareOptions { passive: !declare, durable: true, ..Default::default() };
                let res = probe.exchange_declare(name.as_str().into(), ExchangeKind::Topic, opts, FieldTable::default()).await;
                let _ = probe.close(200, "OK".into()).await;
                res
            },
            interrupts,
        );
        let name = &self.exchange;
        match checked {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => {
                let text = e.to_string();
                // Refusals about the exchange itself; anything else (the
                // connection, a timeout) is worth asking again.
                let refused = ["NOT_FOUND", "NOT-FOUND", "ACCESS_REFUSED", "ACCESS-REFUSED", "PRECONDITION_FAILED", "PRECONDITION-FAILED"]
                    .iter()
                    .any(|c| text.contains(c));
                if !refused {
                    Err(DestinationError::Unreachable(format!("checking exchange \"{name}\" on RabbitMQ at {url}: {text}")))
                } else if declare {
                    Err(DestinationError::Missing(format!(
                        "could not declare exchange \"{name}\" (durable, topic) on RabbitMQ at {url}: {text}"
                    )))
                } else {
                    Err(DestinationError::Missing(format!(
                        "exchange \"{name}\" does not exist on RabbitMQ at {url} and outbox.amqp_exchange_declare is off ({text})"
                    )))
                }
            }
            None => Err(DestinationError::Unreachable(format!(
                "checking exchange \"{name}\" on RabbitMQ at {url}: no answer within {} s",
                REQUEST_LIMIT.as_secs()
            ))),
        }
    }
}

/// Publishes in the order handed over, within the bound on unconfirmed
/// messages, and passes each confirm on, in the same order.
async fn publish_loop(
    channel: Channel,
    exchange: String,
    mut rx: mpsc::Receiver<Outgoing>,
    confirms: mpsc::UnboundedSender<(u64, lapin::Result<PublisherConfirm>)>,
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
) {
    let exchange = ShortString::from(exchange);
    let mut n = 0u64;
    while let Some(m) = rx.recv().await {
        n += 1;
        let kib = (m.body.len() / 1024).clamp(1, UNCONFIRMED_KIB) as u32;
        let permit = Arc::clone(&permits).acquire_many_owned(kib).await.ok();
        if let Ok(mut f) = shared.in_flight.lock() {
            f.insert(n, (m.kept, permit));
        }
        let opts = BasicPublishOptions { mandatory: true, immediate: false };
        let published = channel.basic_publish(exchange.clone(), m.routing_key, opts, &m.body, m.props).await;
        let _ = confirms.send((n, published));
    }
}

/// A failure of the whole channel or connection: charged to no event when
/// the connection went (the server stopped, the network), to the event when
/// the server closed the channel over a message (a soft error).
fn failure(e: &lapin::Error) -> (String, bool, bool) {
    let connection = !e.is_amqp_soft_error();
    (format!("RabbitMQ: {e}"), false, connection)
}

/// Awaits the confirms in publish order. A return (with its confirm, or a
/// later one's) fails the message it names; a positive confirm is held for
/// RETURN_GRACE first, so a return attached to a later confirm of the same
/// multiple ack is seen before its message is reported acknowledged.
async fn confirm_loop(mut rx: mpsc::UnboundedReceiver<(u64, lapin::Result<PublisherConfirm>)>, shared: Arc<Shared>) {
    let mut queue: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    let mut held: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut open = true;
    loop {
        let release_at = held.front().map(|(_, at)| tokio::time::Instant::from_std(*at + RETURN_GRACE));
        tokio::select! {
            biased;
            outcome = async { match queue.front_mut() { Some((_, c)) => c.await, None => std::future::pending().await } }, if !queue.is_empty() => {
                let Some((n, _)) = queue.pop_front() else { continue };
                match outcome {
                    Ok(Confirmation::Ack(ret)) => {
                        if let Some(ret) = ret {
                            returned(&shared, &ret);
                        }
                        held.push_back((n, crate::clock::now()));
                    }
                    Ok(Confirmation::Nack(ret)) => {
                        if let Some(ret) = ret {
                            returned(&shared, &ret);
                        }
                        let reason = "RabbitMQ refused it (basic.nack: the server could not take responsibility for the message)";
                        shared.report(n, Some((reason.to_owned(), true, false)));
                    }
                    Ok(Confirmation::NotRequested) => held.push_back((n, crate::clock::now())),
                    Err(e) => shared.report(n, Some(failure(&e))),
                }
            }
            item = rx.recv(), if open => match item {
                Some((n, Ok(c))) => queue.push_back((n, c)),
                Some((n, Err(e))) => shared.report(n, Some(failure(&e))),
                None => open = false,
            },
            _ = async { match release_at { Some(t) => tokio::time::sleep_until(t).await, None => std::future::pending().await } }, if release_at.is_some() => {
                let now = crate::clock::now();
                while held.front().is_some_and(|(_, at)| now >= *at + RETURN_GRACE) {
                    if let Some((n, _)) = held.pop_front() {
                        shared.report(n, None);
                    }
                }
            }
            else => break,
        }
    }
    // Closed: what is still held was confirmed.
    for (n, _) in held {
        shared.report(n, None);
    }
}

/// A basic.return: fails the oldest unreported message with its id (the
/// confirm it came with may be another message's).
///
/// Should lapin's loop have been held up past RETURN_GRACE, the message was
/// already reported acknowledged: it is found among the recent ones and
/// reported failed after all (dead-lettered, or the relay stops), so it is
/// never dropped in silence.
fn returned(shared: &Shared, ret: &lapin::message::BasicReturnMessage) {
    let Some(id) = ret.delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()) else { return };
    let mut reason = format!(
        "unroutable: RabbitMQ returned it ({} {}): no queue is bound to the exchange for routing key \"{}\"",
        ret.reply_code,
        ret.reply_text.as_str(),
        ret.delivery.routing_key.as_str()
    );
    if let Some(n) = shared.by_id(&id) {
        shared.report(n, Some((reason, true, false)));
        return;
    }
    let late = shared.recent.lock().ok().and_then(|mut r| r.iter().position(|k| k.id == id).and_then(|i| r.remove(i)));
    if let Some(k) = late {
        reason.push_str(" (the return came after its confirm had been counted)");
        shared.push(Shared::failed(k, Some((reason, true, false))));
    }
}

/// The longest prefix of `s` within `max` bytes, cut at a character boundary.
fn short(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Sink for RabbitSink {
    fn name(&self) -> &'static str {
        "RabbitMQ"
    }

    fn prepare(&mut self, _routing_key: &str, interrupts: &mut dyn FnMut()) -> Result<Option<usize>, DestinationError> {
        if !self.conn.status().connected() {
            // Sending then fails as a connection failure: the stream restarts
            // and waits for the server, rather than asking here forever.
            return Ok(None);
        }
        if !self.exchange_ready {
            self.check_exchange(interrupts)?;
            self.exchange_ready = true;
        }
        // The server's max_message_size is not asked for (AMQP cannot);
        // a message above it closes the channel, which is charged to the
        // event and, repeated, rejects it (outbox_core::retry).
        Ok(None)
    }

    fn send(&mut self, ev: &OutEvent<'_>, on_full: &mut dyn FnMut(&mut Vec<Report>)) -> Result<(), Rejected> {
        let mut id_buf = [0u8; 36];
        let id = format_uuid_into(ev.id, &mut id_buf).to_owned();
        let refuse = |reason: String, connection: bool| Rejected {
            reason,
            destination: ev.destination.to_owned(),
            event_id: id.clone(),
            permanent: !connection,
            batch: false,
            returned: None,
            connection,
        };
        for (k, _) in ev.headers {
            // AMQP field names are short strings (lapin panics past 255
            // bytes); CC and BCC are routing instructions to RabbitMQ.
            if k.len() > 255 {
                return Err(refuse(format!("header name \"{}…\" is longer than the 255 bytes AMQP allows", short(k, 40)), false));
            }
            if k.eq_ignore_ascii_case("CC") || k.eq_ignore_ascii_case("BCC") || *k == "aggregateid" {
                return Err(refuse(format!("header \"{k}\" cannot be sent to RabbitMQ: the relay or the server gives it a meaning"), false));
            }
        }
        let mut headers = FieldTable::default();
        let own = [("id", id.as_str()), ("type", ev.event_type), ("aggregatetype", ev.aggregate_type)];
        let own = own.iter().copied().filter(|_| ev.own_headers);
        for (k, v) in own.chain(ev.key.map(|k| ("aggregateid", k))).chain(ev.headers.iter().copied()) {
            headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_type(short(ev.event_type, 255).into())
            .with_app_id("outbox".into())
            .with_timestamp(time::pg_to_unix_micros(ev.timestamp).div_euclid(1_000_000).max(0) as u64)
            .with_content_type(ev.content_type.unwrap_or("application/json").into())
            .with_headers(headers);
        let mut m = Outgoing {
            kept: Kept {
                seq: ev.seq,
                id: id.clone(),
                destination: ev.destination.to_owned(),
                // The key travels in `Returned::key`, not as `aggregateid`.
                parts: Returned::of(ev, &id),
                bytes: (ev.key.map_or(0, str::len) + ev.value.map_or(0, <[u8]>::len)) as u64,
            },
            routing_key: short(ev.destination, 255).into(),
            // AMQP has no null body: a tombstone is an empty one.
            body: ev.value.unwrap_or_default().to_vec(),
            props,
        };
        let mut reports = Vec::new();
        loop {
            match self.tx.try_send(m) {
                Ok(()) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(back)) => {
                    m = back;
                    self.poll_into(Duration::from_millis(100), &mut reports);
                    on_full(&mut reports);
                    reports.clear();
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err(refuse("RabbitMQ publishing stopped (the connection was lost)".into(), true))
                }
            }
        }
    }

    fn poll_into(&mut self, timeout: Duration, out: &mut Vec<Report>) {
        let Ok(mut v) = self.shared.reports.lock() else { return };
        if v.is_empty() && !timeout.is_zero() {
            match self.shared.ready.wait_timeout(v, timeout) {
                Ok((g, _)) => v = g,
                Err(_) => return,
            }
        }
        std::mem::swap(&mut *v, out);
    }

    fn close(self: Box<Self>, limit: Duration) -> Option<Duration> {
        let start = crate::clock::now();
        let RabbitSink { rt, conn, tx, .. } = *self;
        drop(tx);
        let closing = Arc::clone(&conn);
        let _ = wait_for(&rt, limit / 2, async move { closing.close(200, "OK".into()).await }, &mut || {});
        // Dropping the connection ends lapin's I/O thread; joined here,
        // within the bound, so it does not outlive the worker.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let joined = with_signals_blocked(|| {
            std::thread::Builder::new().name("outbox-amqp-close".into()).spawn(move || {
                // A request the worker stopped waiting for may still hold
                // the connection for a moment.
                let mut conn = conn;
                loop {
                    match Arc::try_unwrap(conn) {
                        Ok(c) => {
                            let _ = c.run();
                            break;
                        }
                        Err(again) if start.elapsed() < limit => {
                            conn = again;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => break,
                    }
                }
                let _ = done_tx.send(());
            })
        });
        let left = limit.saturating_sub(start.elapsed());
        let io_done = joined.is_ok() && done_rx.recv_timeout(left).is_ok();
        rt.shutdown_timeout(limit.saturating_sub(start.elapsed()));
        let took = start.elapsed();
        (io_done && took <= limit + Duration::from_millis(50)).then_some(took)
    }
}
