package replicator

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// A transaction too large to hold for a retry (fastMaxTxnBytes) is applied
// in bulk: in one explicit local transaction, streamed, a chunk of changes
// at a time, each chunk with the fast path's statements (set-based when it
// collapses, see collapse.go) sent in one round trip. Collapsing a chunk is
// as exact as collapsing a group: the chunks run in order. If anything
// fails, the local transaction is rolled back, the stream restarts from the
// origin's progress, and this transaction, streamed again, takes the
// careful path.

// bulkChunk is how many changes are sent at a time.
const bulkChunk = 1000

// retryCarefully is returned when a bulk transaction failed; the stream
// restarts and applies it carefully.
type retryCarefully struct {
	lsn   pglogrepl.LSN // the transaction's FinalLSN
	cause error
}

func (e *retryCarefully) Error() string {
	return fmt.Sprintf("large transaction (commit LSN %s) applies carefully after: %v", e.lsn, e.cause)
}

// toBulk starts applying the transaction in bulk, after everything before
// it is confirmed.
func (a *applier) toBulk(ctx context.Context, t *fastTxn) error {
	a.fast = nil
	if err := a.drain(ctx); err != nil {
		return err
	}
	if err := a.pc.Exec(ctx, "BEGIN").Close(); err != nil {
		return fmt.Errorf("begin local transaction: %w", err)
	}
	a.bulk = &fastTxn{}
	a.localOpen = true
	for _, msg := range t.msgs[1:] { // after Begin
		if err := a.bulkMsg(ctx, msg); err != nil {
			return err
		}
	}
	return nil
}

// bulkMsg applies one message of a bulk transaction; data is the caller's
// copy, which the changes gathered for the next chunk point into.
func (a *applier) bulkMsg(ctx context.Context, data []byte) error {
	msg, err := parseFast(data)
	if err != nil {
		return fmt.Errorf("decode pgoutput message: %w", err)
	}
	t := a.bulk
	t.changes++
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		t.changes--
		if t.touched[m.RelationID] {
			err = errNotFast // redefined after changes: the careful path copes
			break
		}
		a.rels[m.RelationID] = newRelation(m, data)
		return nil
	case *pglogrepl.InsertMessage, *pglogrepl.UpdateMessage, *pglogrepl.DeleteMessage:
		err = a.fastChange(ctx, t, msg)
	case *pglogrepl.CommitMessage:
		return a.bulkCommit(ctx, m)
	case *pglogrepl.TypeMessage:
		t.changes--
		return nil
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional {
			t.changes--
			return nil
		}
		err = errNotFast // DDL: the careful path runs it in place
	default:
		err = errNotFast
	}
	if err == nil && len(t.rows) >= bulkChunk {
		err = a.bulkFlush(ctx)
	}
	return a.bulkFailed(ctx, err)
}

// bulkFlush applies the changes gathered so far.
func (a *applier) bulkFlush(ctx context.Context) error {
	t := a.bulk
	if len(t.rows) == 0 {
		return nil
	}
	stmts, _, err := a.statements(ctx, t.rows)
	if err != nil {
		return err
	}
	t.rows = t.rows[:0]
	b := &pgconn.Batch{}
	for _, s := range stmts {
		b.ExecPrepared(s.name, s.params, s.formats, nil)
	}
	t.sent += len(stmts)
	_, err = a.pc.ExecBatch(ctx, b).ReadAll()
	return err
}

// bulkFailed turns a failure into a careful retry of the whole transaction.
func (a *applier) bulkFailed(ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	var pe *pgconn.PgError
	if !errors.Is(err, errNotFast) && !errors.As(err, &pe) {
		return err // the connection failed: the stream restarts anyway
	}
	a.rollback(ctx)
	a.bulk = nil
	return &retryCarefully{lsn: a.fastBegin.FinalLSN, cause: err}
}

func (a *applier) bulkCommit(ctx context.Context, m *pglogrepl.CommitMessage) error {
	t := a.bulk
	if err := a.bulkFlush(ctx); err != nil {
		return a.bulkFailed(ctx, err)
	}
	a.bulk, a.localOpen = nil, false
	if _, err := a.pc.Exec(ctx, a.commitSQL(m)).ReadAll(); err != nil {
		return fmt.Errorf("commit transaction from peer %q (remote xid %d): %w", a.cfg.Peer.Name, a.fastBegin.Xid, err)
	}
	a.stats.committedGroup(t.sent, false)
	a.stats.applied(m.TransactionEndLSN, m.CommitTime, t.changes-1, nil)
	a.applied = m.TransactionEndLSN
	a.confirm(m.TransactionEndLSN)
	return nil
}
