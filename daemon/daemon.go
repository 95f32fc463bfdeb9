package daemon

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
	"github.com/pgmesh/pgmesh/repset"
	pgsql "github.com/pgmesh/pgmesh/sql"
)

// Daemon is one running pgmesh node.
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	db    *pgxpool.Pool
	store *membership.Store

	mu       sync.Mutex
	streams  map[string]*running
	problems []string // current problems found by checks, for status
	// localTables are the tables in no replication set, and published the
	// hash of the sets this node's publications last took (repset.Sets.Hash).
	localTables []string
	published   string
	// current is false while the group state here is older than the one
	// the publications follow (after a restart, until Raft catches up).
	current  bool
	lastSync string // group state last written to pgmesh.node
	ids      atomic.Pointer[map[string]int]
	// luwNanos is the luw_resolution in use (resolution.go).
	luwNanos atomic.Int64
	slots    []api.SlotStatus
	// seqProblems are the global-sequence problems found by maintainSequences.
	seqProblems []string
	join        joiner
	// bg holds work the API starts in the background (a join); Run waits
	// for it before closing the pool and the Raft store it uses.
	bg  sync.WaitGroup
	ctx context.Context // the daemon's lifetime, for background work
	// gate holds the streams while a joining node takes its snapshot here.
	gate   replicator.Gate
	pauses pauses
	// members is how this daemon calls other daemons (HTTPS with TLS on).
	members *api.Transport
	// sweepSoon asks housekeeping to look for overtaken rows soon
	// (replicator.RemoveOvertaken); one pending request covers many.
	sweepSoon chan struct{}
	// tendSoon wakes maintainSequences at once (a sequence was converted).
	tendSoon chan struct{}
}

// member is a client of another member's API, with the group's token.
func (d *Daemon) member(addr string) (*api.Client, error) {
	token, err := d.loadToken()
	if err != nil {
		return nil, err
	}
	return d.members.Client(addr, token), nil
}

// peerDSN is how this node reaches a peer's Postgres: its public_dsn, or
// the peer_dsns override for it.
func (d *Daemon) peerDSN(n *membership.Node) string {
	if o, ok := d.cfg.PeerDSNs[n.Name]; ok {
		return o
	}
	return n.DSN
}

// peerAPI is how this node reaches a peer's API: its advertise_api, or the
// peer_api_addrs override for it.
func (d *Daemon) peerAPI(n *membership.Node) string {
	if o, ok := d.cfg.PeerAPIAddrs[n.Name]; ok {
		return o
	}
	return n.API
}

// nodeID returns a node's id by name (0 if unknown), for tie-breaks.
func (d *Daemon) nodeID(name string) int {
	if m := d.ids.Load(); m != nil {
		return (*m)[name]
	}
	return 0
}

type running struct {
	stream *replicator.Stream
	dsn    string
	cancel context.CancelFunc
	done   chan struct{}
}

// reconcileEvery bounds how long a missed change or a repairable problem
// waits for the next reconcile pass.
const reconcileEvery = 5 * time.Second

