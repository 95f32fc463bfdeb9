package daemon

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
	pgsql "github.com/pgmesh/pgmesh/sql"
)

// Daemon is one running pgmesh node.
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	db    *pgxpool.Pool
	store *membership.Store

	streams      supervisor
	publications publications
	nodeTable    nodeTable
	problems     problemLog
	slots        latest[api.SlotStatus]
	standbys     *standbyWatch
	promotion    *promotion
	housekeeper  *housekeeper
	sequences    *sequences

	ids atomic.Pointer[map[string]int]
	// luwNanos is the luw_resolution in use (resolution.go).
	luwNanos atomic.Int64
	join     joiner // the join's status
	joining  *joining
	// gate holds the streams while a joining node takes its snapshot here.
	gate   replicator.Gate
	pauses pauses
	// members is how this daemon calls other daemons (HTTPS with TLS on).
	members *api.Transport
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

// reconcileEvery bounds how long a missed change or a repairable problem
// waits for the next reconcile pass.
const reconcileEvery = 5 * time.Second

// Run starts the daemon and blocks until ctx ends or a fatal error occurs.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.Normalize(); err != nil {
		return err
	}
	log = log.With("node", cfg.NodeName)
	d := &Daemon{cfg: cfg, log: log, problems: problemLog{log: log}}

	// A joining node's database is read-only for applications, not for us.
	poolCfg, err := pgsession.Pool(cfg.DSN, "pgmesh admin", 4, pgsession.Writer)
	if err != nil {
		return fmt.Errorf("dsn: %s", redactErr(err))
	}
	if err := d.prepareDatabase(ctx, poolCfg.ConnConfig); err != nil {
		return err
	}
	if d.db, err = pgxpool.NewWithConfig(ctx, poolCfg); err != nil {
		return fmt.Errorf("open pool to local Postgres: %w", err)
	}
	defer d.db.Close()
	d.join.db, d.join.log = d.db, log
	tlsCfg, err := d.openStore()
	if err != nil {
		return err
	}
	defer d.store.Close()
	d.makeParts()

	ln, err := listenAPI(cfg.ListenAPI, tlsCfg, log)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: d.routes(), ReadHeaderTimeout: 10 * time.Second}
	log.Info("pgmesh daemon started", "dsn", dsn.Describe(cfg.DSN), "api", cfg.ListenAPI, "raft", cfg.ListenRaft, "tls", tlsCfg != nil)

	// The parts of a running node. Each returns when ctx ends, or with an
	// error that stops the others; the pool and the Raft store they use
	// are closed (deferred above) only after all have returned.
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return serve(ctx, srv, ln) })
	g.Go(func() error {
		d.loop(ctx)
		d.streams.stopAll()
		return nil
	})
	g.Go(func() error { d.housekeeper.run(ctx); return nil })
	g.Go(func() error { d.publishProgress(ctx); return nil })
	g.Go(func() error { d.sequences.maintain(ctx); return nil })
	g.Go(func() error { d.joining.run(ctx); return nil })
	g.Go(func() error { d.standbys.run(ctx); return nil })
	g.Go(func() error { d.promotion.run(ctx); return nil })
	err = g.Wait()
	log.Info("pgmesh daemon stopped")
	return err
}

// makeParts builds the parts that keep state of their own (ARCHITECTURE.md,
// the daemon's parts), once the pool and the Raft store are open.
func (d *Daemon) makeParts() {
	d.housekeeper = &housekeeper{db: d.db, dsn: d.cfg.DSN, node: d.cfg.NodeName, interval: d.cfg.HousekeepingInterval,
		retention: d.cfg.ConflictRetention, log: d.log, rule: d.rule, nodeID: d.nodeID, sweepSoon: make(chan struct{}, 1),
		horizon: func() (time.Time, bool) {
			g, _ := d.store.Group()
			return tombstoneHorizon(g, d.cfg.NodeName, d.streams.statuses(), time.Now())
		}}
	d.standbys = &standbyWatch{dsn: d.cfg.DSN, slots: d.cfg.StandbySlots, db: d.db, problems: &d.problems}
	d.promotion = newPromotion(d.db, d.log, &d.problems, d.repairAll, d.streamsNotBack)
	d.sequences = &sequences{db: d.db, node: d.cfg.NodeName, store: d.store, leader: d.leader, problems: &d.problems,
		everywhere: d.everywhere, tendSoon: make(chan struct{}, 1)}
	d.joining = &joining{name: d.cfg.NodeName, localDSN: d.cfg.DSN, store: d.store, local: d, status: &d.join,
		members: func(addr, token string) member { return d.members.Client(addr, token) },
		queue:   make(chan api.JoinRequest, 1), log: d.log}
}

// publishHere makes this node's publications for the group's members.
func (d *Daemon) publishHere(ctx context.Context, g *membership.Group) error {
	return d.withConn(ctx, func(conn *pgx.Conn) error {
		_, err := d.publications.sync(ctx, conn, g, d.receivers(g))
		return err
	})
}

// serve runs the API server until ctx ends, then shuts it down, waiting
// for the handlers that are running.
func serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	select {
	case err := <-done:
		return fmt.Errorf("api server: %w", err)
	case <-ctx.Done():
	}
	shutCtx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutCtx)
	if err := <-done; !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("api server: %w", err)
	}
	return nil
}

