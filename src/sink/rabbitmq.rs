//! The RabbitMQ sink: AMQP 0-9-1 through lapin, on a tokio runtime of its
//! own (one worker thread, plus lapin's I/O thread), with publisher
//! confirms as the acknowledgement.
//!
//! One channel, one publishing task: the relay's thread hands events to a
//! bounded queue, the task publishes them in that order (delivery tags in
//! the order the server sees them) and a task per message awaits its
//! confirm. Messages are persistent and published with `mandatory`: an
//! event no queue is bound for comes back (basic.return, 312 NO_ROUTE) and
//! is a rejection, as is a negative confirm; both follow
//! `outbox.on_rejected_event`. A lost connection fails what was in flight
//! as transient (the relay restarts the stream; not charged to the event).
//!
//! RabbitMQ promises that messages published on one channel are routed in
//! publish order, and that a confirm means the message is on disk in every
//! queue it was routed to. It does not promise order between channels, nor
//! after a consumer requeues; the relay uses one channel, so per-key order
//! holds at the exchange.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};

use outbox_core::{format_uuid_into, time};

use super::{with_signals_blocked, DestinationError, OutEvent, Rejected, Report, Returned, Sink};

/// Events handed over and not yet published (the relay's side of the queue).
const QUEUE: usize = 10_000;

/// A message on its way to the publishing task.
struct Outgoing {
    seq: u64,
    id: String,
    routing_key: ShortString,
    body: Vec<u8>,
    props: BasicProperties,
    destination: String,
    returned: Returned,
}

/// What the confirm tasks hand back, and a condition to wait on.
#[derive(Default)]
struct Shared {
    reports: Mutex<Vec<Report>>,
    ready: Condvar,
    /// Messages not yet confirmed, by id (their copy for a dead letter).
    in_flight: Mutex<HashMap<String, Kept>>,
}

impl Shared {
    fn push(&self, r: Report) {
        if let Ok(mut v) = self.reports.lock() {
            v.push(r);
        }
        self.ready.notify_one();
    }
}

pub struct RabbitSink {
    rt: tokio::runtime::Runtime,
    conn: Connection,
    channel: Channel,
    tx: tokio::sync::mpsc::Sender<Outgoing>,
    shared: Arc<Shared>,
    exchange: String,
    declare: bool,
    exchange_ready: bool,
    url_shown: String,
}

/// A connection failure, for the relay's status.
pub struct ConnectError(pub String);

impl RabbitSink {
    /// Connects, opens the channel and turns on publisher confirms. Bounded
    /// by 10 s; the relay retries a failure.
    pub fn connect(url: &str, exchange: String, declare: bool) -> Result<Self, ConnectError> {
        let shown = outbox_core::amqp::redact(url);
        let fail = |e: String| ConnectError(format!("could not connect to RabbitMQ at {shown}: {e}"));
        if exchange.len() > 255 {
            return Err(fail(format!("outbox.amqp_exchange is {} bytes, AMQP allows 255", exchange.len())));
        }
        let rt = with_signals_blocked(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .max_blocking_threads(2)
                .thread_name("outbox-amqp")
                .enable_all()
                .build()
        })
        .map_err(|e| fail(e.to_string()))?;
        let lrt = async_rs::Runtime::tokio_with_handle(rt.handle().clone());
        let props = ConnectionProperties::default().with_connection_name("outbox relay".into());
        // lapin's I/O thread starts here: signals stay with the worker.
        let (conn, channel) = with_signals_blocked(|| {
            rt.block_on(async {
                let conn = tokio::time::timeout(Duration::from_secs(10), Connection::connect_with_runtime(url, props, lrt))
                    .await
                    .map_err(|_| "no answer within 10 s".to_owned())?
                    .map_err(|e| e.to_string())?;
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(|e| e.to_string())?;
                Ok::<_, String>((conn, channel))
            })
        })
        .map_err(fail)?;
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
        let shared = Arc::new(Shared::default());
        rt.spawn(publish_loop(channel.clone(), exchange.clone(), rx, Arc::clone(&shared)));
        Ok(RabbitSink { rt, conn, channel, tx, shared, exchange, declare, exchange_ready: false, url_shown: shown })
    }

    /// Declares the exchange (durable, topic) or, with declaring off,
    /// checks that it exists, on a channel of its own (a failed check
    /// closes the channel it ran on).
    fn check_exchange(&mut self) -> Result<(), DestinationError> {
        let (name, declare, url) = (self.exchange.clone(), self.declare, self.url_shown.clone());
        let conn = &self.conn;
        self.rt.block_on(async move {
            let probe = conn
                .create_channel()
                .await
                .map_err(|e| DestinationError::Unreachable(format!("RabbitMQ at {url}: could not open a channel: {e}")))?;
            let opts = ExchangeDeclareOptions { passive: !declare, durable: true, ..Default::default() };
            let res = tokio::time::timeout(
                Duration::from_secs(10),
                probe.exchange_declare(name.as_str().into(), ExchangeKind::Topic, opts, FieldTable::default()),
            )
            .await;
            let _ = probe.close(200, "OK".into()).await;
            match res {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) if e.to_string().contains("NOT-FOUND") || e.to_string().contains("NOT_FOUND") => {
                    Err(DestinationError::Missing(format!(
                        "exchange \"{name}\" does not exist on RabbitMQ at {url} and outbox.amqp_exchange_declare is off"
                    )))
                }
                Ok(Err(e)) if declare => Err(DestinationError::Missing(format!(
                    "could not declare exchange \"{name}\" (durable, topic) on RabbitMQ at {url}: {e}"
                ))),
                Ok(Err(e)) => Err(DestinationError::Unreachable(format!("checking exchange \"{name}\": {e}"))),
                Err(_) => Err(DestinationError::Unreachable(format!("checking exchange \"{name}\": no answer within 10 s"))),
            }
        })
    }
}

