//! Dead letters: events Kafka rejects for a reason retrying cannot fix (too
//! large, invalid or missing topic, not authorised), kept with the reason in
//! the `outbox_dead_letter` table when `outbox.on_rejected_event =
//! dead_letter`, so the stream goes on. `outbox_dead_letter_republish()`
//! (sql/outbox.sql) writes them again, with their ids, once the cause is fixed.
//!
//! The worker writes a letter in its own committed transaction before it
//! counts the event as settled, so the slot is never confirmed past an event
//! that is neither in Kafka nor in the table.

use pgrx::bgworkers::BackgroundWorker;
use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;

use outbox_core::confirm::TxnSeq;
use outbox_core::lsn;

/// The event, owned: what the table keeps to publish it again.
#[derive(Debug, Clone)]
pub struct Letter {
    pub id: String,
    pub aggregate_type: String,
    /// None: a row of an adopted table with a NULL key.
    pub aggregate_id: Option<String>,
    pub event_type: String,
    /// The JSON payload of outbox's own events.
    pub payload: Option<String>,
    /// An adopted table's row: its payload's bytes (None when NULL).
    pub payload_bytes: Option<Vec<u8>>,
    /// A row of an adopted table; `source_table` names it when known (a
    /// refusal in a sink's delivery report names only the topic).
    pub adopted: bool,
    pub source_table: Option<String>,
    /// Its signature did not verify: it may have been written by any role
    /// (pg_logical_emit_message), so re-publishing all leaves it alone.
    pub unverified: bool,
    pub headers: Vec<(String, String)>,
    /// The topic it was routed to; None when no topic could be derived.
    pub topic: Option<String>,
    /// Commit time, µs since 2000-01-01 (Postgres' epoch).
    pub commit_time: i64,
}

impl Letter {
    /// The event as decoded: every refusal the relay makes itself (a bad
    /// topic, too large, not verified).
    pub fn of_event(d: &outbox_core::decoded::DecodedEvent<'_>, destination: Option<&str>) -> Letter {
        let ev = &d.event;
        Letter {
            id: outbox_core::format_uuid(&ev.id),
            aggregate_type: ev.aggregate_type.to_owned(),
            aggregate_id: Some(ev.aggregate_id.to_owned()),
            event_type: ev.event_type.to_owned(),
            payload: ev.payload.map(str::to_owned),
            payload_bytes: None,
            adopted: false,
            source_table: None,
            unverified: d.source == outbox_core::decoded::Source::Unverified,
            headers: ev.headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            topic: destination.map(str::to_owned),
            commit_time: d.commit_time,
        }
    }

    /// A row of an adopted table, as decoded.
    pub fn of_row(d: &outbox_core::decoded::DecodedRow<'_>) -> Letter {
        Letter {
            id: outbox_core::format_uuid(&d.id),
            aggregate_type: d.route_value.unwrap_or_default().to_owned(),
            aggregate_id: d.key.map(str::to_owned),
            event_type: d.event_type.unwrap_or_default().to_owned(),
            payload: None,
            payload_bytes: d.payload.map(<[u8]>::to_vec),
            adopted: true,
            source_table: Some(d.table.to_owned()),
            unverified: false,
            headers: d.headers.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            topic: Some(d.topic.to_owned()).filter(|t| !t.is_empty()),
            commit_time: d.commit_time,
        }
    }

    /// A message the sink gave back with its failure (the decoded event is
    /// gone by then): `id`, `type` and `aggregatetype` come out of the
    /// headers the relay put them in.
    pub fn of_returned(r: crate::sink::Returned, destination: &str, commit_time: i64) -> Letter {
        if r.adopted {
            // The router's headers, kept as they are; the id as decoding
            // derives it (outbox_core::adopt::row_event).
            let text = r.headers.iter().find(|(k, _)| k == "id").map(|(_, v)| v.as_str()).unwrap_or_default();
            let id = outbox_core::adopt::id_of_text(destination, text);
            return Letter {
                id: outbox_core::format_uuid(&id),
                aggregate_type: String::new(),
                aggregate_id: r.key,
                event_type: String::new(),
                payload: None,
                payload_bytes: r.value,
                adopted: true,
                source_table: None,
                unverified: false,
                headers: r.headers,
                topic: Some(destination.to_owned()),
                commit_time,
            };
        }
        let mut l = Letter {
            id: String::new(),
            aggregate_type: String::new(),
            aggregate_id: r.key,
            event_type: String::new(),
            payload: r.value.map(|v| String::from_utf8_lossy(&v).into_owned()),
            payload_bytes: None,
            adopted: false,
            source_table: None,
            unverified: false,
            headers: Vec::new(),
            topic: Some(destination.to_owned()),
            commit_time,
        };
        for (k, v) in r.headers {
            match k.as_str() {
                "id" => l.id = v,
                "type" => l.event_type = v,
                "aggregatetype" => l.aggregate_type = v,
                _ => l.headers.push((k, v)),
            }
        }
        l
    }
}

