package replicator

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/origin"
)

// careful is the careful mode: one source transaction at a time, each
// statement waited for, conflicts settled and logged as they show. The
// grouped mode hands it the transactions that cannot go fast, and applies
// the members of a failed group through it; after a failure it keeps the
// stream for a stretch, since conflicts come in runs.
type careful struct {
	*applier
	begin     pglogrepl.BeginMessage
	filter    origin.Filter
	inTxn     bool // between a Begin and its Commit
	wantTxn   bool // the transaction has changes here
	pending   []pendingInsert
	pendingSz int
	rows      int64
	conflicts map[string]int64 // by "type/resolution", in the current transaction
	// committed: the last transaction committed here (it was not skipped).
	committed   bool
	hadConflict bool // the last transaction logged a conflict
	// deletedMissing: the transaction deleted a key with no row here (see
	// Config.DeletedMissing).
	deletedMissing bool
	// stretch is how many more transactions go careful before the grouped
	// mode is tried again.
	stretch int
	warned  map[string]bool // tables warned about, once each
}

// carefulStretch is how many transactions in a row must apply without a
// conflict on the careful path before the grouped mode is tried again.
const carefulStretch = 100

func newCareful(a *applier) *careful {
	return &careful{applier: a, conflicts: map[string]int64{}, warned: map[string]bool{}}
}

func (c *careful) between() bool { return !c.inTxn }

// handle applies one message; once a transaction is done, the stream
// goes back to the grouped mode unless the stretch goes on.
func (c *careful) handle(ctx context.Context, data []byte) (mode, error) {
	end, err := c.apply(ctx, data)
	if err != nil || end == 0 {
		return c, err
	}
	c.confirm(end)
	if c.committed {
		c.applied = end
	}
	if c.stretch > 0 {
		c.stretch--
		if c.hadConflict {
			c.stretch = carefulStretch
		}
	}
	if c.stretch > 0 {
		return c, nil
	}
	return c.grouped, nil
}

// apply applies one pgoutput message, waiting for each statement and
// settling conflicts as they show. It returns the end LSN of a
// transaction once it is committed (or dropped), else 0.
func (c *careful) apply(ctx context.Context, data []byte) (pglogrepl.LSN, error) {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return 0, fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		if c.s.inTxn() || len(c.pending) > 0 {
			// One source transaction, one local transaction: never let a
			// transaction commit what an earlier one left behind.
			return 0, fmt.Errorf("internal error: the local transaction applying remote xid %d is still open when remote xid %d begins; the stream restarts from the last committed transaction",
				c.begin.Xid, m.Xid)
		}
		c.begin = *m
		c.filter.Begin()
		c.inTxn, c.committed = true, false
		c.rows, c.deletedMissing = 0, false
		clear(c.conflicts)
		if m.FinalLSN < c.progress {
			// Already applied before a restart (the server may resend
			// from the slot's older confirmed position).
			_ = c.filter.Origin()
		}
	case *pglogrepl.OriginMessage:
		// Forwarded from a third node: that node streams it to us itself.
		return 0, c.filter.Origin()
	case *pglogrepl.RelationMessage:
		c.rels[m.RelationID] = newRelation(m, bytes.Clone(data))
	case *pglogrepl.TypeMessage:
		// Values arrive as text and are parsed by the local types of the
		// same-named columns, so type OIDs (which differ between nodes for
		// user-defined types) are not needed.
	case *pglogrepl.InsertMessage:
		return 0, c.change(ctx, m.RelationID, data, func(r *relation) error { return c.queueInsert(ctx, r, m) })
	case *pglogrepl.UpdateMessage:
		if err := c.flush(ctx); err != nil {
			return 0, err
		}
		return 0, c.change(ctx, m.RelationID, data, func(r *relation) error { return c.update(ctx, r, m) })
	case *pglogrepl.DeleteMessage:
		if err := c.flush(ctx); err != nil {
			return 0, err
		}
		return 0, c.change(ctx, m.RelationID, data, func(r *relation) error { return c.delete(ctx, r, m) })
	case *pglogrepl.TruncateMessage:
		if err := c.flush(ctx); err != nil {
			return 0, err
		}
		return 0, c.truncate(ctx, m)
	case *pglogrepl.CommitMessage:
		if err := c.flush(ctx); err != nil {
			return 0, err
		}
		return c.commit(ctx, m)
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional || c.filter.Skip() {
			return 0, nil
		}
		if err := c.flush(ctx); err != nil {
			return 0, err
		}
		return 0, c.ddl(ctx, m.Content)
	}
	return 0, nil
}

