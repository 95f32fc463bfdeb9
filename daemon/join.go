package daemon

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
	"github.com/pgmesh/pgmesh/repset"
)

// joiner tracks the one join a daemon may run at a time.
type joiner struct {
	mu      sync.Mutex
	running bool
	status  *api.JoinStatus
}

func (j *joiner) snapshot() *api.JoinStatus {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.status == nil {
		return nil
	}
	s := *j.status
	return &s
}

func (j *joiner) update(f func(*api.JoinStatus)) {
	j.mu.Lock()
	f(j.status)
	j.mu.Unlock()
}

// handleJoin starts joining the group of the daemon at Via in the
// background; `pgmesh group join` then follows the progress in status.
func (d *Daemon) handleJoin(w http.ResponseWriter, r *http.Request) {
	var req api.JoinRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	if req.Via == "" || req.Token == "" {
		writeErr(w, http.StatusBadRequest, errors.New("join needs --via HOST:PORT (a member's API address) and --token (printed by 'pgmesh group create')"))
		return
	}
	if g, _ := d.store.Group(); g != nil {
		if me := g.Nodes[d.cfg.NodeName]; me != nil && me.State != membership.Joining {
			writeErr(w, http.StatusConflict, fmt.Errorf("node %q is already %s in node group %q", d.cfg.NodeName, me.State, g.Name))
			return
		}
	}
	d.join.mu.Lock()
	if d.join.running {
		d.join.mu.Unlock()
		writeErr(w, http.StatusConflict, errors.New("a join is already running on this node: follow it with 'pgmesh status'"))
		return
	}
	d.join.running = true
	d.join.status = &api.JoinStatus{Via: req.Via, Phase: "starting", StartedAt: time.Now().UTC()}
	d.join.mu.Unlock()

	// A bad token or a non-empty database is reported to the caller at
	// once; the rest runs in the background.
	reg, err := d.register(r.Context(), req)
	if err != nil {
		d.finishJoin(err)
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	d.bg.Go(func() {
		err := d.copyAndActivate(d.ctx, req)
		d.finishJoin(err)
	})
	writeJSON(w, http.StatusAccepted, reg)
}

func (d *Daemon) finishJoin(err error) {
	d.join.update(func(s *api.JoinStatus) {
		if err != nil {
			s.Error = err.Error()
			s.Phase = "failed"
		} else {
			s.Done, s.Phase = true, "done"
		}
	})
	d.join.mu.Lock()
	d.join.running = false
	d.join.mu.Unlock()
	if err != nil {
		d.log.Error("join failed; run the same 'pgmesh group join' again to retry", "err", err)
	}
	d.saveJoinStatus(context.Background())
}

func (d *Daemon) phase(p string) {
	d.join.update(func(s *api.JoinStatus) { s.Phase = p })
	d.log.Info("join", "phase", p)
	d.saveJoinStatus(d.ctx)
}

// saveJoinStatus mirrors the progress into pgmesh.join_status for SQL users.
func (d *Daemon) saveJoinStatus(ctx context.Context) {
	s := d.join.snapshot()
	if s == nil {
		return
	}
	var errText *string
	if s.Error != "" {
		errText = &s.Error
	}
	_, err := d.db.Exec(ctx, `INSERT INTO pgmesh.join_status AS j (via, phase, tables_total, tables_done, rows_copied, bytes_copied, bytes_total, started_at, error)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
		ON CONFLICT (one) DO UPDATE SET via = EXCLUDED.via, phase = EXCLUDED.phase, tables_total = EXCLUDED.tables_total,
			tables_done = EXCLUDED.tables_done, rows_copied = EXCLUDED.rows_copied, bytes_copied = EXCLUDED.bytes_copied,
			bytes_total = EXCLUDED.bytes_total, started_at = EXCLUDED.started_at, updated_at = now(), error = EXCLUDED.error`,
		s.Via, s.Phase, s.TablesTotal, s.TablesDone, s.Rows, s.Bytes, s.BytesTotal, s.StartedAt, errText)
	if err != nil {
		d.log.Warn("save join progress", "err", err)
	}
}

// register checks this database and enters the group as joining.
func (d *Daemon) register(ctx context.Context, req api.JoinRequest) (*api.JoinResponse, error) {
	g, _ := d.store.Group()
	retry := g != nil && g.Nodes[d.cfg.NodeName] != nil
	if !retry {
		// On a retry the tables hold a partial copy, which is replaced.
		if err := d.checkEmpty(ctx); err != nil {
			return nil, err
		}
	}
	reg, err := d.members.Client(req.Via, req.Token).Register(ctx, api.RegisterRequest{Node: d.self()})
	if err != nil {
		return nil, fmt.Errorf("join through %s: %w", req.Via, err)
	}
	if err := d.saveToken(req.Token); err != nil {
		return nil, fmt.Errorf("save join token: %w", err)
	}
	return &reg, nil
}

// copyAndActivate copies schema and data from the source member and makes
// this node active, so that every change of every member reaches it exactly
// once (ARCHITECTURE.md, invariants: join loses nothing).
func (d *Daemon) copyAndActivate(ctx context.Context, req api.JoinRequest) error {
	g, err := d.waitForSelf(ctx)
	if err != nil {
		return err
	}
	src, err := d.members.Client(req.Via, "").Status(ctx)
	if err != nil {
		return fmt.Errorf("ask %s which node it is: %w", req.Via, err)
	}
	source := g.Nodes[src.Node]
	if source == nil || source.State != membership.Active {
		return fmt.Errorf("%s is node %q, which is not an active member: join through an active member", req.Via, src.Node)
	}
	var others []*membership.Node
	for _, n := range g.Sorted() {
		if n.State == membership.Active && n.Name != source.Name && n.Name != d.cfg.NodeName {
			others = append(others, n)
		}
	}

	// Applications may not write here until the node is active: their
	// changes would not reach the group.
	d.phase("preparing")
	if err := d.setReadOnly(ctx, true); err != nil {
		return err
	}
	if err := d.forgetAll(ctx); err != nil { // leftovers of an earlier attempt
		return err
	}
	slot := origin.SlotName(d.cfg.NodeName)

	// 0. This node's publication on every member, before the slots: a
	// slot must never meet a change from before its publication existed.
	for _, m := range append(others, source) {
		if err := publishOn(ctx, d.peerDSN(m), g, d.cfg.NodeName); err != nil {
			return fmt.Errorf("publish this node's share on member %q: %w", m.Name, err)
		}
	}
	// 1. Slots on every other member first: from here on their changes are
	// kept for this node.
	starts := map[string]pglogrepl.LSN{}
	for _, m := range others {
		lsn, err := recreateSlot(ctx, d.peerDSN(m), slot)
		if err != nil {
			return fmt.Errorf("create this node's slot on member %q: %w", m.Name, err)
		}
		starts[m.Name] = lsn
	}
	// 2. The source must have applied those members' changes up to there,
	// so the copy holds everything before the slots' start.
	for _, m := range others {
		d.phase(fmt.Sprintf("waiting for %s to apply %s's changes up to %s", source.Name, m.Name, starts[m.Name]))
		if err := waitApplied(ctx, d.members.Client(source.API, ""), m.Name, starts[m.Name], 10*time.Minute); err != nil {
			return err
		}
	}
	// 3. A slot on the source with an exported snapshot: the copy is taken
	// under it, and streaming the source starts exactly after it.
	d.phase("exporting a snapshot on " + source.Name)
	repl, err := replicator.ConnectReplication(ctx, d.peerDSN(source), "pgmesh join "+d.cfg.NodeName)
	if err != nil {
		return fmt.Errorf("connect to source %q for replication: %w", source.Name, err)
	}
	defer repl.Close(context.Background())
	if err := dropSlotAt(ctx, d.peerDSN(source), slot); err != nil {
		return fmt.Errorf("drop old slot on source %q: %w", source.Name, err)
	}
	snapshot, progress, err := d.sourceSnapshot(ctx, repl, source, slot, req.Token)
	if err != nil {
		return err
	}
	starts[source.Name] = snapshot.start
	// Each other member's stream starts where the snapshot has got with
	// that member's changes, or at its new slot, whichever is later.
	for name, start := range starts {
		if p, ok := progress[name]; ok && name != source.Name && p > start {
			starts[name] = p
		}
	}

	if err := d.copyFrom(ctx, source, snapshot, starts); err != nil {
		return err
	}
	repl.Close(ctx) // the snapshot is no longer needed

	// 4. Publications and slots here for every member, after the copy:
	// members must not receive the copied rows as new changes.
	d.phase("creating slots for the members")
	if err := d.withConn(ctx, func(conn *pgx.Conn) error {
		return repset.Sync(ctx, conn, g.Sets(), d.receivers(g))
	}); err != nil {
		return err
	}
	for _, m := range append(others, source) {
		if _, err := recreateSlot(ctx, d.cfg.DSN, origin.SlotName(m.Name)); err != nil {
			return fmt.Errorf("create slot for member %q here: %w", m.Name, err)
		}
	}
	if err := d.setReadOnly(ctx, false); err != nil {
		return err
	}
	d.phase("activating")
	done, err := d.members.Client(req.Via, req.Token).SetState(ctx, api.StateRequest{Name: d.cfg.NodeName, State: membership.Active})
	if err != nil {
		return fmt.Errorf("activate through %s: %w", req.Via, err)
	}
	d.log.Info("joined node group", "group", done.Group, "node_id", done.Node.ID)
	return nil
}

// publishOn creates or updates receiver's publication on the Postgres at dsn.
func publishOn(ctx context.Context, dsn string, g *membership.Group, receiver string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	return repset.Publish(ctx, conn, g.Sets(), receiver)
}

// setReadOnly makes application transactions in this database read-only
// (new sessions), or lifts it. pgmesh's own sessions override it.
func (d *Daemon) setReadOnly(ctx context.Context, on bool) error {
	var db string
	if err := d.db.QueryRow(ctx, `SELECT current_database()`).Scan(&db); err != nil {
		return err
	}
	sql := "ALTER DATABASE " + pgx.Identifier{db}.Sanitize() + " RESET default_transaction_read_only"
	if on {
		sql = "ALTER DATABASE " + pgx.Identifier{db}.Sanitize() + " SET default_transaction_read_only = on"
	}
	if _, err := d.db.Exec(ctx, sql); err != nil {
		return fmt.Errorf("set the database read-only while joining: %w", err)
	}
	return nil
}

// waitApplied waits until the daemon c calls has applied peer's changes up
// to lsn.
func waitApplied(ctx context.Context, c *api.Client, peer string, lsn pglogrepl.LSN, timeout time.Duration) error {
	notYet := fmt.Errorf("%s has not applied %s's changes up to %s within %s (is its stream from %s connected? see 'pgmesh status' there)", c.Addr(), peer, lsn, timeout, peer)
	return poll.Until(ctx, 200*time.Millisecond, timeout, func() error {
		rep, err := c.Status(ctx)
		if err != nil {
			return notYet
		}
		for _, p := range rep.Peers {
			if got, perr := pglogrepl.ParseLSN(p.AppliedLSN); p.Peer == peer && perr == nil && got >= lsn {
				return nil
			}
		}
		return notYet
	})
}

type exported struct {
	name  string        // the snapshot, for SET TRANSACTION SNAPSHOT
	start pglogrepl.LSN // where streaming the source starts
	at    time.Time     // when it was taken, by the source's clock
}

// sourceSnapshot creates this node's slot on the source with an exported
// snapshot while the source's streams are paused, and returns the snapshot
// and how far the source had applied each other member's changes then.
func (d *Daemon) sourceSnapshot(ctx context.Context, repl *pgconn.PgConn, source *membership.Node, slot, token string) (exported, map[string]pglogrepl.LSN, error) {
	var snap exported
	conn, err := pgx.Connect(ctx, d.peerDSN(source))
	if err != nil {
		return snap, nil, fmt.Errorf("connect to source %q: %w", source.Name, err)
	}
	defer conn.Close(context.Background())
	resume, err := pauseApply(ctx, d.members.Client(source.API, token))
	if err != nil {
		return snap, nil, fmt.Errorf("pause applying on source %q for the snapshot: %w", source.Name, err)
	}
	created, err := pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: "EXPORT_SNAPSHOT"})
	var progress map[string]pglogrepl.LSN
	if err == nil {
		progress, err = originProgress(ctx, conn)
	}
	if err == nil {
		err = conn.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&snap.at)
	}
	held, rerr := resume(context.Background())
	if err != nil {
		return snap, nil, fmt.Errorf("create slot with snapshot on source %q: %w", source.Name, err)
	}
	if rerr != nil || !held {
		return snap, nil, fmt.Errorf("source %q resumed applying before the snapshot was taken (it took over %s, e.g. waiting for a long transaction there to end): run the join again", source.Name, pauseLease)
	}
	snap.name = created.SnapshotName
	snap.start, err = pglogrepl.ParseLSN(created.ConsistentPoint)
	return snap, progress, err
}

