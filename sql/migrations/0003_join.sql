-- pgmesh schema, version 3: what joining a node with data needs.

-- How far this node has applied each peer's changes, written in the same
-- transaction as the changes. Unlike pg_replication_origin_status it is
-- MVCC-consistent: a snapshot exported for a joining node shows exactly the
-- progress whose data it contains, which is where the new node must start
-- streaming that peer.
CREATE TABLE pgmesh.origin_progress (
    node_name  text PRIMARY KEY,
    remote_lsn pg_lsn NOT NULL
);

-- Progress of this node's join (one row while and after it joins).
CREATE TABLE pgmesh.join_status (
    one           boolean PRIMARY KEY DEFAULT true CHECK (one),
    via           text NOT NULL,
    phase         text NOT NULL,
    tables_total  integer NOT NULL DEFAULT 0,
    tables_done   integer NOT NULL DEFAULT 0,
    rows_copied   bigint NOT NULL DEFAULT 0,
    bytes_copied  bigint NOT NULL DEFAULT 0,
    bytes_total   bigint NOT NULL DEFAULT 0,
    started_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    error         text
);

CREATE VIEW pgmesh.join_progress AS
SELECT via, phase, tables_done, tables_total, rows_copied, bytes_copied, bytes_total,
       CASE WHEN bytes_total > 0 THEN round(100.0 * bytes_copied / bytes_total, 1) END AS percent,
       started_at, updated_at, error
FROM pgmesh.join_status;
