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
//! - `relay`: the worker: decode → deliver → acknowledge → confirm
//! - `sink`: where events go (Kafka, RabbitMQ), behind one trait
//! - `dead_letter`, `slot`, `shmem` (status), `ops` (SQL functions for operators)
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(any(feature = "pg13", feature = "pg14"))]
compile_error!("outbox supports PostgreSQL 15, 16, 17 and 18 (see src/ffi.rs)");

use pgrx::prelude::*;

mod adopt;
mod clock;
mod dead_letter;
mod emit;
mod event_id;
mod errors;
mod ffi;
mod key;
mod ops;
mod plugin;
mod row;
mod row_trigger;
mod settings;
mod shmem;
mod slot;
mod relay;
mod sink;

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
        shmem::init();
        // SAFETY: a plain global flag, set from the command line.
        if unsafe { pg_sys::IsBinaryUpgrade } {
            // pg_upgrade starts both servers: no relay there (it would
            // create a slot in the half-built new cluster).
            log!("outbox: binary upgrade mode; the relay worker does not start");
        } else {
            relay::register();
        }
    } else {
        // Without preloading there is no relay: outbox_emit() says so.
        log!("outbox: loaded without shared_preload_libraries; the relay worker does not run");
    }
}

/// In-database tests (`cargo pgrx test`): the SQL API, its validation and
/// error codes, the DDL and the settings. They run inside a transaction that
/// is rolled back, so nothing here is ever decoded; committed behaviour is
/// tested end to end in `pg_test/`.
#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// `outbox_emit()` refuses to run without the configured slot. Creating a
    /// slot is not transactional, so it outlives the test's rollback; it must be
    /// created through a read-only SPI call, before anything assigns the test's
    /// transaction an id (DESIGN.md point 10).
    fn ensure_slot() {
        // Spi::get_one assigns an xid (pgrx marks the transaction mutable),
        // so read-only selects through client.select.
        let select = |q: &str| {
            Spi::connect(|c| c.select(q, Some(1), &[])?.first().get_one::<bool>()).expect(q);
        };
        // Tests run in parallel: one creates the slot, the others wait on
        // the lock and then find it ready.
        select("SELECT pg_advisory_lock(7263) IS NOT NULL");
        select(
            "SELECT CASE WHEN EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = 'outbox') THEN true
                         ELSE (SELECT true FROM pg_create_logical_replication_slot('outbox', 'outbox')) END",
        );
        select("SELECT pg_advisory_unlock(7263)");
    }

    #[pg_test]
    fn emit_returns_a_fresh_uuid_v7() {
        ensure_slot();
        let a = Spi::get_one::<pgrx::Uuid>("SELECT outbox_emit('Order', '1', 'OrderPlaced', '{\"total\": 4200}')")
            .unwrap()
            .unwrap();
        let b = Spi::get_one::<pgrx::Uuid>("SELECT outbox_emit('Order', '1', 'OrderPlaced', 'null', '{\"trace\": \"t\"}', 'orders')")
            .unwrap()
            .unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[6] >> 4, 7, "version nibble");
        // No table row: emit writes a logical message only.
        assert_eq!(Spi::get_one::<i64>("SELECT count(*) FROM outbox.outbox").unwrap(), Some(0));
    }

    #[pg_test(error = "outbox event aggregate type must not be NULL")]
    fn emit_refuses_null_aggregate_type() {
        ensure_slot();
        Spi::run("SELECT outbox_emit(NULL, '1', 'T', '{}')").unwrap();
    }

    #[pg_test(error = "outbox event payload must not be NULL")]
    fn emit_refuses_null_payload() {
        ensure_slot();
        Spi::run("SELECT outbox_emit('A', '1', 'T', NULL)").unwrap();
    }

    #[pg_test(error = "outbox event header \"n\" must be a JSON string, not a number")]
    fn emit_refuses_non_string_headers() {
        ensure_slot();
        Spi::run("SELECT outbox_emit('A', '1', 'T', '{}', '{\"n\": 1}')").unwrap();
    }

    #[pg_test(error = "Kafka topic name \"no/slash\" contains the character '/', which Kafka rejects")]
    fn emit_refuses_bad_topic() {
        ensure_slot();
        Spi::run("SELECT outbox_emit('A', '1', 'T', '{}', '{}', 'no/slash')").unwrap();
    }

    #[pg_test(error = "cannot execute outbox_emit() in a read-only transaction")]
    fn emit_refuses_read_only_transaction() {
        ensure_slot();
        Spi::run("SET transaction_read_only = on").unwrap();
        Spi::run("SELECT outbox_emit('A', '1', 'T', '{}')").unwrap();
    }

    #[pg_test]
    fn table_accepts_debezium_style_rows_with_defaults() {
        ensure_slot();
        Spi::run("INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload) VALUES ('Order', '7', 'OrderPlaced', '{}')")
            .unwrap();
        let (headers, has_id, has_time) = Spi::get_three::<pgrx::JsonB, bool, bool>(
            "SELECT headers, id IS NOT NULL, created_at IS NOT NULL FROM outbox.outbox WHERE aggregateid = '7'",
        )
        .unwrap();
        assert_eq!(headers.unwrap().0, serde_json::json!({}));
        assert_eq!((has_id, has_time), (Some(true), Some(true)));
    }

    #[pg_test(error = "outbox event is 1000188 bytes as a Kafka record, more than outbox.max_event_bytes (999000)")]
    fn table_refuses_oversized_rows() {
        ensure_slot();
        Spi::run(
            "INSERT INTO outbox.outbox (aggregatetype, aggregateid, type, payload)
             VALUES ('A', '1', 'T', to_jsonb(repeat('x', 1000000)))",
        )
        .unwrap();
    }

    #[pg_test]
    fn only_the_producer_role_may_emit_or_insert() {
        let privs = Spi::get_one::<String>(
            "SELECT string_agg(p, ',' ORDER BY p) FROM (VALUES
                ('public-emit:' || has_function_privilege('public', 'outbox_emit(text,text,text,jsonb,jsonb,text)', 'EXECUTE')),
                ('public-insert:' || has_table_privilege('public', 'outbox.outbox', 'INSERT')),
                ('producer-emit:' || has_function_privilege('outbox_producer', 'outbox_emit(text,text,text,jsonb,jsonb,text)', 'EXECUTE')),
                ('producer-insert:' || has_table_privilege('outbox_producer', 'outbox.outbox', 'INSERT')),
                ('producer-select:' || has_table_privilege('outbox_producer', 'outbox.outbox', 'SELECT')),
                ('producer-delete:' || has_table_privilege('outbox_producer', 'outbox.outbox', 'DELETE'))
             ) AS t(p)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            privs,
            "producer-delete:false,producer-emit:true,producer-insert:true,producer-select:false,public-emit:false,public-insert:false"
        );
    }

    #[pg_test]
    fn settings_have_documented_defaults() {
        let show = |name: &str| Spi::get_one::<String>(&format!("SHOW {name}")).unwrap().unwrap();
        assert_eq!(show("outbox.slot_name"), "outbox");
        assert_eq!(show("outbox.topic_template"), "outbox.event.${aggregatetype}");
        assert_eq!(show("outbox.max_event_bytes"), "999000B");
        assert_eq!(show("outbox.kafka_bootstrap_servers"), "localhost:9092");
        // The broker's default.replication.factor, not 1.
        assert_eq!(show("outbox.topic_replication_factor"), "-1");
    }

    #[pg_test(error = "invalid configuration parameter name \"outbox.slotname\"")]
    fn the_outbox_prefix_is_reserved() {
        Spi::run("SET outbox.slotname = 'x'").unwrap();
    }
}

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
            "outbox.database = 'pgrx_tests'",
            // The tests own the slot; the relay is tested end to end in pg_test/.
            "outbox.relay_enabled = off",
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
