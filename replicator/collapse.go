package replicator

import (
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
)

// Set-based apply. The changes of a group (or of a chunk of a large
// transaction) are collapsed to each row's final image, per table and
// primary key, and each table is then applied by a few statements over
// arrays, whatever the number of changes: the deletes of rows that were
// there, the updates (one statement per set of columns sent), the inserts,
// and the deletes of rows inserted within the group. Every statement checks
// for every row what the one-by-one statements check (the last writer is
// the peer, the row is there or is not, no delete of it is remembered), so
// a group that would have met a conflict one by one still fails as a whole
// and is applied again carefully, transaction by transaction.
//
// Collapsing is exact only for sequences of changes the one-by-one path
// applies without a conflict: per key, an insert followed by updates and
// perhaps a delete, or updates perhaps followed by a delete. Anything else
// (a key changed by an update, an insert of a key already written in the
// group, a change after a delete, a table whose triggers must see every
// change in source order) is built one by one instead, which settles it
// the way it always has.

// change is one row change on the fast path. Its values point into a copy
// of the message (the next receive reuses the stream's buffer).
type change struct {
	r    *relation
	op   pglogrepl.MessageType // Insert, Update or Delete
	cols []int                 // the new image's columns (unchanged TOAST values left out)
	vals [][]byte
	// key is the row's primary key before the change (nil for an insert
	// into a table without one).
	key [][]byte
	// newKey marks an update that changes the primary key.
	newKey   bool
	commitTS time.Time // the source transaction's commit time (a delete's tombstone)
}

// finalRow is one row's changes in a group, collapsed.
type finalRow struct {
	key     [][]byte
	existed bool // the first change was an update or delete: the row was there before
	deleted bool
	// cols/vals is the final image: of the row after the group, or for a
	// row inserted and deleted within it, as it was inserted.
	cols      []int
	vals      [][]byte
	deletedAt time.Time
}

// tableSet is what a group does to one table, as the statements that do
// it, in the order they run: deletes of rows that were there first (a key
// or unique value they free may be taken by a later row), updates by
// columns sent, inserts by columns, inserts into a table without a primary
// key (runs of the same columns, in order), and last the deletes of rows
// inserted within the group.
type tableSet struct {
	r                     *relation
	rows                  []*finalRow // keyed rows in the order of their first change
	deletes, deletesOfNew []*finalRow
	updates, inserts      []setPart
	keyless               []insertRun
}

// collapse gathers changes per table and key, in the order tables and keys
// first appear. ok is false when the changes cannot be collapsed exactly
// and must be applied one by one.
func collapse(changes []change) (sets []*tableSet, ok bool) {
	byRel := map[*relation]*tableSet{}
	byKey := map[*relation]map[string]*finalRow{}
	// Every row in one array: there are at most as many rows as changes,
	// so it never grows and the pointers into it stay valid.
	rows := make([]finalRow, 0, len(changes))
	var k []byte
	for _, c := range changes {
		if c.r.orderedTriggers || c.newKey {
			return nil, false
		}
		ts := byRel[c.r]
		if ts == nil {
			ts = &tableSet{r: c.r}
			byRel[c.r], byKey[c.r] = ts, make(map[string]*finalRow, len(changes))
			sets = append(sets, ts)
		}
		if c.key == nil {
			if c.op != pglogrepl.MessageTypeInsert {
				return nil, false
			}
			if n := len(ts.keyless); n == 0 || !slices.Equal(ts.keyless[n-1].cols, c.cols) {
				ts.keyless = append(ts.keyless, insertRun{r: c.r, cols: c.cols})
			}
			ts.keyless[len(ts.keyless)-1].rows = append(ts.keyless[len(ts.keyless)-1].rows, c.vals)
			continue
		}
		k = appendKey(k[:0], c.key)
		row := byKey[c.r][string(k)] // looked up without a copy of k
		if row == nil {
			rows = append(rows, finalRow{key: c.key, existed: c.op != pglogrepl.MessageTypeInsert})
			row = &rows[len(rows)-1]
			byKey[c.r][string(k)] = row
			ts.rows = append(ts.rows, row)
		} else if row.deleted || c.op == pglogrepl.MessageTypeInsert {
			// A change after a delete, or an insert of a key already
			// written: one by one, these conflict.
			return nil, false
		}
		switch c.op {
		case pglogrepl.MessageTypeDelete:
			row.deleted, row.deletedAt = true, c.commitTS
		default:
			row.cols, row.vals = mergeImage(row.cols, row.vals, c.cols, c.vals)
		}
	}
	for _, ts := range sets {
		ts.split()
	}
	return sets, true
}

// mergeImage lays a change's columns over an image; both list columns in
// increasing order, as values returns them.
func mergeImage(cols []int, vals [][]byte, newCols []int, newVals [][]byte) ([]int, [][]byte) {
	if len(cols) == 0 || slices.Equal(cols, newCols) {
		return newCols, newVals // the usual update: every column sent again
	}
	outCols := make([]int, 0, len(cols)+len(newCols))
	outVals := make([][]byte, 0, len(cols)+len(newCols))
	i, j := 0, 0
	for i < len(cols) || j < len(newCols) {
		switch {
		case j == len(newCols) || (i < len(cols) && cols[i] < newCols[j]):
			outCols, outVals = append(outCols, cols[i]), append(outVals, vals[i])
			i++
		case i == len(cols) || newCols[j] < cols[i]:
			outCols, outVals = append(outCols, newCols[j]), append(outVals, newVals[j])
			j++
		default: // the same column: the change's value
			outCols, outVals = append(outCols, newCols[j]), append(outVals, newVals[j])
			i++
			j++
		}
	}
	return outCols, outVals
}

// appendKey appends a map key for a primary key's values (NULL and empty
// apart) to b.
func appendKey(b []byte, vals [][]byte) []byte {
	for _, v := range vals {
		if v == nil {
			b = append(b, "n;"...)
			continue
		}
		b = strconv.AppendInt(b, int64(len(v)), 10)
		b = append(b, ':')
		b = append(b, v...)
	}
	return b
}

// setPart is the rows of one statement of a table's set: the same kind of
// change with the same columns.
type setPart struct {
	cols []int
	rows []*finalRow
}

// split sorts a table's keyed rows into its statements.
func (ts *tableSet) split() {
	byShape := func(parts []setPart, row *finalRow) []setPart {
		for i := range parts {
			if slices.Equal(parts[i].cols, row.cols) {
				parts[i].rows = append(parts[i].rows, row)
				return parts
			}
		}
		return append(parts, setPart{cols: row.cols, rows: []*finalRow{row}})
	}
	for _, row := range ts.rows {
		switch {
		case row.existed && row.deleted:
			ts.deletes = append(ts.deletes, row)
		case row.existed:
			ts.updates = byShape(ts.updates, row)
		default:
			ts.inserts = byShape(ts.inserts, row)
			if row.deleted {
				ts.deletesOfNew = append(ts.deletesOfNew, row)
			}
		}
	}
}

// statementCount is the number of statements the table's set takes.
func (ts *tableSet) statementCount() int {
	n := len(ts.updates) + len(ts.inserts) + len(ts.keyless)
	if len(ts.deletes) > 0 {
		n++
	}
	if len(ts.deletesOfNew) > 0 {
		n++
	}
	return n
}