// change applies one insert, update or delete (raw, its message) of
// relation relID, or parks it when its table is parked (park.go). An
// error of the change itself is an *applyFailed.
func (c *careful) change(ctx context.Context, relID uint32, raw []byte, apply func(*relation) error) error {
	if c.filter.Skip() {
		return nil
	}
	r, ok := c.rels[relID]
	if !ok {
		return fmt.Errorf("peer %q sent a change for relation id %d without describing it first (protocol error)", c.cfg.Peer.Name, relID)
	}
	c.wantTxn = true
	if c.parks(r) {
		return c.park(ctx, r, raw)
	}
	var err error
	if r.stale() {
		err = r.load(ctx, c.s.conn(), c.cfg.Peer.Name)
	}
	if err == nil {
		err = apply(r)
	}
	if err != nil {
		err = fmt.Errorf("apply change to %s from peer %q (remote xid %d, commit LSN %s): %w",
			r.qualified, c.cfg.Peer.Name, c.begin.Xid, c.begin.FinalLSN, err)
		if changeError(err) {
			return &applyFailed{table: r.table(), err: err}
		}
		return err
	}
	c.rows++
	return nil
}

// pendingInsert is an insert sent in the next pipelined batch.
type pendingInsert struct {
	r        *relation
	stmt     string
	params   [][]byte
	cols     []int
	vals     [][]byte
	match    []int
	nullSafe bool
}

// Batches are bounded so a huge transaction is still applied as it streams.
const (
	maxPendingInserts = 1000
	maxPendingBytes   = 4 << 20
)

// queueInsert adds an insert to the pipelined batch. A run of consecutive
// inserts of one source transaction goes out in one round trip (with the
// BEGIN), which is safe because their keys are distinct (the origin enforced
// that); any that inserted nothing is settled afterwards, in order.
func (c *careful) queueInsert(ctx context.Context, r *relation, m *pglogrepl.InsertMessage) error {
	cols, vals := values(m.Tuple)
	// The message's buffer is reused by the next receive: keep copies.
	size := 0
	for i := range vals {
		// bytes.Clone keeps an empty value empty (not NULL).
		vals[i] = bytes.Clone(vals[i])
		size += len(vals[i])
	}
	match, nullSafe := r.match(m.Tuple)
	sql, params := c.insertStmt(r, cols, vals, match, nil)
	if err := c.s.prepare(ctx, sql); err != nil {
		return err
	}
	c.pending = append(c.pending, pendingInsert{r: r, stmt: sql, params: params, cols: cols, vals: vals, match: match, nullSafe: nullSafe})
	c.pendingSz += size
	if len(c.pending) >= maxPendingInserts || c.pendingSz >= maxPendingBytes {
		return c.flush(ctx)
	}
	return nil
}

// flush sends the pending inserts (and BEGIN, if due) as one pipelined batch
// and settles the ones that inserted nothing.
func (c *careful) flush(ctx context.Context) error {
	if len(c.pending) == 0 {
		return nil
	}
	pending := c.pending
	c.pending, c.pendingSz = c.pending[:0], 0
	stmts := make([]stmt, len(pending))
	for i, p := range pending {
		stmts[i] = stmt{sql: p.stmt, params: p.params}
	}
	results, err := c.s.batch(ctx, stmts)
	if err != nil {
		err = fmt.Errorf("apply inserts from peer %q (remote xid %d, commit LSN %s): %w", c.cfg.Peer.Name, c.begin.Xid, c.begin.FinalLSN, err)
		// The statements after the failed one were skipped: it is the last.
		if i := len(results) - 1; i >= 0 && i < len(pending) && results[i].Err != nil && changeError(err) {
			return &applyFailed{table: pending[i].r.table(), err: err}
		}
		return err
	}
	for i, p := range pending {
		if results[i].CommandTag.RowsAffected() == 1 {
			continue
		}
		if err := c.insertConflict(ctx, p.r, p.cols, p.vals, p.match, p.nullSafe); err != nil {
			return fmt.Errorf("apply change to %s from peer %q (remote xid %d, commit LSN %s): %w",
				p.r.qualified, c.cfg.Peer.Name, c.begin.Xid, c.begin.FinalLSN, err)
		}
	}
	return nil
}

