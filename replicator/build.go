package replicator

import (
	"bytes"
	"context"
	"encoding/binary"
	"math"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// insertRun gathers consecutive inserts into one relation with one column
// set, applied by a single statement.
type insertRun struct {
	r    *relation
	cols []int
	rows [][][]byte
}

// The grouped and bulk modes read each row change into a change (for
// collapse.go) and turn a group's or a chunk's changes into statements.
// Building them never waits for the server: statements are prepared when
// they are sent (session.go).

// rowChange reads an insert, update or delete of a transaction committed
// at commitTS into t's changes; any other message is errNotFast.
func (a *applier) rowChange(ctx context.Context, t *fastTxn, msg pglogrepl.Message, commitTS time.Time) error {
	switch m := msg.(type) {
	case *pglogrepl.InsertMessage:
		t.touch(m.RelationID)
		return a.fastInsert(ctx, t, m, commitTS)
	case *pglogrepl.UpdateMessage:
		t.touch(m.RelationID)
		return a.fastUpdate(ctx, t, m, commitTS)
	case *pglogrepl.DeleteMessage:
		t.touch(m.RelationID)
		return a.fastDelete(ctx, t, m, commitTS)
	}
	return errNotFast
}

// fastRelation returns the relation a change is for, with fresh local
// catalog facts. Reading them needs the connection out of pipeline mode:
// the batch in flight is read back first.
func (a *applier) fastRelation(ctx context.Context, id uint32) (*relation, error) {
	r, ok := a.rels[id]
	if !ok || a.parks(r) {
		return nil, errNotFast // the careful path reports the protocol error, or parks
	}
	if r.stale() {
		if err := a.grouped.collect(ctx); err != nil {
			return nil, err
		}
		if err := r.load(ctx, a.s.conn(), a.cfg.Peer.Name); err != nil {
			return nil, errNotFast // the careful path reports it
		}
	}
	return r, nil
}

// fastKey reports whether the change can be matched by the local primary
// key, which the fast path needs for tombstones and single-row statements.
func fastKey(r *relation, t *pglogrepl.TupleData) bool {
	return r.pk != nil && carries(t, r.pk)
}

func (a *applier) fastInsert(ctx context.Context, t *fastTxn, m *pglogrepl.InsertMessage, commitTS time.Time) error {
	r, err := a.fastRelation(ctx, m.RelationID)
	if err != nil {
		return err
	}
	if r.pk != nil && !fastKey(r, m.Tuple) {
		return errNotFast
	}
	cols, vals := r.rowValues(m.Tuple) // pointing into the message, which the caller copied
	c := change{r: r, op: pglogrepl.MessageTypeInsert, cols: cols, vals: vals, commitTS: commitTS}
	if r.pk != nil {
		c.key = r.keyOf(m.Tuple, cols, vals)
	}
	t.rows = append(t.rows, c)
	return nil
}

// rowValues is values for a change the grouped or bulk mode keeps. When
// the tuple sends every column (no unchanged TOAST value), cols is
// r.allCols, shared: a row then costs one allocation instead of two.
func (r *relation) rowValues(t *pglogrepl.TupleData) (cols []int, vals [][]byte) {
	if len(t.Columns) != len(r.allCols) {
		return values(t)
	}
	vals = make([][]byte, len(t.Columns))
	for i, c := range t.Columns {
		switch c.DataType {
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			vals[i] = c.Data
		case pglogrepl.TupleDataTypeNull:
		default: // an unchanged TOAST value: not every column is sent
			return values(t)
		}
	}
	return r.allCols, vals
}

// keyOf is pick(t, r.pk) for the tuple rowValues read as cols and vals:
// when every column was sent and the primary key is the leading columns
// (as it most often is), the key is the start of vals, not a copy.
func (r *relation) keyOf(t *pglogrepl.TupleData, cols []int, vals [][]byte) [][]byte {
	n := len(r.pk)
	if len(cols) != len(r.allCols) || len(vals) < n {
		return pick(t, r.pk)
	}
	for i, c := range r.pk {
		if c != i {
			return pick(t, r.pk)
		}
	}
	return vals[:n:n]
}

// continues reports whether rows of r with these columns can join the run.
func (run *insertRun) continues(r *relation, cols []int) bool {
	return run.r == r && slices.Equal(run.cols, cols) && len(run.rows) < fastMaxRun
}

// finishRun turns the pending inserts into statements appended to stmts:
// a plain INSERT, which fails on any unique collision, guarded against
// remembered deletes. One row is one INSERT that checks its key itself;
// several travel as one text array per column, or with copyRuns (the bulk
// mode) by COPY, each followed by the check of their keys.
func finishRun(pending *insertRun, stmts *[]stmt, copyRuns bool) {
	run := *pending
	*pending = insertRun{}
	if run.r == nil || len(run.rows) == 0 {
		return
	}
	r := run.r
	if copyRuns && len(run.rows) > 1 {
		*stmts = append(*stmts, stmt{copy: &copyIn{r: r, cols: run.cols, rows: run.rows}})
		deletedCheck(&run, nil, stmts)
		return
	}
	if len(run.rows) == 1 {
		var p params
		exprs := make([]string, len(run.cols)) // each column's value, typed
		for i, c := range run.cols {
			exprs[i] = r.typed(&p, c, run.rows[0][i])
		}
		*stmts = append(*stmts, stmt{sql: r.insertSQL(&p, run.cols, exprs, ""), params: p.vals})
		return
	}
	cols := make([][]byte, len(run.cols))
	for i := range run.cols {
		cols[i] = runColumn(&run, i)
	}
	// Arrays travel in binary (the relation's name, text, reads the same
	// either way): no quoting to write or parse. The check for remembered
	// deletes is a statement of its own, as after COPY: an INSERT that
	// returned its keys for it took half as long again.
	*stmts = append(*stmts, stmt{sql: r.insertSetSQL(run.cols), params: cols, formats: binaryParams})
	deletedCheck(&run, cols, stmts)
}

// deletedCheck appends the check for remembered deletes of the run's keys
// (deletedCheckSQL), after its rows went in without one. encoded are the
// run's columns as runColumn encoded them, if it did.
func deletedCheck(run *insertRun, encoded [][]byte, stmts *[]stmt) {
	r := run.r
	if r.pk == nil {
		return // no tombstones without a primary key
	}
	params := make([][]byte, 0, len(r.pk)+1)
	for _, k := range r.pk {
		i := slices.Index(run.cols, k)
		if encoded != nil {
			params = append(params, encoded[i])
			continue
		}
		params = append(params, runColumn(run, i))
	}
	*stmts = append(*stmts, stmt{sql: r.deletedCheckSQL(), params: append(params, []byte(r.tombName)), formats: binaryParams})
}

// runColumn encodes the run's values of its i-th column as a text[].
func runColumn(run *insertRun, i int) []byte {
	col := make([][]byte, len(run.rows))
	for j, row := range run.rows {
		col[j] = row[i]
	}
	return textArray(col)
}

// binaryParams marks every parameter of a statement as binary.
var binaryParams = []int16{pgtype.BinaryFormatCode}

func (a *applier) fastUpdate(ctx context.Context, t *fastTxn, m *pglogrepl.UpdateMessage, commitTS time.Time) error {
	r, err := a.fastRelation(ctx, m.RelationID)
	if err != nil {
		return err
	}
	keySrc := m.NewTuple
	if m.OldTuple != nil {
		keySrc = m.OldTuple
	}
	if !fastKey(r, keySrc) || hasDelta(r) {
		return errNotFast
	}
	cols, vals := r.rowValues(m.NewTuple)
	if !slices.ContainsFunc(cols, func(c int) bool { return !r.identityAlways[c] }) {
		return errNotFast // nothing can be set: the careful path decides
	}
	var key [][]byte
	if keySrc == m.NewTuple {
		key = r.keyOf(keySrc, cols, vals)
	} else {
		key = pick(keySrc, r.pk)
	}
	c := change{r: r, op: pglogrepl.MessageTypeUpdate, cols: cols, vals: vals, key: key, commitTS: commitTS}
	for i, k := range r.pk {
		if v, ok := valueOf(cols, vals, k); ok && !bytes.Equal(v, c.key[i]) {
			c.newKey = true
		}
	}
	t.rows = append(t.rows, c)
	return nil
}

func (a *applier) fastDelete(ctx context.Context, t *fastTxn, m *pglogrepl.DeleteMessage, commitTS time.Time) error {
	r, err := a.fastRelation(ctx, m.RelationID)
	if err != nil {
		return err
	}
	if m.OldTuple == nil || !fastKey(r, m.OldTuple) {
		return errNotFast
	}
	t.rows = append(t.rows, change{r: r, op: pglogrepl.MessageTypeDelete, key: pick(m.OldTuple, r.pk),
		commitTS: commitTS})
	return nil
}

// statements builds the statements applying changes, in source order as
// far as the result can tell: set-based when they collapse exactly and
// that takes fewer statements (collapsed is then true), else one by one.
func (a *applier) statements(changes []change, copyRuns bool) (stmts []stmt, collapsed bool, err error) {
	// One statement one by one (a run of inserts) cannot be bettered:
	// collapsing is not even tried.
	if n := oneByOneCount(changes); n > 1 {
		if sets, ok := collapse(changes); ok && setStatementCount(sets) < n {
			stmts, err = a.setStatements(sets, copyRuns)
			return stmts, true, err
		}
	}
	stmts, err = a.oneByOne(changes, copyRuns)
	return stmts, false, err
}

// oneByOneCount is the number of statements oneByOne builds.
func oneByOneCount(changes []change) int {
	n := 0
	var run insertRun
	for _, c := range changes {
		if c.op == pglogrepl.MessageTypeInsert && run.continues(c.r, c.cols) {
			run.rows = append(run.rows, nil)
			continue
		}
		n++
		rows := run.rows[:0] // only lengths count here: one array serves every run
		run = insertRun{rows: rows}
		if c.op == pglogrepl.MessageTypeInsert {
			run = insertRun{r: c.r, cols: c.cols, rows: append(rows, nil)}
		}
	}
	return n
}

// oneByOne builds a statement per update and delete, and one per run of
// inserts into one table with the same columns.
func (a *applier) oneByOne(changes []change, copyRuns bool) ([]stmt, error) {
	var stmts []stmt
	var run insertRun
	for _, c := range changes {
		if c.op == pglogrepl.MessageTypeInsert {
			if !run.continues(c.r, c.cols) {
				finishRun(&run, &stmts, copyRuns)
				run = insertRun{r: c.r, cols: c.cols}
			}
			run.rows = append(run.rows, c.vals)
			continue
		}
		finishRun(&run, &stmts, copyRuns)
		var p params
		var sql string
		if c.op == pglogrepl.MessageTypeUpdate {
			var ok bool
			if sql, ok = c.r.updateSQL(&p, c.cols, c.vals, c.key, a.roident); !ok {
				return nil, errNotFast
			}
		} else {
			sql = c.r.deleteSQL(&p, c.key, a.roident, c.commitTS, a.cfg.Peer.Name)
		}
		stmts = append(stmts, stmt{sql: sql, params: p.vals})
	}
	finishRun(&run, &stmts, copyRuns)
	return stmts, nil
}

// setStatementCount is the number of statements setStatements builds.
func setStatementCount(sets []*tableSet) int {
	n := 0
	for _, ts := range sets {
		n += ts.statementCount()
	}
	return n
}

// setStatements builds each table's set-based statements (collapse.go).
func (a *applier) setStatements(sets []*tableSet, copyRuns bool) ([]stmt, error) {
	var stmts []stmt
	for _, ts := range sets {
		r := ts.r
		a.deleteSet(&stmts, r, ts.deletes)
		for _, part := range ts.updates {
			sql, ok := r.updateSetSQL(part.cols, a.roident)
			if !ok {
				return nil, errNotFast
			}
			arrays := keyArrays(r, part.rows)
			for i := range part.cols {
				arrays = append(arrays, textArray(column(part.rows, func(row *finalRow) []byte { return row.vals[i] })))
			}
			stmts = append(stmts, stmt{sql: sql, params: arrays, formats: binaryParams})
		}
		for _, part := range ts.inserts {
			run := insertRun{r: r, cols: part.cols, rows: make([][][]byte, len(part.rows))}
			for i, row := range part.rows {
				run.rows[i] = row.vals
			}
			finishRun(&run, &stmts, copyRuns)
		}
		for _, run := range ts.keyless {
			finishRun(&run, &stmts, copyRuns)
		}
		a.deleteSet(&stmts, r, ts.deletesOfNew)
	}
	return stmts, nil
}

// deleteSet adds the statement deleting rows, if there are any.
func (a *applier) deleteSet(stmts *[]stmt, r *relation, rows []*finalRow) {
	if len(rows) == 0 {
		return
	}
	at := textArray(column(rows, func(row *finalRow) []byte { return []byte(pgquote.Timestamp(row.deletedAt)) }))
	arrays := append(keyArrays(r, rows), at, []byte(r.tombName), []byte(a.cfg.Peer.Name))
	*stmts = append(*stmts, stmt{sql: r.deleteSetSQL(a.roident), params: arrays, formats: binaryParams})
}

// keyArrays encodes the rows' primary keys, one array per key column.
func keyArrays(r *relation, rows []*finalRow) [][]byte {
	out := make([][]byte, len(r.pk), len(r.pk)+3) // room for what a statement adds
	for i := range r.pk {
		out[i] = textArray(column(rows, func(row *finalRow) []byte { return row.key[i] }))
	}
	return out
}

// column gathers one value of each row.
func column(rows []*finalRow, value func(*finalRow) []byte) [][]byte {
	col := make([][]byte, len(rows))
	for j, row := range rows {
		col[j] = value(row)
	}
	return col
}

// textArray encodes values (nil for NULL) as a one-dimensional text[] in
// PostgreSQL's binary array format (array_send), straight from the bytes
// pgoutput sent, in one allocation: pgtype's generic encoder boxed every
// element in an interface, a seventh of the grouped mode's allocations in
// a pgbench stream. TestTextArrayMatchesPgtype checks it against pgtype.
func textArray(vals [][]byte) []byte {
	size, hasNull := 12, uint32(0)
	if len(vals) > 0 {
		size += 8
	}
	for _, v := range vals {
		size += 4 + len(v)
		if v == nil {
			hasNull = 1
		}
	}
	b := make([]byte, 0, size)
	if len(vals) == 0 {
		b = binary.BigEndian.AppendUint32(b, 0) // no dimensions
	} else {
		b = binary.BigEndian.AppendUint32(b, 1)
	}
	b = binary.BigEndian.AppendUint32(b, hasNull)
	b = binary.BigEndian.AppendUint32(b, pgtype.TextOID)
	if len(vals) > 0 {
		b = binary.BigEndian.AppendUint32(b, uint32(len(vals)))
		b = binary.BigEndian.AppendUint32(b, 1) // lower bound
	}
	for _, v := range vals {
		if v == nil {
			b = binary.BigEndian.AppendUint32(b, math.MaxUint32) // -1: NULL
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(len(v)))
		b = append(b, v...)
	}
	return b
}
