package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/join"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
	"github.com/pgmesh/pgmesh/repset"
)

// joining is this node's join of a group, the protocol between this node
// and the members (ARCHITECTURE.md, "Joining"): it admits one join at a
// time (status), registers through a member at once, then copies and
// activates in the background, for the daemon's lifetime (run). It talks
// to the members through member and to this node through joinLocal, so
// that its decisions are tested without HTTP (join_test.go).
type joining struct {
	name     string // this node
	localDSN string
	store    interface {
		Group() (*membership.Group, <-chan struct{})
	}
	members func(addr, token string) member
	local   joinLocal
	status  *joiner
	// queue hands a join start accepted to run; it holds one, and status
	// admits one at a time, so start never blocks on it.
	queue chan api.JoinRequest
	log   *slog.Logger
}

// member is another member's daemon as a join calls it (*api.Client over
// HTTP).
type member interface {
	statusSource
	pausable
	Register(ctx context.Context, req api.RegisterRequest) (api.JoinResponse, error)
	SetState(ctx context.Context, req api.StateRequest) (api.JoinResponse, error)
}

// joinLocal is what a join does to this node's own database and daemon
// (joinHere, over the daemon's parts).
type joinLocal interface {
	self() membership.Node
	checkEmpty(ctx context.Context) error
	adoptResolution(ctx context.Context, nodes map[string]*membership.Node) error
	saveToken(token string) error
	waitForSelf(ctx context.Context) (*membership.Group, error)
	setReadOnly(ctx context.Context, on bool) error
	forgetAll(ctx context.Context) error
	peerDSN(n *membership.Node) string
	peerAPI(n *membership.Node) string
	publishHere(ctx context.Context, g *membership.Group) error
	syncNodeTable(ctx context.Context, g *membership.Group) error
	applySetting(ctx context.Context, s api.Setting) error
}

// joinHere is joinLocal over the daemon's parts.
type joinHere struct {
	d          *Daemon
	reconciler *reconciler
	cluster    *cluster
	resolution *resolution
	settings   *settings
}

func (h joinHere) self() membership.Node                          { return h.d.self() }
func (h joinHere) checkEmpty(ctx context.Context) error           { return h.d.checkEmpty(ctx) }
func (h joinHere) setReadOnly(ctx context.Context, on bool) error { return h.d.setReadOnly(ctx, on) }
func (h joinHere) waitForSelf(ctx context.Context) (*membership.Group, error) {
	return h.d.waitForSelf(ctx)
}
func (h joinHere) adoptResolution(ctx context.Context, nodes map[string]*membership.Node) error {
	return h.resolution.adopt(ctx, nodes)
}
func (h joinHere) saveToken(token string) error        { return h.cluster.saveToken(token) }
func (h joinHere) peerDSN(n *membership.Node) string   { return h.cluster.peerDSN(n) }
func (h joinHere) peerAPI(n *membership.Node) string   { return h.cluster.peerAPI(n) }
func (h joinHere) forgetAll(ctx context.Context) error { return h.reconciler.forgetAll(ctx) }
func (h joinHere) publishHere(ctx context.Context, g *membership.Group) error {
	return h.reconciler.publishHere(ctx, g)
}
func (h joinHere) syncNodeTable(ctx context.Context, g *membership.Group) error {
	return h.reconciler.syncNodeTable(ctx, g)
}
func (h joinHere) applySetting(ctx context.Context, s api.Setting) error {
	return h.settings.apply(ctx, s)
}

// start registers this node with the group as joining and hands the
// rest of the join to run. A bad token or a non-empty database is
// reported at once.
func (j *joining) start(ctx context.Context, req api.JoinRequest) (*api.JoinResponse, error) {
	if req.Via == "" || req.Token == "" {
		return nil, errors.New("join needs --via HOST:PORT (a member's API address) and --token (printed by 'pgmesh group create')")
	}
	if g, _ := j.store.Group(); g != nil {
		if me := g.Nodes[j.name]; me != nil && me.State != membership.Joining {
			return nil, &api.Error{Status: http.StatusConflict, Message: fmt.Sprintf("node %q is already %s in node group %q", j.name, me.State, g.Name)}
		}
	}
	if !j.status.start(req.Via) {
		return nil, &api.Error{Status: http.StatusConflict, Message: "a join is already running on this node: follow it with 'pgmesh status'"}
	}

	reg, err := j.register(ctx, req)
	if err != nil {
		j.status.finish(err)
		return nil, err
	}
	j.queue <- req // never blocks: the buffer holds one, and join.start admits one
	return reg, nil
}