// prepareDatabase checks the local Postgres and the role (preflight),
// installs or upgrades the pgmesh schema, and records this node's settings
// there, on one connection closed before the daemon's pool opens.
func (d *Daemon) prepareDatabase(ctx context.Context, connCfg *pgx.ConnConfig) error {
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	conn, err := pgx.ConnectConfig(cctx, connCfg)
	cancel()
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres %s (%s): check dsn and that Postgres is running", dsn.Describe(d.cfg.DSN), redactErr(err))
	}
	defer conn.Close(context.Background())
	if err := preflight(ctx, conn); err != nil {
		return err
	}
	from, to, err := pgsql.Install(ctx, conn)
	if err != nil {
		return err
	}
	if from != to {
		d.log.Info("installed pgmesh schema", "from_version", from, "to_version", to)
	}
	if err := afterInstall(ctx, conn, &d.cfg, d.log); err != nil {
		return err
	}
	captureDDL := "off"
	if d.cfg.CaptureDDL {
		captureDDL = "on"
	}
	if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('capture_ddl', $1)
		ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, captureDDL); err != nil {
		return fmt.Errorf("record capture_ddl: %w", err)
	}
	return d.initResolution(ctx, conn)
}

// openStore opens the Raft store in data_dir, over TLS when it is
// configured, and returns the TLS settings for the API too (nil without).
func (d *Daemon) openStore() (*tlsSetup, error) {
	cfg := d.cfg
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("create data_dir %s: %w", cfg.DataDir, err)
	}
	tlsCfg, err := loadTLS(cfg)
	if err != nil {
		return nil, err
	}
	mcfg := membership.Config{NodeName: cfg.NodeName, DataDir: cfg.DataDir,
		ListenRaft: cfg.ListenRaft, AdvertiseRaft: cfg.AdvertiseRaft, Timing: cfg.RaftTiming, PeerAddrs: cfg.PeerRaftAddrs}
	d.members = api.NewTransport(nil)
	if tlsCfg != nil {
		mcfg.TLSServer, mcfg.TLSClient = tlsCfg.raft, tlsCfg.client
		d.members = api.NewTransport(tlsCfg.client)
	}
	if d.store, err = membership.Open(mcfg); err != nil {
		return nil, err
	}
	return tlsCfg, nil
}

// listenAPI opens the API's listener, over TLS when it is configured.
func listenAPI(addr string, tlsCfg *tlsSetup, log *slog.Logger) (net.Listener, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("listen for the API on %s: %w: choose a free address with listen_api", addr, err)
	}
	if tlsCfg != nil {
		return tls.NewListener(ln, tlsCfg.api), nil
	}
	if host, _, _ := net.SplitHostPort(addr); !isLoopback(host) {
		log.Warn("the API listens beyond loopback without TLS; set tls_cert_file, tls_key_file and tls_ca_file, or restrict access to it with a firewall", "listen_api", addr)
	}
	return ln, nil
}

func isLoopback(host string) bool {
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}

// loop reconciles on every membership change and periodically.
func (d *Daemon) loop(ctx context.Context) {
	t := time.NewTicker(reconcileEvery)
	defer t.Stop()
	for {
		g, changed := d.store.Group()
		d.reconcile(ctx, g)
		select {
		case <-ctx.Done():
			return
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
		d.problems.set("reconcile", problems)
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
	want := map[string]replicator.Config{}
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
				want[n.Name] = d.streamConfig(n)
			}
		}
	}
	d.streams.match(ctx, want)

	// A node parted in an older state may have joined again since.
	current := d.publications.isCurrent()
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
	d.problems.set("reconcile", problems)
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

// streamConfig is how this node streams from peer n.
func (d *Daemon) streamConfig(n *membership.Node) replicator.Config {
	return replicator.Config{
		LocalNode:      d.cfg.NodeName,
		LocalDSN:       d.cfg.DSN,
		Peer:           replicator.Peer{Name: n.Name, ID: n.ID, DSN: d.peerDSN(n)},
		NodeID:         d.nodeID,
		Logger:         d.log,
		Gate:           &d.gate,
		Rule:           d.rule(),
		MaxClockSkew:   d.cfg.MaxClockSkew,
		StandbySlots:   d.cfg.StandbySlots,
		OnApplyError:   d.cfg.OnApplyError,
		DeletedMissing: d.housekeeper.sweep,
	}
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
	// A promotion's record of the peer must not apply to its next slot.
	if _, err := conn.Exec(ctx, `WITH s AS (DELETE FROM pgmesh.recreated_slot WHERE peer = $1)
		DELETE FROM pgmesh.origin_reset WHERE node = $1`, peer); err != nil {
		return fmt.Errorf("forget what a promotion recorded of %s: %w", peer, err)
	}
	return dropSlot(ctx, conn.Conn(), origin.SlotName(peer))
}

// forgetAll is forgetPeer for every pgmesh origin and slot, once this node
// itself has been parted.
func (d *Daemon) forgetAll(ctx context.Context) error {
	d.streams.stopAll()
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

// syncNodeTable mirrors the group into pgmesh.node.
func (d *Daemon) syncNodeTable(ctx context.Context, g *membership.Group) error {
	return d.nodeTable.sync(ctx, d.db, g, d.cfg.NodeName)
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
		current, err := d.publications.sync(ctx, conn.Conn(), g, d.receivers(g))
		if err != nil {
			return err
		}
		if !current {
			return nil // an older state than the publications follow: wait
		}
	}
	if err := ensureTombstoneTriggers(ctx, conn.Conn()); err != nil {
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