// localRow is a local row version a remote change meets.
type localRow struct {
	ctid    []byte
	version conflict.Version
	ownTxn  bool
}

func (c *careful) versions(ctx context.Context, sql string, params [][]byte) ([]localRow, error) {
	res := c.s.exec(ctx, sql, params)
	if res.Err != nil {
		return nil, res.Err
	}
	var out []localRow
	for _, row := range res.Rows {
		lr := localRow{ctid: append([]byte(nil), row[0]...), ownTxn: string(row[3]) == "t"}
		if row[1] != nil {
			us, err := strconv.ParseInt(string(row[1]), 10, 64)
			if err != nil {
				return nil, fmt.Errorf("parse commit timestamp %q: %w", row[1], err)
			}
			lr.version.CommitTS = time.UnixMicro(us).UTC()
		}
		roident, _ := strconv.ParseUint(string(row[2]), 10, 32)
		name, err := c.originNode(ctx, uint32(roident))
		if err != nil {
			return nil, err
		}
		lr.version.Node, lr.version.NodeID = name, c.cfg.NodeID(name)
		out = append(out, lr)
	}
	return out, nil
}

// lookup finds and locks the local row with the given identity.
func (c *careful) lookup(ctx context.Context, r *relation, match []int, nullSafe bool, keyVals [][]byte) (*localRow, error) {
	var p params
	sql := lockedVersions(r.qualified, fmt.Sprintf("SELECT t.ctid, t.xmin FROM %s t WHERE %s LIMIT 1 FOR UPDATE",
		r.qualified, r.where(&p, match, keyVals, nullSafe)))
	rows, err := c.versions(ctx, sql, p.vals)
	if err != nil || len(rows) == 0 {
		return nil, err
	}
	return &rows[0], nil
}

// tombstone returns the newest known delete of the key, or nil.
func (c *careful) tombstone(ctx context.Context, r *relation, match []int, keyVals [][]byte) (*conflict.Version, error) {
	if !samePK(r, match) {
		return nil, nil // tombstones are kept for tables with a primary key
	}
	var p params
	rel := p.add([]byte(r.tombName))
	sql := fmt.Sprintf(`SELECT %s, t.deleted_by FROM pgmesh.tombstone t WHERE t.relation = %s AND t.key = %s`,
		conflict.TombstoneAtMicros("t"), rel, r.keyJSON(&p, match, keyVals))
	res := c.s.exec(ctx, sql, p.vals)
	if res.Err != nil {
		return nil, fmt.Errorf("read tombstone: %w", res.Err)
	}
	if len(res.Rows) == 0 {
		return nil, nil
	}
	var micros *int64
	if b := res.Rows[0][0]; b != nil {
		us, err := strconv.ParseInt(string(b), 10, 64)
		if err != nil {
			return nil, err
		}
		micros = &us
	}
	var by *string
	if b := res.Rows[0][1]; b != nil {
		by = new(string(b))
	}
	v := conflict.TombstoneVersion(micros, by, c.cfg.LocalNode)
	v.NodeID = c.cfg.NodeID(v.Node)
	return &v, nil
}

func (c *careful) remote() conflict.Version {
	return conflict.Version{CommitTS: c.begin.CommitTime, NodeID: c.cfg.Peer.ID, Node: c.cfg.Peer.Name}
}