// originProgress reads how far a node has applied each member's changes.
func originProgress(ctx context.Context, conn *pgx.Conn) (map[string]pglogrepl.LSN, error) {
	rows, err := conn.Query(ctx, `SELECT external_id, coalesce(remote_lsn, '0/0')::text FROM pg_catalog.pg_replication_origin_status`)
	if err != nil {
		return nil, fmt.Errorf("read the source's replication progress: %w", err)
	}
	defer rows.Close()
	out := map[string]pglogrepl.LSN{}
	for rows.Next() {
		var name, lsn string
		if err := rows.Scan(&name, &lsn); err != nil {
			return nil, err
		}
		if node, ok := origin.NodeOf(name); ok {
			if l, err := pglogrepl.ParseLSN(lsn); err == nil {
				out[node] = l
			}
		}
	}
	return out, rows.Err()
}

func recreateSlot(ctx context.Context, dsn, slot string) (pglogrepl.LSN, error) {
	if err := dropSlotAt(ctx, dsn, slot); err != nil {
		return 0, err
	}
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var lsn pglogrepl.LSN
	err = conn.QueryRow(ctx, `SELECT lsn FROM pg_create_logical_replication_slot($1, 'pgoutput')`, slot).Scan(&lsn)
	return lsn, err
}

func dropSlotAt(ctx context.Context, dsn, slot string) error {
	conn, err := pgx.Connect(ctx, dsn)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return dropSlot(ctx, conn, slot)
}