// run runs the joins the API accepts for the daemon's lifetime: a
// join outlives the request that started it.
func (j *joining) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case req := <-j.queue:
			j.status.finish(j.copyAndActivate(ctx, req))
		}
	}
}

// register checks this database and enters the group as joining.
func (j *joining) register(ctx context.Context, req api.JoinRequest) (*api.JoinResponse, error) {
	g, _ := j.store.Group()
	retry := g != nil && g.Nodes[j.name] != nil
	if !retry {
		// On a retry the tables hold a partial copy, which is replaced.
		if err := j.local.checkEmpty(ctx); err != nil {
			return nil, err
		}
	}
	// Without luw_resolution in the config, this node takes the group's.
	if !retry {
		st, err := j.members(req.Via, "").Status(ctx)
		if err != nil {
			return nil, fmt.Errorf("ask %s about the group: %w", req.Via, err)
		}
		nodes := map[string]*membership.Node{}
		for _, n := range st.Nodes {
			nodes[n.Name] = n.Member()
		}
		if err := j.local.adoptResolution(ctx, nodes); err != nil {
			return nil, err
		}
	}
	reg, err := j.members(req.Via, req.Token).Register(ctx, api.RegisterRequest{Node: *api.NodeOf(new(j.local.self()))})
	if err != nil {
		return nil, fmt.Errorf("join through %s: %w", req.Via, err)
	}
	if err := j.local.saveToken(req.Token); err != nil {
		return nil, fmt.Errorf("save join token: %w", err)
	}
	return &reg, nil
}

// copyAndActivate copies schema and data from the source member and makes
// this node active, so that every change of every member reaches it exactly
// once (ARCHITECTURE.md, invariants: join loses nothing).
func (j *joining) copyAndActivate(ctx context.Context, req api.JoinRequest) error {
	g, err := j.local.waitForSelf(ctx)
	if err != nil {
		return err
	}
	src, err := j.members(req.Via, "").Status(ctx)
	if err != nil {
		return fmt.Errorf("ask %s which node it is: %w", req.Via, err)
	}
	source, others, err := planJoin(g, j.name, src.Node, req.Via)
	if err != nil {
		return err
	}

	// Applications may not write here until the node is active: their
	// changes would not reach the group.
	j.status.phase(ctx, "preparing")
	if err := j.local.setReadOnly(ctx, true); err != nil {
		return err
	}
	if err := j.local.forgetAll(ctx); err != nil { // leftovers of an earlier attempt
		return err
	}
	slot := origin.SlotName(j.name)
	starts, err := j.reserveOnMembers(ctx, g, source, others)
	if err != nil {
		return err
	}
	// 3. A slot on the source with an exported snapshot: the copy is taken
	// under it, and streaming the source starts exactly after it.
	j.status.phase(ctx, "exporting a snapshot on "+source.Name)
	repl, err := replicator.ConnectReplication(ctx, j.local.peerDSN(source), "pgmesh join "+j.name)
	if err != nil {
		return fmt.Errorf("connect to source %q for replication: %w", source.Name, err)
	}
	defer repl.Close(context.Background())
	if err := dropSlotAt(ctx, j.local.peerDSN(source), slot); err != nil {
		return fmt.Errorf("drop old slot on source %q: %w", source.Name, err)
	}
	snapshot, progress, err := j.sourceSnapshot(ctx, repl, source, slot, req.Token)
	if err != nil {
		return err
	}
	starts = streamStarts(starts, source.Name, snapshot.Start, progress)

	c := join.Copy{Source: source.Name, SourceDSN: j.local.peerDSN(source), LocalDSN: j.localDSN, Receiver: j.name,
		Snapshot: snapshot, Starts: starts, Report: j.status.progress(ctx)}
	if err := c.Run(ctx); err != nil {
		return err
	}
	repl.Close(ctx) // the snapshot is no longer needed
	if err := j.adoptSettings(ctx, j.local.peerDSN(source), g); err != nil {
		return err
	}
	return j.activate(ctx, g, req, append(others, source))
}

