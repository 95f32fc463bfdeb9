package replicator

import (
	"context"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/pgmesh/pgmesh/origin"
)

// applier turns one peer's decoded changes into local transactions on a
// session bound to that peer's replication origin, each committed together
// with the origin's progress (ARCHITECTURE.md, "The apply pipeline"). It
// is always in one of three modes, each a type holding its own state and
// returning the mode for the next message:
//
//   - grouped (grouped.go): transactions of the same rounded commit time
//     share a local transaction, built set-based where it collapses
//     (collapse.go) and sent through the pipeline without waiting;
//   - careful (careful.go): one transaction at a time, settling and logging
//     conflicts, for what cannot go grouped and for groups that failed;
//   - bulk (bulk.go): a transaction too large to hold, streamed in chunks.
//
// The applier itself holds only what every mode shares.
type applier struct {
	s        session
	cfg      *Config
	rels     map[uint32]*relation
	origins  map[uint32]string // roident -> node name
	roident  uint32            // this peer's replication origin here
	progress pglogrepl.LSN     // origin progress when the stream started
	// retryLSN is a large transaction (FinalLSN) whose bulk apply failed:
	// streamed again, it takes the careful path.
	retryLSN pglogrepl.LSN
	stats    *stats
	log      *slog.Logger
	// parked are the tables whose changes go to the parked queue, the
	// stream's (park.go); replaying is the one being replayed, whose
	// changes apply.
	parked    parkedTables
	replaying tableName

	// applied is the origin's progress once everything sent commits: each
	// group's commit guard checks its predecessor's.
	applied pglogrepl.LSN
	// confirmed is the position committed here since handle last returned.
	confirmed pglogrepl.LSN

	mode    mode
	grouped *grouped
	careful *careful
	// scratch is where the grouped and bulk modes decode row changes
	// (parseFast): they keep only each change's values, which point into
	// the copies of the messages.
	scratch parseScratch
	copies  copies
}

// mode is what the applier does with the next message.
type mode interface {
	// handle applies one message and returns the mode for the next one.
	handle(ctx context.Context, data []byte) (mode, error)
	// between reports whether the mode is between source transactions.
	between() bool
}

func newApplier(s session, cfg *Config, progress pglogrepl.LSN, roident uint32, st *stats, retryLSN pglogrepl.LSN, parked parkedTables, log *slog.Logger) *applier {
	a := &applier{s: s, cfg: cfg, progress: progress, applied: progress, roident: roident, stats: st,
		retryLSN: retryLSN, parked: parked, log: log, rels: map[uint32]*relation{}, origins: map[uint32]string{}}
	a.grouped = newGrouped(a)
	a.careful = newCareful(a)
	a.mode = a.grouped
	return a
}

// handle applies one pgoutput message and returns the peer position up to
// which everything is now committed here (0 when that did not move).
func (a *applier) handle(ctx context.Context, data []byte) (pglogrepl.LSN, error) {
	next, err := a.mode.handle(ctx, data)
	a.mode = next
	return a.takeConfirmed(), err
}

// takeConfirmed returns the position newly confirmed, or 0.
func (a *applier) takeConfirmed() pglogrepl.LSN {
	end := a.confirmed
	a.confirmed = 0
	return end
}

// confirm records that everything up to end is committed here.
func (a *applier) confirm(end pglogrepl.LSN) { a.confirmed = max(a.confirmed, end) }

// between reports whether the stream is between transactions.
func (a *applier) between() bool { return a.mode.between() }

// busy reports whether transactions wait to be sent or confirmed.
func (a *applier) busy() bool { return a.grouped.busy() }

// pause is how long the stream may be silent before idle is called.
func (a *applier) pause() time.Duration { return a.grouped.pause() }

// behind reports whether the stream works through a backlog: the last
// transaction read committed a while ago.
func (a *applier) behind() bool { return a.grouped.behind }

// inLarge reports whether the stream is inside a large transaction, whose
// next messages are certain to follow at once: one it applies in bulk, or
// one it skips (grouped.passingOver).
func (a *applier) inLarge() bool {
	_, bulk := a.mode.(*bulk)
	return bulk || a.grouped.passingOver()
}

