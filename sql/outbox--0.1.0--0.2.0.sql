-- outbox 0.1.0 -> 0.2.0, run by ALTER EXTENSION outbox UPDATE once the
-- 0.2.0 library is installed and loaded (shared_preload_libraries: restart
-- the server first). Like every extension script it runs with
-- search_path = @extschema@, pg_temp. The result is the catalog a fresh
-- CREATE EXTENSION outbox gives (pg_test/tests/test_upgrade.py compares
-- them object by object).
--
-- Events in flight are safe across it: the relay recognises the outbox
-- table's rows by extension membership (the table keeps its OID when it
-- moves), so rows committed before the update and rows committed after it
-- are published alike, and a stopped relay resumes where it confirmed.

\echo Use "ALTER EXTENSION outbox UPDATE" to load this file. \quit

-- A fresh install refuses a database whose encoding is not UTF8; 0.1.0 did
-- not check. The update goes on there (it carries the hardening below),
-- with a warning: events are JSON sent as UTF-8.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE WARNING 'outbox requires a UTF8 database; database "%" uses %',
                pg_catalog.current_database(), pg_catalog.getdatabaseencoding()
            USING HINT = 'Events are JSON and Kafka records carry UTF-8: text outside UTF-8 cannot be published as is. Move the application to a UTF8 database (ENCODING ''UTF8'', TEMPLATE template0).';
    END IF;
END
$$;

-- 3 below recreates outbox_status: objects of yours that depend on it
-- would be dropped with it, so they are named and the update refused.
DO $$
DECLARE
    dependents text;
BEGIN
    SELECT pg_catalog.string_agg(DISTINCT pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid), ', ')
      INTO dependents
      FROM pg_catalog.pg_depend d
     WHERE d.deptype OPERATOR(pg_catalog.=) 'n'
       AND ((d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
             AND d.refobjid OPERATOR(pg_catalog.=) '@extschema@.outbox_status'::pg_catalog.regclass)
         OR (d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
             AND d.refobjid OPERATOR(pg_catalog.=) '@extschema@.outbox_relay_status()'::pg_catalog.regprocedure))
       AND NOT (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_rewrite'::pg_catalog.regclass
                AND d.objid IN (SELECT r.oid FROM pg_catalog.pg_rewrite r
                                 WHERE r.ev_class OPERATOR(pg_catalog.=) '@extschema@.outbox_status'::pg_catalog.regclass));
    IF dependents IS NOT NULL THEN
        RAISE EXCEPTION 'outbox_status cannot be recreated by the update: % depends on it', dependents
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'outbox 0.2.0 adds columns to outbox_status. Drop those objects, run ALTER EXTENSION outbox UPDATE, then create them again.';
    END IF;
END
$$;

-- 1. The table moves into schema "outbox", so that a user's own table named
-- outbox (the usual name of a Debezium outbox table) can live beside the
-- extension. Same OID, rows, constraints, index, guard trigger and grants
-- (USAGE on the schema goes to PUBLIC, so a role granted INSERT on the
-- table directly keeps it; the schema gives nothing by itself). It takes
-- an ACCESS EXCLUSIVE lock on the table for the moment of the move
-- (outbox_emit() does not touch the table). Code that inserts into the
-- table unqualified must name it outbox.outbox afterwards, or put schema
-- outbox on its search_path. Installed in a schema named outbox, the
-- extension's table is outbox.outbox already and stays.
DO $$
BEGIN
    IF '@extschema@' OPERATOR(pg_catalog.<>) 'outbox' THEN
        IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'outbox') THEN
            RAISE EXCEPTION 'schema "outbox" already exists in database "%"', pg_catalog.current_database()
                USING ERRCODE = 'duplicate_schema',
                      DETAIL = 'outbox 0.2.0 keeps its own table in a schema named outbox, which it creates and owns.',
                      HINT = 'Rename that schema (ALTER SCHEMA outbox RENAME TO ...), then run ALTER EXTENSION outbox UPDATE again.';
        END IF;
        CREATE SCHEMA outbox;
        COMMENT ON SCHEMA outbox IS 'The outbox extension''s own Debezium-style table';
        GRANT USAGE ON SCHEMA outbox TO PUBLIC;
        ALTER TABLE @extschema@.outbox SET SCHEMA outbox;
    END IF;
END
$$;

-- 2. Hardening (issue 9). The row trigger is no longer SECURITY DEFINER:
-- the row becomes JSON with the rights of whoever writes the table, and
-- only the message is written by the library. CREATE OR REPLACE keeps the
-- function's OID (existing user triggers keep working) and its grants, and
-- resets every property it does not name (SECURITY DEFINER, its SET). The
-- C function is looked up in the library now: run with the 0.1.0 library
-- still loaded (the server not restarted), the update fails here, before
-- any 0.2.0 declaration meets a library that does not match it.
CREATE OR REPLACE FUNCTION outbox_row_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_row_trigger';

