package replicator

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/origin"
)

// applier turns one peer's decoded changes into local transactions on a
// connection bound to that peer's replication origin. One source transaction
// becomes exactly one local transaction, committed together with the origin's
// progress (DESIGN.md §3.2–3.3).
type applier struct {
	pc       *pgconn.PgConn
	cfg      *Config
	rels     map[uint32]*relation
	stmts    map[string]string // SQL text -> prepared statement name
	origins  map[uint32]string // roident -> node name
	filter   origin.Filter
	progress pglogrepl.LSN // origin progress when the stream started

	begin     pglogrepl.BeginMessage
	localOpen bool // a local transaction is open
	rows      int64
	conflicts int64
	stats     *stats
}

func newApplier(pc *pgconn.PgConn, cfg *Config, progress pglogrepl.LSN, st *stats) *applier {
	return &applier{pc: pc, cfg: cfg, progress: progress, stats: st,
		rels: map[uint32]*relation{}, stmts: map[string]string{}, origins: map[uint32]string{}}
}

// handle applies one pgoutput message. It returns the end LSN of a
// transaction once it is committed (or dropped), else 0.
func (a *applier) handle(ctx context.Context, data []byte) (pglogrepl.LSN, error) {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return 0, fmt.Errorf("decode pgoutput message: %w", err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		a.begin = *m
		a.filter.Begin()
		a.rows, a.conflicts = 0, 0
		if m.FinalLSN < a.progress {
			// Already applied before a restart (the server may resend
			// from the slot's older confirmed position).
			a.filter.Origin()
		}
	case *pglogrepl.OriginMessage:
		// Forwarded from a third node: that node streams it to us itself.
		return 0, a.filter.Origin()
	case *pglogrepl.RelationMessage:
		a.rels[m.RelationID] = newRelation(m)
	case *pglogrepl.TypeMessage:
		// Values arrive as text and are parsed by the local types of the
		// same-named columns, so type OIDs (which differ between nodes for
		// user-defined types) are not needed.
	case *pglogrepl.InsertMessage:
		return 0, a.change(ctx, m.RelationID, func(r *relation) error { return a.insert(ctx, r, m) })
	case *pglogrepl.UpdateMessage:
		return 0, a.change(ctx, m.RelationID, func(r *relation) error { return a.update(ctx, r, m) })
	case *pglogrepl.DeleteMessage:
		return 0, a.change(ctx, m.RelationID, func(r *relation) error { return a.delete(ctx, r, m) })
	case *pglogrepl.TruncateMessage:
		return 0, a.truncate(ctx, m)
	case *pglogrepl.CommitMessage:
		return a.commit(ctx, m)
	case *pglogrepl.LogicalDecodingMessage:
		// Not used yet.
	}
	return 0, nil
}

func (a *applier) change(ctx context.Context, relID uint32, apply func(*relation) error) error {
	if a.filter.Skip() {
		return nil
	}
	r, ok := a.rels[relID]
	if !ok {
		return fmt.Errorf("peer %q sent a change for relation id %d without describing it first (protocol error)", a.cfg.Peer.Name, relID)
	}
	if err := a.openLocal(ctx); err != nil {
		return err
	}
	if !r.loaded {
		if err := r.load(ctx, a.pc, a.cfg.Peer.Name); err != nil {
			return err
		}
	}
	if err := apply(r); err != nil {
		return fmt.Errorf("apply change to %s from peer %q (remote xid %d, commit LSN %s): %w",
			r.qualified, a.cfg.Peer.Name, a.begin.Xid, a.begin.FinalLSN, err)
	}
	a.rows++
	return nil
}

func (a *applier) openLocal(ctx context.Context) error {
	if a.localOpen {
		return nil
	}
	if err := a.pc.Exec(ctx, "BEGIN").Close(); err != nil {
		return fmt.Errorf("begin local transaction: %w", err)
	}
	a.localOpen = true
	return nil
}