// quiet reports whether no transaction is open or unconfirmed.
func (a *applier) quiet() bool { return !a.busy() && a.between() }

// idle is called when the stream has nothing more to read for now: it
// closes the open group, confirms the batch in flight and sends what is
// queued.
func (a *applier) idle(ctx context.Context) (pglogrepl.LSN, error) {
	err := a.grouped.idle(ctx)
	return a.takeConfirmed(), err
}

// drain sends and confirms everything the grouped mode holds, so that the
// connection is free for statements outside the pipeline.
func (a *applier) drain(ctx context.Context) error { return a.grouped.drain(ctx) }

// commitAlone ends the local transaction applying one source transaction
// alone (careful and bulk): once the local clock has passed its rounded
// commit time (see clockGuard), with the origin's progress and commit time
// (ARCHITECTURE.md, invariants: exactly once, origin time is the row's
// time).
func (a *applier) commitAlone(ctx context.Context, m *pglogrepl.CommitMessage) error {
	at := a.visibleAfter(m.CommitTime)
	a.stats.clockAhead(at)
	return a.s.commit(ctx, stamp{end: m.TransactionEndLSN, commitTS: m.CommitTime, at: at})
}

// visibleAfter is the local clock reading a peer's change committed at
// commit waits for before it commits here (conflict.Rule.VisibleAfter).
func (a *applier) visibleAfter(commit time.Time) time.Time {
	here := 0
	if a.cfg.NodeID != nil {
		here = a.cfg.NodeID(a.cfg.LocalNode)
	}
	return a.cfg.Rule.VisibleAfter(commit, a.cfg.Peer.ID, here)
}

// rollback abandons an open local transaction after an error.
func (a *applier) rollback(ctx context.Context) {
	a.grouped.abandon()
	a.careful.abandon()
	a.s.rollback(ctx)
	if _, bulk := a.mode.(*bulk); bulk {
		a.mode = a.grouped
	}
}

// values returns the indexes and values of the tuple's columns, leaving out
// unchanged TOAST values ('u'), which must never be overwritten.
func values(t *pglogrepl.TupleData) (cols []int, vals [][]byte) {
	cols, vals = make([]int, 0, len(t.Columns)), make([][]byte, 0, len(t.Columns))
	for i, c := range t.Columns {
		switch c.DataType {
		case pglogrepl.TupleDataTypeNull:
			cols, vals = append(cols, i), append(vals, nil)
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			cols, vals = append(cols, i), append(vals, c.Data)
		}
	}
	return cols, vals
}

func pick(t *pglogrepl.TupleData, cols []int) [][]byte {
	out := make([][]byte, len(cols))
	for i, c := range cols {
		if c < len(t.Columns) && t.Columns[c].DataType != pglogrepl.TupleDataTypeNull {
			out[i] = t.Columns[c].Data
		}
	}
	return out
}

// valueOf returns the value of column c among cols/vals, and whether it is there.
func valueOf(cols []int, vals [][]byte, c int) ([]byte, bool) {
	for i, x := range cols {
		if x == c {
			return vals[i], true
		}
	}
	return nil, false
}

func samePK(r *relation, match []int) bool {
	if r.pk == nil || len(match) != len(r.pk) {
		return false
	}
	for i := range match {
		if match[i] != r.pk[i] {
			return false
		}
	}
	return true
}

// originNode maps a replication origin id to the node it stands for; 0 is
// this node's own writes.
func (a *applier) originNode(ctx context.Context, roident uint32) (string, error) {
	if roident == 0 {
		return a.cfg.LocalNode, nil
	}
	if n, ok := a.origins[roident]; ok {
		return n, nil
	}
	res := a.s.conn().ExecParams(ctx, "SELECT roident, roname FROM pg_catalog.pg_replication_origin", nil, nil, nil, nil).Read()
	if res.Err != nil {
		return "", fmt.Errorf("read replication origins: %w", res.Err)
	}
	for _, row := range res.Rows {
		id, _ := strconv.ParseUint(string(row[0]), 10, 32)
		name, ok := origin.NodeOf(string(row[1]))
		if !ok {
			name = string(row[1])
		}
		a.origins[uint32(id)] = name
	}
	return a.origins[roident], nil
}
