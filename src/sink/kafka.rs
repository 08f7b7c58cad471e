//! The Kafka sink: an rdkafka `BaseProducer` polled on the worker's own
//! thread, so delivery reports (and librdkafka's errors) are handled there
//! and never call Postgres from another thread.
//!
//! Settings that guarantee delivery and order are ours, not the user's:
//! idempotence, `acks=all`, and `message.timeout.ms=0` (a message never
//! expires: an expired message re-sent later would break per-key order).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext};
use rdkafka::Message;

use outbox_core::first_writes::FirstWrites;
use outbox_core::{format_uuid_into, time};

use super::{wait_serving, with_signals_blocked, DestinationError, OutEvent, Rejected, Report, Returned, Sink};

/// Properties the relay sets itself. The settings refuse them, under any
/// of their names, when set (`kafka_props::check`); they are applied last.
pub const FIXED: [(&str, &str); 6] = [
    ("enable.idempotence", "true"),
    // After a produce request fails for good, librdkafka raises a fatal
    // error instead of re-sending what followed under a new epoch, so the
    // broker's sequence check stops later requests for the partition (not
    // the first requests of a new producer: Kafka accepts those whatever
    // their sequence). The relay answers the fatal error (a transient
    // failure) by restarting the stream with a new producer.
    ("enable.gapless.guarantee", "true"),
    ("acks", "all"),
    ("message.timeout.ms", "0"),
    ("partitioner", "murmur2_random"),
    // A metadata request for one topic must never create it with the
    // broker's defaults: topics are created by the relay, as
    // outbox.topic_creation, topic_partitions and topic_replication_factor say.
    ("allow.auto.create.topics", "false"),
];

fn permanent(e: &KafkaError) -> bool {
    e.rdkafka_error_code().is_some_and(|c| outbox_core::kafka_errors::is_permanent(c as i32))
}

/// Kafka's error as the relay judges it.
fn rejected(e: &KafkaError, topic: &str, event_id: String, returned: Returned) -> Rejected {
    let code = e.rdkafka_error_code().map_or(0, |c| c as i32);
    Rejected {
        reason: e.to_string(),
        destination: topic.to_owned(),
        event_id,
        permanent: permanent(e),
        batch: outbox_core::kafka_errors::is_batch_rejection(code),
        returned: Some(Box::new(returned)),
        connection: false,
    }
}

pub struct Ctx {
    reports: Mutex<Vec<Report>>,
    /// The partitions this producer has not written to yet (see
    /// `outbox_core::first_writes`). Reports come on the worker's thread,
    /// in `poll`; the lock is never contended.
    first: Mutex<FirstWrites>,
}

impl ClientContext for Ctx {}

impl ProducerContext for Ctx {
    type DeliveryOpaque = usize;

    fn delivery(&self, r: &DeliveryResult<'_>, opaque: usize) {
        let seq = (opaque & !(CLOUDEVENTS_SENT | ADOPTED_SENT)) as u64;
        let (cloudevents, adopted) = (opaque & CLOUDEVENTS_SENT != 0, opaque & ADOPTED_SENT != 0);
        let (error, bytes) = match r {
            Ok(msg) => (None, (msg.key_len() + msg.payload_len()) as u64),
            Err((e, msg)) => {
                let (id, returned) = returned_of(msg, cloudevents, adopted);
                (Some(rejected(e, msg.topic(), id, returned)), 0)
            }
        };
        if let Ok(mut f) = self.first.lock() {
            if f.waiting() {
                f.reported(seq, error.is_none());
            }
        }
        if let Ok(mut v) = self.reports.lock() {
            v.push(Report { seq, bytes, error });
        }
    }
}

/// The opaque's top bit: the record was sent as a CloudEvent (the rest is
/// the event's sequence number, far below it).
const CLOUDEVENTS_SENT: usize = 1 << (usize::BITS - 1);
/// The opaque's next bit: the record is a row of an adopted table.
const ADOPTED_SENT: usize = 1 << (usize::BITS - 2);

