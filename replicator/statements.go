package replicator

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// The fast path's statements, built from a relation alone (no connection):
// each does what the careful path does when nothing conflicts, and raises
// pgmesh.apply_conflict (SQLSTATE PM100) otherwise, which sends the
// transaction to the careful path. They never compare commit times: the
// only last writer they accept is the peer itself (or the local
// transaction applying it), so every decision between versions is left to
// conflict.Rule.

// insertSQL inserts rows given as one typed expression per column (exprs,
// over the FROM clause from, which may be empty for a single row). It fails
// on any unique collision, and raises when a delete of a key is remembered.
// That is checked after the rows are in (pgmesh.raise_if_deleted), so that
// it also sees a delete committed here while the insert waited for it.
func (r *relation) insertSQL(p *params, cols []int, exprs []string, from string) string {
	insert := r.plainInsertSQL(cols, exprs, from)
	if r.pk == nil {
		return insert // no tombstones without a primary key
	}
	return fmt.Sprintf("WITH i AS (%s RETURNING %s AS k) SELECT pgmesh.raise_if_deleted(%s, array_agg(i.k)) FROM i",
		insert, r.rowKey(""), p.add([]byte(r.tombName)))
}

// updateSQL sets the given columns of the row with the primary key keyVals,
// if its last writer is the peer (roident); it raises unless exactly one
// row is updated. ok is false when nothing can be set (every column sent
// is GENERATED ALWAYS): the careful path decides.
func (r *relation) updateSQL(p *params, cols []int, vals, keyVals [][]byte, roident uint32) (sql string, ok bool) {
	var sets []string
	for i, c := range cols {
		if !r.identityAlways[c] {
			sets = append(sets, quote(r.cols[c])+" = "+p.add(vals[i]))
		}
	}
	if len(sets) == 0 {
		return "", false
	}
	return fmt.Sprintf("WITH c AS (UPDATE %s t SET %s WHERE %s AND %s RETURNING 1)", r.qualified,
		strings.Join(sets, ", "), r.where(p, r.pk, keyVals, false), r.lastWriterIs(roident)) + expectOneRow, true
}

// deleteSQL deletes the row with the primary key keyVals if its last writer
// is the peer, and remembers the delete in a tombstone stamped with the
// source transaction's commit time and the peer (as the careful path's
// deleteRow does); it raises unless exactly one row is deleted.
func (r *relation) deleteSQL(p *params, keyVals [][]byte, roident uint32, commitTS time.Time, peer string) string {
	return fmt.Sprintf(`WITH c AS (DELETE FROM %s t WHERE %s AND %s RETURNING %s AS k),
	s AS (`+conflict.TombstoneInsert+`
	      SELECT %s, c.k, %s::timestamptz, %s FROM c`+conflict.TombstoneUpsert+`)`,
		r.qualified, r.where(p, r.pk, keyVals, false), r.lastWriterIs(roident), r.rowKey("t"),
		p.add([]byte(r.tombName)), p.add([]byte(pgquote.Timestamp(commitTS))), p.add([]byte(peer))) + expectOneRow
}

// lastWriterIs is true for a row (alias t) whose last change came from the
// origin roident or from the transaction applying this one: an ordinary
// sequential change, which last-update-wins applies without a conflict.
// Anything else raises, and is settled on the careful path (a row a table
// rewrite wrote too: its version is unknown).
func (r *relation) lastWriterIs(roident uint32) string {
	return fmt.Sprintf(`CASE WHEN (SELECT v.roident FROM %s v) = %d THEN true
	WHEN t.xmin = (pg_catalog.pg_current_xact_id_if_assigned()::text::numeric %% 4294967296)::text::xid THEN true
	ELSE pgmesh.apply_conflict('the row was last written elsewhere') END`, conflict.RowVersion("t", r.qualified), roident)
}

// expectOneRow ends a statement whose CTE c returns one row per row changed.
const expectOneRow = ` SELECT CASE WHEN count(*) = 1 THEN true ELSE pgmesh.apply_conflict('no row with this key') END FROM c`

// The set-based statements (collapse.go) take one text array per column,
// bound in binary, whatever the number of rows: their text depends only on
// the relation and the columns, so each is prepared once. The arrays are
// unnested as u(k0, k1, ..., c0, c1, ...): the primary key's columns, then
// the values set.

// keyArrays is the unnest arguments and aliases of the primary key's
// arrays, parameters $1 to $len(pk).
func (r *relation) keyArrays() (arrays, aliases []string) {
	for i := range r.pk {
		arrays = append(arrays, "$"+strconv.Itoa(i+1)+"::text[]")
		aliases = append(aliases, "k"+strconv.Itoa(i))
	}
	return arrays, aliases
}

// keyMatch matches the row t to the array row u by primary key.
func (r *relation) keyMatch() string {
	w := make([]string, len(r.pk))
	for i, c := range r.pk {
		w[i] = "t." + quote(r.cols[c]) + " = u.k" + strconv.Itoa(i) + "::" + r.localType[c]
	}
	return strings.Join(w, " AND ")
}

// lastWriterIsFor is lastWriterIs for a row of t joined to a row of u: false
// for any pairing that does not match, so that it never raises for a row
// the statement does not change, wherever the planner evaluates it.
func (r *relation) lastWriterIsFor(roident uint32) string {
	return "CASE WHEN NOT (" + r.keyMatch() + ") THEN false ELSE " + r.lastWriterIs(roident) + " END"
}

// expectAllRows ends a set statement whose CTE c returns one row per row
// changed: every key of the first array must have matched a row.
const expectAllRows = ` SELECT CASE WHEN count(*) = cardinality($1::text[]) THEN true ELSE pgmesh.apply_conflict('no row with this key') END FROM c`

