package replicator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// The fast path applies a peer's transactions through a pipeline, without
// waiting for the server between them. Each source transaction becomes
// statements that do exactly what the careful path would do when nothing
// conflicts, and raise an error otherwise.
//
// Consecutive transactions whose commit times round to the same value
// (conflict.Rule) are merged into a group: one local transaction, stamped
// with the last member's commit time and end LSN, so the origin's progress
// still commits atomically with the data. Runs of inserts continue from one
// member into the next, so a stream of one-row transactions becomes
// multi-row INSERTs. Last-update-wins compares rounded times, and every
// member's time rounds to the group's, so every node decides as if each
// member had committed alone.
//
// A group that fails (a conflict, a missing row, a remembered delete, a
// lock timeout, bad data) is applied again on the careful path, one source
// transaction at a time, which settles, logs or reports it. Every later
// group in the same batch failed too: each one's last statement checks that
// the origin's progress is where the previous one left it, so commits never
// run ahead of a failure.
//
// Transactions that cannot go fast (DDL, TRUNCATE, relation changes, tables
// without a primary key, delta columns, large transactions) take the careful
// path from their first change, after everything before them is confirmed.

// Bounds of the fast path: a transaction larger than this is applied in
// bulk (it is streamed, not held), a group closes at these sizes, and a
// batch is sent once this much is waiting.
const (
	fastMaxTxnBytes   = 4 << 20
	fastMaxTxnChanges = 20000
	fastMaxRun        = 1000
	fastMaxGroupTxns  = 1000
	fastMaxGroupBytes = 4 << 20
	fastMaxQueued     = 500
	fastMaxQueueBytes = 16 << 20
	// carefulStretch is how many transactions in a row must apply without
	// a conflict on the careful path before the fast path is tried again.
	carefulStretch = 100
)

// fastTxn is one source transaction on the fast path, held until its local
// commit is confirmed so that it can be applied again carefully.
type fastTxn struct {
	msgs     [][]byte // raw messages, Begin to Commit
	size     int
	rows     []change // its row changes, for the group's statements
	sent     int      // statements sent for it (bulk)
	end      pglogrepl.LSN
	commitTS time.Time
	changes  int64
	skip     bool            // forwarded, or applied before: nothing to do here
	touched  map[uint32]bool // relations this transaction changed
}

func (t *fastTxn) touch(rel uint32) {
	if t.touched == nil {
		t.touched = map[uint32]bool{}
	}
	t.touched[rel] = true
}

// empty reports whether the transaction has nothing to apply here.
func (t *fastTxn) empty() bool { return len(t.rows) == 0 }

// fastGroup is one local transaction: the statements of one or more source
// transactions of the same rounded commit time, built when it closes and
// ended by the commit guard. A group without statements (forwarded or
// empty transactions) is only confirmed in its turn.
type fastGroup struct {
	txns      []*fastTxn
	stmts     []fastStmt
	collapsed bool          // its statements are set-based (collapse.go)
	rounded   int64         // the members' rounded commit time (conflict.Rule.Round)
	end       pglogrepl.LSN // the last member's end
	commitTS  time.Time     // the last applying member's commit time
	size      int
}

func (g *fastGroup) applies() bool { return len(g.stmts) > 0 }

type fastStmt struct {
	name    string
	params  [][]byte
	formats []int16 // nil: all text
}

// insertRun gathers consecutive inserts into one relation with one column
// set, applied by a single statement.
type insertRun struct {
	r    *relation
	cols []int
	rows [][][]byte
}

// msgType is a pgoutput message's type, read without decoding it (0 for an
// empty message).
func msgType(data []byte) pglogrepl.MessageType {
	if len(data) == 0 {
		return 0
	}
	return pglogrepl.MessageType(data[0])
}

// errNotFast sends the current transaction to the careful path.
var errNotFast = errors.New("change needs the careful path")

// handle applies one pgoutput message and returns the peer position up to
// which everything is now committed here (0 when that did not move).
func (a *applier) handle(ctx context.Context, data []byte) (pglogrepl.LSN, error) {
	err := a.handleMsg(ctx, data)
	return a.takeConfirmed(), err
}

// takeConfirmed returns the position newly confirmed, or 0.
func (a *applier) takeConfirmed() pglogrepl.LSN {
	end := a.confirmedEnd
	a.confirmedEnd = 0
	return end
}

