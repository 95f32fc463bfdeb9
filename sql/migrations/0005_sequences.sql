-- pgmesh schema, version 5: global sequences.

-- Sequences converted to a global kind on this node.
CREATE TABLE pgmesh.global_sequence (
    seq        text PRIMARY KEY,  -- format('%I.%I', schema, name)
    kind       text NOT NULL CHECK (kind IN ('timeshard', 'galloc')),
    chunk_size bigint             -- galloc: values per chunk
);

-- galloc: the chunks this node holds (drawn from the group through Raft),
-- in the order they are used.
CREATE TABLE pgmesh.galloc_chunk (
    seq         text NOT NULL,
    ordinal     bigint NOT NULL,
    chunk_start bigint NOT NULL,
    chunk_end   bigint NOT NULL,   -- exclusive
    PRIMARY KEY (seq, ordinal)
);

-- The next galloc value: a per-node counter (pgmesh.galloc_<oid>) mapped
-- onto this node's chunks. Nothing is locked or altered on the way, so it
-- is as safe in a rolled-back transaction as nextval() itself.
CREATE FUNCTION pgmesh.galloc_nextval(s regclass) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    name text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = s);
    size bigint;
    c    bigint;
    base bigint;
BEGIN
    SELECT chunk_size INTO size FROM pgmesh.global_sequence WHERE seq = name AND kind = 'galloc';
    IF size IS NULL THEN
        RAISE EXCEPTION 'sequence % is not a galloc sequence', s;
    END IF;
    c := nextval(format('pgmesh.%I', 'galloc_' || s::oid)::regclass);
    SELECT chunk_start INTO base FROM pgmesh.galloc_chunk WHERE seq = name AND ordinal = (c - 1) / size;
    IF base IS NULL THEN
        RAISE EXCEPTION 'galloc sequence % has used up the chunks this node holds, and no new chunk could be drawn', s
            USING ERRCODE = '2200H',
                  HINT = 'The node group has no Raft quorum or this daemon is down (see pgmesh status); values resume once a new chunk can be drawn.';
    END IF;
    RETURN base + (c - 1) % size;
END
$$;

-- timeshard values: milliseconds since 2020-01-01 UTC (41 bits), a counter
-- within the millisecond (12 bits), this node's id (10 bits).
CREATE FUNCTION pgmesh.timeshard_epoch() RETURNS timestamptz
LANGUAGE sql IMMUTABLE AS $$ SELECT '2020-01-01 00:00:00+00'::timestamptz $$;

CREATE FUNCTION pgmesh.timeshard_floor(node_id int) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT ((extract(epoch FROM clock_timestamp() - pgmesh.timeshard_epoch()) * 1000)::bigint << 22) | node_id
$$;

-- What a timeshard value says: when, which node, which counter.
CREATE FUNCTION pgmesh.timeshard_decode(v bigint, OUT at timestamptz, OUT counter int, OUT node_id int)
LANGUAGE sql IMMUTABLE AS $$
    SELECT pgmesh.timeshard_epoch() + ((v >> 22) * interval '1 millisecond'), ((v >> 10) & 4095)::int, (v & 1023)::int
$$;

-- Columns that hand out sequence values (nextval() defaults and identity
-- columns) but are not bigint, the foreign keys that reference them, and
-- the integer sequences behind them, with the statements that fix each.
CREATE VIEW pgmesh.sequence_audit AS
WITH seqcols AS (
    SELECT c.oid AS relid, a.attnum, format('%I.%I', n.nspname, c.relname) AS tbl, a.attname::text AS col,
           format_type(a.atttypid, a.atttypmod) AS typ,
           coalesce(pg_get_serial_sequence(format('%I.%I', n.nspname, c.relname), a.attname),
                    substring(pg_get_expr(d.adbin, d.adrelid) FROM $r$nextval\('([^']+)'$r$)) AS seq
    FROM pg_attribute a
    JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE c.relkind IN ('r', 'p') AND a.attnum > 0 AND NOT a.attisdropped
      AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pgmesh') AND n.nspname NOT LIKE 'pg\_%'
      AND (a.attidentity <> '' OR pg_get_expr(d.adbin, d.adrelid) LIKE 'nextval(%')
)
SELECT 1 AS step, 'sequence column'::text AS what, s.tbl AS table_name, s.col AS column_name, s.typ AS data_type,
       format('ALTER TABLE %s ALTER COLUMN %I TYPE bigint', s.tbl, s.col) AS statement
FROM seqcols s WHERE s.typ <> 'bigint'
UNION ALL
SELECT 2, 'references ' || s.tbl || '.' || quote_ident(s.col), format('%I.%I', fn.nspname, fc.relname), fa.attname::text,
       format_type(fa.atttypid, fa.atttypmod),
       format('ALTER TABLE %I.%I ALTER COLUMN %I TYPE bigint', fn.nspname, fc.relname, fa.attname)
FROM seqcols s
JOIN pg_constraint con ON con.contype = 'f' AND con.confrelid = s.relid
CROSS JOIN LATERAL unnest(con.confkey, con.conkey) AS k(refnum, fknum)
JOIN pg_class fc ON fc.oid = con.conrelid
JOIN pg_namespace fn ON fn.oid = fc.relnamespace
JOIN pg_attribute fa ON fa.attrelid = con.conrelid AND fa.attnum = k.fknum
WHERE k.refnum = s.attnum AND format_type(fa.atttypid, fa.atttypmod) <> 'bigint'
UNION ALL
SELECT 3, 'sequence of ' || s.tbl || '.' || quote_ident(s.col), s.seq, NULL, q.data_type::text,
       format('ALTER SEQUENCE %s AS bigint', s.seq)
FROM seqcols s
JOIN pg_sequences q ON format('%I.%I', q.schemaname, q.sequencename) = s.seq::regclass::text
    OR format('%I.%I', q.schemaname, q.sequencename) = s.seq
WHERE s.seq IS NOT NULL AND q.data_type <> 'bigint'::regtype;

-- Convert a sequence to timeshard on this node (the daemon keeps its clock
-- part current). Run on every node: pgmesh sequences convert does.
CREATE FUNCTION pgmesh.convert_timeshard(s regclass) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    node int := (SELECT node_id FROM pgmesh.node WHERE is_local);
    typ regtype := (SELECT seqtypid::regtype FROM pg_sequence WHERE seqrelid = s);
    name text := (SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = s);
BEGIN
    IF node IS NULL THEN
        RAISE EXCEPTION 'this node is not in a node group, so it has no node id for timeshard values';
    END IF;
    IF typ IS NULL THEN
        RAISE EXCEPTION '% is not a sequence', s;
    END IF;
    IF typ <> 'bigint'::regtype THEN
        RAISE EXCEPTION 'sequence % is %, too small for timeshard values', s, typ
            USING HINT = 'Run pgmesh sequences audit --apply first (columns and sequences become bigint).';
    END IF;
    EXECUTE format('ALTER SEQUENCE %s INCREMENT BY 1024 MINVALUE 0 MAXVALUE 9223372036854775807 NO CYCLE', s);
    PERFORM setval(s, pgmesh.timeshard_floor(node), true);
    INSERT INTO pgmesh.global_sequence VALUES (name, 'timeshard', NULL)
        ON CONFLICT (seq) DO UPDATE SET kind = 'timeshard', chunk_size = NULL;
END
$$;
