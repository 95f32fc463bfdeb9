package replicator

import (
	"context"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// Parking (docs/apply-errors.md). A change of table T from this peer that
// fails with an error of its own (bad data, a schema that differs here),
// when T's on_apply_error is park, does not stop the stream: the source
// transaction is applied again with that change, and every later change of
// T from this peer, written to pgmesh.parked_changes instead, in the same
// local transaction as the rest. pgmesh replay applies them later, on this
// stream's connection (it holds the peer's origin), between transactions.

// Policies of on_apply_error.
const (
	OnErrorStop = "stop"
	OnErrorPark = "park"
)

// tableName is a table as the peer names it: schema and name.
type tableName [2]string

func (t tableName) String() string { return t[0] + "." + t[1] }

// applyFailed is a change that failed with an error of its own; the stream
// parks its table if the table's policy says so (parkTable).
type applyFailed struct {
	table tableName
	err   error
}

func (e *applyFailed) Error() string { return e.err.Error() }
func (e *applyFailed) Unwrap() error { return e.err }

// changeError reports whether err belongs to the change rather than to the
// moment: data errors (class 22), constraint violations (23), a table,
// column or type that differs here (42, and schemaError). Lock and
// serialization failures and lost connections are retried instead.
func changeError(err error) bool {
	if _, ok := errors.AsType[*schemaError](err); ok {
		return true
	}
	pe, ok := errors.AsType[*pgconn.PgError](err)
	if !ok {
		return false
	}
	switch pe.Code[:2] {
	case "22", "23", "42":
		return true
	}
	return false
}

// fixHint says, for the errors a differing schema causes most often, what
// to change on this node ("" when the error says it already).
func fixHint(err error) string {
	pe, ok := errors.AsType[*pgconn.PgError](err)
	if !ok {
		return ""
	}
	switch pe.Code {
	case "22001":
		return "a value is longer than this node's column allows: widen the column to the peer's type"
	case "22003":
		return "a number is out of range for this node's column: give the column the peer's type"
	case "22P02", "22007", "22008":
		return "a value does not fit this node's column type: give the column the peer's type"
	case "23502":
		return "this node's column is NOT NULL and the peer's is not: drop the NOT NULL here, or fill the column on the peer"
	case "23514":
		return "a CHECK constraint of this node rejects the row: drop or relax it to match the peer"
	case "23503":
		return "a foreign key of this node has no row to point to: drop it, or make sure the referenced rows replicate"
	case "42501":
		return "pgmesh's role lacks a privilege on the table here: grant it (pgmesh grants)"
	}
	return ""
}

// parkedTables are this peer's parked tables, each with the error that
// parked it ("" when read back from pgmesh.parked_changes at start). Only
// the stream's goroutine uses it.
type parkedTables map[tableName]string

// load adds the tables that have parked changes from peer.
func (p parkedTables) load(ctx context.Context, pc *pgconn.PgConn, peer string) error {
	res := pc.ExecParams(ctx, `SELECT DISTINCT schema_name, table_name FROM pgmesh.parked_changes WHERE peer = $1`,
		[][]byte{[]byte(peer)}, nil, nil, nil).Read()
	if res.Err != nil {
		return fmt.Errorf("read parked tables: %w", res.Err)
	}
	for _, row := range res.Rows {
		t := tableName{string(row[0]), string(row[1])}
		if _, ok := p[t]; !ok {
			p[t] = ""
		}
	}
	return nil
}

// policy reads table's on_apply_error: its own, or else the daemon's.
func policy(ctx context.Context, pc *pgconn.PgConn, t tableName, fallback string) (string, error) {
	res := pc.ExecParams(ctx, `SELECT policy FROM pgmesh.apply_error_policy WHERE relation = format('%I.%I', $1::text, $2::text)`,
		[][]byte{[]byte(t[0]), []byte(t[1])}, nil, nil, nil).Read()
	if res.Err != nil {
		return "", fmt.Errorf("read on_apply_error of %s: %w", t, res.Err)
	}
	if len(res.Rows) == 1 {
		return string(res.Rows[0][0]), nil
	}
	if fallback == "" {
		return OnErrorStop, nil
	}
	return fallback, nil
}

// parks reports whether r's changes go to the parked queue.
func (a *applier) parks(r *relation) bool {
	if a.replaying == r.table() {
		return false
	}
	_, ok := a.parked[r.table()]
	return ok
}

// park writes one change (raw, its pgoutput message) to the parked queue,
// in the local transaction applying the rest of its source transaction.
// The first change parked for a table carries the error that parked it.
func (c *careful) park(ctx context.Context, r *relation, raw []byte) error {
	msg, err := pglogrepl.Parse(raw)
	if err != nil {
		return fmt.Errorf("decode pgoutput message: %w", err)
	}
	var kind string
	var old, cur *pglogrepl.TupleData
	switch m := msg.(type) {
	case *pglogrepl.InsertMessage:
		kind, cur = "insert", m.Tuple
	case *pglogrepl.UpdateMessage:
		kind, old, cur = "update", m.OldTuple, m.NewTuple
	case *pglogrepl.DeleteMessage:
		kind, old = "delete", m.OldTuple
	default:
		return fmt.Errorf("internal error: cannot park a %T", msg)
	}
	t := r.table()
	var errText []byte
	if e := c.parked[t]; e != "" {
		errText = []byte(e)
	}
	params := [][]byte{[]byte(c.cfg.Peer.Name), []byte(t[0]), []byte(t[1]), []byte(c.begin.FinalLSN.String()),
		[]byte(strconv.FormatUint(uint64(c.begin.Xid), 10)), []byte(pgquote.Timestamp(c.begin.CommitTime)), []byte(kind),
		r.tupleJSON(old), r.tupleJSON(cur), errText, byteaText(r.raw), byteaText(raw)}
	res := c.s.exec(ctx, `INSERT INTO pgmesh.parked_changes (peer, schema_name, table_name, source_lsn, source_xid,
			commit_time, origin_node, kind, old_key, new_values, error, relation_message, change_message)
		SELECT $1, $2, $3, $4::pg_lsn, $5::bigint, $6::timestamptz, $1, $7, $8::jsonb, $9::jsonb,
			CASE WHEN NOT EXISTS (SELECT 1 FROM pgmesh.parked_changes WHERE peer = $1 AND schema_name = $2 AND table_name = $3)
				THEN $10 END, $11::bytea, $12::bytea`, params)
	if res.Err != nil {
		return fmt.Errorf("park a change of %s from peer %q: %w", t, c.cfg.Peer.Name, res.Err)
	}
	return nil
}

// tupleJSON renders a tuple as a JSON object of text values, for people
// reading the parked queue (nil for no tuple).
func (r *relation) tupleJSON(t *pglogrepl.TupleData) []byte {
	if t == nil {
		return nil
	}
	obj := map[string]any{}
	for i, c := range t.Columns {
		if i >= len(r.cols) {
			break
		}
		switch c.DataType {
		case pglogrepl.TupleDataTypeNull:
			obj[r.cols[i]] = nil
		case pglogrepl.TupleDataTypeToast:
			obj[r.cols[i]] = map[string]bool{"unchanged_toast": true}
		default:
			obj[r.cols[i]] = string(c.Data)
		}
	}
	b, _ := json.Marshal(obj) // strings and nils only
	return b
}

func byteaText(b []byte) []byte { return []byte(`\x` + hex.EncodeToString(b)) }

func (r *relation) table() tableName { return tableName{r.msg.Namespace, r.msg.RelationName} }

// QueueResult is what a replay or a discard of a table's parked changes did
// (or, dry, would do).
type QueueResult struct {
	Peer    string `json:"peer"`
	Table   string `json:"table"`
	DryRun  bool   `json:"dry_run,omitempty"`
	Changes int64  `json:"changes"`
	// Transactions is how many local transactions applied them (one per
	// source transaction).
	Transactions int64 `json:"transactions,omitempty"`
	Conflicts    int64 `json:"conflicts"`
	// Left is how many changes stay parked (after a failed or dry replay).
	Left int64 `json:"left"`
	// Error is why a replay stopped; the change it names and every later
	// one stay parked.
	Error string `json:"error,omitempty"`
}

// parkedRow is one parked change as replay reads it.
type parkedRow struct {
	id       int64
	lsn      pglogrepl.LSN
	xid      uint32
	commit   time.Time
	relation []byte
	change   []byte
}

// replay applies table t's parked changes from this peer in order, one
// local transaction per source transaction, each committed with the
// source's commit time and stamped with the peer's origin (without moving
// the origin's progress), so that last-update-wins settles each against
// what the row holds now, as if it had arrived late. It stops at the first
// change that fails; it first does all of that dry (each transaction
// rolled back), so that a replay that would stop applies nothing.
func (c *careful) replay(ctx context.Context, t tableName, dry bool) (QueueResult, error) {
	if !dry {
		// All or nothing: a replay that would stop at a change applies none.
		if res, err := c.replay(ctx, t, true); err != nil || res.Error != "" {
			res.DryRun = false
			return res, err
		}
	}
	res := QueueResult{Peer: c.cfg.Peer.Name, Table: t.String(), DryRun: dry}
	c.replaying = t
	defer func() { c.replaying = tableName{} }()
	for after := int64(0); ; {
		txn, err := c.parkedTxn(ctx, t, after)
		if err != nil {
			return res, err
		}
		if len(txn) == 0 {
			break
		}
		conflicts, err := c.replayTxn(ctx, txn, dry)
		if err != nil {
			res.Error = fmt.Sprintf("replay of %s from peer %q stopped at parked change %d (source LSN %s, xid %d): %v; that change and every later one stay parked: fix the cause and run pgmesh replay again",
				t, c.cfg.Peer.Name, txn[0].id, txn[0].lsn, txn[0].xid, err)
			res.Left, err = c.parkedCount(ctx, t)
			return res, err
		}
		res.Changes += int64(len(txn))
		res.Transactions++
		res.Conflicts += conflicts
		after = txn[len(txn)-1].id
	}
	if dry {
		var err error
		res.Left, err = c.parkedCount(ctx, t)
		return res, err
	}
	delete(c.parked, t)
	return res, nil
}

// parkedTxn reads the parked changes of t of the next source transaction
// after change id after.
func (c *careful) parkedTxn(ctx context.Context, t tableName, after int64) ([]parkedRow, error) {
	res := c.s.conn().ExecParams(ctx, `SELECT id, source_lsn::text, source_xid, (extract(epoch FROM commit_time) * 1000000)::bigint, relation_message, change_message
		FROM pgmesh.parked_changes WHERE peer = $1 AND schema_name = $2 AND table_name = $3 AND id > $4
		AND source_lsn = (SELECT source_lsn FROM pgmesh.parked_changes
			WHERE peer = $1 AND schema_name = $2 AND table_name = $3 AND id > $4 ORDER BY id LIMIT 1)
		ORDER BY id`,
		[][]byte{[]byte(c.cfg.Peer.Name), []byte(t[0]), []byte(t[1]), []byte(strconv.FormatInt(after, 10))},
		nil, nil, []int16{0, 0, 0, 0, 1, 1}).Read() // the messages in binary: as they were
	if res.Err != nil {
		return nil, fmt.Errorf("read parked changes of %s: %w", t, res.Err)
	}
	rows := make([]parkedRow, 0, len(res.Rows))
	for _, r := range res.Rows {
		id, _ := strconv.ParseInt(string(r[0]), 10, 64)
		lsn, err := pglogrepl.ParseLSN(string(r[1]))
		if err != nil {
			return nil, fmt.Errorf("read parked change %d: %w", id, err)
		}
		xid, _ := strconv.ParseUint(string(r[2]), 10, 32)
		us, _ := strconv.ParseInt(string(r[3]), 10, 64)
		rows = append(rows, parkedRow{id: id, lsn: lsn, xid: uint32(xid), commit: time.UnixMicro(us).UTC(), relation: r[4], change: r[5]})
	}
	return rows, nil
}

// replayTxn applies the parked changes of one source transaction in one
// local transaction and takes them off the queue; it returns how many
// conflicts they logged.
func (c *careful) replayTxn(ctx context.Context, txn []parkedRow, dry bool) (int64, error) {
	commitTime := txn[0].commit
	c.begin = pglogrepl.BeginMessage{FinalLSN: txn[0].lsn, CommitTime: commitTime, Xid: txn[0].xid}
	c.filter.Begin()
	defer c.filter.End()
	c.rows, c.deletedMissing = 0, false
	clear(c.conflicts)
	// The stored descriptions replace the live ones for the replay only.
	saved := map[uint32]*relation{}
	defer func() {
		for id, r := range saved {
			if r == nil {
				delete(c.rels, id)
			} else {
				c.rels[id] = r
			}
		}
	}()
	ids := make([]string, 0, len(txn))
	for _, row := range txn {
		msg, err := pglogrepl.Parse(row.relation)
		if err != nil {
			return 0, fmt.Errorf("decode parked relation message: %w", err)
		}
		rm, ok := msg.(*pglogrepl.RelationMessage)
		if !ok {
			return 0, fmt.Errorf("parked change %d holds a %T, not a relation message", row.id, msg)
		}
		if _, ok := saved[rm.RelationID]; !ok {
			saved[rm.RelationID] = c.rels[rm.RelationID]
		}
		c.rels[rm.RelationID] = newRelation(rm, row.relation)
		if _, err := c.apply(ctx, row.change); err != nil {
			c.rollback(ctx)
			if af, ok := errors.AsType[*applyFailed](err); ok {
				err = af.err
			}
			return 0, err
		}
		ids = append(ids, strconv.FormatInt(row.id, 10))
	}
	if err := c.flush(ctx); err != nil {
		c.rollback(ctx)
		return 0, err
	}
	if res := c.s.exec(ctx, `DELETE FROM pgmesh.parked_changes WHERE id = ANY($1::bigint[])`,
		[][]byte{[]byte("{" + strings.Join(ids, ",") + "}")}); res.Err != nil {
		c.rollback(ctx)
		return 0, fmt.Errorf("take replayed changes off the queue: %w", res.Err)
	}
	var conflicts int64
	for _, n := range c.conflicts {
		conflicts += n
	}
	// No end leaves the origin's progress where the stream has it; the
	// commit still carries the origin (so peers do not get it back from
	// this node) and the source's commit time (the rows' version).
	c.wantTxn = false
	if err := c.s.commit(ctx, stamp{commitTS: commitTime, rollback: dry}); err != nil {
		return 0, fmt.Errorf("commit replayed changes: %w", err)
	}
	return conflicts, nil
}

func (c *careful) parkedCount(ctx context.Context, t tableName) (int64, error) {
	res := c.s.conn().ExecParams(ctx, `SELECT count(*) FROM pgmesh.parked_changes WHERE peer = $1 AND schema_name = $2 AND table_name = $3`,
		[][]byte{[]byte(c.cfg.Peer.Name), []byte(t[0]), []byte(t[1])}, nil, nil, nil).Read()
	if res.Err != nil {
		return 0, fmt.Errorf("count parked changes of %s: %w", t, res.Err)
	}
	return strconv.ParseInt(string(res.Rows[0][0]), 10, 64)
}

// discard takes table t's parked changes from this peer off the queue,
// each recorded in pgmesh.conflict_history (resolution skip, the change in
// remote_tuple), and unparks the table.
func (c *careful) discard(ctx context.Context, t tableName) (QueueResult, error) {
	res := QueueResult{Peer: c.cfg.Peer.Name, Table: t.String()}
	r := c.s.conn().ExecParams(ctx, `WITH gone AS (
			DELETE FROM pgmesh.parked_changes WHERE peer = $1 AND schema_name = $2 AND table_name = $3 RETURNING *)
		INSERT INTO pgmesh.conflict_history (local_node, origin_node, relation, conflict_type, resolution,
			remote_commit_ts, remote_commit_lsn, remote_xid, key_tuple, remote_tuple, reason)
		SELECT $4, origin_node, schema_name || '.' || table_name, $5, $6, commit_time, source_lsn, source_xid,
			old_key, new_values, 'parked ' || kind || ' discarded by pgmesh discard' || coalesce(': ' || error, '')
		FROM gone ORDER BY id`,
		[][]byte{[]byte(c.cfg.Peer.Name), []byte(t[0]), []byte(t[1]), []byte(c.cfg.LocalNode),
			[]byte(conflict.ParkedDiscarded), []byte(conflict.Skip)}, nil, nil, nil).Read()
	if r.Err != nil {
		return res, fmt.Errorf("discard parked changes of %s: %w", t, r.Err)
	}
	res.Changes = r.CommandTag.RowsAffected()
	delete(c.parked, t)
	return res, nil
}

// parkTable is an apply error whose table the stream parks from now on.
type parkTable struct{ failed *applyFailed }

func (e *parkTable) Error() string { return e.failed.Error() }

// queueRequest asks the stream to replay or discard a table's parked
// changes, between two transactions, on its apply connection.
type queueRequest struct {
	table   tableName
	discard bool
	dry     bool
	reply   chan queueReply
}

type queueReply struct {
	res QueueResult
	err error
}

// Replay applies the parked changes of table (schema and name) from this
// peer, or with dry says what that would do; Discard drops them, each
// logged as a conflict. Both run on the stream between transactions and
// wait for it; they fail at once when the stream is not connected.
func (s *Stream) Replay(ctx context.Context, schema, table string, dry bool) (QueueResult, error) {
	return s.queue(ctx, queueRequest{table: tableName{schema, table}, dry: dry})
}

// Discard: see Replay.
func (s *Stream) Discard(ctx context.Context, schema, table string) (QueueResult, error) {
	return s.queue(ctx, queueRequest{table: tableName{schema, table}, discard: true})
}

func (s *Stream) queue(ctx context.Context, req queueRequest) (QueueResult, error) {
	if st := s.stats.snapshot(); !st.Connected {
		why := ""
		if st.LastError != "" {
			why = " (" + st.LastError + ")"
		}
		return QueueResult{}, fmt.Errorf("the stream from peer %q is not connected%s: parked changes are replayed and discarded on it, so try again once it is", s.cfg.Peer.Name, why)
	}
	req.reply = make(chan queueReply, 1)
	select {
	case s.requests <- req:
	case <-ctx.Done():
		return QueueResult{}, ctx.Err()
	}
	select {
	case r := <-req.reply:
		return r.res, r.err
	case <-ctx.Done():
		return QueueResult{}, ctx.Err()
	}
}

// serve runs a queue request between transactions.
func (c *careful) serve(ctx context.Context, req queueRequest) queueReply {
	var r queueReply
	if req.discard {
		r.res, r.err = c.discard(ctx, req.table)
	} else {
		r.res, r.err = c.replay(ctx, req.table, req.dry)
	}
	return r
}
