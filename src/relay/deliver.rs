//! Delivery: each record the output plugin writes becomes one event handed
//! to the sink (routed, checked against the destination's limit, registered
//! in the ledger first), and each report the sink gives back is applied to
//! the ledger. An event that cannot be published is judged here: a
//! transient failure restarts the stream, a permanent one is dead-lettered
//! or stops the relay (`outbox.on_rejected_event`).

use std::rc::Rc;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::confirm::TxnSeq;
use outbox_core::decoded::{self, DecodedEvent};
use outbox_core::ledger::{AdoptedRow, Ledger, Row};
use outbox_core::relay_state::Input;
use outbox_core::topic::TopicTemplate;
use outbox_core::{lsn, retry};

use super::exit::SinkHandle;
use super::state;
use crate::clock;
use crate::dead_letter::{self, Letter};
use crate::settings;
use crate::shmem::Shared;
use crate::sink::{DestinationError, OutEvent, Rejected, Report};

/// Everything the decoding callbacks need; reached through the context's
/// `output_writer_private`.
pub struct Deliver {
    pub sink: SinkHandle,
    pub ledger: Ledger,
    pub shared: &'static Shared,
    /// Rejected events to write to the dead-letter table at the next settle.
    pub dead: Vec<dead_letter::Pending>,
    /// Events already in the dead-letter table that this stream may decode
    /// again (committed after the confirmed position): (id, commit LSN).
    pub dead_known: std::collections::HashSet<([u8; 16], u64)>,
    /// Kafka sends one event per request (after a batch rejection; until
    /// the position in `Shared::isolating_until` is confirmed).
    pub one_per_request: bool,
    /// The destination template (`outbox.topic_template`, or
    /// `outbox.amqp_routing_key`), re-read at each reload.
    pub template: TopicTemplate,
    /// Routing keys need not be topic names.
    pub topic_names: bool,
    /// CloudEvents (`outbox.cloudevents`), re-read at each reload.
    cloudevents: CloudEvents,
    /// The last destination the template produced: (aggregate type, event type, destination).
    last_route: Option<(String, String, Rc<str>)>,
    /// Reports, swapped with the sink's buffer so neither is reallocated.
    reports: Vec<Report>,
}

/// An event that could not be published.
struct Failure {
    seq: TxnSeq,
    rej: Rejected,
    commit_lsn: u64,
    commit_time: i64,
    /// The ledger counts it as failed: the sink reported it, or the sink
    /// could not take it for a reason that is not permanent. Else it was
    /// refused before the sink took it, and `letter` is the decoded event.
    from_report: bool,
    letter: Option<Letter>,
    /// The relay refused it before handing it to the sink (a bad row, no
    /// topic, too large, not verified): said so, not blamed on the sink.
    refused_here: bool,
}

impl Deliver {
    pub fn new(sink: SinkHandle, shared: &'static Shared, one_per_request: bool) -> Self {
        let (template, topic_names) = settings::destination_template();
        Deliver {
            sink,
            ledger: Ledger::new(clock::now()),
            shared,
            dead: Vec::new(),
            dead_known: Default::default(),
            one_per_request,
            template,
            topic_names,
            cloudevents: CloudEvents::from_settings(topic_names),
            last_route: None,
            reports: Vec::new(),
        }
    }

    pub fn reload(&mut self) {
        (self.template, self.topic_names) = settings::destination_template();
        self.cloudevents = CloudEvents::from_settings(self.topic_names);
        self.last_route = None;
    }

    /// Serves the sink's reports, waiting up to `wait` for the first.
    pub fn apply_reports(&mut self, wait: Duration) {
        let mut reports = std::mem::take(&mut self.reports);
        self.sink.get().poll_into(wait, &mut reports);
        let failures = apply(&mut self.ledger, self.shared, &mut reports);
        self.reports = reports;
        for f in failures {
            self.reject(f);
        }
    }

