-- pgmesh schema, version 7: the pipelined apply path.

-- Raised by the applier's own statements when a change does not fit the fast
-- path (a conflict, a missing row, a remembered delete, or an earlier
-- transaction that failed). The daemon never shows it: it applies that
-- transaction again on the careful path, which settles and logs conflicts.
CREATE FUNCTION pgmesh.apply_conflict(reason text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'PM100',
        MESSAGE = 'pgmesh fast apply stopped: ' || reason,
        HINT = 'the transaction is applied again on the careful path';
END
$$;

-- A joining node now reads each origin's progress while the source holds its
-- streams between transactions, so applied transactions no longer write a
-- progress row (a hot row updated by every one of them).
DROP TABLE pgmesh.origin_progress;
