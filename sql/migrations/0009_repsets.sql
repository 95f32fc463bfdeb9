-- pgmesh schema, version 9: replication sets.

-- The tables pgmesh can replicate: permanent plain tables (partitions
-- included, as publications list them) of every schema but the system ones
-- and pgmesh's own. Every part of pgmesh that needs "the user's tables"
-- reads this view.
CREATE VIEW pgmesh.user_tables AS
SELECT c.oid::regclass AS relid,
       format('%I.%I', n.nspname, c.relname) AS relation,
       n.nspname AS schema_name,
       c.relname AS table_name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND c.relpersistence = 'p'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgmesh')
  AND n.nspname NOT LIKE 'pg\_%';

-- The group's replication sets, as the daemon last read them from Raft
-- (it rewrites these rows; edit sets with pgmesh repset).
CREATE TABLE pgmesh.repset (
    set_name   text PRIMARY KEY,
    nodes      text[],                      -- NULL: every node
    all_tables boolean NOT NULL DEFAULT false, -- every table not in except_tables
    except_tables text[] NOT NULL DEFAULT '{}'
);

CREATE TABLE pgmesh.repset_table (
    set_name   text NOT NULL REFERENCES pgmesh.repset ON DELETE CASCADE,
    relation   text NOT NULL,
    row_filter text,
    columns    text[],
    PRIMARY KEY (set_name, relation)
);

CREATE VIEW pgmesh.replication_set_tables AS
SELECT t.set_name, t.relation, t.row_filter, t.columns
FROM pgmesh.repset_table t
UNION ALL
SELECT s.set_name, u.relation, NULL, NULL
FROM pgmesh.repset s CROSS JOIN pgmesh.user_tables u
WHERE s.all_tables AND u.relation <> ALL (s.except_tables)
  AND NOT EXISTS (SELECT 1 FROM pgmesh.repset_table t WHERE t.set_name = s.set_name AND t.relation = u.relation);

CREATE VIEW pgmesh.replication_sets AS
SELECT s.set_name, s.nodes, s.all_tables AS new_tables_join,
       (SELECT count(*) FROM pgmesh.replication_set_tables t WHERE t.set_name = s.set_name) AS tables
FROM pgmesh.repset s;

-- Tables in no set: their changes never leave the node that makes them.
CREATE VIEW pgmesh.local_tables AS
SELECT u.relation FROM pgmesh.user_tables u
WHERE NOT EXISTS (SELECT 1 FROM pgmesh.replication_set_tables t WHERE t.relation = u.relation);

-- A new table joins the sets that take every table (the default set unless
-- the group was created with repset_new_tables off) in the same transaction
-- that creates it, so no change to it is ever left out. The publication of
-- each receiver (pgmesh_<node>) gets it when the receiver is a member of
-- such a set. Enabled ALWAYS: a table created by replicated DDL joins on
-- the applying node too. The daemon rewrites the publications from Raft
-- afterwards, to the same result.
CREATE FUNCTION pgmesh.new_table_joins_sets() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    rel text;
    pub text;
BEGIN
    FOR rel IN SELECT DISTINCT u.relation FROM pg_event_trigger_ddl_commands() c
               JOIN pgmesh.user_tables u ON u.relid = c.objid
               WHERE c.classid = 'pg_class'::regclass AND c.objsubid = 0
    LOOP
        FOR pub IN SELECT p.pubname FROM pg_publication p
                   WHERE p.pubname LIKE 'pgmesh\_%'
                     AND EXISTS (SELECT 1 FROM pgmesh.repset s
                                 WHERE s.all_tables AND rel <> ALL (s.except_tables)
                                   AND (s.nodes IS NULL OR p.pubname IN (SELECT 'pgmesh_' || n FROM unnest(s.nodes) n)))
                     AND NOT EXISTS (SELECT 1 FROM pg_publication_rel pr
                                     WHERE pr.prpubid = p.oid AND pr.prrelid = rel::regclass)
        LOOP
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, rel);
        END LOOP;
    END LOOP;
END
$$;

-- Its event trigger (only a superuser may create one) is made by
-- pgmesh.install_event_triggers() (version 11).
