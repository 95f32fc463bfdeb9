-- pgmesh schema, version 13: the peers' slots made again after a promotion
-- (docs/high-availability.md).

-- The WAL timeline this server writes on: higher after each promotion. From
-- the name of the current WAL file, whose first 8 hex digits are the
-- timeline (pg_control_checkpoint() lags until the next checkpoint).
CREATE FUNCTION pgmesh.wal_timeline() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT ('x' || substr(pg_catalog.pg_walfile_name(pg_catalog.pg_current_wal_lsn()), 1, 8))::bit(32)::bigint
$$;

-- On a node whose Postgres was promoted from a standby that held no copy of
-- the peers' slots (PostgreSQL 15 and 16; 17+ without a ready standby): the
-- slot made again for each peer, and where it starts. A peer reads its row
-- before it streams: while start_lsn is NULL the slot is being made and the
-- peer waits; then the peer moves its origin for this node to start_lsn,
-- once (pgmesh.origin_reset), because its old position belongs to the
-- timeline that ended with the old primary.
CREATE TABLE pgmesh.recreated_slot (
    peer text PRIMARY KEY,
    timeline integer NOT NULL,
    start_lsn pg_lsn,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The promotions this node recovered from: which peers' slots it made
-- again, and the compare-and-repair of every replicated table that settles
-- what no stream carried (what this node wrote before the slots existed,
-- what a peer had that the standby never got). repaired_at is NULL until
-- that repair has run to the end.
CREATE TABLE pgmesh.promotion (
    timeline integer PRIMARY KEY,
    peers text[] NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    repaired_at timestamptz,
    repaired_rows integer,
    last_error text
);

-- On a peer: the recreated slot (node, timeline, start) its origin for that
-- node was moved to, so that it is moved once.
CREATE TABLE pgmesh.origin_reset (
    node text PRIMARY KEY,
    timeline integer NOT NULL,
    start_lsn pg_lsn NOT NULL,
    from_lsn pg_lsn,
    reset_at timestamptz NOT NULL DEFAULT now()
);
