package replicator

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/origin"
)

// A delete of a key that has no row here only leaves a tombstone. If a
// transaction inserting that key (another peer's stream, or a local
// writer) is in progress meanwhile, neither can see the other: the delete
// finds no row because the insert has not committed, and the insert's look
// for tombstones (after its rows are in) comes before the delete's
// tombstone commits. Both commit, and the row stays here although the
// delete is newer and removed it on every other node. Nothing PostgreSQL
// offers makes the two wait for each other short of locking every key
// applied, so the state is repaired instead, by the same rule: a row whose
// own key's tombstone is newer than it (conflict.Rule) has been overtaken
// and is removed, as the delete would have removed it.
//
// The removal commits under a replication origin of its own (which exists
// only while a sweep removes rows), so no peer receives it (PostgreSQL 16+ peers ask for changes without an origin; 15
// peers drop transactions with one): every other node already holds what
// the delete left. A conflict is logged for each row removed.

// sweepOrigin marks the removals; its name is not a node's (origin.NodeOf).
const sweepOrigin = "pgmesh-sweep"

// RemoveOvertaken removes the rows that a newer delete of their key
// overtook (see above) from every table with tombstones, and returns how
// many it removed. Rows that an apply transaction holds are left for the
// next time.
func RemoveOvertaken(ctx context.Context, dsn, localNode string, rule conflict.Rule, nodeID func(string) int) (int, error) {
	conn, err := pgsession.Connect(ctx, dsn, "pgmesh sweep", pgsession.Applier, pgsession.Settings{"search_path": ""})
	if err != nil {
		return 0, fmt.Errorf("connect to remove overtaken rows: %w", err)
	}
	defer conn.Close(context.Background())
	// The table's name as the catalog quotes it, for the statements.
	rows, err := conn.Query(ctx, `SELECT t.relation, pg_catalog.to_regclass(t.relation)::text
		FROM (SELECT DISTINCT relation FROM pgmesh.tombstone) t WHERE pg_catalog.to_regclass(t.relation) IS NOT NULL`)
	if err != nil {
		return 0, fmt.Errorf("list tables with tombstones: %w", err)
	}
	var rels [][2]string
	var name, qualified string
	if _, err := pgx.ForEachRow(rows, []any{&name, &qualified}, func() error {
		rels = append(rels, [2]string{name, qualified})
		return nil
	}); err != nil {
		return 0, fmt.Errorf("list tables with tombstones: %w", err)
	}
	s := sweep{conn: conn, local: localNode, rule: rule, nodeID: nodeID}
	defer s.dropOrigin()
	removed := 0
	for _, rel := range rels {
		n, err := s.table(ctx, rel[0], rel[1])
		removed += n
		if err != nil {
			return removed, fmt.Errorf("remove overtaken rows of %s: %w", rel[0], err)
		}
	}
	return removed, nil
}

type sweep struct {
	conn    *pgx.Conn
	local   string
	rule    conflict.Rule
	nodeID  func(string) int
	origins map[uint32]string
	// marked: the session commits under sweepOrigin, which exists only
	// while a sweep removes rows.
	marked bool
}

// mark makes the session's commits carry sweepOrigin, creating it.
func (s *sweep) mark(ctx context.Context, tx pgx.Tx) error {
	if s.marked {
		return nil
	}
	if _, err := tx.Exec(ctx, `SELECT pg_catalog.pg_replication_origin_create($1)
		WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_origin WHERE roname = $1)`, sweepOrigin); err != nil {
		return fmt.Errorf("create replication origin %s: %w", sweepOrigin, err)
	}
	if _, err := tx.Exec(ctx, `SELECT pg_catalog.pg_replication_origin_session_setup($1)`, sweepOrigin); err != nil {
		return fmt.Errorf("use replication origin %s: %w", sweepOrigin, err)
	}
	s.marked = true
	return nil
}

