package replicator

import (
	"bytes"
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// A transaction too large to hold for a retry (fastMaxTxnBytes) is applied
// in bulk: in one explicit local transaction, streamed, a chunk of changes
// at a time, each chunk with the grouped mode's statements (set-based when
// it collapses, see collapse.go), except that runs of inserts go by COPY,
// then the check for remembered deletes. Collapsing a chunk is as exact as
// collapsing a group: the chunks run in order. If anything
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

// bulk is the bulk mode: one large transaction, applied in one explicit
// local transaction as it streams.
type bulk struct {
	*applier
	begin pglogrepl.BeginMessage
	txn   *fastTxn // the changes gathered for the next chunk
	sent  int      // statements sent
}

// startBulk opens the local transaction and applies msgs, the large
// transaction's messages read so far (after its Begin), in bulk.
func startBulk(ctx context.Context, a *applier, begin pglogrepl.BeginMessage, msgs [][]byte) (mode, error) {
	if err := a.s.begin(ctx); err != nil {
		return a.grouped, err
	}
	b := &bulk{applier: a, begin: begin, txn: &fastTxn{}}
	var next mode = b
	for _, msg := range msgs {
		var err error
		if next, err = b.apply(ctx, msg); err != nil {
			return next, err
		}
	}
	return next, nil
}

func (b *bulk) between() bool { return false }

func (b *bulk) handle(ctx context.Context, data []byte) (mode, error) {
	return b.apply(ctx, b.copies.of(data))
}

// apply applies one message of the transaction; data is the caller's
// copy, which the changes gathered for the next chunk point into.
func (b *bulk) apply(ctx context.Context, data []byte) (mode, error) {
	msg, err := parseFast(data, &b.scratch)
	if err != nil {
		return b, fmt.Errorf("decode pgoutput message: %w", err)
	}
	t := b.txn
	t.changes++
	switch m := msg.(type) {
	case *pglogrepl.RelationMessage:
		t.changes--
		if t.changed(m.RelationID) {
			err = errNotFast // redefined after changes: the careful path copes
			break
		}
		b.rels[m.RelationID] = newRelation(m, bytes.Clone(data)) // it outlives data's block
		return b, nil
	case *pglogrepl.InsertMessage, *pglogrepl.UpdateMessage, *pglogrepl.DeleteMessage:
		err = b.rowChange(ctx, t, msg, b.begin.CommitTime)
	case *pglogrepl.CommitMessage:
		return b.commit(ctx, m)
	case *pglogrepl.TypeMessage:
		t.changes--
		return b, nil
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional {
			t.changes--
			return b, nil
		}
		err = errNotFast // DDL: the careful path runs it in place
	default:
		err = errNotFast
	}
	if err == nil && len(t.rows) >= bulkChunk {
		err = b.flush(ctx)
	}
	return b.failed(ctx, err)
}

// flush applies the changes gathered so far.
func (b *bulk) flush(ctx context.Context) error {
	t := b.txn
	if len(t.rows) == 0 {
		return nil
	}
	stmts, _, err := b.statements(t.rows, true)
	if err != nil {
		return err
	}
	t.rows = t.rows[:0]
	b.sent += len(stmts)
	_, err = b.s.batch(ctx, stmts)
	return err
}

// failed turns a failure into a careful retry of the whole transaction.
func (b *bulk) failed(ctx context.Context, err error) (mode, error) {
	if err == nil {
		return b, nil
	}
	var pe *pgconn.PgError
	if !errors.Is(err, errNotFast) && !errors.As(err, &pe) {
		return b, err // the connection failed: the stream restarts anyway
	}
	b.rollback(ctx)
	return b.grouped, &retryCarefully{lsn: b.begin.FinalLSN, cause: err}
}

func (b *bulk) commit(ctx context.Context, m *pglogrepl.CommitMessage) (mode, error) {
	if err := b.flush(ctx); err != nil {
		return b.failed(ctx, err)
	}
	if err := b.commitAlone(ctx, m); err != nil {
		return b.grouped, fmt.Errorf("commit transaction from peer %q (remote xid %d): %w", b.cfg.Peer.Name, b.begin.Xid, err)
	}
	b.stats.committedGroup(b.sent, false)
	b.stats.applied(m.TransactionEndLSN, m.CommitTime, b.txn.changes-1, nil)
	b.applied = m.TransactionEndLSN
	b.confirm(m.TransactionEndLSN)
	return b.grouped, nil
}
