-- pgmesh schema, version 11: a role that is not a superuser.

-- Event triggers: DDL capture (capture_ddl) and new tables joining
-- replication sets in the transaction that creates them. Only a superuser may
-- create an event trigger, so the schema is installed without them, and
-- this makes the ones missing when the installing role is a superuser. It
-- returns whether they all exist. Run at every install (sql.Install), so a
-- role made superuser later gets them at its next start.
CREATE FUNCTION pgmesh.install_event_triggers() RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    IF NOT (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) THEN
        RETURN (SELECT count(*) = 3 FROM pg_catalog.pg_event_trigger
                WHERE evtname IN ('pgmesh_note_dropped_temp', 'pgmesh_capture_ddl', 'pgmesh_new_table_joins_sets'));
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
    RETURN true;
END
$$;

-- A table joins the publications of the receivers of every set that takes
-- all tables and does not except it. The event trigger above does this for
-- each table created; replicated DDL does it for every user table missing
-- (pgmesh.replicate_ddl here, and the applying node after the DDL), so that
-- a table created through pgmesh ddl joins the sets in the transaction that
-- creates it on every node, event trigger or not.
CREATE FUNCTION pgmesh.join_sets(rel text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    pub text;
BEGIN
    FOR pub IN SELECT p.pubname FROM pg_catalog.pg_publication p
               WHERE p.pubname LIKE 'pgmesh\_%'
                 AND EXISTS (SELECT 1 FROM pgmesh.repset s
                             WHERE s.all_tables AND rel <> ALL (s.except_tables)
                               AND (s.nodes IS NULL OR p.pubname IN (SELECT 'pgmesh_' || n FROM unnest(s.nodes) n)))
                 AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_publication_rel pr
                                 WHERE pr.prpubid = p.oid AND pr.prrelid = rel::regclass)
    LOOP
        EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel);
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION pgmesh.new_table_joins_sets() RETURNS event_trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pgmesh.join_sets(u.relation) FROM (SELECT DISTINCT u.relation FROM pg_event_trigger_ddl_commands() c
        JOIN pgmesh.user_tables u ON u.relid = c.objid
        WHERE c.classid = 'pg_class'::regclass AND c.objsubid = 0) u;
END
$$;

CREATE FUNCTION pgmesh.new_tables_join_sets() RETURNS void
LANGUAGE sql AS $$
    SELECT pgmesh.join_sets(relation) FROM pgmesh.user_tables;
$$;

-- replicate_ddl also leaves the pgmesh schema out of the search path the
-- command runs with.
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
    EXECUTE command;
    PERFORM pgmesh.new_tables_join_sets();
    PERFORM pgmesh.emit_ddl(command);
    PERFORM set_config('pgmesh.replicating_ddl', 'off', true);
END
$$;

-- Functions that run for the applications' own writes: the tombstone
-- trigger (deletes), the home-region check and galloc column defaults. They
-- run as the pgmesh schema's owner, so an application's role needs no
-- privilege on the pgmesh schema, whatever role installed it.
ALTER FUNCTION pgmesh.record_tombstone() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgmesh.check_home() SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION pgmesh.galloc_nextval(regclass) SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
