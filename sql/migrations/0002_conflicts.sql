-- pgmesh schema, version 2: tombstones and delta columns.

-- A tombstone remembers that a row was deleted, and when, so that an older
-- change to the same key arriving later (from a peer whose stream lags) is
-- recognised as overtaken by the delete instead of resurrecting the row.
-- For local deletes the commit time is read from the tombstone's own xmin
-- (the deleting transaction) until housekeeping copies it to deleted_at.
CREATE TABLE pgmesh.tombstone (
    relation   text NOT NULL,   -- format('%I.%I', schema, table)
    key        jsonb NOT NULL,  -- primary key columns of the deleted row
    deleted_at timestamptz,     -- commit time of the delete (NULL: read from xmin)
    deleted_by text,            -- node that deleted it (NULL: this node)
    PRIMARY KEY (relation, key)
);

-- Installed by the daemon as an AFTER DELETE trigger on every replicated
-- table with a primary key; its arguments are the key column names. It does
-- not fire for changes applied from peers (session_replication_role =
-- replica); the daemon records those itself.
CREATE FUNCTION pgmesh.record_tombstone() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    k jsonb;
BEGIN
    SELECT jsonb_object_agg(c, to_jsonb(OLD) -> c) INTO k FROM unnest(TG_ARGV) AS c;
    INSERT INTO pgmesh.tombstone (relation, key)
    VALUES (format('%I.%I', TG_TABLE_SCHEMA, TG_TABLE_NAME), k)
    ON CONFLICT (relation, key) DO UPDATE SET deleted_at = NULL, deleted_by = NULL;
    RETURN NULL;
END
$$;

-- Numeric columns whose remote updates are applied as increments
-- (col = col + (new - old)) instead of overwrites.
CREATE TABLE pgmesh.delta_column (
    relation    text NOT NULL,  -- format('%I.%I', schema, table)
    column_name text NOT NULL,
    PRIMARY KEY (relation, column_name)
);

CREATE FUNCTION pgmesh.set_delta_column(tbl regclass, col name, enabled boolean DEFAULT true)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    typ regtype;
    rel text;
BEGIN
    SELECT a.atttypid::regtype INTO typ FROM pg_attribute a
    WHERE a.attrelid = tbl AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped;
    IF typ IS NULL THEN
        RAISE EXCEPTION 'table % has no column %', tbl, quote_ident(col);
    END IF;
    IF typ NOT IN ('smallint'::regtype, 'integer'::regtype, 'bigint'::regtype, 'numeric'::regtype,
                   'real'::regtype, 'double precision'::regtype) THEN
        RAISE EXCEPTION 'column % of % is %, but delta columns must be numeric', quote_ident(col), tbl, typ
            USING HINT = 'Use smallint, integer, bigint, numeric, real or double precision.';
    END IF;
    SELECT format('%I.%I', n.nspname, c.relname) INTO rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = tbl;
    IF enabled THEN
        INSERT INTO pgmesh.delta_column VALUES (rel, col) ON CONFLICT DO NOTHING;
        -- Increments need the old value of every update, which only
        -- REPLICA IDENTITY FULL sends; rows are still matched by primary key.
        EXECUTE format('ALTER TABLE %s REPLICA IDENTITY FULL', tbl);
        RAISE NOTICE 'column % of % is now a delta column on this node; do the same on every node (pgmesh delta-column does)', quote_ident(col), tbl;
    ELSE
        DELETE FROM pgmesh.delta_column WHERE relation = rel AND column_name = col;
    END IF;
END
$$;

-- insert_deleted: an insert arrives for a key that a newer delete removed
-- (its delete reached this node first, from another peer).
ALTER TABLE pgmesh.conflict_history DROP CONSTRAINT conflict_history_conflict_type_check;
ALTER TABLE pgmesh.conflict_history ADD CONSTRAINT conflict_history_conflict_type_check
    CHECK (conflict_type IN (
        'insert_exists', 'insert_deleted', 'update_origin_differs', 'update_exists', 'update_missing',
        'update_deleted', 'delete_origin_differs', 'delete_missing', 'multiple_unique_conflicts'));
CREATE INDEX conflict_history_relation_type ON pgmesh.conflict_history (relation, conflict_type);
