-- pgmesh schema, version 12: park and replay (docs/apply-errors.md).

-- The changes from a peer that could not be applied here, in the order they
-- came, kept until pgmesh replay applies them or pgmesh discard drops them.
-- A table with rows here from a peer is parked: every later change of it
-- from that peer is parked behind them, in the local transaction that
-- applies the rest of its source transaction.
CREATE TABLE pgmesh.parked_changes (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    peer text NOT NULL,
    schema_name text NOT NULL,
    table_name text NOT NULL,
    -- The source transaction: its commit LSN on the peer, xid, commit time
    -- and the node it originated on (the peer: forwarded ones are dropped).
    source_lsn pg_lsn NOT NULL,
    source_xid bigint NOT NULL,
    commit_time timestamptz NOT NULL,
    origin_node text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('insert', 'update', 'delete')),
    -- For reading: the old key (or old row) and the new values, as text.
    old_key jsonb,
    new_values jsonb,
    -- The error that parked the table, on its first change; the changes
    -- parked behind it have none.
    error text,
    parked_at timestamptz NOT NULL DEFAULT now(),
    -- What replay applies: the pgoutput messages as the peer sent them.
    relation_message bytea NOT NULL,
    change_message bytea NOT NULL
);
CREATE INDEX parked_changes_table ON pgmesh.parked_changes (peer, schema_name, table_name, id);

-- A table's on_apply_error, where it differs from the daemon's setting
-- (pgmesh on-apply-error, set on every node).
CREATE TABLE pgmesh.apply_error_policy (
    relation text PRIMARY KEY,       -- format('%I.%I'), as pgmesh.delta_column
    policy text NOT NULL CHECK (policy IN ('stop', 'park'))
);

-- set_on_apply_error sets (park, stop) or clears (NULL) a table's policy.
CREATE FUNCTION pgmesh.set_on_apply_error(rel regclass, policy text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    name text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_catalog.pg_class c
                  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = rel);
BEGIN
    IF policy IS NULL THEN
        DELETE FROM pgmesh.apply_error_policy WHERE relation = name;
    ELSE
        INSERT INTO pgmesh.apply_error_policy VALUES (name, policy)
            ON CONFLICT (relation) DO UPDATE SET policy = EXCLUDED.policy;
    END IF;
END $$;

-- pgmesh discard records each discarded change as a conflict of its own type.
ALTER TABLE pgmesh.conflict_history DROP CONSTRAINT conflict_history_conflict_type_check;
ALTER TABLE pgmesh.conflict_history ADD CONSTRAINT conflict_history_conflict_type_check
    CHECK (conflict_type IN ('insert_exists', 'insert_deleted', 'update_origin_differs', 'update_exists',
        'update_missing', 'update_deleted', 'delete_origin_differs', 'delete_missing',
        'multiple_unique_conflicts', 'parked_discarded'));
