//! CloudEvents settings (`outbox.cloudevents`, `outbox.cloudevents_source`,
//! `outbox.cloudevents_amqp_prefix`). Reloadable: the relay reads them at
//! each reload, and events sent after it take the new form (unconfirmed
//! events a later restart of the stream sends again included).

use std::ffi::{c_char, c_void, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use outbox_core::cloudevents::{self, Mode, AMQP_PREFIXES};

use super::{check_failed, new_value, string};

#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum CloudEventsMode {
    #[name = c"off"]
    Off,
    #[name = c"binary"]
    Binary,
    #[name = c"structured"]
    Structured,
}

static MODE: GucSetting<CloudEventsMode> = GucSetting::<CloudEventsMode>::new(CloudEventsMode::Off);
static SOURCE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c""));
static AMQP_PREFIX: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"cloudEvents_"));

pub fn init() {
    GucRegistry::define_enum_guc(
        c"outbox.cloudevents",
        c"Publish events as CloudEvents 1.0: off, binary (attributes as headers) or structured (the JSON event format).",
        c"Reloadable. The key and the outbox headers stay as they are in every mode.",
        &MODE,
        GucContext::Sighup,
        GucFlags::default(),
    );
    // SAFETY: the check hooks are #[pg_guard] functions.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.cloudevents_source",
            c"The CloudEvents source attribute (a URI-reference); empty: /outbox/<outbox.database>.",
            c"Reloadable.",
            &SOURCE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_source),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"outbox.cloudevents_amqp_prefix",
            c"Prefix of the attribute headers on RabbitMQ in binary mode: cloudEvents_, cloudEvents: or ce-.",
            c"Reloadable. cloudEvents_ is the AMQP binding's; ce- is what RabbitMQ's 0-9-1 SDKs read.",
            &AMQP_PREFIX,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_amqp_prefix),
            None,
            None,
        );
    }
}

pub fn mode() -> Mode {
    match MODE.get() {
        CloudEventsMode::Off => Mode::Off,
        CloudEventsMode::Binary => Mode::Binary,
        CloudEventsMode::Structured => Mode::Structured,
    }
}

/// The source in force (the default computed from `outbox.database`).
pub fn source() -> String {
    let s = string(&SOURCE);
    if s.is_empty() {
        cloudevents::default_source(&super::database())
    } else {
        s
    }
}

pub fn amqp_prefix() -> String {
    string(&AMQP_PREFIX)
}

string_check_hook!(check_source, |v: &str| if v.is_empty() { Ok(()) } else { cloudevents::check_source(v) });

string_check_hook!(check_amqp_prefix, |v: &str| if AMQP_PREFIXES.contains(&v) {
    Ok(())
} else {
    Err(format!("\"{v}\" is not one of {}", AMQP_PREFIXES.join(", ")))
});
