//! The `outbox.*` settings (GUCs): definitions, validation and typed access.
//!
//! Restart-only (`Postmaster`) where the value is baked into something that
//! lives as long as the server: the database the worker connects to, the slot
//! it holds. Reloadable (`Sighup`) everywhere else; the worker rebuilds its
//! Kafka producer on reload. Values that would fail later (a malformed
//! property list, a template that cannot produce a topic name) are refused
//! when set, with the reason, so a bad reload keeps the old value.

use std::ffi::{c_char, c_void, CStr, CString};

use once_cell::sync::Lazy;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::{kafka_props, topic::TopicTemplate};

/// A string setting's check hook: `$check` (a `fn(&str) -> Result<_, String>`)
/// says why a value is refused, in the DETAIL of Postgres' own error.
macro_rules! string_check_hook {
    ($name:ident, $check:expr) => {
        #[pg_guard]
        unsafe extern "C-unwind" fn $name(
            newval: *mut *mut c_char,
            _extra: *mut *mut c_void,
            _source: pg_sys::GucSource::Type,
        ) -> bool {
            // SAFETY: see new_value / check_failed.
            unsafe {
                match ($check)(new_value(newval)) {
                    Ok(_) => true,
                    Err(e) => check_failed(&e),
                }
            }
        }
    };
}

pub mod amqp;
pub mod cloudevents;
pub mod tables;

static DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"postgres"));
static SLOT_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox"));
static BOOTSTRAP_SERVERS: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"localhost:9092"));
static KAFKA_PROPERTIES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static KAFKA_PROPERTIES_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static TOPIC_TEMPLATE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"outbox.event.${aggregatetype}"));
static MAX_EVENT_BYTES: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_EVENT_BYTES);
static TRACEPARENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static TOMBSTONES: GucSetting<bool> = GucSetting::<bool>::new(false);

/// Just under the 1,000,000 bytes that librdkafka's `message.max.bytes` and a
/// Kafka broker's defaults allow, so that an event we accept is one both
/// accept (see `validate::RECORD_OVERHEAD`).
pub const DEFAULT_MAX_EVENT_BYTES: i32 = 999_000;

pub fn init() {
    // SAFETY: called once from _PG_init; every check hook is a #[pg_guard]
    // function, so a Rust panic in it becomes a Postgres ERROR.
    unsafe {
        GucRegistry::define_string_guc(
            c"outbox.database",
            c"Database whose outbox the relay worker publishes.",
            c"Restart-only: the worker connects to one database for its whole life. outbox_emit() refuses \
              to run in any other database, because the slot would never see its events.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.slot_name",
            c"Logical replication slot the relay holds.",
            c"Restart-only: changing it while the worker streams would abandon the old slot's position.",
            &SLOT_NAME,
            GucContext::Postmaster,
            GucFlags::default(),
            Some(check_slot_name),
            None,
            None,
        );
        GucRegistry::define_string_guc(
            c"outbox.kafka_bootstrap_servers",
            c"Kafka bootstrap servers (librdkafka bootstrap.servers).",
            c"Reloadable: the worker rebuilds its producer on SIGHUP.",
            &BOOTSTRAP_SERVERS,
            GucContext::Sighup,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.kafka_properties",
            c"Extra librdkafka properties, key=value pairs separated by ';'.",
            c"Reloadable. Superuser-only because it holds credentials (sasl.password, ssl.key.password). Properties \
              the relay sets itself are refused under any of their names; properties that load code, run commands \
              or read files are accepted only in outbox.kafka_properties_file.",
            &KAFKA_PROPERTIES,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_kafka_properties),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.kafka_properties_file",
            c"File of extra librdkafka properties, key=value per line: the place for passwords.",
            c"Reloadable. Absolute path, read by the server's OS user. Members of pg_read_all_settings (pg_monitor) \
              can read every setting, outbox.kafka_properties included, but not this file.",
            &KAFKA_PROPERTIES_FILE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_kafka_properties_file),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.topic_template",
            c"Kafka topic of an event without an explicit topic; ${aggregatetype} and ${type} are replaced.",
            c"Reloadable: read by outbox_emit() for each event. The default matches Debezium's Outbox Event Router.",
            &TOPIC_TEMPLATE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_topic_template),
            None,
            None,
        );
        GucRegistry::define_int_guc(
            c"outbox.max_event_bytes",
            c"Largest event accepted, measured as the Kafka record (key, value, headers).",
            c"Reloadable: checked by outbox_emit() for each event; the producer's message.max.bytes follows it.",
            &MAX_EVENT_BYTES,
            1024,
            100_000_000,
            GucContext::Sighup,
            GucFlags::UNIT_BYTE,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.traceparent",
            c"W3C traceparent for the events this session or transaction writes (SET LOCAL in an instrumented application).",
            c"Any user, any time. outbox_emit() adds it as the traceparent header of each event whose headers carry none. \
              Checked when set: an invalid value is refused.",
            &TRACEPARENT,
            GucContext::Userset,
            GucFlags::default(),
            Some(check_traceparent),
            None,
            None,
        );
        init_relay();
        amqp::init();
        cloudevents::init();
        tables::init();
        // A typo such as outbox.slotname is then an error, not a silent no-op.
        pg_sys::MarkGUCPrefixReserved(c"outbox".as_ptr());
    }
}

fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting.get().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A string setting's current value, borrowed rather than copied (the
/// checks in `outbox_emit()` read three of them per call).
fn with_cstr<R>(setting: &GucSetting<Option<CString>>, f: impl FnOnce(&CStr) -> R) -> R {
    // SAFETY: as_ptr() is the GUC's own char* variable; the string it points
    // to is replaced (and freed) only when the setting changes, which cannot
    // happen while the caller's code runs (no SET, no reload in between).
    unsafe {
        let p = *setting.as_ptr();
        if p.is_null() {
            f(c"")
        } else {
            f(CStr::from_ptr(p))
        }
    }
}

pub fn with_database<R>(f: impl FnOnce(&CStr) -> R) -> R {
    with_cstr(&DATABASE, f)
}

pub fn with_slot_name<R>(f: impl FnOnce(&CStr) -> R) -> R {
    with_cstr(&SLOT_NAME, f)
}

pub fn database() -> String {
    string(&DATABASE)
}

pub fn slot_name() -> String {
    string(&SLOT_NAME)
}

pub fn bootstrap_servers() -> String {
    string(&BOOTSTRAP_SERVERS)
}

/// The librdkafka properties of the setting and of the file. The check hooks
/// refused values that do not parse; the file may have changed since, so
/// its errors are returned (naming the file, never a value).
pub fn kafka_properties() -> Result<Vec<(String, String)>, String> {
    let setting = setting_properties(&string(&KAFKA_PROPERTIES)).map_err(|e| format!("outbox.kafka_properties: {e}"))?;
    let file = read_properties_file(&string(&KAFKA_PROPERTIES_FILE))?;
    kafka_props::merge(setting, file)
}

/// The setting's properties, refused as a whole when one of them may not
/// come from a setting (see `kafka_props::check`).
fn setting_properties(value: &str) -> Result<Vec<(String, String)>, String> {
    let props = kafka_props::parse(value)?;
    kafka_props::check(&props, kafka_props::Origin::Setting)?;
    Ok(props)
}