// sourceTable is a replicated table on the source, with its columns.
type sourceTable struct {
	name  string // format('%I.%I')
	cols  []string
	where string // the row filter of this node's share; empty: every row
	bytes int64
}

// copyFrom copies schema (when this database has none) and every
// replicated table from the source under its exported snapshot, in one
// local transaction that also records where each member's stream starts.
func (d *Daemon) copyFrom(ctx context.Context, source *membership.Node, snap exported, starts map[string]pglogrepl.LSN) error {
	snapshot := snap.name
	src, err := pgsession.Connect(ctx, d.peerDSN(source), "pgmesh join copy")
	if err != nil {
		return fmt.Errorf("connect to source %q: %w", source.Name, err)
	}
	defer src.Close(context.Background())
	if _, err := src.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		return err
	}
	if _, err := src.Exec(ctx, "SET TRANSACTION SNAPSHOT "+pgquote.Literal(snapshot)); err != nil {
		return fmt.Errorf("use the source's snapshot: %w", err)
	}
	tables, err := sourceTables(ctx, src, d.cfg.NodeName)
	if err != nil {
		return err
	}
	dst, err := pgsession.Connect(ctx, d.cfg.DSN, "pgmesh join copy", pgsession.Applier)
	if err != nil {
		return fmt.Errorf("connect to local Postgres: %w", err)
	}
	defer dst.Close(context.Background())

	d.phase("copying schema")
	if err := d.copySchema(ctx, src, dst, source, snapshot, tables); err != nil {
		return err
	}
	var total int64
	for _, t := range tables {
		total += t.bytes
	}
	d.join.update(func(s *api.JoinStatus) { s.TablesTotal, s.BytesTotal = len(tables), total })
	d.phase("copying data")
	// The copied rows carry the source's origin and the snapshot's time, as
	// if the source had written them then: its later changes to them are
	// ordinary sequential changes here, not conflicts (which they would
	// lose against the copy's own, later commit time).
	for name := range starts {
		if _, err := dst.Exec(ctx, `SELECT pg_replication_origin_create($1)
			WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)`, origin.Name(name)); err != nil {
			return fmt.Errorf("create the replication origin of %s: %w", name, err)
		}
	}
	if _, err := dst.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, origin.Name(source.Name)); err != nil {
		return fmt.Errorf("copy as %s's changes: %w", source.Name, err)
	}
	tx, err := dst.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	if len(tables) > 0 {
		var names []string
		for _, t := range tables {
			names = append(names, t.name)
		}
		if _, err := tx.Exec(ctx, "TRUNCATE "+strings.Join(names, ", ")+" CASCADE"); err != nil {
			return fmt.Errorf("empty the local tables: %w", err)
		}
	}
	for _, t := range tables {
		n, err := d.copyTable(ctx, src.PgConn(), dst.PgConn(), t)
		if err != nil {
			return fmt.Errorf("copy table %s: %w", t.name, err)
		}
		d.join.update(func(s *api.JoinStatus) { s.TablesDone++; s.Rows += n })
		d.saveJoinStatus(ctx)
	}
	if err := copySequences(ctx, src, tx); err != nil {
		return err
	}
	// Streaming starts where the copy ends, atomically with the data.
	for name, lsn := range starts {
		if name == source.Name {
			// The source's origin is this session's: its commit sets it.
			_, err = tx.Exec(ctx, `SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2)`, lsn.String(), snap.at)
		} else {
			_, err = tx.Exec(ctx, `SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)`, origin.Name(name), lsn.String())
		}
		if err != nil {
			return fmt.Errorf("set the start of %s's stream: %w", name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit the copy: %w", err)
	}
	_, _ = src.Exec(ctx, "COMMIT")
	return nil
}

// sourceTables lists what the source publishes to receiver (tables, their
// columns and row filters) as of the copy's snapshot: exactly what the
// stream from the source then continues.
func sourceTables(ctx context.Context, src *pgx.Conn, receiver string) ([]sourceTable, error) {
	rows, err := src.Query(ctx, `SELECT format('%I.%I', pt.schemaname, pt.tablename),
		array(SELECT quote_ident(a.attname) FROM pg_attribute a
		      WHERE a.attrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass
		        AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
		        AND a.attname = ANY (pt.attnames) ORDER BY a.attnum),
		coalesce(pt.rowfilter, ''),
		pg_table_size(format('%I.%I', pt.schemaname, pt.tablename)::regclass)
		FROM pg_publication_tables pt WHERE pt.pubname = $1 ORDER BY 1`, origin.PublicationName(receiver))
	if err != nil {
		return nil, fmt.Errorf("list the source's tables: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (sourceTable, error) {
		var t sourceTable
		return t, r.Scan(&t.name, &t.cols, &t.where, &t.bytes)
	})
}

// copyTable streams one table from the source's COPY into the local COPY.
func (d *Daemon) copyTable(ctx context.Context, src, dst *pgconn.PgConn, t sourceTable) (int64, error) {
	cols := strings.Join(t.cols, ", ")
	pr, pw := io.Pipe()
	outErr := make(chan error, 1)
	go func() {
		_, err := src.CopyTo(ctx, &countingWriter{w: pw, add: func(n int) {
			d.join.update(func(s *api.JoinStatus) { s.Bytes += int64(n) })
		}}, copyOut(t))
		pw.CloseWithError(err)
		outErr <- err
	}()
	tag, err := dst.CopyFrom(ctx, pr, fmt.Sprintf("COPY %s (%s) FROM STDIN", t.name, cols))
	pr.CloseWithError(err)
	if oerr := <-outErr; oerr != nil && err == nil {
		err = oerr
	}
	return tag.RowsAffected(), err
}

// copyOut is the source's COPY of this node's share of t.
func copyOut(t sourceTable) string {
	cols := strings.Join(t.cols, ", ")
	if t.where == "" {
		return fmt.Sprintf("COPY %s (%s) TO STDOUT", t.name, cols)
	}
	return fmt.Sprintf("COPY (SELECT %s FROM %s WHERE %s) TO STDOUT", cols, t.name, t.where)
}

type countingWriter struct {
	w   io.Writer
	add func(int)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.add(n)
	return n, err
}

// copySequences sets every local sequence past the source's and past the
// copied values of the column it belongs to, so values handed out here do
// not repeat copied ones.
func copySequences(ctx context.Context, src *pgx.Conn, tx pgx.Tx) error {
	rows, err := src.Query(ctx, `SELECT format('%I.%I', schemaname, sequencename), last_value
		FROM pg_sequences WHERE schemaname <> 'pgmesh' AND last_value IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("read the source's sequences: %w", err)
	}
	last := map[string]int64{}
	for rows.Next() {
		var n string
		var v int64
		if err := rows.Scan(&n, &v); err != nil {
			return err
		}
		last[n] = v
	}
	if err := rows.Err(); err != nil {
		return err
	}
	rows, err = tx.Query(ctx, `SELECT format('%I.%I', sn.nspname, s.relname),
		(SELECT format('%I.%I', tn.nspname, t.relname) || ' ' || quote_ident(a.attname)
		 FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
		 JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
		 WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass
		   AND d.deptype IN ('a', 'i') LIMIT 1)
		FROM pg_class s JOIN pg_namespace sn ON sn.oid = s.relnamespace
		WHERE s.relkind = 'S' AND sn.nspname <> 'pgmesh'`)
	if err != nil {
		return fmt.Errorf("list local sequences: %w", err)
	}
	type seq struct {
		name  string
		owner *string // "table column"
	}
	seqs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (seq, error) {
		var s seq
		return s, r.Scan(&s.name, &s.owner)
	})
	if err != nil {
		return err
	}
	for _, s := range seqs {
		maxExpr := "NULL::bigint"
		if s.owner != nil {
			table, col, _ := strings.Cut(*s.owner, " ")
			maxExpr = fmt.Sprintf("(SELECT max(%s)::bigint FROM %s)", col, table)
		}
		var src *int64
		if v, ok := last[s.name]; ok {
			src = &v
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf(`SELECT setval($1::regclass, v, true) FROM (SELECT greatest($2::bigint, %s) AS v) x WHERE v IS NOT NULL`, maxExpr), s.name, src); err != nil {
			return fmt.Errorf("set sequence %s: %w", s.name, err)
		}
	}
	return nil
}

// copySchema creates the source's schema here when this database has no
// user tables, and otherwise checks that every replicated table exists here
// with the same columns and key.
func (d *Daemon) copySchema(ctx context.Context, src, dst *pgx.Conn, source *membership.Node, snapshot string, tables []sourceTable) error {
	var localTables int
	if err := dst.QueryRow(ctx, `SELECT count(*) FROM pgmesh.user_tables`).Scan(&localTables); err != nil {
		return err
	}
	if localTables == 0 {
		return d.restoreSchema(ctx, dst, source, snapshot)
	}
	want, err := tableDefinitions(ctx, src)
	if err != nil {
		return err
	}
	have, err := tableDefinitions(ctx, dst)
	if err != nil {
		return err
	}
	var errs []error
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !slices.ContainsFunc(tables, func(t sourceTable) bool { return t.name == n }) {
			continue // not sent to this node: its own business
		}
		h, ok := have[n]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("table %s exists on %q but not here: create it as on %q, or join with an empty database and pgmesh copies the schema", n, source.Name, source.Name))
		case h != want[n]:
			errs = append(errs, fmt.Errorf("table %s differs from %q's (here: %s; there: %s): make the definitions match, or join with an empty database", n, source.Name, h, want[n]))
		}
	}
	return errors.Join(errs...)
}

// tableDefinitions describes each replicated table by its columns (name,
// type, not null) and primary key, order-independent.
func tableDefinitions(ctx context.Context, conn *pgx.Conn) (map[string]string, error) {
	rows, err := conn.Query(ctx, `SELECT u.relation,
		(SELECT string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
		        CASE WHEN a.attnotnull THEN ' not null' ELSE '' END), ', ' ORDER BY a.attname)
		 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
		|| coalesce((SELECT '; primary key (' || string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) || ')'
		 FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
		 WHERE i.indrelid = c.oid AND i.indisprimary), '')
		FROM pgmesh.user_tables u JOIN pg_class c ON c.oid = u.relid`)
	if err != nil {
		return nil, fmt.Errorf("read table definitions: %w", err)
	}
	out := map[string]string{}
	for rows.Next() {
		var n, def string
		if err := rows.Scan(&n, &def); err != nil {
			return nil, err
		}
		out[n] = def
	}
	return out, rows.Err()
}

// restoreSchema runs pg_dump --schema-only of the source under the exported
// snapshot and applies it here in one transaction.
func (d *Daemon) restoreSchema(ctx context.Context, dst *pgx.Conn, source *membership.Node, snapshot string) error {
	pgDump, err := findPgDump()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, pgDump, "--schema-only", "--snapshot="+snapshot, "--no-owner", "--no-privileges",
		"--no-publications", "--no-subscriptions", "--exclude-schema=pgmesh", "--dbname="+d.peerDSN(source))
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("pg_dump --schema-only of %q failed: %v: %s", source.Name, err, strings.TrimSpace(stderr.String()))
	}
	script := filterDump(string(out))
	if _, err := dst.Exec(ctx, "BEGIN;\n"+script+"\nCOMMIT;"); err != nil {
		_, _ = dst.Exec(ctx, "ROLLBACK")
		return fmt.Errorf("create the source's schema here: %w", err)
	}
	// The connection's settings may have been changed by the dump's SETs.
	_, err = dst.Exec(ctx, "RESET ALL; SET session_replication_role = replica; SET default_transaction_read_only = off")
	return err
}

// filterDump drops from a pg_dump script what this node has or makes
// itself: pgmesh's event triggers (database-wide, so pg_dump includes them
// despite --exclude-schema) and tombstone triggers (installed by this node's
// daemon), found by pg_dump's "-- Name: ...; Type: ..." object headers; and
// psql meta-commands (recent pg_dump writes \restrict), which mean nothing
// to the server.
func filterDump(dump string) string {
	var keep []string
	skip := false
	for _, line := range strings.Split(dump, "\n") {
		if rest, ok := strings.CutPrefix(line, "-- Name: "); ok {
			name, typ, _ := strings.Cut(rest, "; Type: ")
			typ, _, _ = strings.Cut(typ, ";")
			skip = typ == "EVENT TRIGGER" && strings.HasPrefix(name, "pgmesh_") ||
				typ == "TRIGGER" && strings.HasSuffix(name, " pgmesh_tombstone")
		}
		if strings.HasPrefix(line, "\\") || skip && !strings.HasPrefix(line, "--") {
			continue
		}
		keep = append(keep, line)
	}
	return strings.Join(keep, "\n")
}

// findPgDump looks for pg_dump on PATH, then in the newest PostgreSQL
// installation under /usr/lib/postgresql.
func findPgDump() (string, error) {
	if p, err := exec.LookPath("pg_dump"); err == nil {
		return p, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_dump")
	sort.Strings(dirs)
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(dirs[i]); err == nil {
			return dirs[i], nil
		}
	}
	return "", errors.New("pg_dump is needed to copy the schema but was not found: install the PostgreSQL client (apt-get install postgresql-client-15), or create the schema here before joining")
}
