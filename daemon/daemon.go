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
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sync/errgroup"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
	pgsql "github.com/pgmesh/pgmesh/sql"
)

// Daemon is one running pgmesh node: the parts below, each with its own
// state (ARCHITECTURE.md, the daemon's parts), and the HTTP API over them
// (api.go).
type Daemon struct {
	cfg   Config
	log   *slog.Logger
	db    *pgxpool.Pool
	store *membership.Store

	cluster     *cluster
	resolution  *resolution
	reconciler  *reconciler
	slots       *slotCheck
	pauses      *pauses
	comparer    *comparer
	repsets     *repsets
	settings    *settings
	problems    problemLog
	standbys    *standbyWatch
	promotion   *promotion
	housekeeper *housekeeper
	sequences   *sequences
	join        joiner // the join's status
	joining     *joining
}

// Run starts the daemon and blocks until ctx ends or a fatal error occurs.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	if err := cfg.Normalize(); err != nil {
		return err
	}
	log = log.With("node", cfg.NodeName)
	d := &Daemon{cfg: cfg, log: log, problems: problemLog{log: log},
		resolution: &resolution{self: cfg.NodeName, configured: cfg.LUWResolution, configuredSet: cfg.LUWResolutionSet, log: log}}

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
	d.resolution.db = d.db
	d.join.db, d.join.log = d.db, log
	tlsCfg, transport, err := d.openStore()
	if err != nil {
		return err
	}
	defer d.store.Close()
	d.makeParts(transport)

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
	g.Go(func() error { d.reconciler.run(ctx); return nil })
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
func (d *Daemon) makeParts(transport *api.Transport) {
	cfg, log := d.cfg, d.log
	self := cfg.NodeName
	d.cluster = &cluster{self: self, store: d.store, log: log, transport: transport,
		peerDSNs: cfg.PeerDSNs, peerAPIs: cfg.PeerAPIAddrs, dataDir: cfg.DataDir}
	rc := &reconciler{self: self, dsn: cfg.DSN, db: d.db, store: d.store, cluster: d.cluster,
		resolution: d.resolution, problems: &d.problems, log: log}
	d.reconciler = rc
	d.housekeeper = &housekeeper{db: d.db, dsn: cfg.DSN, node: self, interval: cfg.HousekeepingInterval,
		retention: cfg.ConflictRetention, log: log, rule: d.resolution.rule, nodeID: rc.nodeID, sweepSoon: make(chan struct{}, 1),
		horizon: func() (time.Time, bool) {
			g, _ := d.store.Group()
			return tombstoneHorizon(g, self, rc.streams.statuses(), time.Now())
		}}
	rc.base = replicator.Config{LocalNode: self, LocalDSN: cfg.DSN, Logger: log, MaxClockSkew: cfg.MaxClockSkew,
		StandbySlots: cfg.StandbySlots, OnApplyError: cfg.OnApplyError, DeletedMissing: d.housekeeper.sweep}
	d.pauses = &pauses{self: self, gate: &rc.gate, log: log}
	d.comparer = &comparer{self: self, dsn: cfg.DSN, store: d.store, cluster: d.cluster, rule: d.resolution.rule, log: log}
	d.repsets = &repsets{self: self, dsn: cfg.DSN, db: d.db, store: d.store, cluster: d.cluster, comparer: d.comparer,
		status: d.Status, log: log}
	d.standbys = &standbyWatch{dsn: cfg.DSN, slots: cfg.StandbySlots, db: d.db, problems: &d.problems}
	d.promotion = newPromotion(d.db, log, &d.problems, d.comparer.repairAll, d.streamsNotBack)
	d.slots = &slotCheck{self: self, db: d.db, max: cfg.WALRetentionMax, warn: cfg.WALRetentionWarn, log: log, promotion: d.promotion}
	rc.slots = d.slots
	d.settings = &settings{self: self, db: d.db, store: d.store, cluster: d.cluster}
	d.sequences = &sequences{db: d.db, node: self, store: d.store, leader: d.cluster.leader, problems: &d.problems,
		everywhere: d.settings.everywhere, tendSoon: make(chan struct{}, 1)}
	d.settings.sequences = d.sequences
	d.joining = &joining{name: self, localDSN: cfg.DSN, store: d.store, status: &d.join,
		local:   joinHere{d: d, reconciler: rc, cluster: d.cluster, resolution: d.resolution, settings: d.settings},
		members: func(addr, token string) member { return d.cluster.client(addr, token) },
		queue:   make(chan api.JoinRequest, 1), log: log}
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
	return d.resolution.init(ctx, conn)
}

// openStore opens the Raft store in data_dir, over TLS when it is
// configured, and returns the TLS settings for the API too (nil without)
// and the transport of calls to other members.
func (d *Daemon) openStore() (*tlsSetup, *api.Transport, error) {
	cfg := d.cfg
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, nil, fmt.Errorf("create data_dir %s: %w", cfg.DataDir, err)
	}
	tlsCfg, err := loadTLS(cfg)
	if err != nil {
		return nil, nil, err
	}
	mcfg := membership.Config{NodeName: cfg.NodeName, DataDir: cfg.DataDir,
		ListenRaft: cfg.ListenRaft, AdvertiseRaft: cfg.AdvertiseRaft, Timing: cfg.RaftTiming, PeerAddrs: cfg.PeerRaftAddrs}
	transport := api.NewTransport(nil)
	if tlsCfg != nil {
		mcfg.TLSServer, mcfg.TLSClient = tlsCfg.raft, tlsCfg.client
		transport = api.NewTransport(tlsCfg.client)
	}
	if d.store, err = membership.Open(mcfg); err != nil {
		return nil, nil, err
	}
	return tlsCfg, transport, nil
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