// Run starts the daemon and blocks until ctx ends or a fatal error occurs.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.Normalize(); err != nil {
		return err
	}
	log = log.With("node", cfg.NodeName)
	d := &Daemon{cfg: cfg, log: log, streams: map[string]*running{}, ctx: ctx, sweepSoon: make(chan struct{}, 1),
		tendSoon: make(chan struct{}, 1)}

	poolCfg, err := pgxpool.ParseConfig(cfg.DSN)
	if err != nil {
		return fmt.Errorf("parse dsn: %s", redactErr(err))
	}
	poolCfg.MaxConns = 4
	poolCfg.ConnConfig.RuntimeParams["application_name"] = "pgmesh admin"
	// A joining node's database is read-only for applications, not for us.
	poolCfg.ConnConfig.RuntimeParams["default_transaction_read_only"] = "off"
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	conn, err := pgx.ConnectConfig(cctx, poolCfg.ConnConfig)
	cancel()
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres %s (%s): check dsn and that Postgres is running", dsn.Describe(cfg.DSN), redactErr(err))
	}
	err = preflight(ctx, conn)
	if err == nil {
		var from, to int
		if from, to, err = pgsql.Install(ctx, conn); err == nil && from != to {
			log.Info("installed pgmesh schema", "from_version", from, "to_version", to)
		}
	}
	if err == nil {
		err = afterInstall(ctx, conn, &d.cfg, log)
	}
	if err == nil {
		_, err = conn.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('capture_ddl', $1)
			ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, map[bool]string{true: "on", false: "off"}[d.cfg.CaptureDDL])
	}
	if err == nil {
		err = d.initResolution(ctx, conn)
	}
	conn.Close(ctx)
	if err != nil {
		return err
	}
	if d.db, err = pgxpool.NewWithConfig(ctx, poolCfg); err != nil {
		return fmt.Errorf("open pool to local Postgres: %w", err)
	}
	defer d.db.Close()

	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return fmt.Errorf("create data_dir %s: %w", cfg.DataDir, err)
	}
	tlsCfg, err := loadTLS(cfg)
	if err != nil {
		return err
	}
	mcfg := membership.Config{NodeName: cfg.NodeName, DataDir: cfg.DataDir,
		ListenRaft: cfg.ListenRaft, AdvertiseRaft: cfg.AdvertiseRaft, Timing: cfg.RaftTiming, PeerAddrs: cfg.PeerRaftAddrs}
	d.members = api.NewTransport(nil)
	if tlsCfg != nil {
		mcfg.TLSServer, mcfg.TLSClient = tlsCfg.raft, tlsCfg.client
		d.members = api.NewTransport(tlsCfg.client)
	}
	if d.store, err = membership.Open(mcfg); err != nil {
		return err
	}
	defer d.store.Close()

	ln, err := net.Listen("tcp", cfg.ListenAPI)
	if err != nil {
		return fmt.Errorf("listen for the API on %s: %w: choose a free address with listen_api", cfg.ListenAPI, err)
	}
	if tlsCfg != nil {
		ln = tls.NewListener(ln, tlsCfg.api)
	} else if host, _, _ := net.SplitHostPort(cfg.ListenAPI); !isLoopback(host) {
		log.Warn("the API listens beyond loopback without TLS; set tls_cert_file, tls_key_file and tls_ca_file, or restrict access to it with a firewall", "listen_api", cfg.ListenAPI)
	}
	srv := &http.Server{Handler: d.routes(), ReadHeaderTimeout: 10 * time.Second}
	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(ln) }()
	log.Info("pgmesh daemon started", "dsn", dsn.Describe(cfg.DSN), "api", cfg.ListenAPI, "raft", cfg.ListenRaft, "tls", tlsCfg != nil)

	hkCtx, stopHK := context.WithCancel(ctx)
	hkDone := make(chan struct{})
	go func() { defer close(hkDone); d.housekeeping(hkCtx) }()
	progressDone := make(chan struct{})
	go func() { defer close(progressDone); d.publishProgress(hkCtx) }()
	seqDone := make(chan struct{})
	go func() { defer close(seqDone); d.maintainSequences(hkCtx) }()

	err = d.loop(ctx, serveErr)
	stopHK()
	<-hkDone
	<-progressDone
	<-seqDone

	shutCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutCtx) // no handler runs after it: bg gets no new work
	d.stopAll()
	d.bg.Wait()
	log.Info("pgmesh daemon stopped")
	return err
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loop reconciles on every membership change and periodically.
func (d *Daemon) loop(ctx context.Context, serveErr <-chan error) error {
	t := time.NewTicker(reconcileEvery)
	defer t.Stop()
	for {
		g, changed := d.store.Group()
		d.reconcile(ctx, g)
		select {
		case <-ctx.Done():
			return nil
		case err := <-serveErr:
			return fmt.Errorf("api server: %w", err)
		case <-changed:
		case <-t.C:
		}
	}
}

// reconcile makes the local streams, origins and slots match the group.
func (d *Daemon) reconcile(ctx context.Context, g *membership.Group) {
	var problems []string
	if err := d.checkTables(ctx, g, &problems); err != nil {
		problems = append(problems, err.Error())
	}
	if g == nil {
		d.setProblems(problems)
		return
	}
	if err := d.syncNodeTable(ctx, g); err != nil {
		d.log.Warn("update pgmesh.node", "err", err)
	}
	if err := d.checkSlots(ctx, g, &problems); err != nil {
		problems = append(problems, err.Error())
	}
	ids := make(map[string]int, len(g.Nodes))
	for _, n := range g.Nodes {
		ids[n.Name] = n.ID
	}
	d.ids.Store(&ids)
	me := g.Nodes[d.cfg.NodeName]
	want := map[string]*membership.Node{}
	if err := d.adoptResolution(ctx, g.Nodes); err != nil {
		problems = append(problems, err.Error())
	}
	res := d.luw().String()
	agreed := true
	if other := differingResolution(g, res, ""); other != nil && me != nil {
		agreed = false
		problems = append(problems, fmt.Sprintf("this node has luw_resolution %s, but %s uses %s: every node must round commit times the same way, so nothing is applied here until luw_resolution is %s in this node's config and pgmesh is restarted",
			res, describeMember(other, d.cfg.NodeName), other.LUWResolution, other.LUWResolution))
	}
	// Streams run only once this node is active: a joining node's slots
	// are still being made.
	if me != nil && me.State == membership.Active && agreed {
		for _, n := range g.Nodes {
			if n.Name != me.Name && n.State == membership.Active {
				want[n.Name] = n
			}
		}
	}
	// Streams are stopped outside d.mu: a stream may take a while to stop
	// (a joining node holds it), and status, health and metrics read d.mu.
	d.mu.Lock()
	var stopping []*running
	for name, r := range d.streams {
		if n, ok := want[name]; !ok || d.peerDSN(n) != r.dsn {
			stopping = append(stopping, d.detachLocked(name))
		}
	}
	d.mu.Unlock()
	waitStopped(stopping)
	d.mu.Lock()
	for name, n := range want {
		if _, ok := d.streams[name]; !ok {
			d.startLocked(ctx, n)
		}
	}
	d.mu.Unlock()

	// A node parted in an older state may have joined again since.
	d.mu.Lock()
	current := d.current
	d.mu.Unlock()
	for _, n := range g.Nodes {
		if current && n.State == membership.Parted && n.Name != d.cfg.NodeName {
			if err := d.forgetPeer(ctx, n.Name); err != nil {
				problems = append(problems, err.Error())
			}
		}
	}
	if current && me != nil && me.State == membership.Parted {
		if err := d.forgetAll(ctx); err != nil {
			problems = append(problems, err.Error())
		}
	}
	d.setProblems(problems)
}