    /// One record from the output plugin: send it.
    pub fn handle(&mut self, bytes: &[u8]) {
        if !state::mode().sends() {
            // Not sent: the slot is not confirmed past the event that stopped
            // the stream, so this one is decoded and sent again after it.
            return;
        }
        let d = match decoded::decode_record(bytes) {
            Ok(decoded::Record::Event(d)) => d,
            Ok(decoded::Record::Row(r)) => return self.handle_row(&r),
            Err(e) => {
                warning!("outbox relay: skipping an output record it cannot read: {e}");
                return;
            }
        };
        let ev = &d.event;
        let row = (d.source == decoded::Source::Table).then_some(Row::Own(ev.id));
        let seq = self.ledger.sent(d.commit_lsn, d.commit_time, row, clock::now());
        // Refused before the sink saw it: retrying cannot help.
        let refuse = |me: &mut Self, reason: String, destination: Option<&str>| {
            let letter = Letter::of_event(&d, destination);
            me.refuse(seq, &d.event.id, d.commit_lsn, d.commit_time, reason, destination, letter);
        };
        if self.dead_known.contains(&(ev.id, d.commit_lsn)) {
            // Dead-lettered before a restart of the stream: settled, not sent again.
            self.ledger.settled_elsewhere(seq, false);
            return;
        }
        if d.source == decoded::Source::Unverified {
            // Not signed with this server's key: never published, never
            // skipped in silence (dead-lettered or the relay stops).
            self.shared.add_unverified();
            let reason = "not verified: the event's signature does not match this server's key ($PGDATA/outbox.key); \
                          it was written under another key (the key file was replaced or restored from elsewhere) \
                          or forged with pg_logical_emit_message()";
            return refuse(self, reason.to_owned(), ev.topic);
        }
        let destination = match self.route(&d) {
            Ok(r) => r,
            Err(reason) => return refuse(self, reason, None),
        };
        let limit = match self.destination_limit(&destination) {
            Ok(limit) => limit,
            Err(reason) => return refuse(self, reason, Some(&destination)),
        };
        // CloudEvents: attribute headers (binary) or the event as the value
        // (structured), and the content type to say. An event header that
        // would read as one of CloudEvents' is refused rather than sent
        // beside (or, on RabbitMQ, under) the relay's.
        if let Some(name) = self.cloudevents.colliding_header(ev) {
            let reason = format!(
                "header \"{name}\" collides with CloudEvents (outbox.cloudevents is on): a header named content-type or \
                 starting with \"{}\" (in any case) is the binding's",
                self.cloudevents.prefix
            );
            return refuse(self, reason, Some(&destination));
        }
        let ce = self.cloudevents.apply(&d);
        let (value, content_type) = match &ce {
            Some(c) => (c.value.as_deref().or(ev.payload), Some(c.content_type)),
            None => (ev.payload, None),
        };
        let with_ce: Vec<(&str, &str)>;
        let headers: &[(&str, &str)] = match &ce {
            Some(c) => {
                with_ce = ev.headers.iter().copied().chain(c.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))).collect();
                &with_ce
            }
            None => &ev.headers,
        };
        if let Some(limit) = limit {
            let mut size =
                outbox_core::validate::record_size(ev.aggregate_type, ev.aggregate_id, ev.event_type, headers, value.unwrap_or(""));
            if let Some(ct) = content_type {
                // As record_size counts a header: name, value and 10 bytes.
                size += outbox_core::cloudevents::KAFKA_CONTENT_TYPE.len() + ct.len() + 10;
            }
            if let Err(reason) = self.fits(size, limit, &destination) {
                return refuse(self, reason, Some(&destination));
            }
        }
        let out = OutEvent {
            seq,
            id: &ev.id,
            key: Some(ev.aggregate_id),
            value: value.map(str::as_bytes),
            payload: ev.payload.map(str::as_bytes),
            own_headers: true,
            partition: None,
            event_type: ev.event_type,
            aggregate_type: ev.aggregate_type,
            headers,
            event_headers: &ev.headers,
            destination: &destination,
            timestamp: d.commit_time,
            content_type,
        };
        self.send(&out, d.commit_lsn, d.commit_time, || Letter::of_event(&d, Some(&destination)));
    }

    /// A row of an adopted table: the router's message, sent as it is
    /// (routed and checked by the output plugin), or refused with the
    /// reason the plugin gave.
    fn handle_row(&mut self, r: &decoded::DecodedRow<'_>) {
        // With delete.published.rows: deleted once settled, as the outbox
        // table's rows are (published or dead-lettered alike).
        let row = r.cleanup.zip(r.headers.first().filter(|(k, _)| *k == "id")).map(|(column, (_, id))| {
            Row::Adopted(AdoptedRow { table: r.table.to_owned(), column: column.to_owned(), id: (*id).to_owned() })
        });
        let seq = self.ledger.sent(r.commit_lsn, r.commit_time, row, clock::now());
        if self.dead_known.contains(&(r.id, r.commit_lsn)) {
            self.ledger.settled_elsewhere(seq, false);
            return;
        }
        let destination = Some(r.topic).filter(|t| !t.is_empty());
        let problem = match (r.error, destination) {
            (Some(e), _) => Err(e.to_owned()),
            (None, None) => Err(format!("row of {}: no destination", r.table)),
            (None, Some(t)) if self.topic_names => outbox_core::validate::topic(t).map_err(|e| e.message),
            (None, Some(_)) => Ok(()),
        };
        let limit = problem.and_then(|()| self.destination_limit(r.topic));
        let limit = match limit {
            Ok(limit) => limit,
            Err(reason) => return self.refuse(seq, &r.id, r.commit_lsn, r.commit_time, reason, destination, Letter::of_row(r)),
        };
        if let Some(limit) = limit {
            let size = r.key.map_or(0, str::len)
                + r.value.map_or(0, <[u8]>::len)
                + r.headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum::<usize>()
                + outbox_core::validate::RECORD_OVERHEAD;
            if let Err(reason) = self.fits(size, limit, r.topic) {
                return self.refuse(seq, &r.id, r.commit_lsn, r.commit_time, reason, destination, Letter::of_row(r));
            }
        }
        let out = OutEvent {
            seq,
            id: &r.id,
            key: r.key,
            value: r.value,
            payload: r.payload,
            own_headers: false,
            partition: r.partition,
            event_type: r.event_type.unwrap_or_default(),
            aggregate_type: r.route_value.unwrap_or_default(),
            headers: &r.headers,
            event_headers: &r.headers,
            destination: r.topic,
            timestamp: r.timestamp.unwrap_or(r.commit_time),
            content_type: None,
        };
        self.send(&out, r.commit_lsn, r.commit_time, || Letter::of_row(r));
    }

    /// An event refused before the sink saw it: retrying cannot help.
    #[allow(clippy::too_many_arguments)]
    fn refuse(&mut self, seq: TxnSeq, id: &[u8; 16], commit_lsn: u64, commit_time: i64, reason: String, destination: Option<&str>, letter: Letter) {
        let rej = Rejected {
            reason,
            destination: destination.unwrap_or_default().to_owned(),
            event_id: outbox_core::format_uuid(id),
            permanent: true,
            batch: false,
            returned: None,
            connection: false,
        };
        self.reject(Failure { seq, rej, commit_lsn, commit_time, from_report: false, letter: Some(letter), refused_here: true });
    }

    /// Waits until the sink can take events for `destination` (never
    /// skipping while it cannot be asked); its size limit, or why it cannot.
    fn destination_limit(&mut self, destination: &str) -> Result<Option<usize>, String> {
        loop {
            match self.sink.get().prepare(destination, &mut || {
                pg_sys::check_for_interrupts!();
            }) {
                Ok(limit) => return Ok(limit),
                Err(DestinationError::Missing(reason)) => return Err(reason),
                Err(DestinationError::Unreachable(reason)) => {
                    // The sink cannot be asked: wait and ask again, never skip.
                    self.shared.add_retry();
                    self.shared.set_broker_up(false);
                    self.shared.set_error(&reason);
                    state::feed(Input::SinkUnreachable, Some(&reason));
                    self.apply_reports(Duration::from_millis(500));
                    pg_sys::check_for_interrupts!();
                }
            }
        }
    }

    /// Refuses a message larger than the destination takes, before it is
    /// sent, so nothing after it can reach the destination first.
    fn fits(&self, size: usize, limit: usize, destination: &str) -> Result<(), String> {
        if size <= limit {
            return Ok(());
        }
        Err(if self.topic_names {
            format!("event is too large for topic \"{destination}\": {size} bytes as a Kafka record, its max.message.bytes is {limit}")
        } else {
            format!("event is too large for routing key \"{destination}\": {size} bytes, the server's max_message_size is {limit}")
        })
    }

    /// Hands `out` to the sink, serving its reports while it has no room.
    fn send(&mut self, out: &OutEvent<'_>, commit_lsn: u64, commit_time: i64, letter: impl FnOnce() -> Letter) {
        let Deliver { sink, ledger, shared, .. } = self;
        let shared: &'static Shared = shared;
        let mut pending = Vec::new();
        let mut full_since = None;
        let res = sink.get().send(out, &mut |reports| {
            // The sink has no room: its reports are served meanwhile.
            pending.extend(apply(ledger, shared, reports));
            // A wait inside decoding is visible in the status.
            let now = clock::now();
            if now.duration_since(*full_since.get_or_insert(now)) >= outbox_core::ledger::SINK_SILENCE {
                shared.set_broker_up(false);
                state::feed(
                    Input::SinkUnreachable,
                    Some(
                        "the sink takes no more events until it acknowledges some (its local queue is full, or the \
                         first event of a new producer to a partition is unacknowledged) and nothing is acknowledged; \
                         waiting, nothing is skipped",
                    ),
                );
            }
            pg_sys::check_for_interrupts!();
        });
        for f in pending {
            self.reject(f);
        }
        if let Err(rej) = res {
            let seq = out.seq;
            // A transient failure is counted as failed, as a report's is: the
            // restart it leads to then waits only for what is really in flight.
            let counted = !rej.permanent;
            if counted {
                self.ledger.failed(seq);
            }
            self.reject(Failure { seq, rej, commit_lsn, commit_time, from_report: counted, letter: Some(letter()), refused_here: false });
        }
    }

    /// The event's destination: its own topic, or the template's result,
    /// kept for the next event of the same aggregate type and event type
    /// (a reload may change the template).
    fn route(&mut self, d: &DecodedEvent<'_>) -> Result<Rc<str>, String> {
        let ev = &d.event;
        if ev.topic.is_none() {
            if let Some((a, t, r)) = &self.last_route {
                if a == ev.aggregate_type && t == ev.event_type {
                    return Ok(r.clone());
                }
            }
        }
        let routed = if self.topic_names {
            outbox_core::topic::route(&self.template, ev.topic, ev.aggregate_type, ev.event_type)
                .map(|c| c.into_owned())
                .map_err(|e| e.message)?
        } else {
            outbox_core::topic::routing_key(&self.template, ev.topic, ev.aggregate_type, ev.event_type)?
        };
        let r: Rc<str> = Rc::from(routed);
        if ev.topic.is_none() {
            self.last_route = Some((ev.aggregate_type.to_owned(), ev.event_type.to_owned(), r.clone()));
        }
        Ok(r)
    }

    /// An event that cannot be published: a transient failure restarts the
    /// stream; a permanent one is dead-lettered or stops the relay.
    fn reject(&mut self, mut f: Failure) {
        if f.from_report && f.rej.permanent && f.rej.batch && !self.one_per_request {
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
        let mut backoff = Duration::ZERO;
        if !f.rej.permanent && f.rej.connection {
            // The sink's connection is gone: every event in flight fails
            // with it, and none of them is the cause. Restart after a short
            // pause; the sink waits for the server on the way back.
            backoff = Duration::from_secs(1);
        } else if !f.rej.permanent && state::mode().sends() {
            // The first transient failure since the stream started decides
            // the restart: backed off, and given up after a few for the
            // same event (outbox_core::retry).
            let id = uuid::Uuid::parse_str(&f.rej.event_id).map(|u| *u.as_bytes()).unwrap_or_default();
            let (streak, next) = retry::after_transient_failure(self.shared.streak(), id);
            self.shared.set_streak(streak);
            match next {
                retry::Next::Restart { backoff: b } => backoff = b,
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
        let sink = if f.refused_here { "outbox" } else { self.sink.name() };
        let what = format!(
            "event {} (transaction committed at {}) for {} \"{}\"",
            f.rej.event_id,
            lsn::format(f.commit_lsn),
            if self.topic_names { "topic" } else { "routing key" },
            f.rej.destination
        );
        if f.rej.permanent && settings::on_rejected_event() == settings::OnRejected::DeadLetter {
            let letter = f.letter.take().or_else(|| {
                f.rej.returned.take().map(|r| Letter::of_returned(*r, &f.rej.destination, f.commit_time))
            });
            if let Some(letter) = letter {
                let verb = if f.refused_here { "refused" } else { "rejected" };
                let msg = format!("{sink} {verb} {what}: {}; moved to the dead-letter table, publishing goes on", f.rej.reason);
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
        if !state::mode().sends() {
            return;
        }
        if f.rej.permanent {
            let verb = if f.refused_here { "refused" } else { "rejected" };
            let msg = format!("{sink} {verb} {what}: {}", f.rej.reason);
            warning!("outbox relay: {msg}");
            self.shared.set_error(&msg);
            state::feed(
                Input::Rejected,
                Some("the slot's position is held; fix the cause, then reload the configuration or call outbox_relay_resume()"),
            );
        } else {
            self.shared.add_retry();
            let msg = format!(
                "{sink} failed to deliver {what}: {}; restarting the stream from the confirmed position {} \
                 (events after it are sent again, none skipped)",
                f.rej.reason,
                lsn::format(self.shared.confirmed())
            );
            warning!("outbox relay: {msg}");
            self.shared.set_error(&msg);
            state::feed(Input::TransientFailure { now: clock::now(), backoff }, None);
        }
    }
}

/// Applies reports to the ledger (leaving `reports` empty, its capacity
/// kept); returns the failures.
fn apply(ledger: &mut Ledger, shared: &Shared, reports: &mut Vec<Report>) -> Vec<Failure> {
    let mut failures = Vec::new();
    let now = clock::now();
    for r in reports.drain(..) {
        match r.error {
            None => note_latency(shared, ledger.acked(r.seq, r.bytes, now)),
            Some(rej) => {
                let (commit_lsn, commit_time) = ledger.failed(r.seq);
                failures.push(Failure { seq: r.seq, rej, commit_lsn, commit_time, from_report: true, letter: None, refused_here: false });
            }
        }
    }
    failures
}

/// Commit-to-acknowledgement latency: the report's arrival minus the
/// transaction's commit time, both from this server's clock.
fn note_latency(shared: &Shared, commit_time: Option<i64>) {
    if let Some(t) = commit_time.filter(|t| *t != 0) {
        // SAFETY: GetCurrentTimestamp only reads the clock.
        let now = unsafe { pg_sys::GetCurrentTimestamp() };
        shared.record_latency((now - t).max(0) as u64);
    }
}

/// `outbox.cloudevents` as the relay applies it to each event.
struct CloudEvents {
    mode: outbox_core::cloudevents::Mode,
    source: String,
    /// The attribute headers' prefix: Kafka's `ce_`, or the AMQP setting's.
    prefix: String,
}

/// What CloudEvents adds to one event.
struct CeParts {
    headers: Vec<(String, String)>,
    /// Structured mode's value (the event in the JSON event format).
    value: Option<String>,
    content_type: &'static str,
}

impl CloudEvents {
    fn from_settings(kafka: bool) -> Self {
        use settings::cloudevents as s;
        let prefix = if kafka { outbox_core::cloudevents::KAFKA_PREFIX.to_owned() } else { s::amqp_prefix() };
        CloudEvents { mode: s::mode(), source: s::source(), prefix }
    }

    /// An event header CloudEvents would collide with, when it is on.
    fn colliding_header<'e>(&self, ev: &outbox_core::Event<'e>) -> Option<&'e str> {
        if self.mode == outbox_core::cloudevents::Mode::Off {
            return None;
        }
        ev.headers.iter().map(|(k, _)| *k).find(|k| outbox_core::cloudevents::header_collides(k, &self.prefix))
    }

    fn apply(&self, d: &DecodedEvent<'_>) -> Option<CeParts> {
        use outbox_core::cloudevents::{Attributes, Mode, DATA_CONTENT_TYPE, STRUCTURED_CONTENT_TYPE};
        let ev = &d.event;
        // A tombstone stays a null value in every mode: it carries no event
        // to describe, and compaction needs the null.
        let payload = ev.payload?;
        if self.mode == Mode::Off {
            return None;
        }
        let id = outbox_core::format_uuid(&ev.id);
        let header = |name: &str| ev.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
        let a = Attributes {
            id: &id,
            source: &self.source,
            event_type: ev.event_type,
            subject: ev.aggregate_id,
            commit_time: d.commit_time,
            traceparent: header("traceparent"),
            tracestate: header("tracestate"),
        };
        Some(match self.mode {
            Mode::Binary => CeParts { headers: a.binary_headers(&self.prefix), value: None, content_type: DATA_CONTENT_TYPE },
            _ => CeParts { headers: Vec::new(), value: Some(a.structured(payload)), content_type: STRUCTURED_CONTENT_TYPE },
        })
    }
}
