-- pgmesh schema, version 10: inserts rechecked against tombstones.

-- A peer's insert can wait for a transaction here that deletes the same key
-- (or inserts and deletes it): PostgreSQL lets the insert go on once that
-- transaction commits, but the insert's snapshot, taken before, cannot see
-- the delete's tombstone. So apply looks for tombstones after the rows are
-- in, through these VOLATILE functions: under READ COMMITTED (which apply
-- sessions use) each of their queries takes a new snapshot, and sees every
-- delete committed by then.

-- The fast path's check: raises pgmesh.apply_conflict, which sends the
-- transaction to the careful path, when a delete of any of keys is
-- remembered. Most tables have no tombstones most of the time: one probe
-- for the relation spares matching the keys.
CREATE FUNCTION pgmesh.raise_if_deleted(rel text, keys jsonb[]) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgmesh.tombstone t WHERE t.relation = rel)
       AND EXISTS (SELECT 1 FROM pgmesh.tombstone t WHERE t.relation = rel AND t.key = ANY (keys)) THEN
        PERFORM pgmesh.apply_conflict('a delete of this key is remembered');
    END IF;
    RETURN true;
END
$$;

-- The careful path's check: when a delete of key is remembered that is newer
-- than the version (at, by) being inserted (any delete, when at is NULL), it
-- deletes the row just inserted at ctid again and returns true; the careful
-- path then settles the insert against that delete.
CREATE FUNCTION pgmesh.take_back_if_deleted(rel text, key jsonb, inserted tid, at timestamptz, by text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pgmesh.tombstone t
                   WHERE t.relation = rel AND t.key = take_back_if_deleted.key
                     AND (at IS NULL OR pgmesh.luw_newer(
                         coalesce(t.deleted_at, pg_catalog.pg_xact_commit_timestamp(t.xmin)), t.deleted_by, at, by))) THEN
        RETURN false;
    END IF;
    EXECUTE format('DELETE FROM %s WHERE ctid = $1', rel::regclass) USING inserted;
    RETURN true;
END
$$;
