package replicator

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/origin"
)

// applier turns one peer's decoded changes into local transactions on a
// connection bound to that peer's replication origin. One source transaction
// becomes one local transaction (or shares one with its neighbours of the
// same rounded commit time, see fastpath.go), committed together with the
// origin's progress (ARCHITECTURE.md, "The apply pipeline").
type applier struct {
	pc       *pgconn.PgConn
	cfg      *Config
	rels     map[uint32]*relation
	stmts    map[string]string // SQL text -> prepared statement name
	stmtGen  int               // bumped when DDL invalidates prepared statements
	origins  map[uint32]string // roident -> node name
	filter   origin.Filter
	progress pglogrepl.LSN // origin progress when the stream started

	begin     pglogrepl.BeginMessage
	localOpen bool // a local transaction is open (BEGIN sent)
	wantTxn   bool // the transaction has changes here; BEGIN goes out with the first statement
	pending   []pendingInsert
	pendingSz int
	rows      int64
	conflicts map[string]int64 // by "type/resolution", in the current transaction
	stats     *stats
	warned    map[string]bool

	// The fast path (fastpath.go).
	types        *pgtype.Map
	roident      uint32 // this peer's replication origin here
	fast         *fastTxn
	fastBegin    pglogrepl.BeginMessage
	group        *fastGroup    // the open group, collecting transactions
	careful      bool          // the current transaction is on the careful path
	pipe         pipeline      // closed groups on their way to the server
	applied      pglogrepl.LSN // origin progress once everything sent commits
	confirmedEnd pglogrepl.LSN // committed here since handle last returned
	carefulFor   int           // transactions to apply carefully before trying fast again
	bulk         *fastTxn      // the large transaction being applied in bulk (bulk.go)
	hadConflict  bool          // the last careful transaction logged a conflict
	// deletedMissing: the careful transaction deleted a key with no row
	// here (see Config.DeletedMissing).
	deletedMissing bool
	// retryLSN is a large transaction (FinalLSN) whose bulk apply failed:
	// streamed again, it takes the careful path.
	retryLSN pglogrepl.LSN
	log      *slog.Logger
	// parked are the tables whose changes go to the parked queue, the
	// stream's (park.go); replaying is the one being replayed, whose
	// changes apply.
	parked    parkedTables
	replaying tableName
}

func newApplier(pc *pgconn.PgConn, cfg *Config, progress pglogrepl.LSN, roident uint32, st *stats, retryLSN pglogrepl.LSN, parked parkedTables, log *slog.Logger) *applier {
	return &applier{pc: pc, cfg: cfg, progress: progress, applied: progress, roident: roident, stats: st, types: pgtype.NewMap(),
		retryLSN: retryLSN, parked: parked, log: log, pipe: pipeline{pc: pc},
		rels: map[uint32]*relation{}, stmts: map[string]string{}, origins: map[uint32]string{},
		conflicts: map[string]int64{}, warned: map[string]bool{}}
}

