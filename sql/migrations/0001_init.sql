-- pgmesh schema, version 1. Never replicated: the publication covers user
-- schemas only.

CREATE TABLE pgmesh.conflict_history (
    id                bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    local_node        text NOT NULL,
    origin_node       text NOT NULL,
    relation          text NOT NULL,
    conflict_type     text NOT NULL CHECK (conflict_type IN (
        'insert_exists', 'update_origin_differs', 'update_exists', 'update_missing',
        'update_deleted', 'delete_origin_differs', 'delete_missing',
        'multiple_unique_conflicts')),
    resolution        text NOT NULL CHECK (resolution IN (
        'apply_remote', 'keep_local', 'apply_as_insert', 'skip', 'merge')),
    key_tuple         jsonb,
    local_tuple       jsonb,
    remote_tuple      jsonb,
    applied_tuple     jsonb,
    local_commit_ts   timestamptz,
    local_origin      text,
    remote_commit_ts  timestamptz,
    remote_commit_lsn pg_lsn,
    remote_xid        bigint,
    reason            text
);
CREATE INDEX conflict_history_occurred_at ON pgmesh.conflict_history (occurred_at);

COMMENT ON TABLE pgmesh.conflict_history IS
    'One row per replication conflict detected on this node (pgmesh).';

-- The node group as this node's daemon last saw it in the Raft state.
CREATE TABLE pgmesh.node (
    node_name   text PRIMARY KEY,
    node_id     integer NOT NULL,
    state       text NOT NULL,
    is_local    boolean NOT NULL DEFAULT false,
    api_addr    text,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Per peer: how far this node has applied that peer's changes.
CREATE VIEW pgmesh.node_status AS
SELECT n.node_name,
       n.node_id,
       n.state,
       n.is_local,
       o.remote_lsn AS applied_remote_lsn,
       o.local_lsn  AS applied_local_lsn
FROM pgmesh.node n
LEFT JOIN pg_catalog.pg_replication_origin_status o
       ON o.external_id = 'pgmesh_' || n.node_name;