/// The event as the relay sent it (see `send`), and its event id; a record
/// sent as a CloudEvent is given back as the event it carried (its payload,
/// its own headers), so that a dead letter keeps the event, not its form.
/// Events whose headers collide with CloudEvents' are never sent with it,
/// so the attribute headers and `content-type` are exactly the added ones.
fn returned_of<M: Message>(msg: &M, cloudevents: bool, adopted: bool) -> (String, Returned) {
    use outbox_core::cloudevents::{header_collides, payload_of_structured, KAFKA_CONTENT_TYPE, KAFKA_PREFIX, STRUCTURED_CONTENT_TYPE};
    use rdkafka::message::Headers;
    let text = |b: Option<&[u8]>| b.map(|v| String::from_utf8_lossy(v).into_owned()).unwrap_or_default();
    let mut r = Returned {
        key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
        value: msg.payload().map(<[u8]>::to_vec),
        headers: Vec::new(),
        adopted,
    };
    let mut id = String::new();
    let mut structured = false;
    if let Some(hs) = msg.headers() {
        for h in hs.iter() {
            let v = text(h.value);
            if h.key == "id" {
                id = v.clone();
            }
            if cloudevents && header_collides(h.key, KAFKA_PREFIX) {
                structured |= h.key == KAFKA_CONTENT_TYPE && v == STRUCTURED_CONTENT_TYPE;
                continue;
            }
            r.headers.push((h.key.to_owned(), v));
        }
    }
    if structured {
        let value = r.value.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
        if let Some(p) = payload_of_structured(&value) {
            r.value = Some(p.as_bytes().to_vec());
        }
    }
    (id, r)
}

/// What the relay knows of a topic it has checked.
#[derive(Clone, Copy)]
struct Topic {
    /// Its `max.message.bytes`, when it could be read and no compression
    /// is configured.
    limit: Option<usize>,
    /// Its number of partitions, as the metadata said when it was checked
    /// (0: not known).
    partitions: i32,
}

pub struct TopicCreation {
    pub enabled: bool,
    pub partitions: i32,
    pub replication_factor: i32,
}

type Admin = AdminClient<DefaultClientContext>;

pub struct KafkaSink {
    producer: BaseProducer<Ctx>,
    config: ClientConfig,
    /// One admin client for topic probes, creation and configs, made at
    /// first use, shared with the admin thread of a request in flight, and
    /// closed with the producer (see `close`).
    admin: Option<Arc<Admin>>,
    /// Topics known to exist (see `ensure_topic`).
    known_topics: HashMap<String, Topic>,
    /// The user configured compression: a record's size on the wire is
    /// then not known beforehand.
    compressed: bool,
    /// librdkafka writes a byte here when reports arrive (after `producer`,
    /// so it is closed after the producer is destroyed).
    wake: Option<WakePipe>,
}

/// A non-blocking pipe librdkafka writes to when its main queue (delivery
/// reports, errors) goes from served to not empty.
struct WakePipe {
    read: i32,
    write: i32,
}

impl WakePipe {
    fn attach(producer: &BaseProducer<Ctx>) -> Option<WakePipe> {
        let mut fds = [0i32; 2];
        // SAFETY: pipe2 fills `fds`; the queue handle from
        // rd_kafka_queue_get_main is released after the io event is set on
        // the queue itself (rd_kafka_q_t, alive as long as the client); the
        // payload is copied by librdkafka.
        unsafe {
            if libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) != 0 {
                return None;
            }
            let q = rdkafka::bindings::rd_kafka_queue_get_main(producer.client().native_ptr());
            if q.is_null() {
                libc::close(fds[0]);
                libc::close(fds[1]);
                return None;
            }
            rdkafka::bindings::rd_kafka_queue_io_event_enable(q, fds[1], b"r".as_ptr().cast(), 1);
            rdkafka::bindings::rd_kafka_queue_destroy(q);
        }
        Some(WakePipe { read: fds[0], write: fds[1] })
    }
}

