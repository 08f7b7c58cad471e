-- outbox: the extension's SQL objects. Functions, the dead-letter table
-- and the status view are created in the schema chosen at CREATE EXTENSION
-- (by default the first schema of search_path); the Debezium-style table is
-- outbox.outbox, in a schema of its own (see below).

-- Events are JSON sent to Kafka as UTF-8, and outbox_emit() refuses text it
-- cannot send as is: in a database of another encoding the outbox table's
-- rows could only be converted lossily. One behaviour for both paths: the
-- extension is refused there.
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() OPERATOR(pg_catalog.<>) 'UTF8' THEN
        RAISE EXCEPTION 'outbox requires a UTF8 database; database "%" uses %',
                pg_catalog.current_database(), pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Events are JSON and Kafka records carry UTF-8. Create the database with ENCODING ''UTF8'' (TEMPLATE template0) and install outbox there.';
    END IF;
END
$$;

-- The role that may write events, and nothing else. Roles are cluster-wide,
-- so it may already exist from another database.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'outbox_producer') THEN
        CREATE ROLE outbox_producer NOLOGIN;
    END IF;
END
$$;

-- Headers: a JSON object of string values, none named id, type or
-- aggregatetype (the relay sets those). Mirrors outbox_emit()'s check.
CREATE FUNCTION outbox_headers_valid(headers jsonb) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT headers IS NULL OR (
        pg_catalog.jsonb_typeof(headers) = 'object'
        AND NOT EXISTS (
            SELECT FROM pg_catalog.jsonb_each(headers) AS h(k, v)
            WHERE pg_catalog.jsonb_typeof(h.v) <> 'string' OR h.k = '' OR h.k IN ('id', 'type', 'aggregatetype')
        )
    )
$$;

-- The extension's own table lives in schema "outbox", a member of the
-- extension (dropped with it): the most common name of a Debezium outbox
-- table is "outbox", and the databases that have one (in public or any
-- schema of the path) must be able to install the extension beside it.
-- Installed in a schema named outbox (CREATE EXTENSION outbox SCHEMA
-- outbox), the extension keeps its table there. The relay finds its table
-- by extension membership, never by schema. USAGE on the schema gives
-- nothing by itself: the table's own grants decide who may insert.
DO $$
BEGIN
    IF '@extschema@' OPERATOR(pg_catalog.<>) 'outbox' THEN
        IF EXISTS (SELECT FROM pg_catalog.pg_namespace WHERE nspname OPERATOR(pg_catalog.=) 'outbox') THEN
            RAISE EXCEPTION 'schema "outbox" already exists in database "%"', pg_catalog.current_database()
                USING ERRCODE = 'duplicate_schema',
                      DETAIL = 'The extension keeps its own table in a schema named outbox, which it creates and owns.',
                      HINT = 'Rename that schema (ALTER SCHEMA outbox RENAME TO ...) and create the extension again, or install the extension in it: CREATE EXTENSION outbox SCHEMA outbox.';
        END IF;
        CREATE SCHEMA outbox;
        COMMENT ON SCHEMA outbox IS 'The outbox extension''s own Debezium-style table';
        GRANT USAGE ON SCHEMA outbox TO PUBLIC;
    END IF;
END
$$;