// rule is the group's last-update-wins rule, as this node applies it (the
// reconcile refuses to stream while members disagree on luw_resolution).
func (d *Daemon) rule() conflict.Rule { return conflict.Rule{Resolution: d.luw()} }

// describeMember names a member in a sentence.
func describeMember(n *membership.Node, self string) string {
	if n.Name == self {
		return "this node's record in the group (from when it joined)"
	}
	return "member " + n.Name
}

func (d *Daemon) setProblems(p []string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, s := range p {
		if !slices.Contains(d.problems, s) {
			d.log.Error("problem", "err", s)
		}
	}
	d.problems = p
}

func (d *Daemon) startLocked(ctx context.Context, n *membership.Node) {
	s := replicator.New(replicator.Config{
		LocalNode:    d.cfg.NodeName,
		LocalDSN:     d.cfg.DSN,
		Peer:         replicator.Peer{Name: n.Name, ID: n.ID, DSN: d.peerDSN(n)},
		NodeID:       d.nodeID,
		Logger:       d.log,
		Gate:         &d.gate,
		Rule:         d.rule(),
		MaxClockSkew: d.cfg.MaxClockSkew,
		DeletedMissing: func() {
			select {
			case d.sweepSoon <- struct{}{}:
			default:
			}
		},
	})
	sctx, cancel := context.WithCancel(ctx)
	r := &running{stream: s, dsn: d.peerDSN(n), cancel: cancel, done: make(chan struct{})}
	d.streams[n.Name] = r
	go func() {
		defer close(r.done)
		s.Run(sctx)
	}()
}

// detachLocked tells a stream to stop and forgets it; the caller waits for
// it (waitStopped) after releasing d.mu.
func (d *Daemon) detachLocked(name string) *running {
	r := d.streams[name]
	r.cancel()
	delete(d.streams, name)
	return r
}

func waitStopped(rs []*running) {
	for _, r := range rs {
		<-r.done
	}
}

func (d *Daemon) stopAll() {
	d.mu.Lock()
	var stopping []*running
	for name := range d.streams {
		stopping = append(stopping, d.detachLocked(name))
	}
	d.mu.Unlock()
	waitStopped(stopping)
}

// forgetPeer drops what this node kept for a parted peer: its origin here and
// the slot it consumed here.
func (d *Daemon) forgetPeer(ctx context.Context, peer string) error {
	conn, err := d.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect to local Postgres: %w", err)
	}
	defer conn.Release()
	if err := origin.Drop(ctx, conn.Conn(), peer); err != nil {
		return err
	}
	return dropSlot(ctx, conn.Conn(), origin.SlotName(peer))
}