impl Drop for WakePipe {
    fn drop(&mut self) {
        // SAFETY: our own descriptors, closed once; the producer that wrote
        // to `write` is destroyed before (field order in KafkaSink).
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}

impl KafkaSink {
    pub fn new(
        bootstrap: &str,
        user: &[(String, String)],
        max_event_bytes: usize,
        linger_ms: u32,
        one_per_request: bool,
    ) -> Result<(Self, Vec<String>), KafkaError> {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", linger_ms.to_string())
            // Room above the largest event for what CloudEvents adds.
            .set("message.max.bytes", (max_event_bytes + 16 * 1024).max(1_000_000).to_string())
            .set("client.id", "outbox-relay")
            .set("queue.buffering.max.messages", "20000");
        // Over the user's properties: while a refused batch is isolated,
        // each event in a request of its own, one request at a time (a
        // batch rejection then names the event really refused, see
        // kafka_errors::is_batch_rejection, and nothing behind it is in
        // flight to be written before it); and the local queue, which
        // bounds the worker's memory during a large transaction (a full
        // queue is waited out, never an error), at least twice the largest
        // event outbox.max_event_bytes allows, so an event never waits for
        // room that cannot exist (32 MiB at the least).
        let (overrides, overrode) = outbox_core::kafka_props::relay_overrides(user, queue_kbytes(max_event_bytes), one_per_request);
        let mut ignored = overrode;
        let canonical = outbox_core::kafka_props::canonical;
        for (k, v) in user {
            // A fixed property is refused by the settings already (kept as
            // a second line); an overridden one is left out under every
            // name, as the configuration is applied in no set order.
            let c = canonical(k);
            if FIXED.iter().any(|(f, _)| canonical(f) == c) {
                ignored.push(k.clone());
            } else if !overrides.iter().any(|(o, _)| canonical(o) == c) {
                config.set(k, v);
            }
        }
        for (k, v) in FIXED.iter().copied().chain(overrides.iter().map(|(k, v)| (*k, v.as_str()))) {
            config.set(k, v);
        }
        let producer = with_signals_blocked(|| {
            config.create_with_context::<Ctx, BaseProducer<Ctx>>(Ctx {
                reports: Mutex::new(Vec::new()),
                first: Mutex::new(FirstWrites::new()),
            })
        })?;
        let compressed = user
            .iter()
            .any(|(k, v)| outbox_core::kafka_props::canonical(k) == "compression.codec" && !v.eq_ignore_ascii_case("none"));
        let wake = WakePipe::attach(&producer);
        Ok((KafkaSink { producer, config, admin: None, known_topics: HashMap::new(), compressed, wake }, ignored))
    }