// reserveOnMembers makes this node's publication and slot on every member
// (steps 0 to 2 of the join), and returns the other members' slots' start
// positions, which the source has applied once it returns.
func (j *joining) reserveOnMembers(ctx context.Context, g *membership.Group, source *membership.Node, others []*membership.Node) (map[string]pglogrepl.LSN, error) {
	// 0. This node's publication on every member, before the slots: a
	// slot must never meet a change from before its publication existed.
	for _, m := range append(others, source) {
		if err := publishOn(ctx, j.local.peerDSN(m), g, j.name); err != nil {
			return nil, fmt.Errorf("publish this node's share on member %q: %w", m.Name, err)
		}
	}
	// 1. Slots on every other member first: from here on their changes are
	// kept for this node.
	starts := map[string]pglogrepl.LSN{}
	for _, m := range others {
		lsn, err := recreateSlot(ctx, j.local.peerDSN(m), origin.SlotName(j.name))
		if err != nil {
			return nil, fmt.Errorf("create this node's slot on member %q: %w", m.Name, err)
		}
		starts[m.Name] = lsn
	}
	// 2. The source must have applied those members' changes up to there,
	// so the copy holds everything before the slots' start.
	for _, m := range others {
		j.status.phase(ctx, fmt.Sprintf("waiting for %s to apply %s's changes up to %s", source.Name, m.Name, starts[m.Name]))
		if err := waitApplied(ctx, j.members(j.local.peerAPI(source), ""), m.Name, starts[m.Name], 10*time.Minute); err != nil {
			return nil, err
		}
	}
	return starts, nil
}

// activate makes the publications here and a slot for every member (step
// 4, after the copy: members must not receive the copied rows as new
// changes), opens the database to applications and goes active.
func (j *joining) activate(ctx context.Context, g *membership.Group, req api.JoinRequest, members []*membership.Node) error {
	j.status.phase(ctx, "creating slots for the members")
	if err := j.local.publishHere(ctx, g); err != nil {
		return err
	}
	for _, m := range members {
		if _, err := recreateSlot(ctx, j.localDSN, origin.SlotName(m.Name)); err != nil {
			return fmt.Errorf("create slot for member %q here: %w", m.Name, err)
		}
	}
	if err := j.local.setReadOnly(ctx, false); err != nil {
		return err
	}
	j.status.phase(ctx, "activating")
	done, err := j.members(req.Via, req.Token).SetState(ctx, api.StateRequest{Name: j.name, State: membership.Active})
	if err != nil {
		return fmt.Errorf("activate through %s: %w", req.Via, err)
	}
	j.log.Info("joined node group", "group", done.Group, "node_id", done.Node.ID)
	return nil
}

// planJoin names the member a join copies from (the one at the --via
// address, which must be active) and the other active members, whose
// slots for the new node are made first.
func planJoin(g *membership.Group, self, sourceName, via string) (source *membership.Node, others []*membership.Node, err error) {
	source = g.Nodes[sourceName]
	if source == nil || source.State != membership.Active {
		return nil, nil, fmt.Errorf("%s is node %q, which is not an active member: join through an active member", via, sourceName)
	}
	for _, n := range g.Sorted() {
		if n.State == membership.Active && n.Name != source.Name && n.Name != self {
			others = append(others, n)
		}
	}
	return source, others, nil
}

// streamStarts is where each member's stream to the new node starts: the
// source's at its snapshot; each other member's where the snapshot has got
// with that member's changes (progress), or at its new slot (slots),
// whichever is later, so that nothing is applied twice or skipped.
func streamStarts(slots map[string]pglogrepl.LSN, source string, snapshot pglogrepl.LSN, progress map[string]pglogrepl.LSN) map[string]pglogrepl.LSN {
	starts := map[string]pglogrepl.LSN{source: snapshot}
	for name, start := range slots {
		if name != source {
			starts[name] = max(start, progress[name])
		}
	}
	return starts
}

// adoptSettings makes here the per-table settings the group made before
// this node joined, as the source holds them: the copy brings the tables
// but not the pgmesh schema's rows, and a node without them would diverge
// (a delta column applied as a plain value), let through writes its home
// column forbids, or go on with the source's sequence values.
func (j *joining) adoptSettings(ctx context.Context, sourceDSN string, g *membership.Group) error {
	conn, err := pgsession.Connect(ctx, sourceDSN, "pgmesh join")
	if err != nil {
		return err
	}
	settings, err := groupSettings(ctx, conn)
	conn.Close(context.Background())
	if err != nil {
		return fmt.Errorf("read the source's delta columns, home columns and global sequences: %w", err)
	}
	if len(settings) == 0 {
		return nil
	}
	j.status.phase(ctx, "adopting the group's settings")
	// Timeshard values carry the local node id, read from pgmesh.node.
	if err := j.local.syncNodeTable(ctx, g); err != nil {
		return err
	}
	for _, s := range settings {
		if err := j.local.applySetting(ctx, s); err != nil {
			return fmt.Errorf("adopt %s as on the source: %w", s, err)
		}
	}
	return nil
}