// exec runs sql as a named prepared statement with text-format parameters,
// whose types the server infers from the statement.
func (a *applier) exec(ctx context.Context, sql string, params [][]byte) *pgconn.Result {
	name, ok := a.stmts[sql]
	if !ok {
		name = "pgmesh_" + strconv.Itoa(len(a.stmts))
		if _, err := a.pc.Prepare(ctx, name, sql, nil); err != nil {
			return &pgconn.Result{Err: err}
		}
		a.stmts[sql] = name
	}
	return a.pc.ExecPrepared(ctx, name, params, nil, nil).Read()
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

// localRow is the local row version a remote change meets.
type localRow struct {
	ctid    []byte
	version conflict.Version
	ownTxn  bool
}

func (a *applier) lookup(ctx context.Context, r *relation, keyVals [][]byte) (*localRow, error) {
	res := a.exec(ctx, r.lookupSQL(r.matchCols()), keyVals)
	if res.Err != nil {
		return nil, fmt.Errorf("look up local row: %w", res.Err)
	}
	if len(res.Rows) == 0 {
		return nil, nil
	}
	row := res.Rows[0]
	lr := &localRow{ctid: append([]byte(nil), row[0]...), ownTxn: string(row[3]) == "t"}
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
	lr.version.Node = name
	lr.version.NodeID = a.cfg.NodeID(name)
	return lr, nil
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

func (a *applier) remoteVersion() conflict.Version {
	return conflict.Version{CommitTS: a.begin.CommitTime, NodeID: a.cfg.Peer.ID, Node: a.cfg.Peer.Name}
}

func (a *applier) insert(ctx context.Context, r *relation, m *pglogrepl.InsertMessage) error {
	cols, vals := values(m.Tuple)
	res := a.exec(ctx, r.insertSQL(cols), vals)
	if res.Err != nil {
		return res.Err
	}
	if res.CommandTag.RowsAffected() == 1 {
		return nil
	}
	match := r.matchCols()
	keyVals := pick(m.Tuple, match)
	var local *localRow
	if len(match) > 0 {
		var err error
		if local, err = a.lookup(ctx, r, keyVals); err != nil {
			return err
		}
	}
	if local == nil {
		// Another unique constraint than the identity blocks the row.
		d := conflict.Decision{Conflict: true, Type: conflict.InsertExists, Resolution: conflict.Skip,
			Reason: "a unique constraint other than the replica identity blocks the row"}
		return a.record(ctx, r, d, nil, match, keyVals, cols, vals)
	}
	d := conflict.Decide(conflict.Insert, &local.version, local.ownTxn, a.remoteVersion())
	if err := a.record(ctx, r, d, local, match, keyVals, cols, vals); err != nil {
		return err
	}
	if !d.Apply {
		return nil
	}
	return a.updateRow(ctx, r, local.ctid, cols, vals)
}

func (a *applier) update(ctx context.Context, r *relation, m *pglogrepl.UpdateMessage) error {
	match := r.matchCols()
	if len(match) == 0 {
		return fmt.Errorf("table %s has no primary key or replica identity on peer %q, so its updates cannot be matched: add a primary key (or ALTER TABLE ... REPLICA IDENTITY FULL) on every node", r.qualified, a.cfg.Peer.Name)
	}
	keySrc := m.NewTuple
	if m.OldTuple != nil {
		keySrc = m.OldTuple
	}
	keyVals := pick(keySrc, match)
	local, err := a.lookup(ctx, r, keyVals)
	if err != nil {
		return err
	}
	cols, vals := values(m.NewTuple)
	var lv *conflict.Version
	if local != nil {
		lv = &local.version
	}
	d := conflict.Decide(conflict.Update, lv, local != nil && local.ownTxn, a.remoteVersion())
	if d.Conflict {
		if err := a.record(ctx, r, d, local, match, keyVals, cols, vals); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	return a.updateRow(ctx, r, local.ctid, cols, vals)
}

func (a *applier) updateRow(ctx context.Context, r *relation, ctid []byte, cols []int, vals [][]byte) error {
	res := a.exec(ctx, r.updateSQL(cols), append([][]byte{ctid}, vals...))
	if res.Err != nil {
		return res.Err
	}
	if n := res.CommandTag.RowsAffected(); n != 1 {
		return fmt.Errorf("update of locked row %s changed %d rows", ctid, n)
	}
	return nil
}

func (a *applier) delete(ctx context.Context, r *relation, m *pglogrepl.DeleteMessage) error {
	match := r.matchCols()
	if len(match) == 0 || m.OldTuple == nil {
		return fmt.Errorf("table %s has no primary key or replica identity on peer %q, so its deletes cannot be matched: add a primary key (or ALTER TABLE ... REPLICA IDENTITY FULL) on every node", r.qualified, a.cfg.Peer.Name)
	}
	keyVals := pick(m.OldTuple, match)
	local, err := a.lookup(ctx, r, keyVals)
	if err != nil {
		return err
	}
	var lv *conflict.Version
	if local != nil {
		lv = &local.version
	}
	d := conflict.Decide(conflict.Delete, lv, local != nil && local.ownTxn, a.remoteVersion())
	if d.Conflict {
		if err := a.record(ctx, r, d, local, match, keyVals, nil, nil); err != nil {
			return err
		}
	}
	if !d.Apply {
		return nil
	}
	res := a.exec(ctx, r.deleteSQL(), [][]byte{local.ctid})
	return res.Err
}

func (a *applier) truncate(ctx context.Context, m *pglogrepl.TruncateMessage) error {
	if a.filter.Skip() {
		return nil
	}
	var names string
	for i, id := range m.RelationIDs {
		r, ok := a.rels[id]
		if !ok {
			return fmt.Errorf("peer %q truncated relation id %d without describing it first (protocol error)", a.cfg.Peer.Name, id)
		}
		if i > 0 {
			names += ", "
		}
		names += r.qualified
	}
	sql := "TRUNCATE " + names
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
// the origin's timestamp (DESIGN.md §3.3).
func (a *applier) commit(ctx context.Context, m *pglogrepl.CommitMessage) (pglogrepl.LSN, error) {
	defer a.filter.End()
	if !a.localOpen {
		a.stats.skipped(a.filter.Skip())
		return m.TransactionEndLSN, nil
	}
	sql := fmt.Sprintf("SELECT pg_catalog.pg_replication_origin_xact_setup('%s', '%s'); COMMIT",
		m.TransactionEndLSN, pgTime(m.CommitTime))
	a.localOpen = false
	if _, err := a.pc.Exec(ctx, sql).ReadAll(); err != nil {
		return 0, fmt.Errorf("commit transaction from peer %q (remote xid %d): %w", a.cfg.Peer.Name, a.begin.Xid, err)
	}
	a.stats.applied(m.TransactionEndLSN, m.CommitTime, a.rows, a.conflicts)
	return m.TransactionEndLSN, nil
}

// rollback abandons an open local transaction after an error.
func (a *applier) rollback(ctx context.Context) {
	if a.localOpen {
		_ = a.pc.Exec(ctx, "ROLLBACK").Close()
		a.localOpen = false
	}
}

// pgTime formats t as a timestamptz literal with microsecond precision.
func pgTime(t time.Time) string {
	return t.UTC().Format("2006-01-02 15:04:05.000000") + "+00"
}

// record writes a conflict_history row in the transaction being applied,
// before the change, so local_tuple is the row as it was.
func (a *applier) record(ctx context.Context, r *relation, d conflict.Decision, local *localRow,
	keyCols []int, keyVals [][]byte, remoteCols []int, remoteVals [][]byte) error {
	var ctid, localTS []byte
	localOrigin := []byte(nil)
	if local != nil {
		ctid = local.ctid
		if local.version.Known() {
			localTS = []byte(pgTime(local.version.CommitTS))
		}
		localOrigin = []byte(local.version.Node)
	}
	params := [][]byte{
		[]byte(a.cfg.LocalNode), []byte(a.cfg.Peer.Name), []byte(r.msg.Namespace + "." + r.msg.RelationName),
		[]byte(d.Type), []byte(d.Resolution), ctid, localTS, localOrigin,
		[]byte(pgTime(a.begin.CommitTime)), []byte(a.begin.FinalLSN.String()),
		[]byte(strconv.FormatUint(uint64(a.begin.Xid), 10)), []byte(d.Reason),
	}
	keyJSON := r.tupleJSON(keyCols, len(params)+1)
	params = append(params, keyVals...)
	remoteJSON := r.tupleJSON(remoteCols, len(params)+1)
	params = append(params, remoteVals...)
	localJSON := fmt.Sprintf("(SELECT to_jsonb(t) FROM %s t WHERE t.ctid = $6::tid)", r.qualified)
	applied := "NULL::jsonb"
	switch {
	case d.Apply && remoteCols != nil:
		applied = remoteJSON
	case !d.Apply && d.Resolution == conflict.KeepLocal:
		applied = localJSON
	}
	sql := fmt.Sprintf(`INSERT INTO pgmesh.conflict_history (local_node, origin_node, relation,
	conflict_type, resolution, key_tuple, local_tuple, remote_tuple, applied_tuple,
	local_commit_ts, local_origin, remote_commit_ts, remote_commit_lsn, remote_xid, reason)
VALUES ($1, $2, $3, $4, $5, %s, %s, %s, %s, $7::timestamptz, $8, $9::timestamptz, $10::pg_lsn, $11::bigint, $12)`,
		keyJSON, localJSON, remoteJSON, applied)
	if res := a.pc.ExecParams(ctx, sql, params, nil, nil, nil).Read(); res.Err != nil {
		return fmt.Errorf("write conflict_history: %w", res.Err)
	}
	a.conflicts++
	return nil
}