    /// Makes sure `topic` exists, creating it when creation is on, and
    /// returns its `max.message.bytes` when known. Returns the reason when
    /// it does not exist: `DestinationError::Unreachable` is worth retrying,
    /// `DestinationError::Missing` is not until an operator acts.
    ///
    /// The topic's size limit lets the relay refuse an event the broker
    /// would refuse before it is sent: a refusal by the broker comes back
    /// after later events of the partition may already be on their way
    /// (and written), which breaks order under `on_rejected_event = stop`.
    fn ensure_topic(
        &mut self,
        topic: &str,
        creation: &TopicCreation,
        mut interrupts: impl FnMut(),
    ) -> Result<Option<usize>, DestinationError> {
        if let Some(known) = self.known_topics.get(topic) {
            return Ok(known.limit);
        }
        let unreachable = |e: String| DestinationError::Unreachable(format!("could not read metadata of topic \"{topic}\": {e}"));
        // Probes go through the admin client, not the producer, so they
        // can run on the admin thread while the worker serves interrupts.
        let prober = self.admin().map_err(|e| unreachable(e.to_string()))?;
        let mut seen = probe_topic(&prober, topic, Duration::from_secs(2), &mut interrupts).map_err(unreachable)?;
        if seen == TopicSeen::Missing {
            if !creation.enabled {
                return Err(DestinationError::Missing(format!(
                    "topic \"{topic}\" does not exist and outbox.topic_creation is off"
                )));
            }
            Self::create_topic(&prober, topic, creation, &mut interrupts)?;
            // Produce only once the broker serves the new topic's metadata
            // with leaders: a young broker may fail a produce that races
            // the creation.
            let deadline = crate::clock::now() + Duration::from_secs(10);
            while crate::clock::now() < deadline {
                interrupts();
                let probe = probe_topic(&prober, topic, Duration::from_millis(500), &mut interrupts);
                if let Ok(s @ TopicSeen::Exists { leaders: true, .. }) = probe {
                    seen = s;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let limit = if self.compressed { None } else { Self::max_message_bytes(&prober, topic, &mut interrupts) };
        if self.known_topics.len() >= KNOWN_TOPICS_MAX {
            self.known_topics.clear();
        }
        let partitions = match seen {
            TopicSeen::Exists { partitions, .. } => partitions,
            TopicSeen::Missing => 0,
        };
        self.known_topics.insert(topic.to_owned(), Topic { limit, partitions });
        Ok(limit)
    }

    /// The topic's `max.message.bytes` (its own or the broker's default), or
    /// None when the broker does not say (no DescribeConfigs right, say):
    /// then only the broker's answer tells.
    fn max_message_bytes(admin: &Arc<Admin>, topic: &str, interrupts: &mut impl FnMut()) -> Option<usize> {
        let (admin, name) = (Arc::clone(admin), topic.to_owned());
        admin_call(
            move || {
                let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
                let spec = [ResourceSpecifier::Topic(&name)];
                let r = futures_executor::block_on(admin.describe_configs(spec.iter(), &opts));
                r.ok().and_then(|v| {
                    let res = v.into_iter().next()?.ok()?;
                    res.get("max.message.bytes")?.value.as_deref()?.parse::<usize>().ok()
                })
            },
            interrupts,
        )
        .flatten()
    }

    /// Creates the topic. The request runs on a thread of its own while the
    /// worker waits for it in short steps, serving `interrupts` (SIGTERM
    /// stops the worker at once). A failure the broker may not repeat (a
    /// timeout, no controller yet) is `Unreachable`: retried, never a
    /// reason to dead-letter the event.
    fn create_topic(
        admin: &Arc<Admin>,
        topic: &str,
        creation: &TopicCreation,
        interrupts: &mut impl FnMut(),
    ) -> Result<(), DestinationError> {
        let admin = Arc::clone(admin);
        let (name, partitions, rf) = (topic.to_owned(), creation.partitions, creation.replication_factor);
        let res = admin_call(
            move || {
                let new = NewTopic::new(&name, partitions, TopicReplication::Fixed(rf));
                let opts = AdminOptions::new()
                    .operation_timeout(Some(Duration::from_secs(10)))
                    .request_timeout(Some(Duration::from_secs(15)));
                futures_executor::block_on(admin.create_topics([&new], &opts))
            },
            interrupts,
        )
        .ok_or_else(|| DestinationError::Unreachable(format!("creating topic \"{topic}\" gave no answer")))?;
        let res = res.map_err(|e| DestinationError::Unreachable(format!("create topic \"{topic}\": {e}")))?;
        for r in res {
            match r {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((t, code)) if outbox_core::kafka_errors::is_transient_admin(code as i32) => {
                    return Err(DestinationError::Unreachable(format!("create topic \"{t}\": {code} (retrying)")))
                }
                Err((t, code)) => return Err(DestinationError::Missing(format!("create topic \"{t}\": {code}"))),
            }
        }
        Ok(())
    }

    /// Hands one event to the producer. A full local queue is waited out by
    /// polling (serving reports into `on_full`); anything else is a
    /// rejection of this event.
    fn produce(&self, ev: &OutEvent<'_>, on_full: &mut dyn FnMut(&mut Vec<Report>)) -> Result<(), Rejected> {
        let mut id_buf = [0u8; 36];
        let id_text = format_uuid_into(ev.id, &mut id_buf);
        if let Some(r) = self.stopped_by_earlier_failure(ev, id_text) {
            return Err(r);
        }
        let mut h = OwnedHeaders::new_with_capacity(3 + ev.headers.len());
        if ev.own_headers {
            h = h
                .insert(Header { key: "id", value: Some(id_text.as_bytes()) })
                .insert(Header { key: "type", value: Some(ev.event_type.as_bytes()) })
                .insert(Header { key: "aggregatetype", value: Some(ev.aggregate_type.as_bytes()) });
        }
        for (k, v) in ev.headers {
            h = h.insert(Header { key: k, value: Some(v.as_bytes()) });
        }
        if let Some(ct) = ev.content_type {
            h = h.insert(Header { key: outbox_core::cloudevents::KAFKA_CONTENT_TYPE, value: Some(ct.as_bytes()) });
        }
        let cloudevents = if ev.content_type.is_some() { CLOUDEVENTS_SENT } else { 0 };
        let adopted = if ev.own_headers { 0 } else { ADOPTED_SENT };
        let mut record: BaseRecord<'_, str, [u8], usize> =
            BaseRecord::with_opaque_to(ev.destination, ev.seq as usize | cloudevents | adopted)
                .headers(h)
                .timestamp(time::pg_to_unix_millis(ev.timestamp));
        if let Some(k) = ev.key {
            record = record.key(k);
        }
        if let Some(v) = ev.value {
            record = record.payload(v);
        }
        let mut reports = Vec::new();
        // A partition this producer has not written to yet takes one event
        // at a time (see outbox_core::first_writes): the partition is named
        // here, as librdkafka's partitioner would choose it, so that the
        // event goes where it was held for.
        let target = self.partition_of(ev);
        let first = target.filter(|&p| !self.is_warm(ev.destination, p));
        if let Some(p) = first {
            while !self.producer.context().first.lock().map_or(true, |f| f.may_send(ev.destination, p)) {
                self.poll_reports(Duration::from_millis(10), &mut reports);
                on_full(&mut reports);
                reports.clear();
            }
        }
        // Named also for a null key, which librdkafka would send to a
        // partition of its own random choice.
        let named = if ev.partition.is_some() || ev.key.is_none() { target } else { first };
        if let Some(p) = named {
            record = record.partition(p);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => {
                    if let (Some(p), Ok(mut f)) = (first, self.producer.context().first.lock()) {
                        f.sent(ev.seq, ev.destination, p);
                    }
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.poll_reports(Duration::from_millis(100), &mut reports);
                    on_full(&mut reports);
                    reports.clear();
                }
                Err((e, _)) => {
                    return Err(self
                        .stopped_by_earlier_failure(ev, id_text)
                        .unwrap_or_else(|| rejected(&e, ev.destination, id_text.to_owned(), Returned::of(ev, id_text))));
                }
            }
        }
    }

    /// After a delivery failed for good, librdkafka's gapless guarantee
    /// stops the producer (a fatal error), and every later send fails
    /// with the *earlier* failure's code: not this event's fault, and not
    /// permanent for it. The stream restarts with a new producer, which
    /// sends it then (not counted against the event, as for a lost
    /// connection).
    fn stopped_by_earlier_failure(&self, ev: &OutEvent<'_>, id_text: &str) -> Option<Rejected> {
        let (_, why) = self.producer.client().fatal_error()?;
        Some(Rejected {
            reason: format!("not sent: the producer stopped after an earlier delivery failed ({why})"),
            destination: ev.destination.to_owned(),
            event_id: id_text.to_owned(),
            permanent: false,
            batch: false,
            returned: Some(Box::new(Returned::of(ev, id_text))),
            connection: true,
        })
    }

    /// The partition the event goes to: its own, or the one librdkafka's
    /// partitioner (murmur2_random, which the relay sets) gives its key
    /// among the topic's partitions as last read; a null key goes to one
    /// picked by its sequence number (librdkafka's would be random). None
    /// when the topic's partitions are not known.
    fn partition_of(&self, ev: &OutEvent<'_>) -> Option<i32> {
        if ev.partition.is_some() {
            return ev.partition;
        }
        let n = self.known_topics.get(ev.destination)?.partitions;
        if n <= 0 {
            return None;
        }
        Some(match ev.key {
            // SAFETY: rd_kafka_msg_partitioner_murmur2 reads `keylen` bytes
            // of the key and nothing else (the topic and opaques are unused;
            // see rdkafka_msg.c), and n > 0.
            Some(k) => unsafe {
                rdkafka::bindings::rd_kafka_msg_partitioner_murmur2(
                    std::ptr::null(),
                    k.as_ptr().cast(),
                    k.len(),
                    n,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            },
            None => (ev.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 33) as i32 % n,
        })
    }

    fn is_warm(&self, topic: &str, partition: i32) -> bool {
        self.producer.context().first.lock().map_or(true, |f| f.is_warm(topic, partition))
    }

    /// Serves delivery reports (waiting up to `timeout` for one) into
    /// `out`, which must be empty: the buffers are swapped, so both keep
    /// their capacity.
    fn poll_reports(&self, timeout: Duration, out: &mut Vec<Report>) {
        self.producer.poll(timeout);
        if let Ok(mut v) = self.producer.context().reports.lock() {
            std::mem::swap(&mut *v, out);
        }
    }

}

/// What a metadata request says about one topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TopicSeen {
    Missing,
    /// With every partition led (false: a leader is still being elected),
    /// and how many partitions.
    Exists { leaders: bool, partitions: i32 },
}

/// Asks the broker about one topic (never creating it: the client has
/// `allow.auto.create.topics=false`), on the admin thread.
fn probe_topic(
    client: &Arc<Admin>,
    topic: &str,
    timeout: Duration,
    interrupts: &mut impl FnMut(),
) -> Result<TopicSeen, String> {
    let (client, name) = (Arc::clone(client), topic.to_owned());
    admin_call(
        move || {
            let md = client.inner().fetch_metadata(Some(&name), timeout).map_err(|e| e.to_string())?;
            let found = md.topics().iter().find(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty());
            Ok(match found {
                None => TopicSeen::Missing,
                Some(t) => TopicSeen::Exists {
                    leaders: t.partitions().iter().all(|p| p.leader() >= 0),
                    partitions: i32::try_from(t.partitions().len()).unwrap_or(i32::MAX),
                },
            })
        },
        interrupts,
    )
    .unwrap_or_else(|| Err("no answer".into()))
}

/// Runs an admin request (it blocks for seconds) on a thread of its own
/// while the worker waits in 100 ms steps, serving `interrupts`. None: the
/// thread could not start or ended without an answer.
fn admin_call<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static, interrupts: &mut impl FnMut()) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    with_signals_blocked(|| {
        std::thread::Builder::new().name("outbox-admin".into()).spawn(move || {
            let _ = tx.send(f());
        })
    })
    .ok()?;
    wait_serving(rx, interrupts)
}

/// The producer's local queue in KiB: 32 MiB, or room for two of the largest
/// events allowed when that is more.
fn queue_kbytes(max_event_bytes: usize) -> usize {
    (2 * (max_event_bytes + 1024)).div_ceil(1024).max(32 * 1024)
}

/// Topics known to exist, remembered up to this many (then forgotten and
/// asked again), so a template routing to ever new topics cannot grow the
/// worker's memory without bound.
const KNOWN_TOPICS_MAX: usize = 10_000;

impl KafkaSink {
    /// The shared admin client, made at first use.
    fn admin(&mut self) -> Result<Arc<Admin>, KafkaError> {
        if let Some(a) = &self.admin {
            return Ok(Arc::clone(a));
        }
        let a = Arc::new(with_signals_blocked(|| self.config.create())?);
        self.admin = Some(Arc::clone(&a));
        Ok(a)
    }