/// A letter waiting for the worker's next settle step.
pub struct Pending {
    pub seq: TxnSeq,
    pub commit_lsn: u64,
    pub reason: String,
    pub letter: Letter,
    /// It failed in a delivery report (counted as failed in flight).
    pub from_report: bool,
}

/// A commit time (µs since 2000-01-01) as timestamptz, computed here rather
/// than with SQL arithmetic a user could shadow.
fn committed_at(pg_micros: i64) -> Option<pgrx::datum::TimestampWithTimeZone> {
    pgrx::datum::TimestampWithTimeZone::try_from(pg_micros).ok()
}

/// Writes the letters in one transaction, committed on return. A letter
/// already there (the worker restarted before confirming past it and Kafka
/// rejected it again) gets the new reason and time.
pub fn store(schema: &str, letters: &[Pending]) -> Result<(), pgrx::spi::Error> {
    let sql = format!(
        // Run as the bootstrap superuser: every type, function and operator
        // is named with its schema, so nothing resolves through a
        // search_path a user could write to (the worker pins it too).
        "INSERT INTO {schema}.outbox_dead_letter
             (id, aggregatetype, aggregateid, type, payload, headers, topic, reason, commit_lsn, committed_at,
              payload_bytes, adopted, source_table, unverified)
         VALUES ($1::pg_catalog.uuid, $2, $3, $4, $5::pg_catalog.jsonb, $6::pg_catalog.jsonb, $7, $8,
                 $9::pg_catalog.pg_lsn, $10, $11, $12, $13, $14)
         ON CONFLICT (id) DO UPDATE SET reason = EXCLUDED.reason, dead_lettered_at = pg_catalog.now()"
    );
    BackgroundWorker::transaction(|| {
        for p in letters {
            let l = &p.letter;
            let headers = serde_json::Value::Object(
                l.headers.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect(),
            )
            .to_string();
            let args: [DatumWithOid; 14] = [
                l.id.as_str().into(),
                l.aggregate_type.as_str().into(),
                l.aggregate_id.as_deref().into(),
                l.event_type.as_str().into(),
                l.payload.as_deref().into(),
                headers.as_str().into(),
                l.topic.as_deref().into(),
                p.reason.as_str().into(),
                lsn::format(p.commit_lsn).into(),
                committed_at(l.commit_time).into(),
                l.payload_bytes.as_deref().into(),
                l.adopted.into(),
                l.source_table.as_deref().into(),
                l.unverified.into(),
            ];
            Spi::run_with_args(&sql, &args)?;
        }
        Ok(())
    })
}

/// The dead letters of events committed at or after `from_lsn`, as (event
/// id, commit LSN): a restarted stream decodes them again and must not send
/// them (they are settled: the table holds them until re-published, which
/// writes them anew under a later commit LSN).
pub fn known_since(schema: &str, from_lsn: u64) -> Result<std::collections::HashSet<([u8; 16], u64)>, pgrx::spi::Error> {
    let sql = format!(
        "SELECT id::pg_catalog.text, pg_catalog.pg_wal_lsn_diff(commit_lsn, '0/0'::pg_catalog.pg_lsn)::pg_catalog.int8
           FROM {schema}.outbox_dead_letter
          WHERE commit_lsn OPERATOR(pg_catalog.>=) $1::pg_catalog.pg_lsn"
    );
    BackgroundWorker::transaction(|| {
        Spi::connect(|c| {
            let args: [DatumWithOid; 1] = [lsn::format(from_lsn).into()];
            let mut out = std::collections::HashSet::new();
            for row in c.select(&sql, None, &args)? {
                let (Some(id), Some(at)) = (row.get::<String>(1)?, row.get::<i64>(2)?) else { continue };
                if let Ok(u) = uuid::Uuid::parse_str(&id) {
                    out.insert((*u.as_bytes(), at as u64));
                }
            }
            Ok(out)
        })
    })
}
