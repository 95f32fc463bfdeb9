-- pgmesh schema, version 14: row versions survive table rewrites
-- (docs/conflicts.md, "Table rewrites").

-- A row's version is the commit time and origin of the transaction that
-- wrote it (pg_xact_commit_timestamp_origin of its xmin). A table rewrite
-- (ALTER TABLE ... TYPE, ... SET ACCESS METHOD, a column with a volatile
-- default) writes every row again in the rewriting transaction, with the
-- data it had: read that way, every row would look written here at the
-- rewrite, and a peer's change committed before the rewrite but arriving
-- after it would lose to it here while it wins everywhere else. So each
-- rewrite is noted here, and the rows it wrote have an unknown version,
-- which last-update-wins counts as the oldest (as for frozen rows).
CREATE TABLE pgmesh.table_rewrite (
    relid oid NOT NULL,
    -- The rewriting transaction (top level: its rows may carry the xid of
    -- a subtransaction, which commits at the same time).
    xid xid8 NOT NULL DEFAULT pg_catalog.pg_current_xact_id(),
    noted_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON pgmesh.table_rewrite (relid);

-- Enabled ALWAYS (install_event_triggers): a rewrite by replicated DDL,
-- applied as the peer, is noted too.
CREATE FUNCTION pgmesh.note_table_rewrite() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    INSERT INTO pgmesh.table_rewrite (relid) VALUES (pg_catalog.pg_event_trigger_table_rewrite_oid());
END
$$;

-- The DDL pgmesh runs itself (pgmesh.replicate_ddl, and a peer's DDL
-- applied here) notes its rewrites without the event trigger too, which
-- only a superuser can create: before_ddl remembers each user table's file,
-- after_ddl notes the tables whose file the statement replaced (a rewrite,
-- or a TRUNCATE, which leaves no rows to misdate).
CREATE FUNCTION pgmesh.before_ddl() RETURNS void LANGUAGE sql AS $$
    SELECT pg_catalog.set_config('pgmesh.table_files',
        (SELECT coalesce(pg_catalog.jsonb_object_agg(c.oid::text, c.relfilenode), '{}')::text
         FROM pgmesh.user_tables u JOIN pg_catalog.pg_class c ON c.oid = u.relid), true);
$$;

CREATE FUNCTION pgmesh.after_ddl() RETURNS void LANGUAGE sql AS $$
    INSERT INTO pgmesh.table_rewrite (relid)
    SELECT c.oid FROM pg_catalog.jsonb_each_text(pg_catalog.current_setting('pgmesh.table_files')::jsonb) f
    JOIN pg_catalog.pg_class c ON c.oid = f.key::oid
    WHERE c.relfilenode::text <> f.value
      AND NOT EXISTS (SELECT 1 FROM pgmesh.table_rewrite r
                      WHERE r.relid = c.oid AND r.xid = pg_catalog.pg_current_xact_id());
$$;

-- replicate_ddl as in version 11, with the DDL between before_ddl and
-- after_ddl.
CREATE OR REPLACE FUNCTION pgmesh.replicate_ddl(command text, timeout interval DEFAULT '30s', proceed boolean DEFAULT false) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT proceed AND NOT pgmesh.wait_for_peers(timeout) THEN
        RAISE EXCEPTION 'not every peer has applied this node''s changes within %, so the DDL was not run', timeout
            USING ERRCODE = '55000',
                  HINT = 'pgmesh status shows which peer lags or is unreachable; retry when it is back, or pass proceed => true (pgmesh ddl --proceed) and it applies the DDL in order when it returns.';
    END IF;
    -- Never the pgmesh schema: for a role named pgmesh, "$user" names it,
    -- and a table made there would never be replicated.
    PERFORM set_config('search_path', coalesce((SELECT string_agg(quote_ident(s), ', ')
        FROM unnest(current_schemas(false)) s WHERE s <> 'pgmesh'), ''), true);
    PERFORM set_config('pgmesh.replicating_ddl', 'on', true);
    PERFORM pgmesh.before_ddl();
    EXECUTE command;
    PERFORM pgmesh.after_ddl();
    PERFORM pgmesh.new_tables_join_sets();
    PERFORM pgmesh.emit_ddl(command);
    PERFORM set_config('pgmesh.replicating_ddl', 'off', true);
END
$$;

-- The version of a row of table rel whose xmin is x: its commit time and
-- origin id, or NULL and 0 (unknown) for a row a table rewrite wrote. The
-- rewrite's rows are found by its commit time, which its subtransactions
-- share. Every read of a row's version goes through this (the apply's
-- checks, conflicts, compare, housekeeping). A plain SQL function in FROM or
-- LATERAL, inlined by the planner; give rel as a constant (a regclass
-- literal), so that the rewrites of rel are read once per statement.
CREATE FUNCTION pgmesh.row_version(rel oid, x xid, OUT "timestamp" timestamptz, OUT roident oid)
RETURNS SETOF record LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN w.rewritten THEN NULL ELSE c.timestamp END,
           CASE WHEN w.rewritten THEN 0 ELSE c.roident END
    FROM pg_catalog.pg_xact_commit_timestamp_origin(x) c,
         LATERAL (SELECT coalesce(c.timestamp = ANY (ARRAY(
                      SELECT pg_catalog.pg_xact_commit_timestamp(r.xid::xid) FROM pgmesh.table_rewrite r
                      WHERE r.relid = rel)), false)) w(rewritten)
$$;

CREATE OR REPLACE FUNCTION pgmesh.install_event_triggers() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN (SELECT count(*) = 4 FROM pg_catalog.pg_event_trigger
                WHERE evtname IN ('pgmesh_note_dropped_temp', 'pgmesh_capture_ddl', 'pgmesh_new_table_joins_sets',
                                  'pgmesh_note_table_rewrite'));
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgmesh_note_dropped_temp') THEN
        CREATE EVENT TRIGGER pgmesh_note_dropped_temp ON sql_drop EXECUTE FUNCTION pgmesh.note_dropped_temp();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgmesh_capture_ddl') THEN
        CREATE EVENT TRIGGER pgmesh_capture_ddl ON ddl_command_end EXECUTE FUNCTION pgmesh.capture_ddl();
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgmesh_new_table_joins_sets') THEN
        -- Enabled ALWAYS: a table created by replicated DDL joins on the
        -- applying node too.
        CREATE EVENT TRIGGER pgmesh_new_table_joins_sets ON ddl_command_end
            WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO')
            EXECUTE FUNCTION pgmesh.new_table_joins_sets();
        ALTER EVENT TRIGGER pgmesh_new_table_joins_sets ENABLE ALWAYS;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger WHERE evtname = 'pgmesh_note_table_rewrite') THEN
        CREATE EVENT TRIGGER pgmesh_note_table_rewrite ON table_rewrite EXECUTE FUNCTION pgmesh.note_table_rewrite();
        ALTER EVENT TRIGGER pgmesh_note_table_rewrite ENABLE ALWAYS;
    END IF;
    RETURN true;
END
$$;
