//! The sink choice and the RabbitMQ sink's settings (`outbox.sink`,
//! `outbox.amqp_*`). All reloadable: a change restarts the stream with a
//! new client, as a Kafka setting does.

use std::ffi::{c_char, c_void, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::topic::TopicTemplate;

use super::{check_failed, new_value, string};

#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum SinkKind {
    #[name = c"kafka"]
    Kafka,
    #[name = c"rabbitmq"]
    Rabbitmq,
}

static SINK: GucSetting<SinkKind> = GucSetting::<SinkKind>::new(SinkKind::Kafka);
static AMQP_URL: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"amqp://localhost:5672/%2f"));
static AMQP_PROPERTIES_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static AMQP_EXCHANGE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"outbox"));
static AMQP_EXCHANGE_DECLARE: GucSetting<bool> = GucSetting::<bool>::new(true);
static AMQP_ROUTING_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"${type}"));

pub fn init() {
    GucRegistry::define_enum_guc(
        c"outbox.sink",
        c"Where the relay publishes: kafka or rabbitmq.",
        c"Reloadable: the relay restarts its stream from the confirmed position with the new sink.",
        &SINK,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the check hooks are #[pg_guard] functions.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.amqp_url",
            c"RabbitMQ server, as an AMQP URI: amqp://user:password@host:port/vhost.",
            c"Reloadable. Superuser-only because it may hold a password; outbox.amqp_properties_file keeps the \
              password out of the settings.",
            &AMQP_URL,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_amqp_url),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.amqp_properties_file",
            c"File with username=... and password=... lines for RabbitMQ: the place for the password.",
            c"Reloadable. Absolute path, read by the server's OS user; its values replace the URL's.",
            &AMQP_PROPERTIES_FILE,
            GucContext::Sighup,
            GucFlags::SUPERUSER_ONLY,
            Some(check_amqp_properties_file),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.amqp_routing_key",
            c"Routing key of an event without an explicit topic; ${aggregatetype} and ${type} are replaced.",
            c"Reloadable. The default, the event type, is what Debezium Server's RabbitMQ sink uses.",
            &AMQP_ROUTING_KEY,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_routing_key),
            None,
            None,
        );
    }
    GucRegistry::define_string_guc(
        c"outbox.amqp_exchange",
        c"The exchange events are published to.",
        c"Reloadable.",
        &AMQP_EXCHANGE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"outbox.amqp_exchange_declare",
        c"Declare the exchange (durable, type topic) when it is missing; off: it must exist.",
        c"Reloadable. Off suits a server whose topology is managed elsewhere: a missing exchange is then refused.",
        &AMQP_EXCHANGE_DECLARE,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

pub fn sink() -> SinkKind {
    SINK.get()
}

/// `kafka` or `rabbitmq`, as the setting spells it.
pub fn sink_name() -> &'static str {
    match sink() {
        SinkKind::Kafka => "kafka",
        SinkKind::Rabbitmq => "rabbitmq",
    }
}

pub fn exchange() -> String {
    string(&AMQP_EXCHANGE)
}

pub fn exchange_declare() -> bool {
    AMQP_EXCHANGE_DECLARE.get()
}

pub fn routing_key_template() -> TopicTemplate {
    TopicTemplate::parse(&string(&AMQP_ROUTING_KEY))
        .or_else(|_| TopicTemplate::parse("${type}"))
        .unwrap_or_else(|e| unreachable!("{e}"))
}

/// The URL with the properties file's username and password applied.
pub fn url() -> Result<String, String> {
    let url = string(&AMQP_URL);
    let creds = read_properties_file(&string(&AMQP_PROPERTIES_FILE))?;
    outbox_core::amqp::with_credentials(&url, creds.0.as_deref(), creds.1.as_deref())
}

/// Everything the RabbitMQ client is built from, hashed: a reload that
/// changes it restarts the stream.
pub fn fingerprint() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (sink() as i32, url(), exchange(), exchange_declare()).hash(&mut h);
    format!("{:x}", h.finish())
}

fn read_properties_file(path: &str) -> Result<(Option<String>, Option<String>), String> {
    if path.is_empty() {
        return Ok((None, None));
    }
    if !path.starts_with('/') {
        return Err(format!("outbox.amqp_properties_file \"{path}\" must be an absolute path"));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read outbox.amqp_properties_file \"{path}\": {e}"))?;
    outbox_core::amqp::parse_properties(&text).map_err(|e| format!("outbox.amqp_properties_file \"{path}\": {e}"))
}

string_check_hook!(check_amqp_url, outbox_core::amqp::check_url);

string_check_hook!(check_amqp_properties_file, read_properties_file);

string_check_hook!(check_routing_key, |v: &str| TopicTemplate::parse(v).map_err(|e| e.replace("topic template", "routing key template")));