// insertConflict settles an insert that inserted nothing: the key exists
// here, a delete of it is remembered, or another unique value is taken.
func (c *careful) insertConflict(ctx context.Context, r *relation, cols []int, vals [][]byte, match []int, nullSafe bool) error {
	keyVals := make([][]byte, len(match))
	for i, c := range match {
		keyVals[i], _ = valueOf(cols, vals, c)
	}
	local, err := c.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	if local != nil {
		d := c.cfg.Rule.Decide(conflict.Insert, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn}, c.remote())
		if err := c.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
		if !d.Apply {
			return nil
		}
		return c.updateChecked(ctx, r, local.ctid, match, keyVals, cols, vals, nil)
	}
	tomb, err := c.tombstone(ctx, r, match, keyVals)
	if err != nil {
		return err
	}
	d := c.cfg.Rule.Decide(conflict.Insert, conflict.Local{Tombstone: tomb, FullRow: true}, c.remote())
	if d.Conflict {
		return c.record(ctx, r, d, nil, match, keyVals, cols, vals)
	}
	// An older tombstone or another unique value stopped the fast path.
	return c.insertChecked(ctx, r, conflict.Insert, match, keyVals, cols, vals)
}

// insertRow inserts unless the row's key exists or another unique value is
// taken. With match set to the primary key, a remembered delete of the key
// also stops it: any delete, or with newerThan set, only one newer than
// that version. It returns the number of rows inserted.
func (c *careful) insertRow(ctx context.Context, r *relation, cols []int, vals [][]byte, match []int, newerThan *conflict.Version) (int64, error) {
	sql, params := c.insertStmt(r, cols, vals, match, newerThan)
	res := c.s.exec(ctx, sql, params)
	if res.Err != nil {
		return 0, res.Err
	}
	return res.CommandTag.RowsAffected(), nil
}

// insertStmt builds insertRow's statement and parameters. Remembered
// deletes are looked for once the row is in (pgmesh.take_back_if_deleted,
// which removes it again), so that a delete committed here while the insert
// waited for it is seen too.
func (c *careful) insertStmt(r *relation, cols []int, vals [][]byte, match []int, newerThan *conflict.Version) (string, [][]byte) {
	var p params
	var names, exprs []string
	for i, c := range cols {
		names = append(names, quote(r.cols[c]))
		exprs = append(exprs, p.add(vals[i]))
	}
	// The origin's value of an identity column is the row's value here too.
	override := ""
	if r.anyIdentity {
		override = " OVERRIDING SYSTEM VALUE"
	}
	sql := fmt.Sprintf("INSERT INTO %s (%s)%s VALUES (%s) ON CONFLICT DO NOTHING", r.qualified, strings.Join(names, ", "), override, strings.Join(exprs, ", "))
	if match == nil || !samePK(r, match) {
		return sql, p.vals
	}
	at, by := "NULL", "NULL"
	if newerThan != nil {
		at = p.add([]byte(pgquote.Timestamp(newerThan.CommitTS))) + "::timestamptz"
		by = p.add([]byte(newerThan.Node)) + "::text"
	}
	return fmt.Sprintf("WITH i AS (%s RETURNING ctid, %s AS k) SELECT 1 FROM i WHERE NOT pgmesh.take_back_if_deleted(%s, i.k, i.ctid, %s, %s)",
		sql, r.rowKey(""), p.add([]byte(r.tombName)), at, by), p.vals
}

// insertChecked inserts a row whose key is free here, first settling any
// other unique index it collides on. A delete of the key newer than the
// change may have committed since it was decided: it is settled then.
func (c *careful) insertChecked(ctx context.Context, r *relation, change conflict.Change, match []int, keyVals [][]byte, cols []int, vals [][]byte) error {
	ok, err := c.settleUnique(ctx, r, change, nil, match, keyVals, cols, vals)
	if err != nil || !ok {
		return err
	}
	remote := c.remote()
	n, err := c.insertRow(ctx, r, cols, vals, match, &remote)
	if err != nil || n == 1 {
		return err
	}
	tomb, err := c.tombstone(ctx, r, match, keyVals)
	if err != nil {
		return err
	}
	if tomb != nil {
		if d := c.cfg.Rule.Decide(change, conflict.Local{Tombstone: tomb, FullRow: true}, remote); !d.Apply {
			return c.record(ctx, r, d, nil, match, keyVals, cols, vals)
		}
	}
	if local, err := c.lookup(ctx, r, match, false, keyVals); err != nil || local != nil {
		return cmp.Or(err, errRowAppeared)
	}
	return fmt.Errorf("insert blocked by a unique constraint that pgmesh cannot resolve (a partial, deferrable or expression index?)")
}

