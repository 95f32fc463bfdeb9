package replicator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pglogrepl"
)

// The grouped mode (the fast path) applies a peer's transactions through a
// pipeline, without waiting for the server between them. Each source transaction becomes
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
// group in flight failed too: each one's last statement checks that
// the origin's progress is where the previous one left it, so commits never
// run ahead of a failure.
//
// Transactions that cannot go fast (DDL, TRUNCATE, relation changes, tables
// without a primary key, delta columns) go to the careful mode from their
// first change, and large ones to the bulk mode, after everything before
// them is confirmed.

// Bounds of the fast path: a transaction larger than this is applied in
// bulk (it is streamed, not held), a group closes at these sizes, and
// groups waiting or in flight are sent or read back once this many are.
const (
	fastMaxTxnBytes      = 4 << 20
	fastMaxTxnChanges    = 20000
	fastMaxRun           = 1000
	fastMaxGroupTxns     = 1000
	fastMaxGroupBytes    = 4 << 20
	fastMaxInFlight      = 500
	fastMaxInFlightBytes = 16 << 20
)

// freshTxn is how recent a transaction's commit must be for its group to
// be fresh: the stream keeps up, and the group is sent as soon as nothing
// more has arrived, or once it is freshPause old, not when the batch in
// flight is read back or the next interval begins. Older transactions are
// a backlog, which large groups absorb. A burst of fresh transactions that
// arrive together still shares a commit.
const (
	freshTxn   = 50 * time.Millisecond
	freshPause = 200 * time.Microsecond
)

// A backlog of transactions of at least heavyTxnRows rows each streams its
// groups (streaming): each is sent as it closes, behind those in flight,
// and the stream may be silent for backlogPause before the open group is
// sent, because the walsender decodes such a transaction whole before
// sending any of it, which can take milliseconds. Groups then hold a whole
// interval, and the server never waits for the stream to pause. Smaller
// transactions keep batches, sent once the batch in flight is read back:
// streamed, a pgbench backlog (4 rows per transaction) applied at two
// thirds of the rate, for reasons not found (ARCHITECTURE.md).
const (
	heavyTxnRows = 16
	backlogPause = 5 * time.Millisecond
)

// fastTxn is one source transaction on the fast path, held until its local
// commit is confirmed so that it can be applied again carefully.
type fastTxn struct {
	msgs     [][]byte // raw messages, Begin to Commit
	size     int
	rows     []change // its row changes, for the group's statements
	end      pglogrepl.LSN
	commitTS time.Time
	changes  int64
	skip     bool     // forwarded, or applied before: nothing to do here
	passed   int      // rows of a skipped transaction passed over so far
	touched  []uint32 // relations this transaction changed (a few: a slice, not a map)
}

func (t *fastTxn) touch(rel uint32) {
	if !t.changed(rel) {
		t.touched = append(t.touched, rel)
	}
}

// changed reports whether the transaction changed relation rel.
func (t *fastTxn) changed(rel uint32) bool { return slices.Contains(t.touched, rel) }

// empty reports whether the transaction has nothing to apply here.
func (t *fastTxn) empty() bool { return len(t.rows) == 0 }

// fastGroup is one local transaction: the statements of one or more source
// transactions of the same rounded commit time, built when it closes and
// ended by the commit guard. A group without statements (forwarded or
// empty transactions) is only confirmed in its turn.
type fastGroup struct {
	txns      []*fastTxn
	stmts     []stmt
	collapsed bool          // its statements are set-based (collapse.go)
	fresh     bool          // it holds a fresh transaction (freshTxn)
	opened    time.Time     // when its first transaction joined
	rounded   int64         // the members' rounded commit time (conflict.Rule.Round)
	end       pglogrepl.LSN // the last member's end
	commitTS  time.Time     // the last applying member's commit time
	size      int
}

func (g *fastGroup) applies() bool { return len(g.stmts) > 0 }

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

// grouped is the grouped mode, the stream's usual one: each source
// transaction is read whole, joins the open group, and the closed groups go
// to the server through the pipeline without waiting.
type grouped struct {
	*applier
	txn   *fastTxn               // the transaction being read
	begin pglogrepl.BeginMessage // its Begin
	group *fastGroup             // the open group, collecting transactions
	pipe  pipeline
	// behind is set when the last transaction read committed freshTxn
	// or more ago: the stream works through a backlog.
	behind bool
	// rowsHint is the room the next transaction's changes start with: the
	// smaller of the last two applying transactions' counts (lastRows is
	// the last one's), since a stream's transactions tend to be alike, and
	// a small one after a large one must not hold the large one's room.
	rowsHint, lastRows int
}