// handleCareful applies one pgoutput message, waiting for each statement
// and settling conflicts as they show. It returns the end LSN of a
// transaction once it is committed (or dropped), else 0.
func (a *applier) handleCareful(ctx context.Context, data []byte) (pglogrepl.LSN, error) {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return 0, fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		if a.localOpen || len(a.pending) > 0 {
			// One source transaction, one local transaction: never let a
			// transaction commit what an earlier one left behind.
			return 0, fmt.Errorf("internal error: the local transaction applying remote xid %d is still open when remote xid %d begins; the stream restarts from the last committed transaction",
				a.begin.Xid, m.Xid)
		}
		a.begin = *m
		a.filter.Begin()
		a.rows, a.deletedMissing = 0, false
		clear(a.conflicts)
		if m.FinalLSN < a.progress {
			// Already applied before a restart (the server may resend
			// from the slot's older confirmed position).
			_ = a.filter.Origin()
		}
	case *pglogrepl.OriginMessage:
		// Forwarded from a third node: that node streams it to us itself.
		return 0, a.filter.Origin()
	case *pglogrepl.RelationMessage:
		a.rels[m.RelationID] = newRelation(m, bytes.Clone(data))
	case *pglogrepl.TypeMessage:
		// Values arrive as text and are parsed by the local types of the
		// same-named columns, so type OIDs (which differ between nodes for
		// user-defined types) are not needed.
	case *pglogrepl.InsertMessage:
		return 0, a.change(ctx, m.RelationID, data, func(r *relation) error { return a.queueInsert(ctx, r, m) })
	case *pglogrepl.UpdateMessage:
		if err := a.flush(ctx); err != nil {
			return 0, err
		}
		return 0, a.change(ctx, m.RelationID, data, func(r *relation) error { return a.update(ctx, r, m) })
	case *pglogrepl.DeleteMessage:
		if err := a.flush(ctx); err != nil {
			return 0, err
		}
		return 0, a.change(ctx, m.RelationID, data, func(r *relation) error { return a.delete(ctx, r, m) })
	case *pglogrepl.TruncateMessage:
		if err := a.flush(ctx); err != nil {
			return 0, err
		}
		return 0, a.truncate(ctx, m)
	case *pglogrepl.CommitMessage:
		if err := a.flush(ctx); err != nil {
			return 0, err
		}
		return a.commit(ctx, m)
	case *pglogrepl.LogicalDecodingMessage:
		if m.Prefix != ddlPrefix || !m.Transactional || a.filter.Skip() {
			return 0, nil
		}
		if err := a.flush(ctx); err != nil {
			return 0, err
		}
		return 0, a.ddl(ctx, m.Content)
	}
	return 0, nil
}

// change applies one insert, update or delete (raw, its message) of
// relation relID, or parks it when its table is parked (park.go). An
// error of the change itself is an *applyFailed.
func (a *applier) change(ctx context.Context, relID uint32, raw []byte, apply func(*relation) error) error {
	if a.filter.Skip() {
		return nil
	}
	r, ok := a.rels[relID]
	if !ok {
		return fmt.Errorf("peer %q sent a change for relation id %d without describing it first (protocol error)", a.cfg.Peer.Name, relID)
	}
	a.wantTxn = true
	if a.parks(r) {
		return a.park(ctx, r, raw)
	}
	var err error
	if r.stale() {
		err = r.load(ctx, a.pc, a.cfg.Peer.Name)
	}
	if err == nil {
		err = apply(r)
	}
	if err != nil {
		err = fmt.Errorf("apply change to %s from peer %q (remote xid %d, commit LSN %s): %w",
			r.qualified, a.cfg.Peer.Name, a.begin.Xid, a.begin.FinalLSN, err)
		if changeError(err) {
			return &applyFailed{table: r.table(), err: err}
		}
		return err
	}
	a.rows++
	return nil
}

// openLocal sends BEGIN unless the transaction is open already.
func (a *applier) openLocal(ctx context.Context) error {
	if a.localOpen {
		return nil
	}
	if err := a.pc.Exec(ctx, "BEGIN").Close(); err != nil {
		return fmt.Errorf("begin local transaction: %w", err)
	}
	a.localOpen, a.wantTxn = true, true
	return nil
}

// prepare returns the name of sql as a prepared statement, preparing it
// the first time. The connection must be out of pipeline mode for that, so
// the batch in flight is read back first, which may apply failed groups
// carefully: their errors are the stream's, returned as they are. Only the
// server's refusal of sql itself is an *unpreparable.
func (a *applier) prepare(ctx context.Context, sql string) (string, error) {
	name, ok := a.stmts[sql]
	if !ok {
		if err := a.collect(ctx); err != nil {
			return "", err
		}
		name = "pgmesh_" + strconv.Itoa(a.stmtGen) + "_" + strconv.Itoa(len(a.stmts))
		if _, err := a.pc.Prepare(ctx, name, sql, nil); err != nil {
			return "", &unpreparable{err}
		}
		a.stmts[sql] = name
	}
	return name, nil
}

