-- pgmesh schema, version 8: last-update-wins at a fixed resolution, and the
-- causality guard.

-- The commit time t rounded up to the group's luw_resolution, in
-- microseconds since the Unix epoch. This is the SQL copy of Go's
-- conflict.Rule.Round; a test checks the two agree at interval edges. The
-- daemon keeps the setting luw_resolution_us (0 or 1: exact times).
CREATE FUNCTION pgmesh.luw_round(t timestamptz) RETURNS bigint
LANGUAGE sql STABLE AS $$
    -- Integer division truncates toward zero, which already rounds negative
    -- times up; positive ones with a remainder go to the next interval.
    SELECT CASE WHEN r <= 1 THEN v
                WHEN v % r > 0 THEN (v / r + 1) * r
                ELSE v / r * r END
    FROM (SELECT (extract(epoch FROM t) * 1000000)::bigint AS v,
                 coalesce((SELECT value::bigint FROM pgmesh.setting WHERE name = 'luw_resolution_us'), 0) AS r) x
$$;

-- A node's id by name (NULL: this node), 0 when unknown, as the daemon's
-- tie-break uses it.
CREATE FUNCTION pgmesh.node_id(name text) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT n.node_id FROM pgmesh.node n
                     WHERE n.node_name = coalesce($1, (SELECT l.node_name FROM pgmesh.node l WHERE l.is_local LIMIT 1))), 0)
$$;

-- Whether version a (commit time, node) wins over version b under
-- last-update-wins: the SQL copy of Go's conflict.Rule.Newer, checked
-- against it by a test. An unknown (NULL) time is older than every known one.
CREATE FUNCTION pgmesh.luw_newer(a_ts timestamptz, a_node text, b_ts timestamptz, b_node text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE
        WHEN b_ts IS NULL THEN a_ts IS NOT NULL OR pgmesh.node_id(a_node) > pgmesh.node_id(b_node)
        WHEN a_ts IS NULL THEN false
        WHEN pgmesh.luw_round(a_ts) <> pgmesh.luw_round(b_ts) THEN pgmesh.luw_round(a_ts) > pgmesh.luw_round(b_ts)
        ELSE pgmesh.node_id(a_node) > pgmesh.node_id(b_node) END
$$;

-- The causality guard: returns once this server's clock (the one that
-- stamps commit times) has passed t. The applier calls it before committing
-- a peer's transaction whose rounded commit time is not yet past here, so
-- that every later local write to its rows gets a later commit time: clock
-- skew delays apply, it never makes nodes diverge.
CREATE FUNCTION pgmesh.wait_for_clock(t timestamptz) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    left_s double precision;
BEGIN
    LOOP
        left_s := extract(epoch FROM t - clock_timestamp());
        EXIT WHEN left_s < 0;
        PERFORM pg_catalog.pg_sleep(least(left_s + 0.0002, 1));
    END LOOP;
    RETURN true;
END
$$;