func newGrouped(a *applier) *grouped { return &grouped{applier: a, pipe: pipeline{s: a.s}} }

func (g *grouped) between() bool { return g.txn == nil }

// handle reads one message. A transaction that cannot go grouped goes to
// the careful or the bulk mode, after everything before it is confirmed.
func (g *grouped) handle(ctx context.Context, data []byte) (mode, error) {
	if g.careful.stretch > 0 && msgType(data) == pglogrepl.MessageTypeBegin {
		// Recent transactions conflicted: this one goes careful too.
		if err := g.drain(ctx); err != nil {
			return g, err
		}
		return g.careful.handle(ctx, data)
	}
	t := g.txn
	if t != nil && t.skip {
		switch msgType(data) {
		case pglogrepl.MessageTypeInsert, pglogrepl.MessageTypeUpdate, pglogrepl.MessageTypeDelete:
			t.passed++
			return g, nil // a forwarded transaction's rows: not even decoded
		}
	}
	// The next receive reuses data's buffer. The copy is kept until the
	// transaction is confirmed (it may be applied again carefully), and
	// the decoded values point into it.
	data = g.copies.of(data)
	msg, err := parseFast(data, &g.scratch)
	if err != nil {
		return g, fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		// Room for Begin, one change and Commit: the usual small transaction.
		msgs := make([][]byte, 1, 3)
		msgs[0] = data
		g.txn = &fastTxn{msgs: msgs, skip: m.FinalLSN < g.progress}
		if g.rowsHint > 1 {
			g.txn.rows = make([]change, 0, g.rowsHint)
		}
		g.begin = *m
		return g, nil
	case *pglogrepl.CommitMessage:
		if t == nil {
			return g, fmt.Errorf("peer %q sent a commit without a begin (protocol error)", g.cfg.Peer.Name)
		}
		t.msgs = append(t.msgs, data)
		return g, g.commit(ctx, t, m)
	case *pglogrepl.TypeMessage:
		return g, nil
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional || t == nil || t.skip {
			return g, nil
		}
	}
	if t == nil {
		// Nothing but the above is sent outside a transaction.
		_, err := g.careful.apply(ctx, data)
		return g, err
	}
	if _, ok := msg.(*pglogrepl.OriginMessage); ok {
		t.skip = true
		t.msgs = append(t.msgs, data)
		return g, nil
	}
	if rm, ok := msg.(*pglogrepl.RelationMessage); ok && !t.changed(rm.RelationID) {
		// A table's (new) description, before this transaction changes it:
		// transactions in flight must not be replayed with it, so they are
		// confirmed first; this one, if it changed other tables already,
		// goes careful.
		t.msgs = append(t.msgs, data)
		if !t.empty() {
			return g.toCareful(ctx, t)
		}
		if err := g.drain(ctx); err != nil {
			return g, err
		}
		// A copy of its own: the relation outlives the block data is in.
		g.rels[rm.RelationID] = newRelation(rm, bytes.Clone(data))
		return g, nil
	}
	if _, ok := msg.(*pglogrepl.RelationMessage); !ok && t.skip {
		return g, nil
	}
	t.msgs = append(t.msgs, data)
	t.size += len(data)
	t.changes++
	if t.size > fastMaxTxnBytes || t.changes > fastMaxTxnChanges {
		if g.begin.FinalLSN == g.retryLSN { // its bulk apply failed before
			return g.toCareful(ctx, t)
		}
		return g.toBulk(ctx, t)
	}
	err = g.rowChange(ctx, t, msg, g.begin.CommitTime)
	if errors.Is(err, errNotFast) {
		return g.toCareful(ctx, t)
	}
	return g, err
}

// toCareful hands the transaction read so far to the careful mode, after
// everything before it is confirmed; it stays there until its commit.
func (g *grouped) toCareful(ctx context.Context, t *fastTxn) (mode, error) {
	g.txn = nil
	if err := g.drain(ctx); err != nil {
		return g, err
	}
	var next mode = g.careful
	for _, msg := range t.msgs {
		var err error
		if next, err = g.careful.handle(ctx, msg); err != nil {
			return next, err
		}
	}
	return next, nil
}

// toBulk hands the transaction read so far to a new bulk mode, after
// everything before it is confirmed.
func (g *grouped) toBulk(ctx context.Context, t *fastTxn) (mode, error) {
	g.txn = nil
	if err := g.drain(ctx); err != nil {
		return g, err
	}
	return startBulk(ctx, g.applier, g.begin, t.msgs[1:]) // after Begin
}