// deleteSetSQL deletes the rows with the given primary keys, each if its
// last writer is the peer, and remembers each delete in a tombstone
// stamped with its source transaction's commit time (an array after the
// keys) and the peer; it raises unless every key deleted a row.
// Parameters: the key arrays, the times, the tombstone relation name, the
// peer.
func (r *relation) deleteSetSQL(roident uint32) string {
	return r.memo('d', nil, func() string { return r.buildDeleteSetSQL(roident) })
}

func (r *relation) buildDeleteSetSQL(roident uint32) string {
	arrays, aliases := r.keyArrays()
	n := len(arrays)
	arrays, aliases = append(arrays, "$"+strconv.Itoa(n+1)+"::text[]"), append(aliases, "at")
	return fmt.Sprintf(`WITH c AS (DELETE FROM %s t USING unnest(%s) AS u(%s) WHERE %s AND %s RETURNING %s AS k, u.at),
	s AS (`+conflict.TombstoneInsert+`
	      SELECT $%d::text, c.k, c.at::timestamptz, $%d::text FROM c`+conflict.TombstoneUpsert+`)`,
		r.qualified, strings.Join(arrays, ", "), strings.Join(aliases, ", "), r.keyMatch(), r.lastWriterIsFor(roident),
		r.rowKey("t"), n+2, n+3) + expectAllRows
}

// plainInsertSQL is insertSQL without the check for remembered deletes:
// deletedCheckSQL follows it.
func (r *relation) plainInsertSQL(cols []int, exprs []string, from string) string {
	names := make([]string, len(cols))
	for i, c := range cols {
		names[i] = quote(r.cols[c])
	}
	override := ""
	if r.anyIdentity {
		override = " OVERRIDING SYSTEM VALUE"
	}
	return fmt.Sprintf("INSERT INTO %s (%s)%s SELECT %s%s", r.qualified, strings.Join(names, ", "), override,
		strings.Join(exprs, ", "), from)
}

// deletedCheckSQL raises when a delete of any of the given keys is
// remembered: insertSQL's check, for rows inserted without it (by COPY,
// which returns no keys, or from arrays).
// The keys are only built when the table has a tombstone at all.
// Parameters: the key arrays, then the tombstone relation name.
func (r *relation) deletedCheckSQL() string {
	return r.memo('c', nil, r.buildDeletedCheckSQL)
}

func (r *relation) buildDeletedCheckSQL() string {
	arrays, aliases := r.keyArrays()
	kv := make([]string, 0, 2*len(r.pk))
	for i, c := range r.pk {
		kv = append(kv, pgquote.Literal(r.cols[c]), "u.k"+strconv.Itoa(i)+"::"+r.localType[c])
	}
	rel := "$" + strconv.Itoa(len(arrays)+1) + "::text"
	return fmt.Sprintf(`SELECT pgmesh.raise_if_deleted(%s, ARRAY(SELECT jsonb_build_object(%s) FROM unnest(%s) AS u(%s)))
	WHERE EXISTS (SELECT 1 FROM pgmesh.tombstone t WHERE t.relation = %s)`,
		rel, strings.Join(kv, ", "), strings.Join(arrays, ", "), strings.Join(aliases, ", "), rel)
}

// insertSetSQL inserts rows of the columns cols, given as one array per
// column, without the check for remembered deletes (deletedCheckSQL).
func (r *relation) insertSetSQL(cols []int) string {
	return r.memo('i', cols, func() string {
		arrays := make([]string, len(cols))
		aliases := make([]string, len(cols))
		exprs := make([]string, len(cols))
		for i, c := range cols {
			arrays[i] = "$" + strconv.Itoa(i+1) + "::text[]"
			aliases[i] = "c" + strconv.Itoa(i)
			exprs[i] = "u." + aliases[i] + "::" + r.localType[c]
		}
		from := " FROM unnest(" + strings.Join(arrays, ", ") + ") AS u(" + strings.Join(aliases, ", ") + ")"
		return r.plainInsertSQL(cols, exprs, from)
	})
}

// updateSetSQL sets the columns cols of the rows with the given primary
// keys, each if its last writer is the peer; it raises unless every key
// updated a row. Parameters: the key arrays, then one array per column.
// ok is false when none of cols can be set.
func (r *relation) updateSetSQL(cols []int, roident uint32) (sql string, ok bool) {
	sql = r.memo('u', cols, func() string { return r.buildUpdateSetSQL(cols, roident) })
	return sql, sql != ""
}

// buildUpdateSetSQL is updateSetSQL's text, "" when none of cols can be set.
func (r *relation) buildUpdateSetSQL(cols []int, roident uint32) string {
	arrays, aliases := r.keyArrays()
	var sets []string
	for i, c := range cols {
		arrays = append(arrays, "$"+strconv.Itoa(len(r.pk)+i+1)+"::text[]")
		aliases = append(aliases, "c"+strconv.Itoa(i))
		if !r.identityAlways[c] {
			sets = append(sets, quote(r.cols[c])+" = u.c"+strconv.Itoa(i)+"::"+r.localType[c])
		}
	}
	if len(sets) == 0 {
		return ""
	}
	return fmt.Sprintf("WITH c AS (UPDATE %s t SET %s FROM unnest(%s) AS u(%s) WHERE %s AND %s RETURNING 1)",
		r.qualified, strings.Join(sets, ", "), strings.Join(arrays, ", "), strings.Join(aliases, ", "),
		r.keyMatch(), r.lastWriterIsFor(roident)) + expectAllRows
}
