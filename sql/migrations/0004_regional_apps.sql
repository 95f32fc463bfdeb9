-- pgmesh schema, version 4: read-your-own-writes and home-region writes.

-- How far this node has applied each peer's WAL (including stretches with
-- nothing for it), published by the daemon several times a second. Unlogged:
-- it is soft state, rebuilt by the daemon after a crash.
CREATE UNLOGGED TABLE pgmesh.peer_progress (
    node_name   text PRIMARY KEY,
    applied_lsn pg_lsn NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- A position at or after the end of everything this session has committed,
-- to hand to pgmesh.wait_for_origin() on another node.
CREATE FUNCTION pgmesh.last_committed_lsn() RETURNS pg_lsn
LANGUAGE sql VOLATILE AS $$ SELECT pg_current_wal_insert_lsn() $$;

-- Wait until every active peer (or the named ones) has applied everything
-- this node had committed when the call began. A peer confirms a position
-- to its slot here only once its transactions up to it are committed there.
CREATE FUNCTION pgmesh.wait_for_peers(timeout interval DEFAULT '30s', peers text[] DEFAULT NULL)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    target   pg_lsn := pg_current_wal_insert_lsn();
    deadline timestamptz := clock_timestamp() + timeout;
    behind   int;
BEGIN
    LOOP
        SELECT count(*) INTO behind
        FROM pgmesh.node n
        LEFT JOIN pg_replication_slots s ON s.slot_name = 'pgmesh_' || n.node_name
        WHERE NOT n.is_local AND n.state = 'active'
          AND (peers IS NULL OR n.node_name = ANY (peers))
          AND (s.confirmed_flush_lsn IS NULL OR s.confirmed_flush_lsn < target);
        IF behind = 0 THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
END
$$;

-- Wait until this node has applied origin_node's changes up to lsn (from
-- pgmesh.last_committed_lsn() there): "has my write from there arrived here?"
CREATE FUNCTION pgmesh.wait_for_origin(origin_node text, lsn pg_lsn, timeout interval DEFAULT '30s')
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + timeout;
BEGIN
    IF origin_node = (SELECT node_name FROM pgmesh.node WHERE is_local) THEN
        RETURN true;
    END IF;
    LOOP
        IF greatest((SELECT applied_lsn FROM pgmesh.peer_progress WHERE node_name = origin_node),
                    pg_replication_origin_progress('pgmesh_' || origin_node, false)) >= lsn THEN
            RETURN true;
        END IF;
        IF clock_timestamp() >= deadline THEN
            RETURN false;
        END IF;
        PERFORM pg_sleep(0.01);
    END LOOP;
END
$$;

-- Home-region writes: rows of a table belong to the node named in one of its
-- columns, and only that node may write them. A local write to a row homed
-- elsewhere fails with SQLSTATE PM001 and the home node's name in DETAIL, so
-- the application can replay the request there. Changes applied from peers
-- are not checked (session_replication_role = replica).
CREATE FUNCTION pgmesh.check_home() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    col   text := TG_ARGV[0];
    here  text := (SELECT node_name FROM pgmesh.node WHERE is_local);
    homes text[];
    home  text;
BEGIN
    IF here IS NULL THEN
        RETURN COALESCE(NEW, OLD);  -- not in a group: nothing to enforce
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        homes := homes || (to_jsonb(OLD) ->> col);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        homes := homes || (to_jsonb(NEW) ->> col);
    END IF;
    FOREACH home IN ARRAY homes LOOP
        IF home IS NOT NULL AND home <> here THEN
            RAISE EXCEPTION 'row of %.% belongs to node "%", not to this node "%"', TG_TABLE_SCHEMA, TG_TABLE_NAME, home, here
                USING ERRCODE = 'PM001', DETAIL = home,
                      HINT = format('Write it on node %s, e.g. by replaying the request in its region.', home);
        END IF;
    END LOOP;
    RETURN COALESCE(NEW, OLD);
END
$$;

CREATE FUNCTION pgmesh.set_home_column(tbl regclass, col name)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('DROP TRIGGER IF EXISTS pgmesh_home ON %s', tbl);
    IF col IS NULL THEN
        RETURN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = tbl AND attname = col AND attnum > 0 AND NOT attisdropped) THEN
        RAISE EXCEPTION 'table % has no column %', tbl, quote_ident(col);
    END IF;
    EXECUTE format('CREATE TRIGGER pgmesh_home BEFORE INSERT OR UPDATE OR DELETE ON %s
        FOR EACH ROW EXECUTE FUNCTION pgmesh.check_home(%L)', tbl, col);
    RAISE NOTICE 'rows of % now belong to the node named in %; do the same on every node (pgmesh home-column does)', tbl, quote_ident(col);
END
$$;