// errRowAppeared: a row with the key was committed here while the insert
// waited for it. Applying the transaction again settles against that row.
var errRowAppeared = errors.New("a row with this key was committed here while the insert waited for it")

// settleUnique looks for local rows other than self that hold the row's
// values in a unique index other than the key, and settles the collision by
// last-update-wins (conflict.Unique). It reports whether the write may go on.
func (c *careful) settleUnique(ctx context.Context, r *relation, change conflict.Change, self []byte, match []int, keyVals [][]byte, cols []int, vals [][]byte) (bool, error) {
	if len(r.uniques) == 0 {
		return true, nil
	}
	var p params
	var ors []string
	for _, idx := range r.uniques {
		var and []string
		for _, c := range idx {
			v, ok := valueOf(cols, vals, c)
			if !ok || v == nil {
				and = nil // unchanged or NULL: cannot collide anew
				break
			}
			and = append(and, "t."+quote(r.cols[c])+" = "+p.add(v))
		}
		if and != nil {
			ors = append(ors, "("+strings.Join(and, " AND ")+")")
		}
	}
	if len(ors) == 0 {
		return true, nil
	}
	where := strings.Join(ors, " OR ")
	if self != nil {
		where = "(" + where + ") AND t.ctid <> " + p.add(self) + "::tid"
	}
	blockers, err := c.versions(ctx, lockedVersions(r.qualified, fmt.Sprintf("SELECT t.ctid, t.xmin FROM %s t WHERE %s ORDER BY t.ctid FOR UPDATE", r.qualified, where)), p.vals)
	if err != nil || len(blockers) == 0 {
		return true, err
	}
	vs := make([]conflict.Version, len(blockers))
	for i, b := range blockers {
		vs[i] = b.version
	}
	d, losers := c.cfg.Rule.Unique(change, vs, c.remote())
	if err := c.record(ctx, r, d, blockers, match, keyVals, cols, vals); err != nil {
		return false, err
	}
	for _, i := range losers {
		if err := c.deleteRow(ctx, r, blockers[i].ctid, c.remote()); err != nil {
			return false, err
		}
	}
	if d.DeleteSelf && self != nil {
		return false, c.deleteRow(ctx, r, self, c.remote())
	}
	return d.Apply, nil
}

func (c *careful) update(ctx context.Context, r *relation, m *pglogrepl.UpdateMessage) error {
	keySrc := m.NewTuple
	if m.OldTuple != nil {
		keySrc = m.OldTuple
	}
	match, nullSafe := r.match(keySrc)
	keyVals := pick(keySrc, match)
	local, err := c.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	cols, vals := values(m.NewTuple)
	var old *pglogrepl.TupleData
	if m.OldTupleType == pglogrepl.UpdateMessageTupleTypeOld {
		old = m.OldTuple
	}
	if local == nil {
		tomb, err := c.tombstone(ctx, r, match, keyVals)
		if err != nil {
			return err
		}
		d := c.cfg.Rule.Decide(conflict.Update, conflict.Local{Tombstone: tomb, FullRow: len(cols) == len(r.cols)}, c.remote())
		if err := c.record(ctx, r, d, nil, match, keyVals, cols, vals); err != nil {
			return err
		}
		if !d.Apply {
			return nil
		}
		// The row may live on under its new key.
		newMatch, _ := r.match(m.NewTuple)
		return c.insertChecked(ctx, r, conflict.Update, newMatch, pick(m.NewTuple, newMatch), cols, vals)
	}
	d := c.cfg.Rule.Decide(conflict.Update, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn, Delta: old != nil && hasDelta(r)}, c.remote())
	if d.MergeDelta {
		if err := c.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
		return c.updateRow(ctx, r, local.ctid, deltaOnly(r, cols), vals, old)
	}
	if d.Conflict {
		if err := c.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	if hasDelta(r) && old == nil && !c.warned[r.name] {
		c.warned[r.name] = true
		c.log.Warn("table has delta columns but the peer does not send old values, so its updates overwrite them: run SELECT pgmesh.set_delta_column(...) on every node (pgmesh delta-column does)",
			"table", r.name, "peer", c.cfg.Peer.Name)
	}
	return c.updateChecked(ctx, r, local.ctid, match, keyVals, cols, vals, old)
}