/// Publishes in the order handed over; a task per message awaits its confirm.
async fn publish_loop(channel: Channel, exchange: String, mut rx: tokio::sync::mpsc::Receiver<Outgoing>, shared: Arc<Shared>) {
    let exchange = ShortString::from(exchange);
    while let Some(m) = rx.recv().await {
        if let Ok(mut f) = shared.in_flight.lock() {
            f.insert(m.id.clone(), Kept { seq: m.seq, destination: m.destination, parts: m.returned });
        }
        let opts = BasicPublishOptions { mandatory: true, immediate: false };
        let published = channel.basic_publish(exchange.clone(), m.routing_key, opts, &m.body, m.props).await;
        let bytes = m.body.len() as u64;
        match published {
            Ok(confirm) => {
                let shared = Arc::clone(&shared);
                let (seq, id) = (m.seq, m.id);
                tokio::spawn(async move {
                    let outcome = confirm.await;
                    settle(&shared, seq, &id, bytes, outcome);
                });
            }
            Err(e) => settle(&shared, m.seq, &m.id, bytes, Err(e)),
        }
    }
}

/// One confirm's outcome into reports. A return names its message by id:
/// with a multiple ack it may come attached to another message's confirm.
fn settle(shared: &Shared, seq: u64, id: &str, bytes: u64, outcome: lapin::Result<Confirmation>) {
    let take = |id: &str| shared.in_flight.lock().ok().and_then(|mut f| f.remove(id));
    let fail = |seq: u64, id: &str, reason: String, permanent: bool, kept: Option<Kept>| Rejected {
        reason,
        destination: kept.as_ref().map(|k| k.destination.clone()).unwrap_or_default(),
        event_id: id.to_owned(),
        permanent,
        batch: false,
        returned: kept.map(|k| Box::new(k.parts)),
        connection: false,
    }
    .into_report(seq);
    match outcome {
        Ok(Confirmation::Ack(Some(ret))) => {
            let rid = ret.delivery.properties.message_id().as_ref().map(|s| s.as_str().to_owned()).unwrap_or_else(|| id.to_owned());
            if let Some(k) = take(&rid) {
                let reason = format!(
                    "unroutable: RabbitMQ returned it ({} {}): no queue is bound to the exchange for routing key \"{}\"",
                    ret.reply_code,
                    ret.reply_text.as_str(),
                    ret.delivery.routing_key.as_str()
                );
                shared.push(fail(k.seq, &rid, reason, true, Some(k)));
            }
            if rid != id && take(id).is_some() {
                shared.push(Report { seq, bytes, error: None });
            }
        }
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => {
            if take(id).is_some() {
                shared.push(Report { seq, bytes, error: None });
            }
        }
        Ok(Confirmation::Nack(_)) => {
            let r = take(id);
            let reason = "RabbitMQ refused it (basic.nack: the server could not take responsibility for the message)".to_owned();
            shared.push(fail(seq, id, reason, true, r));
        }
        Err(e) => {
            let r = take(id);
            let mut rep = fail(seq, id, format!("RabbitMQ connection lost: {e}"), false, r);
            if let Some(rej) = rep.error.as_mut() {
                rej.connection = true;
            }
            shared.push(rep);
        }
    }
}