    /// Destroys the clients, waiting at most `limit` for librdkafka's
    /// threads to end: the worker must not exit with them running (exit-time
    /// cleanup of OpenSSL and the like would race them). Returns how long
    /// it took, or None if it did not finish in time.
    fn close_within(self, limit: Duration) -> Option<Duration> {
        let start = crate::clock::now();
        let (tx, rx) = std::sync::mpsc::channel();
        // Dropped on a thread of its own so the wait is bounded; signals
        // stay with the worker's thread.
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new().name("outbox-close".into()).spawn(move || {
                // An admin request the worker stopped waiting for (SIGTERM
                // during it) still holds the admin client: let it end, so
                // that client is destroyed here too, within the bound.
                if let Some(admin) = &self.admin {
                    while Arc::strong_count(admin) > 1 && start.elapsed() < limit {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                drop(self);
                let _ = tx.send(());
            })
        });
        match spawned {
            Ok(_) => rx.recv_timeout(limit).ok().map(|()| start.elapsed()),
            Err(_) => None,
        }
    }
}

impl Sink for KafkaSink {
    fn name(&self) -> &'static str {
        "Kafka"
    }

    fn prepare(&mut self, destination: &str, interrupts: &mut dyn FnMut()) -> Result<Option<usize>, DestinationError> {
        // Read per topic, so a reload applies without a restart.
        let creation = TopicCreation {
            enabled: crate::settings::topic_creation(),
            partitions: crate::settings::topic_partitions(),
            replication_factor: crate::settings::topic_replication_factor(),
        };
        self.ensure_topic(destination, &creation, interrupts)
    }

    fn send(&mut self, ev: &OutEvent<'_>, on_full: &mut dyn FnMut(&mut Vec<Report>)) -> Result<(), Rejected> {
        self.produce(ev, on_full)
    }

    fn poll_into(&mut self, timeout: Duration, out: &mut Vec<Report>) {
        self.poll_reports(timeout, out)
    }

    fn close(self: Box<Self>, limit: Duration) -> Option<Duration> {
        (*self).close_within(limit)
    }

    fn wake_fd(&self) -> Option<i32> {
        self.wake.as_ref().map(|w| w.read)
    }
}