// deltaOnly masks out every column but the delta ones (by setting the
// others' indexes to -1, which updateRow skips).
func deltaOnly(r *relation, cols []int) []int {
	out := make([]int, len(cols))
	for i, c := range cols {
		out[i] = -1
		if r.delta[c] {
			out[i] = c
		}
	}
	return out
}

func (c *careful) updateChecked(ctx context.Context, r *relation, ctid []byte, match []int, keyVals [][]byte, cols []int, vals [][]byte, old *pglogrepl.TupleData) error {
	ok, err := c.settleUnique(ctx, r, conflict.Update, ctid, match, keyVals, cols, vals)
	if err != nil || !ok {
		return err
	}
	return c.updateRow(ctx, r, ctid, cols, vals, old)
}

// updateRow sets the given columns of the row at ctid. Delta columns get
// the remote increment (new - old) added when the old tuple is known.
func (c *careful) updateRow(ctx context.Context, r *relation, ctid []byte, cols []int, vals [][]byte, old *pglogrepl.TupleData) error {
	var p params
	at := p.add(ctid)
	var sets []string
	for i, c := range cols {
		// GENERATED ALWAYS identity columns cannot be set by UPDATE (the
		// origin could not change them either, short of DEFAULT).
		if c < 0 || r.identityAlways[c] {
			continue
		}
		col := quote(r.cols[c])
		if r.delta[c] && old != nil && c < len(old.Columns) && old.Columns[c].DataType != pglogrepl.TupleDataTypeToast {
			oldVal := pick(old, []int{c})[0]
			sets = append(sets, fmt.Sprintf("%s = coalesce(t.%s, 0) + (coalesce(%s, 0) - coalesce(%s, 0))",
				col, col, r.typed(&p, c, vals[i]), r.typed(&p, c, oldVal)))
			continue
		}
		sets = append(sets, col+" = "+p.add(vals[i]))
	}
	if len(sets) == 0 {
		return nil
	}
	res := c.s.exec(ctx, fmt.Sprintf("UPDATE %s t SET %s WHERE t.ctid = %s::tid", r.qualified, strings.Join(sets, ", "), at), p.vals)
	if res.Err != nil {
		return res.Err
	}
	if n := res.CommandTag.RowsAffected(); n != 1 {
		return fmt.Errorf("update of locked row %s changed %d rows", ctid, n)
	}
	return nil
}

func (c *careful) delete(ctx context.Context, r *relation, m *pglogrepl.DeleteMessage) error {
	if m.OldTuple == nil {
		return fmt.Errorf("table %s has no primary key or replica identity on peer %q, so its deletes cannot be matched: add a primary key (or ALTER TABLE ... REPLICA IDENTITY FULL) on every node", r.qualified, c.cfg.Peer.Name)
	}
	match, nullSafe := r.match(m.OldTuple)
	keyVals := pick(m.OldTuple, match)
	local, err := c.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	if local == nil {
		d := c.cfg.Rule.Decide(conflict.Delete, conflict.Local{}, c.remote())
		if err := c.record(ctx, r, d, nil, match, keyVals, nil, nil); err != nil {
			return err
		}
		// Remember the delete: the row's insert or an older update may
		// still be on its way from another node.
		c.deletedMissing = true
		return c.saveTombstone(ctx, r, match, keyVals)
	}
	d := c.cfg.Rule.Decide(conflict.Delete, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn}, c.remote())
	if d.Conflict {
		if err := c.record(ctx, r, d, []localRow{*local}, match, keyVals, nil, nil); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	return c.deleteRow(ctx, r, local.ctid, c.remote())
}