fn read_properties_file(path: &str) -> Result<Vec<(String, String)>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if !path.starts_with('/') {
        return Err(format!("outbox.kafka_properties_file \"{path}\" must be an absolute path"));
    }
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let cannot = |e: std::io::Error| format!("cannot read outbox.kafka_properties_file \"{path}\": {e}");
    // The ownership checked is the opened file's (fstat), so the text read
    // is the text of the file checked.
    let file = std::fs::File::open(path).map_err(cannot)?;
    let meta = file.metadata().map_err(cannot)?;
    // A regular file of a sane size: the check runs in the postmaster too,
    // where a device or /proc file could block or exhaust memory.
    const MAX_BYTES: u64 = 1024 * 1024;
    if !meta.is_file() || meta.len() > MAX_BYTES {
        return Err(format!("outbox.kafka_properties_file \"{path}\" must be a regular file of at most 1 MiB"));
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let server_uid = unsafe { libc::geteuid() };
    kafka_props::check_file_ownership(meta.uid(), meta.mode(), server_uid)
        .map_err(|e| format!("outbox.kafka_properties_file \"{path}\": {e}"))?;
    let mut text = String::new();
    file.take(MAX_BYTES + 1).read_to_string(&mut text).map_err(cannot)?;
    if text.len() as u64 > MAX_BYTES {
        return Err(format!("outbox.kafka_properties_file \"{path}\" must be a regular file of at most 1 MiB"));
    }
    kafka_props::parse_file(&text)
        .and_then(|props| kafka_props::check(&props, kafka_props::Origin::File).map(|()| props))
        .map_err(|e| format!("outbox.kafka_properties_file \"{path}\": {e}"))
}

pub fn max_event_bytes() -> usize {
    MAX_EVENT_BYTES.get().max(0) as usize
}

/// The parsed topic template, re-parsed only when the setting changed.
pub fn with_topic_template<R>(f: impl FnOnce(&TopicTemplate) -> R) -> R {
    thread_local! {
        static CACHE: std::cell::RefCell<Option<(String, TopicTemplate)>> = const { std::cell::RefCell::new(None) };
    }
    static DEFAULT: Lazy<TopicTemplate> = Lazy::new(|| {
        TopicTemplate::parse(outbox_core::topic::DEFAULT_TEMPLATE).unwrap_or_else(|e| unreachable!("{e}"))
    });
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        let stale = with_cstr(&TOPIC_TEMPLATE, |now| c.as_ref().is_none_or(|(s, _)| s.as_bytes() != now.to_bytes()));
        if stale {
            let current = string(&TOPIC_TEMPLATE);
            // The check hook refused unparsable values, so this only falls
            // back for a value set before the library was loaded.
            let t = TopicTemplate::parse(&current).unwrap_or_else(|_| DEFAULT.clone());
            *c = Some((current, t));
        }
        f(c.as_ref().map(|(_, t)| t).unwrap_or(&DEFAULT))
    })
}

/// The topic template in force, owned (the relay keeps it between reloads).
pub fn topic_template() -> TopicTemplate {
    with_topic_template(|t| t.clone())
}

/// Reports why a value is refused, in the `DETAIL` of Postgres' own
/// "invalid value for parameter" error.
unsafe fn check_failed(detail: &str) -> bool {
    let detail = CString::new(detail.replace('\0', " ")).unwrap_or_default();
    // SAFETY: GUC_check_errdetail_string is read by the GUC machinery right
    // after the hook returns; it expects a palloc'd string, which pstrdup
    // gives in the current memory context, as the C macro does.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE as i32);
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
    }
    false
}

unsafe fn new_value<'a>(newval: *mut *mut c_char) -> &'a str {
    // SAFETY: the GUC machinery passes a valid pointer to a (possibly NULL)
    // NUL-terminated string that outlives the hook call.
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return "";
        }
        CStr::from_ptr(*newval).to_str().unwrap_or("\u{fffd}")
    }
}

string_check_hook!(check_slot_name, outbox_core::validate::slot_name);

string_check_hook!(check_kafka_properties, setting_properties);

string_check_hook!(check_kafka_properties_file, read_properties_file);

string_check_hook!(check_topic_template, TopicTemplate::parse);

string_check_hook!(check_traceparent, |v: &str| if v.is_empty() { Ok(()) } else { outbox_core::trace::check_traceparent(v) });

/// `outbox.traceparent`, borrowed; empty when unset.
pub fn with_traceparent<R>(f: impl FnOnce(&str) -> R) -> R {
    with_cstr(&TRACEPARENT, |c| f(c.to_str().unwrap_or("")))
}