// groupSettings reads the settings a member holds, in the form
// `pgmesh delta-column`, `home-column`, `on-apply-error` and `sequences convert`
// send them.
func groupSettings(ctx context.Context, conn *pgx.Conn) ([]api.Setting, error) {
	rows, err := conn.Query(ctx, `
		SELECT 'delta', relation, column_name, 0 FROM pgmesh.delta_column
		UNION ALL
		SELECT 'home', format('%I.%I', n.nspname, c.relname),
		       convert_from(substring(t.tgargs FOR position('\x00'::bytea IN t.tgargs) - 1), 'UTF8'), 0
		FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE t.tgname = 'pgmesh_home'
		UNION ALL
		SELECT kind, seq, '', coalesce(chunk_size, 0) FROM pgmesh.global_sequence
		UNION ALL
		SELECT 'apply_error', relation, policy, 0 FROM pgmesh.apply_error_policy
		ORDER BY 1, 2, 3`)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (api.Setting, error) {
		var kind, name, column string
		var size int64
		if err := r.Scan(&kind, &name, &column, &size); err != nil {
			return api.Setting{}, err
		}
		switch kind {
		case "delta":
			return api.Setting{DeltaColumn: &api.ColumnSetting{Table: name, Column: column, Enabled: true}}, nil
		case "home":
			return api.Setting{HomeColumn: &api.ColumnSetting{Table: name, Column: column, Enabled: true}}, nil
		case "galloc":
			return api.Setting{Galloc: &api.SequenceSetting{Sequence: name, ChunkSize: size}}, nil
		case "apply_error":
			return api.Setting{ApplyError: &api.ApplyErrorSetting{Table: name, Policy: column}}, nil
		default:
			return api.Setting{Timeshard: &api.SequenceSetting{Sequence: name}}, nil
		}
	})
}

// publishOn creates or updates receiver's publication on the Postgres at dsn.
func publishOn(ctx context.Context, dsn string, g *membership.Group, receiver string) error {
	conn, err := pgsession.Connect(ctx, dsn, "pgmesh join")
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

// statusSource is another member's daemon, as waitApplied asks it
// (*api.Client over HTTP).
type statusSource interface {
	Addr() string
	Status(ctx context.Context) (api.StatusReport, error)
}

// waitApplied waits until the daemon c calls has applied peer's changes up
// to lsn.
func waitApplied(ctx context.Context, c statusSource, peer string, lsn pglogrepl.LSN, timeout time.Duration) error {
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

// sourceSnapshot creates this node's slot on the source with an exported
// snapshot while the source's streams are paused, and returns the snapshot
// and how far the source had applied each other member's changes then.
func (j *joining) sourceSnapshot(ctx context.Context, repl *pgconn.PgConn, source *membership.Node, slot, token string) (join.Snapshot, map[string]pglogrepl.LSN, error) {
	var snap join.Snapshot
	conn, err := pgsession.Connect(ctx, j.local.peerDSN(source), "pgmesh join")
	if err != nil {
		return snap, nil, fmt.Errorf("connect to source %q: %w", source.Name, err)
	}
	defer conn.Close(context.Background())
	resume, err := pauseApply(ctx, j.members(j.local.peerAPI(source), token))
	if err != nil {
		return snap, nil, fmt.Errorf("pause applying on source %q for the snapshot: %w", source.Name, err)
	}
	created, err := replicator.CreateSnapshotSlot(ctx, repl, slot)
	var progress map[string]pglogrepl.LSN
	if err == nil {
		progress, err = originProgress(ctx, conn)
	}
	if err == nil {
		err = conn.QueryRow(ctx, `SELECT clock_timestamp()`).Scan(&snap.At)
	}
	held, rerr := resume(context.Background())
	if err != nil {
		return snap, nil, fmt.Errorf("create slot with snapshot on source %q: %w", source.Name, err)
	}
	if rerr != nil || !held {
		return snap, nil, fmt.Errorf("source %q resumed applying before the snapshot was taken (it took over %s, e.g. waiting for a long transaction there to end): run the join again", source.Name, pauseLease)
	}
	snap.Name = created.SnapshotName
	snap.Start, err = pglogrepl.ParseLSN(created.ConsistentPoint)
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
	conn, err := pgsession.Connect(ctx, dsn, "pgmesh join", pgsession.Writer)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	return replicator.CreateSlot(ctx, conn, slot)
}

func dropSlotAt(ctx context.Context, dsn, slot string) error {
	conn, err := pgsession.Connect(ctx, dsn, "pgmesh join", pgsession.Writer)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return dropSlot(ctx, conn, slot)
}