// dropOrigin removes sweepOrigin again once the sweep is done, so that a
// node keeps only its peers' origins. A failure leaves it for the next
// sweep, which reuses it.
func (s *sweep) dropOrigin() {
	if !s.marked {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, _ = s.conn.Exec(ctx, `SELECT pg_catalog.pg_replication_origin_session_reset()`)
	_, _ = s.conn.Exec(ctx, `SELECT pg_catalog.pg_replication_origin_drop($1)`, sweepOrigin)
}

// table removes the overtaken rows of one table (rel as pgmesh.tombstone
// names it, qualified as the catalog quotes it) in one transaction.
func (s *sweep) table(ctx context.Context, rel, qualified string) (int, error) {
	rows, err := s.conn.Query(ctx, `SELECT a.attname::text FROM pg_catalog.pg_index i,
			unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
			JOIN pg_catalog.pg_attribute a ON a.attrelid = $1::regclass AND a.attnum = k.attnum
		WHERE i.indrelid = $1::regclass AND i.indisprimary ORDER BY k.ord`, rel)
	if err != nil {
		return 0, err
	}
	pk, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil || len(pk) == 0 {
		return 0, err // tombstones are kept for tables with a primary key only
	}
	match := make([]string, len(pk))
	for i, c := range pk {
		match[i] = "r." + quote(c) + " = k." + quote(c)
	}
	// The key as stored (jsonb_build_object of the key columns) turns back
	// into the columns' types through the table's row type.
	query := fmt.Sprintf(`SELECT r.ctid::text, (extract(epoch FROM v.timestamp) * 1000000)::bigint, coalesce(v.roident, 0),
	%[3]s, t.deleted_by, t.key::text
FROM pgmesh.tombstone t
CROSS JOIN LATERAL pg_catalog.jsonb_populate_record(NULL::%[1]s, t.key) k
JOIN %[1]s r ON %[2]s
LEFT JOIN LATERAL %[4]s v ON true
WHERE t.relation = $1
FOR UPDATE OF r SKIP LOCKED`, qualified, strings.Join(match, " AND "), conflict.TombstoneAtMicros("t"), conflict.RowVersion("r", qualified))
	tx, err := s.conn.Begin(ctx)
	if err != nil {
		return 0, err
	}
	defer tx.Rollback(context.Background())
	type candidate struct {
		ctid, key string
		roident   uint32
		row, tomb conflict.Version
	}
	var found []candidate
	rows, err = tx.Query(ctx, query, rel)
	if err != nil {
		return 0, err
	}
	for rows.Next() {
		var c candidate
		var rowUS, tombUS *int64
		var by *string
		if err := rows.Scan(&c.ctid, &rowUS, &c.roident, &tombUS, &by, &c.key); err != nil {
			rows.Close()
			return 0, err
		}
		c.row.CommitTS = microTime(rowUS)
		c.tomb = conflict.TombstoneVersion(tombUS, by, s.local)
		found = append(found, c)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return 0, err
	}
	removed := 0
	for _, c := range found {
		c.row.Node = s.local
		if c.roident != 0 {
			if c.row.Node, err = s.originNode(ctx, tx, c.roident); err != nil {
				return 0, err
			}
		}
		c.row.NodeID, c.tomb.NodeID = s.nodeID(c.row.Node), s.nodeID(c.tomb.Node)
		if !s.rule.Newer(c.tomb, c.row) {
			continue // the row is newer: it stays, and peers get it
		}
		if err := s.mark(ctx, tx); err != nil {
			return 0, err
		}
		rec := conflict.Record{LocalNode: s.local, OriginNode: c.tomb.Node, Relation: rel,
			Decision: conflict.Decision{Conflict: true, Type: conflict.DeleteOriginDiffers, Resolution: conflict.ApplyRemote,
				Reason: "a newer delete of this key committed here while the row was being inserted: the row is removed"},
			Local: &c.row, RemoteCommitTS: c.tomb.CommitTS}
		var args []any
		bind := func(b []byte) string {
			if b == nil {
				args = append(args, nil)
			} else {
				args = append(args, string(b))
			}
			return fmt.Sprintf("$%d", len(args))
		}
		rec.KeyTuple = bind([]byte(c.key)) + "::jsonb"
		rec.LocalTuple = fmt.Sprintf("(SELECT to_jsonb(r.*) FROM %s r WHERE r.ctid = %s::tid)", qualified, bind([]byte(c.ctid)))
		if _, err := tx.Exec(ctx, rec.InsertSQL(bind), args...); err != nil {
			return 0, fmt.Errorf("write conflict_history: %w", err)
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf("DELETE FROM %s r WHERE r.ctid = $1::tid", qualified), c.ctid); err != nil {
			return 0, err
		}
		removed++
	}
	if removed == 0 {
		return 0, nil
	}
	return removed, tx.Commit(ctx)
}

// originNode maps a replication origin id to the node it stands for.
func (s *sweep) originNode(ctx context.Context, tx pgx.Tx, roident uint32) (string, error) {
	if s.origins == nil {
		s.origins = map[uint32]string{}
		rows, err := tx.Query(ctx, `SELECT roident::bigint, roname FROM pg_catalog.pg_replication_origin`)
		if err != nil {
			return "", err
		}
		var id int64
		var name string
		if _, err := pgx.ForEachRow(rows, []any{&id, &name}, func() error {
			if n, ok := origin.NodeOf(name); ok {
				name = n
			}
			s.origins[uint32(id)] = name
			return nil
		}); err != nil {
			return "", err
		}
	}
	if n, ok := s.origins[roident]; ok {
		return n, nil
	}
	return "", errors.New("row written through an unknown replication origin")
}

func microTime(us *int64) time.Time {
	if us == nil {
		return time.Time{}
	}
	return time.UnixMicro(*us).UTC()
}