func (a *applier) handleMsg(ctx context.Context, data []byte) error {
	if a.bulk != nil {
		return a.bulkMsg(ctx, bytes.Clone(data))
	}
	if a.careful {
		end, err := a.handleCareful(ctx, data)
		if end > 0 {
			a.careful = false
			a.confirm(end)
			if a.carefulFor > 0 {
				a.carefulFor--
				if a.hadConflict {
					a.carefulFor = carefulStretch
				}
			}
		}
		return err
	}
	if a.carefulFor > 0 && msgType(data) == pglogrepl.MessageTypeBegin {
		// Recent transactions conflicted: this one goes careful too, after
		// everything before it is confirmed.
		if err := a.drain(ctx); err != nil {
			return err
		}
		a.careful = true
		_, err := a.handleCareful(ctx, data)
		return err
	}
	t := a.fast
	if t != nil && t.skip {
		switch msgType(data) {
		case pglogrepl.MessageTypeInsert, pglogrepl.MessageTypeUpdate, pglogrepl.MessageTypeDelete:
			return nil // a forwarded transaction's rows: not even decoded
		}
	}
	// The next receive reuses data's buffer. The copy is kept until the
	// transaction is confirmed (it may be applied again carefully), and
	// the decoded values point into it.
	data = bytes.Clone(data)
	msg, err := parseFast(data)
	if err != nil {
		return fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		a.fast = &fastTxn{msgs: [][]byte{data}, skip: m.FinalLSN < a.progress}
		a.fastBegin = *m
		return nil
	case *pglogrepl.CommitMessage:
		if t == nil {
			return fmt.Errorf("peer %q sent a commit without a begin (protocol error)", a.cfg.Peer.Name)
		}
		t.msgs = append(t.msgs, data)
		return a.fastCommit(ctx, t, m)
	case *pglogrepl.TypeMessage:
		return nil
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional || t == nil || t.skip {
			return nil
		}
	}
	if t == nil {
		// Nothing but the above is sent outside a transaction.
		_, err := a.handleCareful(ctx, data)
		return err
	}
	if _, ok := msg.(*pglogrepl.OriginMessage); ok {
		t.skip = true
		t.msgs = append(t.msgs, data)
		return nil
	}
	if rm, ok := msg.(*pglogrepl.RelationMessage); ok && !t.touched[rm.RelationID] {
		// A table's (new) description, before this transaction changes it:
		// transactions in flight must not be replayed with it, so they are
		// confirmed first; this one, if it changed other tables already,
		// goes careful.
		t.msgs = append(t.msgs, data)
		if !t.empty() {
			return a.toCareful(ctx, t)
		}
		if err := a.drain(ctx); err != nil {
			return err
		}
		a.rels[rm.RelationID] = newRelation(rm, data)
		return nil
	}
	if _, ok := msg.(*pglogrepl.RelationMessage); !ok && t.skip {
		return nil
	}
	t.msgs = append(t.msgs, data)
	t.size += len(data)
	t.changes++
	if t.size > fastMaxTxnBytes || t.changes > fastMaxTxnChanges {
		if a.fastBegin.FinalLSN == a.retryLSN { // its bulk apply failed before
			return a.toCareful(ctx, t)
		}
		return a.toBulk(ctx, t)
	}
	err = a.fastChange(ctx, t, msg)
	if errors.Is(err, errNotFast) {
		return a.toCareful(ctx, t)
	}
	return err
}

// fastChange builds the statements for an insert, update or delete; any
// other message is errNotFast.
func (a *applier) fastChange(ctx context.Context, t *fastTxn, msg pglogrepl.Message) error {
	switch m := msg.(type) {
	case *pglogrepl.InsertMessage:
		t.touch(m.RelationID)
		return a.fastInsert(ctx, t, m)
	case *pglogrepl.UpdateMessage:
		t.touch(m.RelationID)
		return a.fastUpdate(ctx, t, m)
	case *pglogrepl.DeleteMessage:
		t.touch(m.RelationID)
		return a.fastDelete(ctx, t, m)
	}
	return errNotFast
}

// toCareful applies the transaction read so far on the careful path, after
// everything before it is confirmed, and stays there until its commit.
func (a *applier) toCareful(ctx context.Context, t *fastTxn) error {
	a.fast = nil
	if err := a.drain(ctx); err != nil {
		return err
	}
	a.careful = true
	for _, msg := range t.msgs {
		end, err := a.handleCareful(ctx, msg)
		if err != nil {
			return err
		}
		if end > 0 { // the transaction ended (it failed at its commit)
			a.careful = false
			a.confirm(end)
		}
	}
	return nil
}