static TOPIC_CREATION: GucSetting<bool> = GucSetting::<bool>::new(true);
static TOPIC_PARTITIONS: GucSetting<i32> = GucSetting::<i32>::new(1);
static TOPIC_REPLICATION_FACTOR: GucSetting<i32> = GucSetting::<i32>::new(-1);
static LINGER_MS: GucSetting<i32> = GucSetting::<i32>::new(1);
static DELETE_PUBLISHED_ROWS: GucSetting<bool> = GucSetting::<bool>::new(true);
static RELAY_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static SAVE_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(200);
static ON_REJECTED_EVENT: GucSetting<OnRejected> = GucSetting::<OnRejected>::new(OnRejected::DeadLetter);
static MAX_RETAINED_WAL_MB: GucSetting<i32> = GucSetting::<i32>::new(16 * 1024);

/// What the relay does with an event Kafka rejects for a reason retrying
/// cannot fix (too large, invalid or missing topic, not authorised).
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnRejected {
    /// Move it, with the reason, to the dead-letter table and go on.
    #[name = c"dead_letter"]
    DeadLetter,
    /// Stop publishing with the slot's position held before it.
    #[name = c"stop"]
    Stop,
}

/// The relay's settings, defined after the core ones in `init`.
pub fn init_relay() {
    GucRegistry::define_bool_guc(
        c"outbox.relay_enabled",
        c"Whether the relay worker publishes; off leaves the slot alone (events wait in WAL).",
        c"Reloadable: switching it off stops publishing and releases the slot; on resumes from the confirmed position.",
        &RELAY_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.confirm_save_interval",
        c"How often the relay writes a moved confirmed position to disk.",
        c"Reloadable. Each save is a small file write with ~3 fsyncs; after a server crash the relay re-sends \
          what committed since the last save, so this bounds the duplicates a crash causes.",
        &SAVE_INTERVAL_MS,
        10,
        60_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"outbox.tombstones",
        c"Whether outbox_emit() accepts a NULL payload, published as a tombstone (a null value, same key).",
        c"Reloadable. For compacted topics: a tombstone removes its key. Off: a NULL payload is refused. \
          Adopted tables have their own option (route.tombstone.on.empty.payload).",
        &TOMBSTONES,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.topic_creation",
        c"Whether the relay creates a missing topic before its first event.",
        c"Reloadable. Off: an event for a missing topic is refused like any rejected event \
          (outbox.on_rejected_event: dead-lettered or the relay stops), naming the topic.",
        &TOPIC_CREATION,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"outbox.topic_partitions",
        c"Partitions of topics the relay creates.",
        c"Reloadable; applies to topics created afterwards.",
        &TOPIC_PARTITIONS,
        1,
        10_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the check hook is a #[pg_guard] function.
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"outbox.topic_replication_factor",
        c"Replication factor of topics the relay creates; -1: the broker's default.replication.factor.",
        c"Reloadable; applies to topics created afterwards. With -1 (default) the broker decides, as for topics \
          its own tools create; set the topic's or broker's min.insync.replicas so that acks=all means what you need.",
        &TOPIC_REPLICATION_FACTOR,
        -1,
        32,
        GucContext::Sighup,
        GucFlags::default(),
        Some(check_replication_factor),
        None,
        None,
    ) };
    GucRegistry::define_int_guc(
        c"outbox.linger_ms",
        c"librdkafka linger.ms of the relay's producer: how long it waits to batch.",
        c"Reloadable: the worker restarts its producer. Caps the latency the producer adds.",
        &LINGER_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"outbox.on_rejected_event",
        c"What the relay does with an event Kafka rejects for good: dead_letter or stop.",
        c"Reloadable. dead_letter (default) moves the event and the reason to the outbox_dead_letter table and \
          keeps publishing (later events of the same aggregate overtake it); stop holds the slot's position \
          before it until the cause is fixed and the relay resumed.",
        &ON_REJECTED_EVENT,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the check hook is a #[pg_guard] function.
    unsafe { GucRegistry::define_int_guc_with_hooks(
        c"outbox.max_retained_wal",
        c"Most WAL the outbox slot may hold back (from its restart_lsn) before new events are refused; -1: no limit.",
        c"Reloadable. Past it, outbox_emit() and inserts into the outbox table fail, so back-pressure reaches the \
          application instead of the slot being invalidated or the disk filling. Other writes still add WAL: \
          this protects the events, not the disk. The relay warns at 50, 75 and 90 %.",
        &MAX_RETAINED_WAL_MB,
        -1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MB,
        Some(check_max_retained_wal),
        None,
        None,
    ) };
    GucRegistry::define_bool_guc(
        c"outbox.delete_published_rows",
        c"Whether the relay deletes outbox table rows once Kafka acknowledged them.",
        c"Reloadable. On (default) keeps the table small; off leaves rows for your own retention job.",
        &DELETE_PUBLISHED_ROWS,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub fn relay_enabled() -> bool {
    RELAY_ENABLED.get()
}

pub fn confirm_save_interval() -> std::time::Duration {
    std::time::Duration::from_millis(SAVE_INTERVAL_MS.get().max(10) as u64)
}

pub fn topic_creation() -> bool {
    TOPIC_CREATION.get()
}
pub fn topic_partitions() -> i32 {
    TOPIC_PARTITIONS.get()
}
pub fn topic_replication_factor() -> i32 {
    TOPIC_REPLICATION_FACTOR.get()
}
pub fn linger_ms() -> u32 {
    LINGER_MS.get().max(0) as u32
}
pub fn on_rejected_event() -> OnRejected {
    ON_REJECTED_EVENT.get()
}

/// The WAL guard's limit in bytes; None when off.
pub fn max_retained_wal() -> Option<u64> {
    let mb = MAX_RETAINED_WAL_MB.get();
    (mb >= 0).then(|| mb as u64 * 1024 * 1024)
}

pub fn tombstones() -> bool {
    TOMBSTONES.get()
}

pub fn delete_published_rows() -> bool {
    DELETE_PUBLISHED_ROWS.get()
}

/// The settings the producer is built from: a change on reload means the
/// worker must rebuild it.
pub fn producer_fingerprint() -> String {
    // The file's content, not only its name: editing it and reloading
    // rebuilds the producer. Hashed so no secret sits in a plain string.
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    format!("{:?}", kafka_properties()).hash(&mut h);
    let amqp = match amqp::sink() {
        // The RabbitMQ settings (and their file) matter only to that sink.
        amqp::SinkKind::Kafka => String::new(),
        amqp::SinkKind::Rabbitmq => amqp::fingerprint(),
    };
    format!("{}\u{1}{}\u{1}{}\u{1}{:x}\u{1}{}\u{1}{}", bootstrap_servers(), max_event_bytes(), linger_ms(), h.finish(), amqp::sink_name(), amqp)
}

/// The destination template for the sink in force, and whether what it
/// produces must be a Kafka topic name (else it is an AMQP routing key).
pub fn destination_template() -> (TopicTemplate, bool) {
    match amqp::sink() {
        amqp::SinkKind::Kafka => (topic_template(), true),
        amqp::SinkKind::Rabbitmq => (amqp::routing_key_template(), false),
    }
}

/// An integer setting where 0 means nothing sensible (-1 is "off" or "the
/// default"): refused with `why`.
///
/// # Safety
/// `newval` is the GUC machinery's pointer to the new value.
unsafe fn refuse_zero(newval: *mut i32, why: &str) -> bool {
    // SAFETY: the caller passes the GUC machinery's valid pointer; see
    // check_failed.
    unsafe { *newval != 0 || check_failed(why) }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_replication_factor(
    newval: *mut i32,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: see refuse_zero.
    unsafe { refuse_zero(newval, "a topic needs at least one replica; use -1 for the broker's default") }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_max_retained_wal(
    newval: *mut i32,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: see refuse_zero.
    unsafe {
        refuse_zero(
            newval,
            "0 would refuse every event (a slot always retains some WAL); use -1 for no limit, or a size such as 16GB",
        )
    }
}