// forgetAll is forgetPeer for every pgmesh origin and slot, once this node
// itself has been parted.
func (d *Daemon) forgetAll(ctx context.Context) error {
	d.stopAll()
	rows, err := d.db.Query(ctx, `SELECT roname FROM pg_replication_origin WHERE roname LIKE 'pgmesh\_%'
		UNION SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgmesh\_%'`)
	if err != nil {
		return fmt.Errorf("list pgmesh origins and slots: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, n := range names {
		if peer, ok := origin.NodeOf(n); ok {
			if err := d.forgetPeer(ctx, peer); err != nil {
				return err
			}
		}
	}
	return d.forgetGroupState(ctx)
}

// forgetGroupState forgets which group state the publications followed: a
// group this node creates or joins next counts its Raft indexes anew.
func (d *Daemon) forgetGroupState(ctx context.Context) error {
	if _, err := d.db.Exec(ctx, `DELETE FROM pgmesh.setting WHERE name = 'publications_raft_index'`); err != nil {
		return fmt.Errorf("forget the group state the publications followed: %w", err)
	}
	return nil
}

func dropSlot(ctx context.Context, conn *pgx.Conn, slot string) error {
	// A walsender still serving the slot must go first.
	if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
		WHERE slot_name = $1 AND active_pid IS NOT NULL`, slot); err != nil {
		return fmt.Errorf("stop walsender of slot %s: %w", slot, err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
		WHERE slot_name = $1 AND active_pid IS NULL`, slot); err != nil {
		return fmt.Errorf("drop replication slot %s: %w", slot, err)
	}
	return nil
}

// syncNodeTable mirrors the group into pgmesh.node for SQL users.
func (d *Daemon) syncNodeTable(ctx context.Context, g *membership.Group) error {
	b, _ := json.Marshal(g)
	if string(b) == d.lastSync {
		return nil
	}
	err := pgx.BeginFunc(ctx, d.db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM pgmesh.node`); err != nil {
			return err
		}
		for _, n := range g.Nodes {
			if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.node (node_name, node_id, state, is_local, api_addr)
				VALUES ($1, $2, $3, $4, $5)`, n.Name, n.ID, string(n.State), n.Name == d.cfg.NodeName, n.API); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		d.lastSync = string(b)
	}
	return err
}

// checkTables keeps the publications current with the replication sets and
// reports replicated tables whose updates and deletes cannot replicate for
// lack of a key.
func (d *Daemon) checkTables(ctx context.Context, g *membership.Group, problems *[]string) error {
	conn, err := d.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres %s: %w", dsn.Describe(d.cfg.DSN), err)
	}
	defer conn.Release()
	if g != nil {
		sets := g.Sets()
		done, err := repset.Sync(ctx, conn.Conn(), sets, d.receivers(g), g.Index)
		if err != nil {
			return err
		}
		d.mu.Lock()
		d.current = done.Current
		if done.Current {
			d.localTables, d.published = done.Local, sets.Hash()
		}
		d.mu.Unlock()
		if !done.Current {
			return nil // an older state than the publications follow: wait
		}
	}
	if err := d.ensureTombstoneTriggers(ctx, conn.Conn()); err != nil {
		return err
	}
	rows, err := conn.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE format('%I.%I', n.nspname, c.relname) IN (SELECT relation FROM pgmesh.replication_set_tables)
		  AND (c.relreplident = 'n' OR (c.relreplident = 'd'
		      AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
		ORDER BY 1`)
	if err != nil {
		return fmt.Errorf("check replica identities: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("check replica identities: %w", err)
	}
	for _, t := range names {
		*problems = append(*problems, fmt.Sprintf("table %s has no primary key or replica identity, so its updates and deletes fail and cannot replicate: add a primary key (or ALTER TABLE %s REPLICA IDENTITY FULL)", t, t))
	}
	return nil
}

// withConn runs fn on a connection of the pool, for calls that take a
// *pgx.Conn (and may open a transaction on it).
func (d *Daemon) withConn(ctx context.Context, fn func(*pgx.Conn) error) error {
	conn, err := d.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres %s: %w", dsn.Describe(d.cfg.DSN), err)
	}
	defer conn.Release()
	return fn(conn.Conn())
}

// receivers are the nodes this node publishes to: every other member not
// parted (a joining node included: its slots here are made during the join).
func (d *Daemon) receivers(g *membership.Group) []string {
	return slices.DeleteFunc(g.Receivers(), func(n string) bool { return n == d.cfg.NodeName })
}

// tokenPath is where a member keeps the group's join token (mode 0600) to
// authenticate its calls to other members.
func (d *Daemon) tokenPath() string { return filepath.Join(d.cfg.DataDir, "join-token") }

func (d *Daemon) saveToken(token string) error {
	return os.WriteFile(d.tokenPath(), []byte(token), 0o600)
}

func (d *Daemon) loadToken() (string, error) {
	b, err := os.ReadFile(d.tokenPath())
	if errors.Is(err, os.ErrNotExist) {
		return "", errors.New("this node holds no join token (it is not in a group)")
	}
	return strings.TrimSpace(string(b)), err
}

// streamStatuses returns every stream's status, ordered by peer name.
func (d *Daemon) streamStatuses() []replicator.Status {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make([]replicator.Status, 0, len(d.streams))
	for _, r := range d.streams {
		out = append(out, r.stream.Status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}