// replayCarefully applies whole source transactions again on the careful
// path, one local transaction each, confirming each.
func (a *applier) replayCarefully(ctx context.Context, txns []*fastTxn) error {
	for _, t := range txns {
		if t.msgs == nil { // nothing to apply here (see fastCommit)
			a.confirm(t.end)
			continue
		}
		for _, msg := range t.msgs {
			end, err := a.handleCareful(ctx, msg)
			if err != nil {
				return err
			}
			a.confirm(end)
		}
	}
	return nil
}

// fastRelation returns the relation a change is for, with fresh local
// catalog facts.
func (a *applier) fastRelation(ctx context.Context, id uint32) (*relation, error) {
	r, ok := a.rels[id]
	if !ok || a.parks(r) {
		return nil, errNotFast // the careful path reports the protocol error, or parks
	}
	if r.stale() {
		if err := a.collect(ctx); err != nil {
			return nil, err
		}
		if err := r.load(ctx, a.pc, a.cfg.Peer.Name); err != nil {
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

func (a *applier) fastInsert(ctx context.Context, t *fastTxn, m *pglogrepl.InsertMessage) error {
	r, err := a.fastRelation(ctx, m.RelationID)
	if err != nil {
		return err
	}
	if r.pk != nil && !fastKey(r, m.Tuple) {
		return errNotFast
	}
	cols, vals := values(m.Tuple) // pointing into the message, which the caller copied
	c := change{r: r, op: pglogrepl.MessageTypeInsert, cols: cols, vals: vals, commitTS: a.fastBegin.CommitTime}
	if r.pk != nil {
		c.key = pick(m.Tuple, r.pk)
	}
	t.rows = append(t.rows, c)
	return nil
}

// continues reports whether rows of r with these columns can join the run.
func (run *insertRun) continues(r *relation, cols []int) bool {
	return run.r == r && slices.Equal(run.cols, cols) && len(run.rows) < fastMaxRun
}

// finishRun turns the pending inserts into one statement, appended to
// stmts: a plain INSERT, which fails on any unique collision, guarded
// against remembered deletes. Several rows travel as one text array per
// column.
func (a *applier) finishRun(ctx context.Context, pending *insertRun, stmts *[]fastStmt) error {
	run := *pending
	*pending = insertRun{}
	if run.r == nil || len(run.rows) == 0 {
		return nil
	}
	r := run.r
	var p params
	exprs := make([]string, len(run.cols)) // each column's value, typed
	from := ""
	if len(run.rows) == 1 {
		for i, c := range run.cols {
			exprs[i] = r.typed(&p, c, run.rows[0][i])
		}
	} else {
		arrays := make([]string, len(run.cols))
		aliases := make([]string, len(run.cols))
		for i, c := range run.cols {
			col := make([][]byte, len(run.rows))
			for j, row := range run.rows {
				col[j] = row[i]
			}
			enc, err := a.textArray(r, col)
			if err != nil {
				return err
			}
			arrays[i] = p.add(enc) + "::text[]"
			aliases[i] = "c" + strconv.Itoa(i)
			exprs[i] = "u." + aliases[i] + "::" + r.localType[c]
		}
		from = " FROM unnest(" + strings.Join(arrays, ", ") + ") AS u(" + strings.Join(aliases, ", ") + ")"
	}
	sql := r.insertSQL(&p, run.cols, exprs, from)
	if from != "" {
		// Arrays travel in binary (the relation's name, text, reads the
		// same either way): no quoting to write or parse.
		return a.addStmt(ctx, stmts, sql, p.vals, binaryParams)
	}
	return a.addStmt(ctx, stmts, sql, p.vals, nil)
}

// binaryParams marks every parameter of a statement as binary.
var binaryParams = []int16{pgtype.BinaryFormatCode}

func (a *applier) addStmt(ctx context.Context, stmts *[]fastStmt, sql string, vals [][]byte, formats []int16) error {
	name, err := a.prepare(ctx, sql)
	if _, refused := errors.AsType[*unpreparable](err); refused {
		return errNotFast // the careful path reports what is wrong
	}
	if err != nil {
		return err
	}
	*stmts = append(*stmts, fastStmt{name: name, params: vals, formats: formats})
	return nil
}

func (a *applier) fastUpdate(ctx context.Context, t *fastTxn, m *pglogrepl.UpdateMessage) error {
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
	cols, vals := values(m.NewTuple)
	if !slices.ContainsFunc(cols, func(c int) bool { return !r.identityAlways[c] }) {
		return errNotFast // nothing can be set: the careful path decides
	}
	c := change{r: r, op: pglogrepl.MessageTypeUpdate, cols: cols, vals: vals, key: pick(keySrc, r.pk),
		commitTS: a.fastBegin.CommitTime}
	for i, k := range r.pk {
		if v, ok := valueOf(cols, vals, k); ok && !bytes.Equal(v, c.key[i]) {
			c.newKey = true
		}
	}
	t.rows = append(t.rows, c)
	return nil
}

func (a *applier) fastDelete(ctx context.Context, t *fastTxn, m *pglogrepl.DeleteMessage) error {
	r, err := a.fastRelation(ctx, m.RelationID)
	if err != nil {
		return err
	}
	if m.OldTuple == nil || !fastKey(r, m.OldTuple) {
		return errNotFast
	}
	t.rows = append(t.rows, change{r: r, op: pglogrepl.MessageTypeDelete, key: pick(m.OldTuple, r.pk),
		commitTS: a.fastBegin.CommitTime})
	return nil
}

// statements builds the statements applying changes, in source order as
// far as the result can tell: set-based when they collapse exactly and
// that takes fewer statements (collapsed is then true), else one by one.
func (a *applier) statements(ctx context.Context, changes []change) (stmts []fastStmt, collapsed bool, err error) {
	if sets, ok := collapse(changes); ok && setStatementCount(sets) < oneByOneCount(changes) {
		stmts, err = a.setStatements(ctx, sets)
		return stmts, true, err
	}
	stmts, err = a.oneByOne(ctx, changes)
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
		run = insertRun{}
		if c.op == pglogrepl.MessageTypeInsert {
			run = insertRun{r: c.r, cols: c.cols, rows: [][][]byte{nil}}
		}
	}
	return n
}

// oneByOne builds a statement per update and delete, and one per run of
// inserts into one table with the same columns.
func (a *applier) oneByOne(ctx context.Context, changes []change) ([]fastStmt, error) {
	var stmts []fastStmt
	var run insertRun
	for _, c := range changes {
		if c.op == pglogrepl.MessageTypeInsert {
			if !run.continues(c.r, c.cols) {
				if err := a.finishRun(ctx, &run, &stmts); err != nil {
					return nil, err
				}
				run = insertRun{r: c.r, cols: c.cols}
			}
			run.rows = append(run.rows, c.vals)
			continue
		}
		if err := a.finishRun(ctx, &run, &stmts); err != nil {
			return nil, err
		}
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
		if err := a.addStmt(ctx, &stmts, sql, p.vals, nil); err != nil {
			return nil, err
		}
	}
	if err := a.finishRun(ctx, &run, &stmts); err != nil {
		return nil, err
	}
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
func (a *applier) setStatements(ctx context.Context, sets []*tableSet) ([]fastStmt, error) {
	var stmts []fastStmt
	for _, ts := range sets {
		r := ts.r
		if err := a.deleteSet(ctx, &stmts, r, ts.deletes); err != nil {
			return nil, err
		}
		for _, part := range ts.updates {
			sql, ok := r.updateSetSQL(part.cols, a.roident)
			if !ok {
				return nil, errNotFast
			}
			arrays, err := a.keyArrays(r, part.rows)
			if err != nil {
				return nil, err
			}
			for i := range part.cols {
				col, err := a.textArray(r, column(part.rows, func(row *finalRow) []byte { return row.vals[i] }))
				if err != nil {
					return nil, err
				}
				arrays = append(arrays, col)
			}
			if err := a.addStmt(ctx, &stmts, sql, arrays, binaryParams); err != nil {
				return nil, err
			}
		}
		for _, part := range ts.inserts {
			run := insertRun{r: r, cols: part.cols, rows: make([][][]byte, len(part.rows))}
			for i, row := range part.rows {
				run.rows[i] = row.vals
			}
			if err := a.finishRun(ctx, &run, &stmts); err != nil {
				return nil, err
			}
		}
		for _, run := range ts.keyless {
			if err := a.finishRun(ctx, &run, &stmts); err != nil {
				return nil, err
			}
		}
		if err := a.deleteSet(ctx, &stmts, r, ts.deletesOfNew); err != nil {
			return nil, err
		}
	}
	return stmts, nil
}

// deleteSet adds the statement deleting rows, if there are any.
func (a *applier) deleteSet(ctx context.Context, stmts *[]fastStmt, r *relation, rows []*finalRow) error {
	if len(rows) == 0 {
		return nil
	}
	arrays, err := a.keyArrays(r, rows)
	if err != nil {
		return err
	}
	at, err := a.textArray(r, column(rows, func(row *finalRow) []byte { return []byte(pgquote.Timestamp(row.deletedAt)) }))
	if err != nil {
		return err
	}
	arrays = append(arrays, at, []byte(r.tombName), []byte(a.cfg.Peer.Name))
	return a.addStmt(ctx, stmts, r.deleteSetSQL(a.roident), arrays, binaryParams)
}

// keyArrays encodes the rows' primary keys, one array per key column.
func (a *applier) keyArrays(r *relation, rows []*finalRow) ([][]byte, error) {
	out := make([][]byte, len(r.pk))
	for i := range r.pk {
		arr, err := a.textArray(r, column(rows, func(row *finalRow) []byte { return row.key[i] }))
		if err != nil {
			return nil, err
		}
		out[i] = arr
	}
	return out, nil
}

// column gathers one value of each row.
func column(rows []*finalRow, value func(*finalRow) []byte) [][]byte {
	col := make([][]byte, len(rows))
	for j, row := range rows {
		col[j] = value(row)
	}
	return col
}

// textArray encodes values (nil for NULL) as a text[] in binary, straight
// from the bytes pgoutput sent.
func (a *applier) textArray(r *relation, vals [][]byte) ([]byte, error) {
	enc, err := a.types.Encode(pgtype.TextArrayOID, pgtype.BinaryFormatCode, pgtype.FlatArray[[]byte](vals), nil)
	if err != nil {
		return nil, fmt.Errorf("encode values of %s: %w", r.qualified, err)
	}
	return enc, nil
}

// fastCommit ends a source transaction: it joins the open group when its
// commit time rounds to the group's, else it closes that group and opens
// the next. A group closes too when the server is idle (latency) and at its
// size bounds; closed groups wait in the queue for the next batch.
func (a *applier) fastCommit(ctx context.Context, t *fastTxn, m *pglogrepl.CommitMessage) error {
	a.fast = nil
	t.end, t.commitTS = m.TransactionEndLSN, m.CommitTime
	if t.skip {
		t.rows = nil
		a.stats.skipped(true, m.CommitTime)
	} else if t.empty() {
		a.stats.skipped(false, m.CommitTime)
	}
	if t.empty() {
		t.msgs = nil
		if g := a.group; g != nil {
			g.txns, g.end = append(g.txns, t), t.end // confirmed with the group
			return nil
		}
		if !a.busy() {
			a.confirm(t.end)
			return nil
		}
		a.pipe.enqueue(&fastGroup{txns: []*fastTxn{t}, end: t.end})
		return nil
	}
	rounded := a.cfg.Rule.Round(t.commitTS)
	if g := a.group; g != nil && (g.rounded != rounded || len(g.txns) >= fastMaxGroupTxns || g.size >= fastMaxGroupBytes) {
		if err := a.closeGroup(ctx); err != nil {
			return err
		}
	}
	g := a.group
	if g == nil {
		g = &fastGroup{rounded: rounded}
		a.group = g
	}
	g.txns = append(g.txns, t)
	g.end, g.commitTS = t.end, t.commitTS
	g.size += t.size
	// Close and send at once when the server is idle (latency); else let
	// the group grow while the server works on the batch in flight.
	if !a.pipe.inFlight() {
		if err := a.closeGroup(ctx); err != nil {
			return err
		}
		return a.send(ctx)
	}
	return nil
}

// closeGroup builds the open group's statements, ends them with its commit
// guard and queues it; the queue is sent once it is large.
func (a *applier) closeGroup(ctx context.Context) error {
	g := a.group
	if g == nil {
		return nil
	}
	a.group = nil
	var changes []change
	for _, t := range g.txns {
		changes = append(changes, t.rows...)
		t.rows = nil
	}
	if len(changes) > 0 {
		var err error
		if g.stmts, g.collapsed, err = a.statements(ctx, changes); err != nil {
			a.group = g
			return a.groupFailed(ctx, err)
		}
	}
	if g.applies() {
		// The guard comes last: the group's end is known only now. It
		// checks that every group before it committed, waits for the local
		// clock to pass the group's rounded time (causality), and stamps
		// the commit with the origin's progress and commit time.
		name, err := a.prepare(ctx, `SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz)
WHERE CASE WHEN coalesce(pg_catalog.pg_replication_origin_session_progress(false), '0/0') = $3::pg_lsn THEN true
	ELSE pgmesh.apply_conflict('an earlier transaction from this peer is not applied yet') END
	AND `+clockGuard("$4"))
		if err != nil {
			return err
		}
		at := time.UnixMicro(g.rounded).UTC()
		a.stats.clockAhead(at)
		g.stmts = append(g.stmts, fastStmt{name: name, params: [][]byte{[]byte(g.end.String()), []byte(pgquote.Timestamp(g.commitTS)),
			[]byte(a.applied.String()), []byte(pgquote.Timestamp(at))}})
		a.applied = g.end
	}
	if a.pipe.enqueue(g) {
		return a.send(ctx)
	}
	return nil
}

// groupFailed applies the open group's transactions carefully, after
// everything before them is confirmed: its statements could not be built.
func (a *applier) groupFailed(ctx context.Context, err error) error {
	if !errors.Is(err, errNotFast) {
		return err
	}
	g := a.group
	a.group = nil
	if err := a.drain(ctx); err != nil {
		return err
	}
	a.stats.fallback(len(g.txns))
	return a.replayCarefully(ctx, g.txns)
}

// clockGuard is a condition that holds once the local server's clock has
// passed the timestamptz parameter param, waiting for it if need be: a
// remote transaction commits here only after its rounded commit time, so
// every later local write to its rows is stamped later (causality; see
// ARCHITECTURE.md). The server's clock is the one that stamps commits, so
// it is the one waited on, not the daemon's.
func clockGuard(param string) string {
	return `CASE WHEN pg_catalog.clock_timestamp() > ` + param + `::timestamptz THEN true
	ELSE pgmesh.wait_for_clock(` + param + `::timestamptz) END`
}

// busy reports whether transactions wait to be sent or confirmed.
func (a *applier) busy() bool { return a.group != nil || a.pipe.busy() }

// between reports whether the stream is between transactions.
func (a *applier) between() bool { return a.fast == nil && !a.careful && a.bulk == nil }

// quiet reports whether no transaction is open or unconfirmed.
func (a *applier) quiet() bool { return !a.busy() && a.between() }

// idle is called when the stream has nothing more to read for now: it
// closes the open group, confirms the batch in flight and sends what is
// queued.
func (a *applier) idle(ctx context.Context) (pglogrepl.LSN, error) {
	err := a.closeGroup(ctx)
	if err == nil {
		err = a.send(ctx)
	}
	return a.takeConfirmed(), err
}

// confirm records that everything up to end is committed here.
func (a *applier) confirm(end pglogrepl.LSN) { a.confirmedEnd = max(a.confirmedEnd, end) }

// send confirms the batch in flight, then sends the queued groups as the
// next batch, without waiting.
func (a *applier) send(ctx context.Context) error {
	if err := a.collect(ctx); err != nil {
		return err
	}
	done, err := a.pipe.flush(ctx)
	for _, g := range done {
		a.confirm(g.end)
	}
	return err
}

// drain closes the open group, sends everything queued and confirms it, so
// that the connection is free for statements outside the pipeline.
func (a *applier) drain(ctx context.Context) error {
	if err := a.closeGroup(ctx); err != nil {
		return err
	}
	for a.busy() {
		if err := a.send(ctx); err != nil {
			return err
		}
		if err := a.collect(ctx); err != nil {
			return err
		}
	}
	return nil
}

// collect reads back the batch in flight. Groups up to the first failure
// are confirmed; the transactions of that one and of all after it are
// applied again on the careful path, one by one, in order.
func (a *applier) collect(ctx context.Context) error {
	committed, failed, cause, err := a.pipe.collect()
	for _, g := range committed {
		if g.applies() {
			a.stats.committedGroup(len(g.stmts)-1, g.collapsed) // less the commit guard
			for _, t := range g.txns {
				if t.changes > 0 {
					a.stats.applied(t.end, t.commitTS, t.changes, nil)
				}
			}
		}
		a.confirm(g.end)
	}
	if err != nil || len(failed) == 0 {
		return err
	}
	// The failed group's transactions and all after them (which failed
	// only because it had) are applied carefully, in order. Conflicts come
	// in runs, so the next transactions take the careful path straight
	// away too.
	var txns []*fastTxn
	for _, g := range failed {
		txns = append(txns, g.txns...)
	}
	a.stats.fallback(len(txns))
	a.carefulFor = carefulStretch
	a.log.Debug("group left the fast path; applying its transactions and the rest of its batch carefully",
		"remote_commit_lsn", failed[0].end, "cause", cause, "transactions", len(txns))
	return a.replayCarefully(ctx, txns)
}
