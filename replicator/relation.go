package replicator

import (
	"context"
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// relation is a peer's table as announced by a Relation message, matched by
// column name against the local table of the same name.
type relation struct {
	msg       *pglogrepl.RelationMessage
	qualified string   // quoted "schema"."table", for statements
	name      string   // schema.table, for conflict_history
	cols      []string // remote column names, in the remote order
	keys      []int    // remote replica identity columns (indexes into cols)
	full      bool     // REPLICA IDENTITY FULL on the peer

	// From the local catalog (reloaded now and then, see stale).
	localType []string // local type of each remote column, format_type() text
	tombName  string   // format('%I.%I'), the relation's name in pgmesh.tombstone
	pk        []int    // local primary key columns (nil: none usable)
	uniques   [][]int  // other local unique indexes on plain columns
	delta     []bool   // delta columns, by remote column index
	// identityAlways marks GENERATED ALWAYS AS IDENTITY columns: inserts
	// must override them, and updates cannot set them.
	identityAlways []bool
	anyIdentity    bool
	// orderedTriggers: user triggers fire for applied changes (ENABLE
	// ALWAYS or REPLICA), so they must see every change in source order,
	// never a group's collapsed image.
	orderedTriggers bool
	loadedAt        time.Time
	raw             []byte // the Relation message as the peer sent it
	// allCols lists every column the peer sends, 0 to n-1: the cols of
	// each change that sent them all, shared, never modified (rowValues).
	allCols []int
	// texts are the set statements' SQL built so far (memo), by kind and
	// columns; the catalog facts they are built from change only at load.
	texts map[string]string
}

// memo returns the SQL of a statement of kind over cols, building it once
// per load of the relation: a set statement's text is the same for every
// group, and building it each time was a twentieth of the daemon's CPU in
// a pgbench catch-up. The key is looked up without an allocation.
func (r *relation) memo(kind byte, cols []int, build func() string) string {
	var buf [64]byte
	k := append(buf[:0], kind)
	for _, c := range cols {
		k = binary.AppendUvarint(k, uint64(c))
	}
	if sql, ok := r.texts[string(k)]; ok {
		return sql
	}
	sql := build()
	if r.texts == nil {
		r.texts = map[string]string{}
	}
	r.texts[string(k)] = sql
	return sql
}

// metadataTTL bounds how long local catalog facts are trusted (delta
// columns and indexes can change without the peer resending the relation).
const metadataTTL = 10 * time.Second

// newRelation describes a table from the peer's Relation message; raw is
// the message itself, kept for changes that are parked (park.go).
func newRelation(m *pglogrepl.RelationMessage, raw []byte) *relation {
	r := &relation{msg: m, raw: raw, qualified: pgx.Identifier{m.Namespace, m.RelationName}.Sanitize(),
		name: m.Namespace + "." + m.RelationName}
	r.full = m.ReplicaIdentity == 'f'
	for i, c := range m.Columns {
		r.cols, r.allCols = append(r.cols, c.Name), append(r.allCols, i)
		if c.Flags&1 != 0 {
			r.keys = append(r.keys, i)
		}
	}
	return r
}

// schemaError is a table or column the peer sends that this node lacks: an
// error of the change, which on_apply_error park parks (park.go).
type schemaError struct{ err error }

func (e *schemaError) Error() string { return e.err.Error() }
func (e *schemaError) Unwrap() error { return e.err }

func (r *relation) stale() bool { return time.Since(r.loadedAt) > metadataTTL }

// load reads the local table's columns, keys and delta columns, and checks
// that every column the peer sends exists here. Errors name the cause and
// the fix: the stream stops at this change and resumes from it once the
// schema matches.
func (r *relation) load(ctx context.Context, pc *pgconn.PgConn, peer string) error {
	clear(r.texts) // built from what is read again here
	reg := [][]byte{[]byte(r.qualified)}
	res := pc.ExecParams(ctx, `SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attidentity = 'a'
		FROM pg_catalog.pg_attribute a
		WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''`,
		reg, nil, nil, nil).Read()
	if res.Err != nil {
		return fmt.Errorf("read columns of %s: %w", r.qualified, res.Err)
	}
	if len(res.Rows) == 0 {
		return &schemaError{fmt.Errorf("table %s sent by peer %q does not exist on this node: create it with the same definition as on %q, and the stream resumes from the same change", r.qualified, peer, peer)}
	}
	types := make(map[string]string, len(res.Rows))
	always := map[string]bool{}
	for _, row := range res.Rows {
		types[string(row[0])] = string(row[1])
		always[string(row[0])] = string(row[2]) == "t"
	}
	pos := make(map[string]int, len(r.cols))
	r.localType = r.localType[:0]
	r.identityAlways, r.anyIdentity = make([]bool, len(r.cols)), false
	for i, c := range r.cols {
		r.identityAlways[i] = always[c]
		r.anyIdentity = r.anyIdentity || always[c]
		t, ok := types[c]
		if !ok {
			return &schemaError{fmt.Errorf("peer %q sends column %s of table %s, which this node lacks: add the column (same type as on %q), and the stream resumes from the same change", peer, quote(c), r.qualified, peer)}
		}
		r.localType = append(r.localType, t)
		pos[c] = i
	}

	// Unique indexes on plain columns, primary key first; partial and
	// deferrable ones cannot block an insert the same way and are left out.
	res = pc.ExecParams(ctx, `SELECT i.indexrelid, i.indisprimary, a.attname
		FROM pg_catalog.pg_index i
		CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indisvalid AND i.indimmediate
		  AND i.indpred IS NULL AND i.indexprs IS NULL
		ORDER BY i.indisprimary DESC, i.indexrelid, k.ord`, reg, nil, nil, nil).Read()
	if res.Err != nil {
		return fmt.Errorf("read indexes of %s: %w", r.qualified, res.Err)
	}
	r.pk, r.uniques = nil, nil
	var cur []int
	var curID string
	curPK, usable := false, true
	flush := func() {
		if curID == "" || !usable {
			return
		}
		if curPK {
			r.pk = cur
		} else {
			r.uniques = append(r.uniques, cur)
		}
	}
	for _, row := range res.Rows {
		if id := string(row[0]); id != curID {
			flush()
			curID, curPK, cur, usable = id, string(row[1]) == "t", nil, true
		}
		if p, ok := pos[string(row[2])]; ok {
			cur = append(cur, p)
		} else {
			usable = false // the peer does not send this column
		}
	}
	flush()

	res = pc.ExecParams(ctx, `SELECT format('%I.%I', n.nspname, c.relname),
		coalesce((SELECT array_agg(d.column_name::text) FROM pgmesh.delta_column d
		          WHERE d.relation = format('%I.%I', n.nspname, c.relname)), '{}')::text,
		EXISTS (SELECT 1 FROM pg_catalog.pg_trigger g
		        WHERE g.tgrelid = c.oid AND NOT g.tgisinternal AND g.tgenabled IN ('A', 'R'))
		FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
		WHERE c.oid = to_regclass($1)`, reg, nil, nil, nil).Read()
	if res.Err != nil {
		return fmt.Errorf("read delta columns and triggers of %s: %w", r.qualified, res.Err)
	}
	r.tombName = string(res.Rows[0][0])
	r.orderedTriggers = string(res.Rows[0][2]) == "t"
	r.delta = make([]bool, len(r.cols))
	for _, d := range parseTextArray(string(res.Rows[0][1])) {
		if p, ok := pos[d]; ok {
			r.delta[p] = true
		}
	}
	r.loadedAt = time.Now()
	return nil
}

// parseTextArray parses a one-dimensional text[] in text output form.
func parseTextArray(s string) []string {
	s = strings.TrimSuffix(strings.TrimPrefix(s, "{"), "}")
	var out []string
	for len(s) > 0 {
		if s[0] == '"' {
			var b strings.Builder
			i := 1
			for ; i < len(s) && s[i] != '"'; i++ {
				if s[i] == '\\' && i+1 < len(s) {
					i++
				}
				b.WriteByte(s[i])
			}
			out = append(out, b.String())
			s = strings.TrimPrefix(s[min(i+1, len(s)):], ",")
			continue
		}
		v, rest, _ := strings.Cut(s, ",")
		out, s = append(out, v), rest
	}
	return out
}

func quote(name string) string { return pgquote.Ident(name) }

func hasDelta(r *relation) bool {
	for _, d := range r.delta {
		if d {
			return true
		}
	}
	return false
}

// match picks the columns that identify a row, and whether they must be
// compared NULL-safely: the local primary key when the key source carries
// it, else the peer's replica identity, else (REPLICA IDENTITY FULL without
// a key) every column.
func (r *relation) match(src *pglogrepl.TupleData) (cols []int, nullSafe bool) {
	if r.pk != nil && carries(src, r.pk) {
		return r.pk, false
	}
	if len(r.keys) > 0 && !r.full {
		return r.keys, false
	}
	all := make([]int, len(r.cols))
	for i := range all {
		all[i] = i
	}
	return all, true
}

func carries(t *pglogrepl.TupleData, cols []int) bool {
	for _, c := range cols {
		if c >= len(t.Columns) || t.Columns[c].DataType == pglogrepl.TupleDataTypeNull ||
			t.Columns[c].DataType == pglogrepl.TupleDataTypeToast {
			return false
		}
	}
	return true
}

// params numbers SQL parameters as a statement is built.
type params struct {
	vals [][]byte
}

func (p *params) add(v []byte) string {
	p.vals = append(p.vals, v)
	return "$" + strconv.Itoa(len(p.vals))
}

// typed is a parameter cast to the local type of column c.
func (r *relation) typed(p *params, c int, v []byte) string {
	return p.add(v) + "::" + r.localType[c]
}

// keyJSON is an expression building the jsonb key of a row (as
// pgmesh.tombstone stores it) from the given values.
func (r *relation) keyJSON(p *params, cols []int, vals [][]byte) string {
	if len(cols) == 0 {
		return "NULL::jsonb"
	}
	var f []string
	for i, c := range cols {
		f = append(f, r.typed(p, c, vals[i])+" AS "+quote(r.cols[c]))
	}
	return "(SELECT to_jsonb(pgmesh_v.*) FROM (SELECT " + strings.Join(f, ", ") + ") pgmesh_v)"
}

// rowKey is an expression building the jsonb key of the row (as
// pgmesh.tombstone stores it) from its primary key columns, qualified by
// alias when one is given.
func (r *relation) rowKey(alias string) string {
	if alias != "" {
		alias += "."
	}
	kv := make([]string, 0, 2*len(r.pk))
	for _, c := range r.pk {
		kv = append(kv, pgquote.Literal(r.cols[c]), alias+quote(r.cols[c]))
	}
	return "jsonb_build_object(" + strings.Join(kv, ", ") + ")"
}

// where is a condition matching cols to vals (on table alias t).
func (r *relation) where(p *params, cols []int, vals [][]byte, nullSafe bool) string {
	op := " = "
	if nullSafe {
		op = " IS NOT DISTINCT FROM "
	}
	var w []string
	for i, c := range cols {
		w = append(w, "t."+quote(r.cols[c])+op+p.add(vals[i]))
	}
	return strings.Join(w, " AND ")
}

// lockedVersions wraps a query selecting ctid and xmin of locked rows (CTE
// "l") to return what last-update-wins needs: ctid, commit time in
// microseconds since the Unix epoch (NULL when unknown), origin id, and
// whether the current transaction wrote the row.
//
// Locking and reading the commit time are separate steps on purpose: when a
// concurrent apply updated the row meanwhile, READ COMMITTED re-checks and
// locks the newest version, and only a separate step sees that version's
// xmin (a function joined in the locking query can pair the new row with
// the old version's commit time).
func lockedVersions(table, lockQuery string) string {
	return `WITH l AS (` + lockQuery + `)
SELECT l.ctid,
	(extract(epoch FROM c.timestamp) * 1000000)::bigint,
	coalesce(c.roident, 0),
	coalesce(l.xmin = (pg_catalog.pg_current_xact_id_if_assigned()::text::numeric % 4294967296)::text::xid, false)
FROM l LEFT JOIN LATERAL ` + conflict.RowVersion("l", table) + ` c ON true`
}