-- The Debezium-style outbox table: code that already inserts rows with
-- these columns works unchanged. Rows are published like outbox_emit()'s
-- events; the constraints and the guard trigger refuse, at INSERT, a row
-- the relay could not publish.
CREATE TABLE outbox.outbox (
    id            uuid        NOT NULL DEFAULT gen_random_uuid() PRIMARY KEY,
    aggregatetype text        NOT NULL CONSTRAINT outbox_aggregatetype_not_empty CHECK (aggregatetype <> ''),
    aggregateid   text        NOT NULL CONSTRAINT outbox_aggregateid_not_empty CHECK (aggregateid <> ''),
    type          text        NOT NULL CONSTRAINT outbox_type_not_empty CHECK (type <> ''),
    payload       jsonb       NOT NULL,
    headers       jsonb       NOT NULL DEFAULT '{}' CONSTRAINT outbox_headers_valid CHECK (@extschema@.outbox_headers_valid(headers)),
    created_at    timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE outbox.outbox IS 'Debezium-style outbox: inserted rows are published to Kafka by the outbox relay';

-- Same checks as outbox_emit() that need settings or server state: the
-- topic the row routes to, its size as a Kafka record, the slot, the database.
CREATE FUNCTION outbox_table_guard() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_table_guard';

CREATE TRIGGER outbox_guard BEFORE INSERT ON outbox.outbox
FOR EACH ROW EXECUTE FUNCTION outbox_table_guard();

-- Writes one event as a transactional logical decoding message; no table row.
CREATE FUNCTION outbox_emit(
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb DEFAULT '{}',
    topic          text  DEFAULT NULL
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_emit';

COMMENT ON FUNCTION outbox_emit(text, text, text, jsonb, jsonb, text) IS
    'Writes an outbox event in the current transaction; it is published to Kafka if and only if the transaction commits';

-- Waits until everything committed up to `upto` (default: now) is
-- acknowledged by Kafka and confirmed; false on timeout.
CREATE FUNCTION outbox_drain(timeout_ms integer DEFAULT 30000, upto pg_lsn DEFAULT NULL) RETURNS boolean
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_drain';

-- Dead letters: events Kafka rejected for a reason retrying cannot fix,
-- written by the relay with the reason when outbox.on_rejected_event =
-- dead_letter (the stream goes on without them). Fix the cause, then
-- outbox_dead_letter_republish(). `topic` is where the event was routed
-- (NULL when no topic could be derived); UPDATE it to send the event
-- elsewhere when re-publishing. A NULL payload is a tombstone
-- (outbox.tombstones). Rows of adopted tables (outbox.tables) are
-- `adopted`: their payload is kept as bytes in `payload_bytes`, their key
-- may be NULL, `source_table` names the table (NULL when a broker refused
-- the message, which names only the topic), and they are published again
-- by inserting the row into that table. An `unverified` letter's signature
-- did not verify (any role can write such a message): re-publishing all
-- leaves it alone; one is re-published by id once an operator has checked
-- it and set `unverified` to false.
CREATE TABLE outbox_dead_letter (
    id               uuid        NOT NULL PRIMARY KEY,
    aggregatetype    text        NOT NULL,
    aggregateid      text,
    type             text        NOT NULL,
    payload          jsonb,
    headers          jsonb       NOT NULL DEFAULT '{}',
    topic            text,
    reason           text        NOT NULL,
    commit_lsn       pg_lsn      NOT NULL,
    committed_at     timestamptz NOT NULL,
    dead_lettered_at timestamptz NOT NULL DEFAULT now(),
    payload_bytes    bytea,
    adopted          boolean     NOT NULL DEFAULT false,
    source_table     text,
    unverified       boolean     NOT NULL DEFAULT false,
    CONSTRAINT outbox_dead_letter_event_check CHECK (adopted OR aggregateid IS NOT NULL)
);

COMMENT ON TABLE outbox_dead_letter IS 'Events Kafka rejected for good, with the reason; re-publish with outbox_dead_letter_republish()';

-- Dead letters are data: pg_dump keeps them (an upgrade by dump and restore
-- must not lose them).
SELECT pg_catalog.pg_extension_config_dump('outbox_dead_letter', '');

-- outbox_emit() with a given id: a re-published dead letter keeps the id
-- consumers de-duplicate on. Superuser-only.
CREATE FUNCTION outbox_emit_with_id(
    id             uuid,
    aggregate_type text,
    aggregate_id   text,
    event_type     text,
    payload        jsonb,
    headers        jsonb,
    topic          text
) RETURNS uuid
LANGUAGE c VOLATILE PARALLEL UNSAFE
AS 'MODULE_PATHNAME', 'outbox_emit_with_id';

-- Writes dead letters again as events, in the caller's transaction, oldest
-- commit first, and removes them from the table: published if and only if
-- that transaction commits. NULL: all of them. Returns how many.
CREATE FUNCTION outbox_dead_letter_republish(event_id uuid DEFAULT NULL) RETURNS bigint
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

-- A ready row trigger: publishes a table's inserts, updates and deletes.
--   CREATE TRIGGER orders_outbox AFTER INSERT OR UPDATE OR DELETE ON orders
--   FOR EACH ROW EXECUTE FUNCTION outbox_row_trigger('Order', 'id');
-- Arguments: aggregate type, key column, then optional event types for
-- insert, update and delete (default: <aggregate type>Created / Updated /
-- Deleted). Payload: the new row as JSON, the old row for deletes.
-- Not SECURITY DEFINER: the row is turned into JSON with the rights of
-- whoever writes the table (a cast or output function it reaches runs as
-- them), and only the message is written by the extension. Writers of the
-- table publish without holding outbox_producer; creating such a trigger
-- needs EXECUTE on this function, which only outbox_producer has.
CREATE FUNCTION outbox_row_trigger() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'outbox_row_trigger';

-- Least privilege: nothing for PUBLIC; the producer role may emit, insert
-- and attach the ready trigger, and nothing else.
REVOKE ALL ON FUNCTION outbox_emit(text, text, text, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_table_guard() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_row_trigger() FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_drain(integer, pg_lsn) FROM PUBLIC;
REVOKE ALL ON TABLE outbox.outbox FROM PUBLIC;
REVOKE ALL ON TABLE outbox_dead_letter FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_emit_with_id(uuid, text, text, text, jsonb, jsonb, text) FROM PUBLIC;
REVOKE ALL ON FUNCTION outbox_dead_letter_republish(uuid) FROM PUBLIC;
GRANT USAGE ON SCHEMA @extschema@ TO outbox_producer;
GRANT EXECUTE ON FUNCTION outbox_emit(text, text, text, jsonb, jsonb, text) TO outbox_producer;
GRANT EXECUTE ON FUNCTION outbox_row_trigger() TO outbox_producer;
GRANT INSERT ON TABLE outbox.outbox TO outbox_producer;
