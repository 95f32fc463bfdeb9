package replicator

import (
	"context"
	"fmt"
	"strings"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// relation is a peer's table as announced by a Relation message, matched by
// column name against the local table of the same name.
type relation struct {
	msg       *pglogrepl.RelationMessage
	qualified string   // quoted "schema"."table"
	cols      []string // remote column names, in the remote order
	keys      []int    // indexes into cols of the replica identity columns
	full      bool     // REPLICA IDENTITY FULL: match on every column
	localType []string // local type of each remote column, format_type() text
	loaded    bool
}

func newRelation(m *pglogrepl.RelationMessage) *relation {
	r := &relation{msg: m, qualified: pgx.Identifier{m.Namespace, m.RelationName}.Sanitize()}
	r.full = m.ReplicaIdentity == 'f'
	for i, c := range m.Columns {
		r.cols = append(r.cols, c.Name)
		if c.Flags&1 != 0 {
			r.keys = append(r.keys, i)
		}
	}
	return r
}

// load reads the local table's column types and checks that every column the
// peer sends exists here. Errors name the cause and the fix: the stream stops
// at this change and resumes from it once the schema matches.
func (r *relation) load(ctx context.Context, pc *pgconn.PgConn, peer string) error {
	res := pc.ExecParams(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod)
		FROM pg_catalog.pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''`,
		[][]byte{[]byte(r.qualified)}, nil, nil, nil).Read()
	if res.Err != nil {
		return fmt.Errorf("read columns of %s: %w", r.qualified, res.Err)
	}
	if len(res.Rows) == 0 {
		return fmt.Errorf("table %s sent by peer %q does not exist on this node: create it with the same definition as on %q, and the stream resumes from the same change", r.qualified, peer, peer)
	}
	types := make(map[string]string, len(res.Rows))
	for _, row := range res.Rows {
		types[string(row[0])] = string(row[1])
	}
	r.localType = r.localType[:0]
	for _, c := range r.cols {
		t, ok := types[c]
		if !ok {
			return fmt.Errorf("peer %q sends column %s of table %s, which this node lacks: add the column (same type as on %q), and the stream resumes from the same change", peer, quote(c), r.qualified, peer)
		}
		r.localType = append(r.localType, t)
	}
	if len(r.keys) == 0 && !r.full {
		// Inserts still apply; updates and deletes cannot be sent by the peer at all.
		r.keys = nil
	}
	r.loaded = true
	return nil
}

func quote(name string) string { return pgx.Identifier{name}.Sanitize() }

// matchCols are the columns that identify a row: the replica identity, or
// every column under REPLICA IDENTITY FULL.
func (r *relation) matchCols() []int {
	if r.full {
		all := make([]int, len(r.cols))
		for i := range all {
			all[i] = i
		}
		return all
	}
	return r.keys
}

// insertSQL inserts the given columns; a unique violation inserts nothing, so
// the caller learns of the conflict from the row count instead of an aborted
// transaction.
func (r *relation) insertSQL(cols []int) string {
	var names, params []string
	for i, c := range cols {
		names = append(names, quote(r.cols[c]))
		params = append(params, fmt.Sprintf("$%d", i+1))
	}
	return fmt.Sprintf("INSERT INTO %s (%s) VALUES (%s) ON CONFLICT DO NOTHING",
		r.qualified, strings.Join(names, ", "), strings.Join(params, ", "))
}

// lookupSQL finds and locks the local row matching the identity columns and
// returns what last-update-wins needs: its ctid, commit time (microseconds
// since the Unix epoch, or NULL when unknown), origin id, and whether the
// current transaction wrote it.
func (r *relation) lookupSQL(match []int) string {
	var where []string
	for i, c := range match {
		op := "="
		if r.full {
			op = "IS NOT DISTINCT FROM"
		}
		where = append(where, fmt.Sprintf("t.%s %s $%d", quote(r.cols[c]), op, i+1))
	}
	// Lock first, then read the commit time of the row version that was
	// locked: when a concurrent apply updated the row meanwhile, READ
	// COMMITTED re-checks and locks the newest version, and only a separate
	// step sees that version's xmin (a function joined in the locking query
	// could pair the new row with the old version's commit time).
	return fmt.Sprintf(`WITH l AS (SELECT t.ctid, t.xmin FROM %s t WHERE %s LIMIT 1 FOR UPDATE)
SELECT l.ctid,
	(extract(epoch FROM c.timestamp) * 1000000)::bigint,
	coalesce(c.roident, 0),
	coalesce(l.xmin = (pg_catalog.pg_current_xact_id_if_assigned()::text::numeric %% 4294967296)::text::xid, false)
FROM l LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(l.xmin) c ON true`, r.qualified, strings.Join(where, " AND "))
}

// updateSQL sets the given columns of the row at ctid $1.
func (r *relation) updateSQL(cols []int) string {
	var sets []string
	for i, c := range cols {
		sets = append(sets, fmt.Sprintf("%s = $%d", quote(r.cols[c]), i+2))
	}
	return fmt.Sprintf("UPDATE %s SET %s WHERE ctid = $1", r.qualified, strings.Join(sets, ", "))
}

func (r *relation) deleteSQL() string {
	return fmt.Sprintf("DELETE FROM %s WHERE ctid = $1", r.qualified)
}

// tupleJSON is an SQL expression building a jsonb object of the given
// columns from parameters starting at $first, typed as the local columns.
func (r *relation) tupleJSON(cols []int, first int) string {
	if len(cols) == 0 {
		return "NULL::jsonb"
	}
	var fields []string
	for i, c := range cols {
		fields = append(fields, fmt.Sprintf("$%d::%s AS %s", first+i, r.localType[c], quote(r.cols[c])))
	}
	return fmt.Sprintf("(SELECT to_jsonb(v) FROM (SELECT %s) v)", strings.Join(fields, ", "))
}