// replayCarefully applies whole source transactions again on the careful
// path, one local transaction each, confirming each.
func (g *grouped) replayCarefully(ctx context.Context, txns []*fastTxn) error {
	for _, t := range txns {
		if t.msgs == nil { // nothing to apply here (see commit)
			g.confirm(t.end)
			continue
		}
		for _, msg := range t.msgs {
			end, err := g.careful.apply(ctx, msg)
			if err != nil {
				return err
			}
			g.confirm(end)
		}
	}
	return nil
}

// commit ends a source transaction: it joins the open group when its
// commit time rounds to the group's, else it closes that group and opens
// the next. A group closes too when the server is idle (latency) and at its
// size bounds; a closed group waits for the next batch, or when streaming
// is sent at once, behind those in flight.
func (g *grouped) commit(ctx context.Context, t *fastTxn, m *pglogrepl.CommitMessage) error {
	g.txn = nil
	t.end, t.commitTS = m.TransactionEndLSN, m.CommitTime
	g.behind = time.Since(t.commitTS) >= freshTxn
	if t.skip {
		t.rows = nil
		g.stats.skipped(true, m.CommitTime)
	} else if t.empty() {
		g.stats.skipped(false, m.CommitTime)
	} else {
		g.rowsHint, g.lastRows = min(len(t.rows), g.lastRows, maxRowsHint), len(t.rows)
	}
	if t.empty() {
		t.msgs = nil
		if grp := g.group; grp != nil {
			grp.txns, grp.end = append(grp.txns, t), t.end // confirmed with the group
			return nil
		}
		if !g.busy() {
			g.confirm(t.end)
			return nil
		}
		g.pipe.enqueue(&fastGroup{txns: []*fastTxn{t}, end: t.end})
		return nil
	}
	rounded := g.cfg.Rule.Round(t.commitTS)
	if grp := g.group; grp != nil && (grp.rounded != rounded || len(grp.txns) >= fastMaxGroupTxns || grp.size >= fastMaxGroupBytes) {
		if err := g.closeGroup(ctx); err != nil {
			return err
		}
	}
	grp := g.group
	if grp == nil {
		grp = &fastGroup{rounded: rounded, opened: time.Now()}
		g.group = grp
	}
	grp.txns = append(grp.txns, t)
	grp.end, grp.commitTS = t.end, t.commitTS
	grp.size += t.size
	// A fresh transaction whose guard waits for no more than its own
	// commit time (only skew) makes the group fresh: the stream keeps up,
	// and the group is sent as soon as the stream pauses (freshPause).
	if time.Since(t.commitTS) < freshTxn && !g.visibleAfter(t.commitTS).After(t.commitTS) {
		grp.fresh = true
	}
	// Close and send at once when the server is idle, or when the group
	// is fresh and has waited for the stream to pause long enough; else
	// let the group grow while the server works on what is in flight. A
	// streaming backlog's group grows to its interval's end, or until the
	// stream pauses: its transactions are late anyway, and small groups are
	// what makes a backlog slow.
	if (!g.pipe.inFlight() && !g.streaming()) || (grp.fresh && time.Since(grp.opened) >= freshPause) {
		if err := g.closeGroup(ctx); err != nil {
			return err
		}
		return g.send(ctx)
	}
	return nil
}

// closeGroup builds the open group's statements, ends them with its commit
// guard and queues it; the queue is sent when streaming, or once it is
// large.
func (g *grouped) closeGroup(ctx context.Context) error {
	grp := g.group
	if grp == nil {
		return nil
	}
	g.group = nil
	n := 0
	for _, t := range grp.txns {
		n += len(t.rows)
	}
	changes := make([]change, 0, n)
	for _, t := range grp.txns {
		changes = append(changes, t.rows...)
		t.rows = nil
	}
	if len(changes) > 0 {
		var err error
		if grp.stmts, grp.collapsed, err = g.statements(changes, false); err != nil {
			g.group = grp
			return g.groupFailed(ctx, err)
		}
	}
	if grp.applies() {
		// The guard comes last: the group's end is known only now. It
		// checks that every group before it committed, waits for the local
		// clock to reach the group's interval (causality,
		// visibleAfter), and stamps the commit with the origin's progress
		// and commit time.
		at := g.visibleAfter(grp.commitTS)
		g.stats.clockAhead(at)
		expect := g.applied
		grp.stmts = append(grp.stmts, stamp{end: grp.end, commitTS: grp.commitTS, at: at, expect: &expect}.guard())
		g.applied = grp.end
	}
	if g.pipe.enqueue(grp) || g.streaming() {
		return g.send(ctx)
	}
	return nil
}

// groupFailed applies the open group's transactions carefully, after
// everything before them is confirmed: its statements could not be built.
func (g *grouped) groupFailed(ctx context.Context, err error) error {
	if !errors.Is(err, errNotFast) {
		return err
	}
	grp := g.group
	g.group = nil
	if err := g.drain(ctx); err != nil {
		return err
	}
	g.stats.fallback(len(grp.txns))
	return g.replayCarefully(ctx, grp.txns)
}