-- The headers check runs with a pinned search_path, like every function
-- that runs in a privileged context.
ALTER FUNCTION outbox_headers_valid(jsonb) SET search_path = pg_catalog, pg_temp;

-- 3. The status gained columns (forged_messages, unverified_events, sink):
-- a function's result columns cannot change in place, so it and the view
-- over it are made again, with the same grants.
DROP VIEW outbox_status;
DROP FUNCTION outbox_relay_status();
CREATE FUNCTION "outbox_relay_status"() RETURNS TABLE (
	"pid" INT,
	"state" TEXT,
	"slot_name" TEXT,
	"confirmed_lsn" TEXT,
	"lag_bytes" bigint,
	"lag_seconds" double precision,
	"retained_wal_bytes" bigint,
	"max_retained_wal_bytes" bigint,
	"events_published" bigint,
	"bytes_published" bigint,
	"events_in_flight" bigint,
	"retries" bigint,
	"dead_letters" bigint,
	"forged_messages" bigint,
	"unverified_events" bigint,
	"worker_starts" bigint,
	"peak_rss_kb" bigint,
	"broker_reachable" bool,
	"last_error" TEXT,
	"last_error_at" timestamp with time zone,
	"sink" TEXT
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'outbox_relay_status_wrapper';
CREATE VIEW outbox_status AS SELECT * FROM outbox_relay_status();
COMMENT ON VIEW outbox_status IS 'The outbox relay: state, lag, counters, last error (from shared memory, lock-free)';
REVOKE ALL ON FUNCTION outbox_relay_status() FROM PUBLIC;
REVOKE ALL ON outbox_status FROM PUBLIC;
GRANT EXECUTE ON FUNCTION outbox_relay_status() TO pg_monitor;
GRANT SELECT ON outbox_status TO pg_monitor;

-- 4. Dead letters of adopted tables (outbox.tables): their payload may be
-- any bytes and their key NULL. Columns are added at the end, as a fresh
-- install has them; re-publishing leaves those rows alone.
ALTER TABLE outbox_dead_letter
    ALTER COLUMN aggregateid DROP NOT NULL,
    ALTER COLUMN payload DROP NOT NULL,
    ADD COLUMN payload_bytes bytea,
    ADD COLUMN adopted boolean NOT NULL DEFAULT false,
    ADD COLUMN source_table text,
    ADD COLUMN unverified boolean NOT NULL DEFAULT false,
    ADD CONSTRAINT outbox_dead_letter_event_check CHECK (adopted OR aggregateid IS NOT NULL);
CREATE OR REPLACE FUNCTION outbox_dead_letter_republish(event_id uuid DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    n bigint := 0;
    left_alone bigint;
BEGIN
    FOR r IN
        WITH d AS (
            DELETE FROM @extschema@.outbox_dead_letter
            WHERE (event_id IS NULL OR id = event_id) AND NOT adopted AND NOT unverified
            RETURNING *
        )
        SELECT * FROM d ORDER BY commit_lsn, id
    LOOP
        PERFORM @extschema@.outbox_emit_with_id(r.id, r.aggregatetype, r.aggregateid, r.type, r.payload, r.headers, r.topic);
        n := n + 1;
    END LOOP;
    IF event_id IS NULL THEN
        SELECT count(*) INTO left_alone FROM @extschema@.outbox_dead_letter l WHERE l.unverified;
        IF left_alone OPERATOR(pg_catalog.>) 0 THEN
            RAISE NOTICE '% unverified dead letter(s) left alone: any role can write such an event', left_alone
                USING HINT = 'Check each (reason "not verified"); re-publish one your application wrote by its id, after setting its unverified to false.';
        END IF;
    END IF;
    IF event_id IS NOT NULL AND n = 0 THEN
        IF EXISTS (SELECT FROM @extschema@.outbox_dead_letter l WHERE l.id = event_id AND l.adopted) THEN
            RAISE EXCEPTION 'dead letter % is a row of an adopted table: it is published again from that table', event_id
                USING ERRCODE = 'feature_not_supported',
                      HINT = 'Insert the row into its table again (source_table; payload_bytes holds its payload), then delete the dead letter.';
        END IF;
        IF EXISTS (SELECT FROM @extschema@.outbox_dead_letter l WHERE l.id = event_id AND l.unverified) THEN
            RAISE EXCEPTION 'dead letter % was not verified: any role can write such an event with pg_logical_emit_message(), and re-publishing signs it with this server''s key', event_id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = format('If your application wrote it (under a key this server no longer has): UPDATE outbox_dead_letter SET unverified = false WHERE id = %L, then call this again.', event_id);
        END IF;
        RAISE EXCEPTION 'no dead letter with id %', event_id
            USING ERRCODE = 'no_data_found',
                  HINT = 'SELECT id, reason FROM outbox_dead_letter lists them.';
    END IF;
    RETURN n;
END
$$;

