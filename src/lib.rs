//! outbox: a transactional outbox for PostgreSQL.
//!
//! Events are written in the application's transaction (`outbox_emit()` or an
//! INSERT into the outbox table) and published to Kafka from the logical
//! decoding stream by a background worker inside the server. This crate is
//! the Postgres shell; the pure logic lives in `outbox-core` (src/core).
//!
//! Module map, in the order of the flow:
//! - `settings`: the `outbox.*` GUCs
//! - `key`: the key that authenticates events written by `outbox_emit()`
//! - `emit`: `outbox_emit()` and the outbox table's insert guard
//! - `row`: reading an outbox table row
//! - `plugin`: the logical decoding output plugin
#![deny(unsafe_op_in_unsafe_fn)]

use pgrx::prelude::*;

mod emit;
mod errors;
mod ffi;
mod key;
mod plugin;
mod row;
mod settings;

pgrx::pg_module_magic!();

extension_sql_file!("../sql/outbox.sql", name = "outbox_schema");

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::init();
    // SAFETY: a plain global flag set by the postmaster while it loads
    // shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        if let Err(e) = key::init_in_postmaster() {
            // Without the key no event can be written or verified; refuse
            // to start rather than run a server whose outbox silently fails.
            FATAL!("outbox: {e}");
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests;

/// Hooks for pgrx's `#[pg_test]` runner (not the top-level `pg_test/`
/// directory, which holds the end-to-end suite).
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        let mut conf = vec![
            "shared_preload_libraries = 'outbox'",
            "wal_level = logical",
            "max_replication_slots = 10",
            "max_wal_senders = 10",
        ];
        if server_has_output_plugin_libraries() {
            conf.push("output_plugin_libraries = 'pgoutput, test_decoding, outbox'");
        }
        conf
    }

    /// Since 15.19 a library must be listed in output_plugin_libraries to be
    /// used as an output plugin; older servers refuse the unknown setting.
    fn server_has_output_plugin_libraries() -> bool {
        let pg_config = std::env::var("PGRX_PG_CONFIG_PATH")
            .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin/pg_config".into());
        let sharedir = std::process::Command::new(pg_config)
            .arg("--sharedir")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        std::fs::read_to_string(format!("{sharedir}/postgresql.conf.sample"))
            .map(|s| s.contains("output_plugin_libraries"))
            .unwrap_or(false)
    }
}