// busy reports whether transactions wait to be sent or confirmed.
func (g *grouped) busy() bool { return g.group != nil || g.pipe.busy() }

// maxRowsHint bounds rowsHint: larger transactions grow their room.
const maxRowsHint = 256

// largeSkip is how many rows a skipped transaction shows before the stream
// treats it as large (passingOver).
const largeSkip = 8

// passingOver reports whether the stream is inside a large transaction it
// skips. On PostgreSQL 15 every transaction this node applies comes back
// from the peer (it cannot filter by origin), and a group applied here
// comes back as one transaction of dozens or hundreds of rows: read a
// message at a time, it cost the other node's daemon as much CPU as
// applying it cost this one. A small one is read as it comes.
func (g *grouped) passingOver() bool { return g.txn != nil && g.txn.passed >= largeSkip }

// streaming reports whether closed groups are sent as they close, behind
// those in flight, rather than in batches (heavyTxnRows).
func (g *grouped) streaming() bool { return g.behind && g.lastRows >= heavyTxnRows }

// pause is how long the stream may be silent before what waits is sent
// and confirmed (idle): not at all for a fresh group, which goes once
// nothing more has arrived; longer for a backlog, whose next transactions
// are on their way. A wait on the socket lasts a millisecond at least
// (Go's poller sleeps in whole milliseconds), so the 200 µs pause a fresh
// group once had cost up to a millisecond of latency (TestFreshGroupsGoSoon).
func (g *grouped) pause() time.Duration {
	switch {
	case g.group != nil && g.group.fresh:
		return 0
	case g.streaming():
		return backlogPause
	}
	return time.Millisecond
}

// idle is called when the stream has nothing more to read for now: it
// closes the open group and sends what is queued; streaming, it reads
// back and confirms what is in flight only once nothing is left to send.
func (g *grouped) idle(ctx context.Context) error {
	if g.streaming() && g.group == nil && len(g.pipe.queued) == 0 {
		return g.collect(ctx)
	}
	if err := g.closeGroup(ctx); err != nil {
		return err
	}
	return g.send(ctx)
}

// abandon drops the open group and the batches after an error; the
// connection is closed next.
func (g *grouped) abandon() {
	g.txn, g.group = nil, nil
	g.pipe.abandon()
}

// send sends the queued groups as the next batch, after the batch in
// flight is read back and confirmed. Streaming, it sends them after those
// in flight without waiting for the server, unless too much is in flight:
// the server then always has the next group, while the stream reads on.
func (g *grouped) send(ctx context.Context) error {
	if !g.streaming() || g.pipe.full() {
		if err := g.collect(ctx); err != nil {
			return err
		}
	}
	done, err := g.pipe.flush(ctx)
	for _, grp := range done {
		g.confirm(grp.end)
	}
	return err
}

// drain closes the open group, sends everything queued and confirms it, so
// that the connection is free for statements outside the pipeline.
func (g *grouped) drain(ctx context.Context) error {
	if err := g.closeGroup(ctx); err != nil {
		return err
	}
	for g.busy() {
		if err := g.send(ctx); err != nil {
			return err
		}
		if err := g.collect(ctx); err != nil {
			return err
		}
	}
	return nil
}

// collect reads back the batch in flight. Groups up to the first failure
// are confirmed; the transactions of that one and of all after it are
// applied again on the careful path, one by one, in order.
func (g *grouped) collect(ctx context.Context) error {
	committed, failed, cause, err := g.pipe.collect()
	for _, grp := range committed {
		if grp.applies() {
			g.stats.committedGroup(len(grp.stmts)-1, grp.collapsed) // less the commit guard
			for _, t := range grp.txns {
				if t.changes > 0 {
					g.stats.applied(t.end, t.commitTS, t.changes, nil)
				}
			}
		}
		g.confirm(grp.end)
	}
	if err != nil || len(failed) == 0 {
		return err
	}
	// The failed group's transactions and all after them (which failed
	// only because it had) are applied carefully, in order. Conflicts come
	// in runs, so the next transactions take the careful path straight
	// away too.
	var txns []*fastTxn
	for _, grp := range failed {
		txns = append(txns, grp.txns...)
	}
	g.stats.fallback(len(txns))
	g.careful.stretch = carefulStretch
	g.log.Debug("group left the fast path; applying its transactions and the rest of its batch carefully",
		"remote_commit_lsn", failed[0].end, "cause", cause, "transactions", len(txns))
	return g.replayCarefully(ctx, txns)
}