// deleteRow deletes the row at ctid and, for tables with a primary key,
// records a tombstone stamped with the deleting change's time and origin,
// in one statement.
func (c *careful) deleteRow(ctx context.Context, r *relation, ctid []byte, by conflict.Version) error {
	var p params
	at := p.add(ctid)
	if r.pk == nil {
		return c.s.exec(ctx, fmt.Sprintf("DELETE FROM %s t WHERE t.ctid = %s::tid", r.qualified, at), p.vals).Err
	}
	sql := fmt.Sprintf(`WITH d AS (DELETE FROM %s t WHERE t.ctid = %s::tid RETURNING %s AS k)
`+conflict.TombstoneInsert+`SELECT %s, d.k, %s::timestamptz, %s FROM d`+conflict.TombstoneUpsert,
		r.qualified, at, r.rowKey("t"), p.add([]byte(r.tombName)), p.add([]byte(pgquote.Timestamp(by.CommitTS))), p.add([]byte(by.Node)))
	return c.s.exec(ctx, sql, p.vals).Err
}

// saveTombstone records a delete of a key that has no row here.
func (c *careful) saveTombstone(ctx context.Context, r *relation, match []int, keyVals [][]byte) error {
	if !samePK(r, match) {
		return nil
	}
	var p params
	rel := p.add([]byte(r.tombName))
	key := r.keyJSON(&p, match, keyVals)
	sql := fmt.Sprintf(conflict.TombstoneInsert+`VALUES (%s, %s, %s::timestamptz, %s)`+conflict.TombstoneUpsert,
		rel, key, p.add([]byte(pgquote.Timestamp(c.begin.CommitTime))), p.add([]byte(c.cfg.Peer.Name)))
	return c.s.exec(ctx, sql, p.vals).Err
}

func (c *careful) truncate(ctx context.Context, m *pglogrepl.TruncateMessage) error {
	if c.filter.Skip() {
		return nil
	}
	var names []string
	for _, id := range m.RelationIDs {
		r, ok := c.rels[id]
		if !ok {
			return fmt.Errorf("peer %q truncated relation id %d without describing it first (protocol error)", c.cfg.Peer.Name, id)
		}
		if c.parks(r) {
			return fmt.Errorf("peer %q truncated %s, whose changes from it are parked here: replay them (pgmesh replay %s --peer %s) or discard them, and the stream resumes from this TRUNCATE",
				c.cfg.Peer.Name, r.table(), r.table(), c.cfg.Peer.Name)
		}
		names = append(names, r.qualified)
	}
	sql := "TRUNCATE " + strings.Join(names, ", ")
	if m.Option&pglogrepl.TruncateOptionRestartIdentity != 0 {
		sql += " RESTART IDENTITY"
	}
	if m.Option&pglogrepl.TruncateOptionCascade != 0 {
		sql += " CASCADE"
	}
	c.wantTxn = true
	if err := c.s.run(ctx, sql); err != nil {
		return fmt.Errorf("apply TRUNCATE from peer %q: %w", c.cfg.Peer.Name, err)
	}
	c.rows++
	return nil
}

// abandon forgets the transaction being applied: it was rolled back.
func (c *careful) abandon() {
	c.pending, c.wantTxn, c.inTxn = nil, false, false
}

// commit ends the source transaction. An applied one commits together with
// the origin's progress and the origin's commit time, so the local rows carry
// the origin's timestamp (ARCHITECTURE.md, invariants: origin time is the row's time).
func (c *careful) commit(ctx context.Context, m *pglogrepl.CommitMessage) (pglogrepl.LSN, error) {
	defer c.filter.End()
	c.inTxn = false
	if !c.wantTxn && !c.s.inTxn() { // nothing ran here: nothing to commit
		c.hadConflict = false
		c.stats.skipped(c.filter.Skip(), m.CommitTime)
		return m.TransactionEndLSN, nil
	}
	c.wantTxn = false
	if err := c.commitAlone(ctx, m); err != nil {
		return 0, fmt.Errorf("commit transaction from peer %q (remote xid %d): %w", c.cfg.Peer.Name, c.begin.Xid, err)
	}
	c.stats.committedGroup(0, false) // statements are counted on the fast and bulk paths
	c.stats.applied(m.TransactionEndLSN, m.CommitTime, c.rows, c.conflicts)
	c.hadConflict = len(c.conflicts) > 0
	if c.deletedMissing && c.cfg.DeletedMissing != nil {
		c.cfg.DeletedMissing()
	}
	c.committed = true
	return m.TransactionEndLSN, nil
}