/// A message until it is confirmed: its copy, for a dead letter.
struct Kept {
    seq: u64,
    destination: String,
    parts: Returned,
}

impl Rejected {
    fn into_report(self, seq: u64) -> Report {
        Report { seq, bytes: 0, error: Some(self) }
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

    fn prepare(&mut self, _routing_key: &str, _interrupts: &mut dyn FnMut()) -> Result<Option<usize>, DestinationError> {
        if !self.exchange_ready {
            self.check_exchange()?;
            self.exchange_ready = true;
        }
        // RabbitMQ's max_message_size (128 MiB by default) is not asked
        // for; outbox.max_event_bytes is far below it by default.
        Ok(None)
    }

    fn send(&mut self, ev: &OutEvent<'_>, on_full: &mut dyn FnMut(&mut Vec<Report>)) -> Result<(), Rejected> {
        let mut id_buf = [0u8; 36];
        let id = format_uuid_into(ev.id, &mut id_buf).to_owned();
        let refuse = |reason: String| Rejected {
            reason,
            destination: ev.destination.to_owned(),
            event_id: id.clone(),
            permanent: true,
            batch: false,
            returned: None,
            connection: false,
        };
        // AMQP field names and short strings hold at most 255 bytes (lapin
        // panics past that): refused here, with the reason.
        if let Some((k, _)) = ev.headers.iter().find(|(k, _)| k.len() > 255) {
            return Err(refuse(format!("header name \"{}…\" is longer than the 255 bytes AMQP allows", short(k, 40))));
        }
        let mut headers = FieldTable::default();
        let mut kept = Vec::with_capacity(4 + ev.headers.len());
        for (k, v) in [("id", id.as_str()), ("type", ev.event_type), ("aggregatetype", ev.aggregate_type), ("aggregateid", ev.key)]
            .into_iter()
            .chain(ev.headers.iter().copied())
        {
            headers.insert(k.into(), AMQPValue::LongString(LongString::from(v)));
            if k != "aggregateid" {
                // The key travels in `Returned::key`.
                kept.push((k.to_owned(), v.to_owned()));
            }
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.as_str().into())
            .with_type(short(ev.event_type, 255).into())
            .with_app_id("outbox".into())
            .with_timestamp(time::pg_to_unix_micros(ev.commit_time).div_euclid(1_000_000).max(0) as u64)
            .with_content_type("application/json".into())
            .with_headers(headers);
        let mut m = Outgoing {
            seq: ev.seq,
            id: id.clone(),
            routing_key: ev.destination.into(),
            body: ev.value.as_bytes().to_vec(),
            props,
            destination: ev.destination.to_owned(),
            returned: Returned { key: ev.key.to_owned(), value: ev.value.to_owned(), headers: kept },
        };
        let mut reports = Vec::new();
        loop {
            match self.tx.try_send(m) {
                Ok(()) => return Ok(()),
                Err(tokio::sync::mpsc::error::TrySendError::Full(back)) => {
                    m = back;
                    self.poll_into(Duration::from_millis(100), &mut reports);
                    on_full(&mut reports);
                    reports.clear();
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    return Err(Rejected {
                        reason: "RabbitMQ publishing stopped (the connection was lost)".into(),
                        destination: ev.destination.to_owned(),
                        event_id: id,
                        permanent: false,
                        batch: false,
                        returned: None,
                        connection: true,
                    })
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
        let RabbitSink { rt, conn, channel, tx, .. } = *self;
        drop(tx);
        let half = limit / 2;
        let _ = rt.block_on(async {
            tokio::time::timeout(half, async {
                let _ = channel.close(200, "OK".into()).await;
                let _ = conn.close(200, "OK".into()).await;
            })
            .await
        });
        drop(channel);
        drop(conn);
        rt.shutdown_timeout(limit.saturating_sub(start.elapsed()));
        let took = start.elapsed();
        (took <= limit).then_some(took)
    }
}
