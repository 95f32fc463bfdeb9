-- pgmesh schema, version 6: replicated DDL.

-- Node-local settings the daemon keeps (e.g. capture_ddl).
CREATE TABLE pgmesh.setting (
    name  text PRIMARY KEY,
    value text NOT NULL
);

-- Emit a DDL command into the replication stream: a transactional logical
-- decoding message, so every node runs it at the same point among the data
-- changes around it. The applier runs it with the origin's search_path.
CREATE FUNCTION pgmesh.emit_ddl(command text) RETURNS void
LANGUAGE sql AS $$
    SELECT pg_logical_emit_message(true, 'pgmesh_ddl',
        json_build_object('search_path', current_setting('search_path'), 'command', command)::text)
$$;

-- Run a DDL statement here and on every node. First waits until every peer
-- has applied everything this node committed, so no peer still has changes
-- in flight that the DDL would break; with proceed => true it runs anyway,
-- and a peer that is away applies it in order when it returns.
CREATE FUNCTION pgmesh.replicate_ddl(command text, timeout interval DEFAULT '30s', proceed boolean DEFAULT false)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF NOT proceed AND NOT pgmesh.wait_for_peers(timeout) THEN
        RAISE EXCEPTION 'not every peer has applied this node''s changes within %, so the DDL was not run', timeout
            USING ERRCODE = '55000',
                  HINT = 'pgmesh status shows which peer lags or is unreachable; retry when it is back, or pass proceed => true (pgmesh ddl --proceed) and it applies the DDL in order when it returns.';
    END IF;
    PERFORM set_config('pgmesh.replicating_ddl', 'on', true);
    EXECUTE command;
    PERFORM pgmesh.emit_ddl(command);
    PERFORM set_config('pgmesh.replicating_ddl', 'off', true);
END
$$;

-- Automatic capture (setting capture_ddl = on): plain DDL on replicated
-- schemas is replicated like replicate_ddl would. Temporary objects,
-- pgmesh's own and CONCURRENTLY (which cannot run inside the applying
-- transaction) stay local, with a notice. Event triggers do not fire for
-- applied changes (session_replication_role = replica), so nothing loops.
CREATE FUNCTION pgmesh.note_dropped_temp() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_event_trigger_dropped_objects() WHERE is_temporary OR schema_name = 'pgmesh') THEN
        PERFORM set_config('pgmesh.local_drop', 'on', true);
    END IF;
END
$$;

CREATE FUNCTION pgmesh.capture_ddl() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    q text := current_query();
    key text;
BEGIN
    IF current_setting('pgmesh.replicating_ddl', true) = 'on'
       OR NOT EXISTS (SELECT 1 FROM pgmesh.setting WHERE name = 'capture_ddl' AND value = 'on') THEN
        RETURN;
    END IF;
    IF current_setting('pgmesh.local_drop', true) = 'on'
       OR EXISTS (SELECT 1 FROM pg_event_trigger_ddl_commands()
                  WHERE schema_name IN ('pg_temp', 'pgmesh') OR schema_name LIKE 'pg\_temp\_%' OR in_extension) THEN
        PERFORM set_config('pgmesh.local_drop', 'off', true);
        RAISE NOTICE 'pgmesh: % on a temporary or pgmesh object stays on this node', tg_tag;
        RETURN;
    END IF;
    IF q ~* '\mconcurrently\M' THEN
        RAISE NOTICE 'pgmesh: % CONCURRENTLY cannot be replicated (it cannot run inside a transaction): run it on every node', tg_tag;
        RETURN;
    END IF;
    -- A query string holding several statements fires this once per
    -- statement: send it once.
    key := md5(q) || ':' || txid_current();
    IF current_setting('pgmesh.captured', true) = key THEN
        RETURN;
    END IF;
    PERFORM set_config('pgmesh.captured', key, true);
    PERFORM pgmesh.emit_ddl(q);
END
$$;

-- The event triggers that call these (only a superuser may create them) are
-- made by pgmesh.install_event_triggers() (version 11).