// unpreparable is the server's refusal to prepare a statement (a column
// type this node cannot take, say).
type unpreparable struct{ err error }

func (e *unpreparable) Error() string { return "prepare statement: " + e.err.Error() }
func (e *unpreparable) Unwrap() error { return e.err }

// exec runs sql as a named prepared statement with text-format parameters,
// whose types the server infers from the statement, inside the local
// transaction.
func (a *applier) exec(ctx context.Context, sql string, params [][]byte) *pgconn.Result {
	if err := a.openLocal(ctx); err != nil {
		return &pgconn.Result{Err: err}
	}
	name, err := a.prepare(ctx, sql)
	if err != nil {
		return &pgconn.Result{Err: err}
	}
	return a.pc.ExecPrepared(ctx, name, params, nil, nil).Read()
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
func (a *applier) queueInsert(ctx context.Context, r *relation, m *pglogrepl.InsertMessage) error {
	cols, vals := values(m.Tuple)
	// The message's buffer is reused by the next receive: keep copies.
	size := 0
	for i := range vals {
		// bytes.Clone keeps an empty value empty (not NULL).
		vals[i] = bytes.Clone(vals[i])
		size += len(vals[i])
	}
	match, nullSafe := r.match(m.Tuple)
	sql, params := a.insertStmt(r, cols, vals, match, nil)
	name, err := a.prepare(ctx, sql)
	if err != nil {
		return err
	}
	a.pending = append(a.pending, pendingInsert{r: r, stmt: name, params: params, cols: cols, vals: vals, match: match, nullSafe: nullSafe})
	a.pendingSz += size
	if len(a.pending) >= maxPendingInserts || a.pendingSz >= maxPendingBytes {
		return a.flush(ctx)
	}
	return nil
}

// flush sends the pending inserts (and BEGIN, if due) as one pipelined batch
// and settles the ones that inserted nothing.
func (a *applier) flush(ctx context.Context) error {
	if len(a.pending) == 0 {
		return nil
	}
	pending := a.pending
	a.pending, a.pendingSz = a.pending[:0], 0
	b := &pgconn.Batch{}
	first := 0
	if !a.localOpen {
		b.ExecParams("BEGIN", nil, nil, nil, nil)
		first = 1
	}
	for _, p := range pending {
		b.ExecPrepared(p.stmt, p.params, nil, nil)
	}
	results, err := a.pc.ExecBatch(ctx, b).ReadAll()
	a.localOpen = true // by the BEGIN at its head, even if a later statement failed (rollback ends it)
	if err != nil {
		err = fmt.Errorf("apply inserts from peer %q (remote xid %d, commit LSN %s): %w", a.cfg.Peer.Name, a.begin.Xid, a.begin.FinalLSN, err)
		// The statements after the failed one were skipped: it is the last.
		if i := len(results) - 1 - first; i >= 0 && i < len(pending) && results[len(results)-1].Err != nil && changeError(err) {
			return &applyFailed{table: pending[i].r.table(), err: err}
		}
		return err
	}
	for i, p := range pending {
		if results[first+i].CommandTag.RowsAffected() == 1 {
			continue
		}
		if err := a.insertConflict(ctx, p.r, p.cols, p.vals, p.match, p.nullSafe); err != nil {
			return fmt.Errorf("apply change to %s from peer %q (remote xid %d, commit LSN %s): %w",
				p.r.qualified, a.cfg.Peer.Name, a.begin.Xid, a.begin.FinalLSN, err)
		}
	}
	return nil
}

// values returns the indexes and values of the tuple's columns, leaving out
// unchanged TOAST values ('u'), which must never be overwritten.
func values(t *pglogrepl.TupleData) (cols []int, vals [][]byte) {
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

// localRow is a local row version a remote change meets.
type localRow struct {
	ctid    []byte
	version conflict.Version
	ownTxn  bool
}

func (a *applier) versions(ctx context.Context, sql string, params [][]byte) ([]localRow, error) {
	res := a.exec(ctx, sql, params)
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
		name, err := a.originNode(ctx, uint32(roident))
		if err != nil {
			return nil, err
		}
		lr.version.Node, lr.version.NodeID = name, a.cfg.NodeID(name)
		out = append(out, lr)
	}
	return out, nil
}

// lookup finds and locks the local row with the given identity.
func (a *applier) lookup(ctx context.Context, r *relation, match []int, nullSafe bool, keyVals [][]byte) (*localRow, error) {
	var p params
	sql := lockedVersions(fmt.Sprintf("SELECT t.ctid, t.xmin FROM %s t WHERE %s LIMIT 1 FOR UPDATE",
		r.qualified, r.where(&p, match, keyVals, nullSafe)))
	rows, err := a.versions(ctx, sql, p.vals)
	if err != nil || len(rows) == 0 {
		return nil, err
	}
	return &rows[0], nil
}

// tombstone returns the newest known delete of the key, or nil.
func (a *applier) tombstone(ctx context.Context, r *relation, match []int, keyVals [][]byte) (*conflict.Version, error) {
	if !samePK(r, match) {
		return nil, nil // tombstones are kept for tables with a primary key
	}
	var p params
	rel := p.add([]byte(r.tombName))
	sql := fmt.Sprintf(`SELECT %s, t.deleted_by FROM pgmesh.tombstone t WHERE t.relation = %s AND t.key = %s`,
		conflict.TombstoneAtMicros("t"), rel, r.keyJSON(&p, match, keyVals))
	res := a.exec(ctx, sql, p.vals)
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
	v := conflict.TombstoneVersion(micros, by, a.cfg.LocalNode)
	v.NodeID = a.cfg.NodeID(v.Node)
	return &v, nil
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
	res := a.pc.ExecParams(ctx, "SELECT roident, roname FROM pg_catalog.pg_replication_origin", nil, nil, nil, nil).Read()
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

func (a *applier) remote() conflict.Version {
	return conflict.Version{CommitTS: a.begin.CommitTime, NodeID: a.cfg.Peer.ID, Node: a.cfg.Peer.Name}
}

// insertConflict settles an insert that inserted nothing: the key exists
// here, a delete of it is remembered, or another unique value is taken.
func (a *applier) insertConflict(ctx context.Context, r *relation, cols []int, vals [][]byte, match []int, nullSafe bool) error {
	keyVals := make([][]byte, len(match))
	for i, c := range match {
		keyVals[i], _ = valueOf(cols, vals, c)
	}
	local, err := a.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	if local != nil {
		d := a.cfg.Rule.Decide(conflict.Insert, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn}, a.remote())
		if err := a.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
		if !d.Apply {
			return nil
		}
		return a.updateChecked(ctx, r, local.ctid, match, keyVals, cols, vals, nil)
	}
	tomb, err := a.tombstone(ctx, r, match, keyVals)
	if err != nil {
		return err
	}
	d := a.cfg.Rule.Decide(conflict.Insert, conflict.Local{Tombstone: tomb, FullRow: true}, a.remote())
	if d.Conflict {
		return a.record(ctx, r, d, nil, match, keyVals, cols, vals)
	}
	// An older tombstone or another unique value stopped the fast path.
	return a.insertChecked(ctx, r, conflict.Insert, match, keyVals, cols, vals)
}

// insertRow inserts unless the row's key exists or another unique value is
// taken. With match set to the primary key, a remembered delete of the key
// also stops it: any delete, or with newerThan set, only one newer than
// that version. It returns the number of rows inserted.
func (a *applier) insertRow(ctx context.Context, r *relation, cols []int, vals [][]byte, match []int, newerThan *conflict.Version) (int64, error) {
	sql, params := a.insertStmt(r, cols, vals, match, newerThan)
	res := a.exec(ctx, sql, params)
	if res.Err != nil {
		return 0, res.Err
	}
	return res.CommandTag.RowsAffected(), nil
}

// insertStmt builds insertRow's statement and parameters. Remembered
// deletes are looked for once the row is in (pgmesh.take_back_if_deleted,
// which removes it again), so that a delete committed here while the insert
// waited for it is seen too.
func (a *applier) insertStmt(r *relation, cols []int, vals [][]byte, match []int, newerThan *conflict.Version) (string, [][]byte) {
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
func (a *applier) insertChecked(ctx context.Context, r *relation, change conflict.Change, match []int, keyVals [][]byte, cols []int, vals [][]byte) error {
	ok, err := a.settleUnique(ctx, r, change, nil, match, keyVals, cols, vals)
	if err != nil || !ok {
		return err
	}
	remote := a.remote()
	n, err := a.insertRow(ctx, r, cols, vals, match, &remote)
	if err != nil || n == 1 {
		return err
	}
	tomb, err := a.tombstone(ctx, r, match, keyVals)
	if err != nil {
		return err
	}
	if tomb != nil {
		if d := a.cfg.Rule.Decide(change, conflict.Local{Tombstone: tomb, FullRow: true}, remote); !d.Apply {
			return a.record(ctx, r, d, nil, match, keyVals, cols, vals)
		}
	}
	if local, err := a.lookup(ctx, r, match, false, keyVals); err != nil || local != nil {
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
func (a *applier) settleUnique(ctx context.Context, r *relation, change conflict.Change, self []byte, match []int, keyVals [][]byte, cols []int, vals [][]byte) (bool, error) {
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
	blockers, err := a.versions(ctx, lockedVersions(fmt.Sprintf("SELECT t.ctid, t.xmin FROM %s t WHERE %s ORDER BY t.ctid FOR UPDATE", r.qualified, where)), p.vals)
	if err != nil || len(blockers) == 0 {
		return true, err
	}
	vs := make([]conflict.Version, len(blockers))
	for i, b := range blockers {
		vs[i] = b.version
	}
	d, losers := a.cfg.Rule.Unique(change, vs, a.remote())
	if err := a.record(ctx, r, d, blockers, match, keyVals, cols, vals); err != nil {
		return false, err
	}
	for _, i := range losers {
		if err := a.deleteRow(ctx, r, blockers[i].ctid, a.remote()); err != nil {
			return false, err
		}
	}
	if d.DeleteSelf && self != nil {
		return false, a.deleteRow(ctx, r, self, a.remote())
	}
	return d.Apply, nil
}

func (a *applier) update(ctx context.Context, r *relation, m *pglogrepl.UpdateMessage) error {
	keySrc := m.NewTuple
	if m.OldTuple != nil {
		keySrc = m.OldTuple
	}
	match, nullSafe := r.match(keySrc)
	keyVals := pick(keySrc, match)
	local, err := a.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	cols, vals := values(m.NewTuple)
	var old *pglogrepl.TupleData
	if m.OldTupleType == pglogrepl.UpdateMessageTupleTypeOld {
		old = m.OldTuple
	}
	if local == nil {
		tomb, err := a.tombstone(ctx, r, match, keyVals)
		if err != nil {
			return err
		}
		d := a.cfg.Rule.Decide(conflict.Update, conflict.Local{Tombstone: tomb, FullRow: len(cols) == len(r.cols)}, a.remote())
		if err := a.record(ctx, r, d, nil, match, keyVals, cols, vals); err != nil {
			return err
		}
		if !d.Apply {
			return nil
		}
		// The row may live on under its new key.
		newMatch, _ := r.match(m.NewTuple)
		return a.insertChecked(ctx, r, conflict.Update, newMatch, pick(m.NewTuple, newMatch), cols, vals)
	}
	d := a.cfg.Rule.Decide(conflict.Update, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn, Delta: old != nil && hasDelta(r)}, a.remote())
	if d.MergeDelta {
		if err := a.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
		return a.updateRow(ctx, r, local.ctid, deltaOnly(r, cols), vals, old)
	}
	if d.Conflict {
		if err := a.record(ctx, r, d, []localRow{*local}, match, keyVals, cols, vals); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	if hasDelta(r) && old == nil && !a.warned[r.name] {
		a.warned[r.name] = true
		a.log.Warn("table has delta columns but the peer does not send old values, so its updates overwrite them: run SELECT pgmesh.set_delta_column(...) on every node (pgmesh delta-column does)",
			"table", r.name, "peer", a.cfg.Peer.Name)
	}
	return a.updateChecked(ctx, r, local.ctid, match, keyVals, cols, vals, old)
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

func (a *applier) updateChecked(ctx context.Context, r *relation, ctid []byte, match []int, keyVals [][]byte, cols []int, vals [][]byte, old *pglogrepl.TupleData) error {
	ok, err := a.settleUnique(ctx, r, conflict.Update, ctid, match, keyVals, cols, vals)
	if err != nil || !ok {
		return err
	}
	return a.updateRow(ctx, r, ctid, cols, vals, old)
}

// updateRow sets the given columns of the row at ctid. Delta columns get
// the remote increment (new - old) added when the old tuple is known.
func (a *applier) updateRow(ctx context.Context, r *relation, ctid []byte, cols []int, vals [][]byte, old *pglogrepl.TupleData) error {
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
	res := a.exec(ctx, fmt.Sprintf("UPDATE %s t SET %s WHERE t.ctid = %s::tid", r.qualified, strings.Join(sets, ", "), at), p.vals)
	if res.Err != nil {
		return res.Err
	}
	if n := res.CommandTag.RowsAffected(); n != 1 {
		return fmt.Errorf("update of locked row %s changed %d rows", ctid, n)
	}
	return nil
}

func (a *applier) delete(ctx context.Context, r *relation, m *pglogrepl.DeleteMessage) error {
	if m.OldTuple == nil {
		return fmt.Errorf("table %s has no primary key or replica identity on peer %q, so its deletes cannot be matched: add a primary key (or ALTER TABLE ... REPLICA IDENTITY FULL) on every node", r.qualified, a.cfg.Peer.Name)
	}
	match, nullSafe := r.match(m.OldTuple)
	keyVals := pick(m.OldTuple, match)
	local, err := a.lookup(ctx, r, match, nullSafe, keyVals)
	if err != nil {
		return err
	}
	if local == nil {
		d := a.cfg.Rule.Decide(conflict.Delete, conflict.Local{}, a.remote())
		if err := a.record(ctx, r, d, nil, match, keyVals, nil, nil); err != nil {
			return err
		}
		// Remember the delete: the row's insert or an older update may
		// still be on its way from another node.
		a.deletedMissing = true
		return a.saveTombstone(ctx, r, match, keyVals)
	}
	d := a.cfg.Rule.Decide(conflict.Delete, conflict.Local{Row: &local.version, OwnTxn: local.ownTxn}, a.remote())
	if d.Conflict {
		if err := a.record(ctx, r, d, []localRow{*local}, match, keyVals, nil, nil); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	return a.deleteRow(ctx, r, local.ctid, a.remote())
}

// deleteRow deletes the row at ctid and, for tables with a primary key,
// records a tombstone stamped with the deleting change's time and origin,
// in one statement.
func (a *applier) deleteRow(ctx context.Context, r *relation, ctid []byte, by conflict.Version) error {
	var p params
	at := p.add(ctid)
	if r.pk == nil {
		return a.exec(ctx, fmt.Sprintf("DELETE FROM %s t WHERE t.ctid = %s::tid", r.qualified, at), p.vals).Err
	}
	sql := fmt.Sprintf(`WITH d AS (DELETE FROM %s t WHERE t.ctid = %s::tid RETURNING %s AS k)
`+conflict.TombstoneInsert+`SELECT %s, d.k, %s::timestamptz, %s FROM d`+conflict.TombstoneUpsert,
		r.qualified, at, r.rowKey("t"), p.add([]byte(r.tombName)), p.add([]byte(pgquote.Timestamp(by.CommitTS))), p.add([]byte(by.Node)))
	return a.exec(ctx, sql, p.vals).Err
}

// saveTombstone records a delete of a key that has no row here.
func (a *applier) saveTombstone(ctx context.Context, r *relation, match []int, keyVals [][]byte) error {
	if !samePK(r, match) {
		return nil
	}
	var p params
	rel := p.add([]byte(r.tombName))
	key := r.keyJSON(&p, match, keyVals)
	sql := fmt.Sprintf(conflict.TombstoneInsert+`VALUES (%s, %s, %s::timestamptz, %s)`+conflict.TombstoneUpsert,
		rel, key, p.add([]byte(pgquote.Timestamp(a.begin.CommitTime))), p.add([]byte(a.cfg.Peer.Name)))
	return a.exec(ctx, sql, p.vals).Err
}

func (a *applier) truncate(ctx context.Context, m *pglogrepl.TruncateMessage) error {
	if a.filter.Skip() {
		return nil
	}
	var names []string
	for _, id := range m.RelationIDs {
		r, ok := a.rels[id]
		if !ok {
			return fmt.Errorf("peer %q truncated relation id %d without describing it first (protocol error)", a.cfg.Peer.Name, id)
		}
		if a.parks(r) {
			return fmt.Errorf("peer %q truncated %s, whose changes from it are parked here: replay them (pgmesh replay %s --peer %s) or discard them, and the stream resumes from this TRUNCATE",
				a.cfg.Peer.Name, r.table(), r.table(), a.cfg.Peer.Name)
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
	if err := a.openLocal(ctx); err != nil {
		return err
	}
	if err := a.pc.Exec(ctx, sql).Close(); err != nil {
		return fmt.Errorf("apply TRUNCATE from peer %q: %w", a.cfg.Peer.Name, err)
	}
	a.rows++
	return nil
}

// commit ends the source transaction. An applied one commits together with
// the origin's progress and the origin's commit time, so the local rows carry
// the origin's timestamp (ARCHITECTURE.md, invariants: origin time is the row's time).
func (a *applier) commit(ctx context.Context, m *pglogrepl.CommitMessage) (pglogrepl.LSN, error) {
	defer a.filter.End()
	if !a.wantTxn {
		a.hadConflict = false
		a.stats.skipped(a.filter.Skip(), m.CommitTime)
		return m.TransactionEndLSN, nil
	}
	a.wantTxn = false
	if err := a.openLocal(ctx); err != nil { // a transaction whose changes all were no-ops here
		return 0, err
	}
	a.localOpen = false
	if _, err := a.pc.Exec(ctx, a.commitSQL(m)).ReadAll(); err != nil {
		return 0, fmt.Errorf("commit transaction from peer %q (remote xid %d): %w", a.cfg.Peer.Name, a.begin.Xid, err)
	}
	a.stats.committedGroup(0, false) // statements are counted on the fast and bulk paths
	a.stats.applied(m.TransactionEndLSN, m.CommitTime, a.rows, a.conflicts)
	a.hadConflict = len(a.conflicts) > 0
	if a.deletedMissing && a.cfg.DeletedMissing != nil {
		a.cfg.DeletedMissing()
	}
	if a.careful {
		a.applied = m.TransactionEndLSN
	}
	return m.TransactionEndLSN, nil
}

// commitSQL ends the local transaction applying one source transaction:
// once the local clock has passed its rounded commit time (see clockGuard),
// it commits with the origin's progress and commit time (ARCHITECTURE.md,
// invariants: exactly once, origin time is the row's time).
func (a *applier) commitSQL(m *pglogrepl.CommitMessage) string {
	at := a.cfg.Rule.RoundTime(m.CommitTime)
	a.stats.clockAhead(at)
	return fmt.Sprintf(`SELECT %s; SELECT pg_catalog.pg_replication_origin_xact_setup('%s', '%s'); COMMIT`,
		clockGuard("'"+pgquote.Timestamp(at)+"'"), m.TransactionEndLSN, pgquote.Timestamp(m.CommitTime))
}

// ddlPrefix marks the logical decoding messages that carry DDL.
const ddlPrefix = "pgmesh_ddl"

// ddl runs a replicated DDL command in the applying transaction, with the
// origin's search_path, at its place among the data changes.
func (a *applier) ddl(ctx context.Context, content []byte) error {
	var msg struct {
		SearchPath string `json:"search_path"`
		Command    string `json:"command"`
	}
	if err := json.Unmarshal(content, &msg); err != nil {
		return fmt.Errorf("decode DDL message from peer %q: %w", a.cfg.Peer.Name, err)
	}
	if err := a.openLocal(ctx); err != nil {
		return err
	}
	a.wantTxn = true
	// A table the DDL creates joins the sets that take all tables here too,
	// in this transaction (pgmesh.new_tables_join_sets, migration 11).
	sql := fmt.Sprintf("SELECT pg_catalog.set_config('search_path', %s, true);\n%s;\nSELECT pg_catalog.set_config('search_path', '', true); SELECT pgmesh.new_tables_join_sets(); DEALLOCATE ALL",
		pgquote.Literal(msg.SearchPath), msg.Command)
	if _, err := a.pc.Exec(ctx, sql).ReadAll(); err != nil {
		return fmt.Errorf("run DDL from peer %q (remote xid %d) %q: %w; fix the cause on this node and the stream resumes from this DDL", a.cfg.Peer.Name, a.begin.Xid, msg.Command, err)
	}
	// Statements and catalog facts from before the DDL are stale now.
	a.stmts, a.stmtGen = map[string]string{}, a.stmtGen+1
	for _, r := range a.rels {
		r.loadedAt = time.Time{}
	}
	a.rows++
	return nil
}

// rollback abandons an open local transaction after an error.
func (a *applier) rollback(ctx context.Context) {
	a.bulk = nil
	if a.pipe.pl != nil {
		a.pipe.abandon() // the connection is closed next
		return
	}
	a.pending, a.wantTxn = nil, false
	if a.localOpen {
		_ = a.pc.Exec(ctx, "ROLLBACK").Close()
		a.localOpen = false
	}
}

// record writes a conflict_history row in the transaction being applied,
// before the change, so local_tuple is the row (or rows) as it was.
func (a *applier) record(ctx context.Context, r *relation, d conflict.Decision, locals []localRow,
	keyCols []int, keyVals [][]byte, remoteCols []int, remoteVals [][]byte) error {
	if !d.Conflict {
		return nil
	}
	var p params
	var ctids []string
	for _, l := range locals {
		ctids = append(ctids, `"`+string(l.ctid)+`"`)
	}
	rec := conflict.Record{LocalNode: a.cfg.LocalNode, OriginNode: a.cfg.Peer.Name, Relation: r.name, Decision: d,
		RemoteCommitTS: a.begin.CommitTime, RemoteLSN: a.begin.FinalLSN.String(), RemoteXID: a.begin.Xid}
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
	if err := a.openLocal(ctx); err != nil {
		return err
	}
	if res := a.pc.ExecParams(ctx, sql, p.vals, nil, nil, nil).Read(); res.Err != nil {
		return fmt.Errorf("write conflict_history: %w", res.Err)
	}
	a.conflicts[string(d.Type)+"/"+string(d.Resolution)]++
	return nil
}