// ddlPrefix marks the logical decoding messages that carry DDL.
const ddlPrefix = "pgmesh_ddl"

// ddl runs a replicated DDL command in the applying transaction, with the
// origin's search_path, at its place among the data changes.
func (c *careful) ddl(ctx context.Context, content []byte) error {
	var msg struct {
		SearchPath string `json:"search_path"`
		Command    string `json:"command"`
	}
	if err := json.Unmarshal(content, &msg); err != nil {
		return fmt.Errorf("decode DDL message from peer %q: %w", c.cfg.Peer.Name, err)
	}
	c.wantTxn = true
	// A table the DDL creates joins the sets that take all tables here too,
	// in this transaction (pgmesh.new_tables_join_sets, migration 11); a
	// table it rewrites is noted (pgmesh.after_ddl, migration 14).
	sql := fmt.Sprintf("SELECT pgmesh.before_ddl(); SELECT pg_catalog.set_config('search_path', %s, true);\n%s;\nSELECT pg_catalog.set_config('search_path', '', true); SELECT pgmesh.after_ddl(); SELECT pgmesh.new_tables_join_sets(); DEALLOCATE ALL",
		pgquote.Literal(msg.SearchPath), msg.Command)
	if err := c.s.run(ctx, sql); err != nil {
		return fmt.Errorf("run DDL from peer %q (remote xid %d) %q: %w; fix the cause on this node and the stream resumes from this DDL", c.cfg.Peer.Name, c.begin.Xid, msg.Command, err)
	}
	// Statements and catalog facts from before the DDL are stale now.
	c.s.forget()
	for _, r := range c.rels {
		r.loadedAt = time.Time{}
	}
	c.rows++
	return nil
}

// record writes a conflict_history row in the transaction being applied,
// before the change, so local_tuple is the row (or rows) as it was.
func (c *careful) record(ctx context.Context, r *relation, d conflict.Decision, locals []localRow,
	keyCols []int, keyVals [][]byte, remoteCols []int, remoteVals [][]byte) error {
	if !d.Conflict {
		return nil
	}
	var p params
	var ctids []string
	for _, l := range locals {
		ctids = append(ctids, `"`+string(l.ctid)+`"`)
	}
	rec := conflict.Record{LocalNode: c.cfg.LocalNode, OriginNode: c.cfg.Peer.Name, Relation: r.name, Decision: d,
		RemoteCommitTS: c.begin.CommitTime, RemoteLSN: c.begin.FinalLSN.String(), RemoteXID: c.begin.Xid}
	if len(locals) > 0 {
		rec.Local = &locals[0].version
	}
	ctidArr := p.add([]byte("{" + strings.Join(ctids, ",") + "}"))
	rec.LocalTuple = fmt.Sprintf("(SELECT to_jsonb(t.*) FROM %s t WHERE t.ctid = ANY(%s::tid[]))", r.qualified, ctidArr)
	if len(locals) > 1 {
		rec.LocalTuple = fmt.Sprintf("(SELECT jsonb_agg(to_jsonb(t.*)) FROM %s t WHERE t.ctid = ANY(%s::tid[]))", r.qualified, ctidArr)
	}
	var remoteFields []string
	for i, c := range remoteCols {
		remoteFields = append(remoteFields, r.typed(&p, c, remoteVals[i])+" AS "+quote(r.cols[c]))
	}
	if len(remoteFields) > 0 {
		rec.RemoteTuple = "(SELECT to_jsonb(pgmesh_v.*) FROM (SELECT " + strings.Join(remoteFields, ", ") + ") pgmesh_v)"
	}
	rec.KeyTuple = r.keyJSON(&p, keyCols, keyVals)
	sql := rec.InsertSQL(p.add)
	if res := c.s.execOnce(ctx, sql, p.vals); res.Err != nil {
		return fmt.Errorf("write conflict_history: %w", res.Err)
	}
	c.conflicts[string(d.Type)+"/"+string(d.Resolution)]++
	return nil
}
