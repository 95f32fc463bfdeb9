package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"runtime/pprof"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/pgmesh/pgmesh/daemon"
	"github.com/pgmesh/pgmesh/internal/bytesize"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// configKey is one daemon setting: a YAML key, a flag (--node-name) and an
// environment variable (PGMESH_NODE_NAME). Flags beat env, env beats the file.
type configKey struct {
	name  string
	usage string
	set   func(c *daemon.Config, v string) error
}

func str(dst func(*daemon.Config) *string) func(*daemon.Config, string) error {
	return func(c *daemon.Config, v string) error { *dst(c) = v; return nil }
}

func duration(key string, dst func(*daemon.Config) *time.Duration) func(*daemon.Config, string) error {
	return func(c *daemon.Config, v string) error {
		if v == "" {
			return nil
		}
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return fmt.Errorf("%s %q is not a positive duration: write it like 720h, 30s or 1m30s", key, v)
		}
		*dst(c) = d
		return nil
	}
}

func size(key string, dst func(*daemon.Config) *int64) func(*daemon.Config, string) error {
	return func(c *daemon.Config, v string) error {
		if v == "" {
			return nil
		}
		n, err := bytesize.Parse(v)
		if err != nil {
			return fmt.Errorf("%s %q is not a size: write it like 512MB, 1GB or 64kB", key, v)
		}
		*dst(c) = n
		return nil
	}
}

// peerMap reads a key of per-peer overrides: name=value;name=value.
func peerMap(key, what string, dst func(*daemon.Config) *map[string]string) func(*daemon.Config, string) error {
	return func(c *daemon.Config, v string) error {
		if v == "" {
			return nil
		}
		m := map[string]string{}
		for _, part := range strings.Split(v, ";") {
			name, val, ok := strings.Cut(strings.TrimSpace(part), "=")
			if !ok || name == "" || val == "" {
				return fmt.Errorf("%s entry %q is not name=%s: separate entries with ;", key, part, what)
			}
			m[name] = val
		}
		*dst(c) = m
		return nil
	}
}

var configKeys = []configKey{
	{"node_name", "unique name of this node ([a-z][a-z0-9_]{0,39})", str(func(c *daemon.Config) *string { return &c.NodeName })},
	{"dsn", "local Postgres the daemon applies to and administers", str(func(c *daemon.Config) *string { return &c.DSN })},
	{"public_dsn", "how peers reach this Postgres, without password (default: dsn without its password)", str(func(c *daemon.Config) *string { return &c.PublicDSN })},
	{"listen_api", "HTTP API address (default " + daemon.DefaultListenAPI + ")", str(func(c *daemon.Config) *string { return &c.ListenAPI })},
	{"advertise_api", "API address peers use (default listen_api)", str(func(c *daemon.Config) *string { return &c.AdvertiseAPI })},
	{"listen_raft", "Raft transport address (default " + daemon.DefaultListenRaft + ")", str(func(c *daemon.Config) *string { return &c.ListenRaft })},
	{"advertise_raft", "Raft address peers use (default listen_raft)", str(func(c *daemon.Config) *string { return &c.AdvertiseRaft })},
	{"raft_timing", "Raft's timeouts for the round trips between members: lan (below 150ms), wan (up to 750ms; the default) or a multiplier 1-10", func(c *daemon.Config, v string) error {
		t, err := membership.ParseTiming(v)
		c.RaftTiming = t
		return err
	}},
	{"data_dir", "Raft log, snapshots and local state (default " + daemon.DefaultDataDir + ")", str(func(c *daemon.Config) *string { return &c.DataDir })},
	{"tls_cert_file", "this node's certificate (PEM): the API serves HTTPS and Raft uses mutual TLS", str(func(c *daemon.Config) *string { return &c.TLSCertFile })},
	{"tls_key_file", "the private key of tls_cert_file (PEM)", str(func(c *daemon.Config) *string { return &c.TLSKeyFile })},
	{"tls_ca_file", "the group's CA certificate (PEM), which signed every member's certificate", str(func(c *daemon.Config) *string { return &c.TLSCAFile })},
	{"conflict_retention", "how long pgmesh.conflict_history rows are kept (default 720h)",
		duration("conflict_retention", func(c *daemon.Config) *time.Duration { return &c.ConflictRetention })},
	{"housekeeping_interval", "how often tombstones and old conflicts are pruned (default 30s)",
		duration("housekeeping_interval", func(c *daemon.Config) *time.Duration { return &c.HousekeepingInterval })},
	{"health_max_lag", "GET /health answers 503 once a peer's stream lags (or is disconnected) longer (default 30s)",
		duration("health_max_lag", func(c *daemon.Config) *time.Duration { return &c.HealthMaxLag })},
	{"luw_resolution", "commit times are rounded up to this before last-update-wins compares them; the same on every node, 0 for exact times (default: the group's, 10ms for a new group)", func(c *daemon.Config, v string) error {
		if v == "" {
			c.LUWResolution, c.LUWResolutionSet = 0, false
			return nil
		}
		d, err := time.ParseDuration(v)
		if err != nil {
			return fmt.Errorf("luw_resolution %q is not a duration: write it like 1ms, 500us or 0", v)
		}
		c.LUWResolution, c.LUWResolutionSet = d, true
		return nil
	}},
	{"max_clock_skew", "report a peer whose Postgres clock is further ahead of this node's (default 500ms)",
		duration("max_clock_skew", func(c *daemon.Config) *time.Duration { return &c.MaxClockSkew })},
	{"wal_retention_warn", "mark a peer lagging once its slot here holds this much WAL (default 1GB)",
		size("wal_retention_warn", func(c *daemon.Config) *int64 { return &c.WALRetentionWarn })},
	{"wal_retention_max", "drop a disconnected peer's slot past this much WAL; it must rejoin (default: never)",
		size("wal_retention_max", func(c *daemon.Config) *int64 { return &c.WALRetentionMax })},
	{"peer_dsns", "how to reach given peers' Postgres instead of their public_dsn: name=dsn;name=dsn",
		peerMap("peer_dsns", "dsn", func(c *daemon.Config) *map[string]string { return &c.PeerDSNs })},
	{"peer_api_addrs", "how to reach given peers' API instead of their advertise_api: name=host:port;name=host:port",
		peerMap("peer_api_addrs", "host:port", func(c *daemon.Config) *map[string]string { return &c.PeerAPIAddrs })},
	{"peer_raft_addrs", "how to reach given peers' Raft port instead of their advertise_raft: name=host:port;name=host:port",
		peerMap("peer_raft_addrs", "host:port", func(c *daemon.Config) *map[string]string { return &c.PeerRaftAddrs })},
	{"capture_ddl", "replicate plain DDL statements automatically (default false)", func(c *daemon.Config, v string) error {
		on, err := parseBool("capture_ddl", v, false)
		c.CaptureDDL = on
		return err
	}},
	{"repset_new_tables", "in a group this node creates, new tables join the default replication set (default true; false: they start local)", func(c *daemon.Config, v string) error {
		on, err := parseBool("repset_new_tables", v, true)
		c.NewTablesLocal = !on
		return err
	}},
	{"standby_slots", "physical slots of this Postgres's standbys that may be promoted, comma-separated: peers' changes applied here are confirmed to them only once those standbys have flushed them (default: none)", func(c *daemon.Config, v string) error {
		c.StandbySlots = splitList(v)
		return nil
	}},
	{"on_apply_error", "what a change that cannot be applied here (bad data, a schema that differs) does: stop its peer's stream, or park its table's changes from that peer until pgmesh replay (default stop; pgmesh on-apply-error sets it per table)", func(c *daemon.Config, v string) error {
		switch p := strings.ToLower(strings.TrimSpace(v)); p {
		case "", replicator.OnErrorStop, replicator.OnErrorPark:
			c.OnApplyError = p
			return nil
		}
		return fmt.Errorf("on_apply_error %q is neither stop nor park: stop (the default) holds the peer's stream at the change, park sets the table's changes aside for pgmesh replay", v)
	}},
	{"log_level", "debug, info, warn or error (default info)", nil},
}

// parseBool reads a boolean key; empty is its default.
func parseBool(key, v string, def bool) (bool, error) {
	switch strings.ToLower(v) {
	case "":
		return def, nil
	case "false", "off", "no", "0":
		return false, nil
	case "true", "on", "yes", "1":
		return true, nil
	}
	return def, fmt.Errorf("%s %q is not true or false", key, v)
}

func flagName(key string) string { return strings.ReplaceAll(key, "_", "-") }
func envName(key string) string  { return "PGMESH_" + strings.ToUpper(key) }

// loadConfig merges the config file, the environment and the flags.
func loadConfig(args []string, getenv func(string) string) (daemon.Config, string, error) {
	fs := flag.NewFlagSet("pgmesh run", flag.ContinueOnError)
	configPath := fs.String("config", getenv("PGMESH_CONFIG"), "YAML config file (env PGMESH_CONFIG)")
	flags := map[string]*string{}
	for _, k := range configKeys {
		flags[k.name] = fs.String(flagName(k.name), "", k.usage+" (env "+envName(k.name)+")")
	}
	if err := fs.Parse(args); err != nil {
		return daemon.Config{}, "", err
	}
	if fs.NArg() > 0 {
		return daemon.Config{}, "", fmt.Errorf("unexpected argument %q: settings are given as --key value", fs.Arg(0))
	}
	values := map[string]string{}
	if *configPath != "" {
		file, err := readConfigFile(*configPath)
		if err != nil {
			return daemon.Config{}, "", err
		}
		values = file
	}
	for _, k := range configKeys {
		if v := getenv(envName(k.name)); v != "" {
			values[k.name] = v
		}
	}
	fs.Visit(func(f *flag.Flag) {
		if f.Name != "config" {
			values[strings.ReplaceAll(f.Name, "-", "_")] = f.Value.String()
		}
	})
	var cfg daemon.Config
	var errs []error
	for _, k := range configKeys {
		if k.set != nil {
			errs = append(errs, k.set(&cfg, values[k.name]))
		}
	}
	return cfg, values["log_level"], errors.Join(errs...)
}

func readConfigFile(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read config file: %w", err)
	}
	var raw map[string]any
	if err := yaml.Unmarshal(b, &raw); err != nil {
		return nil, fmt.Errorf("config file %s is not valid YAML (%v): fix the syntax", path, err)
	}
	known := map[string]bool{}
	var names []string
	for _, k := range configKeys {
		known[k.name] = true
		names = append(names, k.name)
	}
	sort.Strings(names)
	out := map[string]string{}
	for k, v := range raw {
		if !known[k] {
			return nil, fmt.Errorf("config file %s has unknown key %q: valid keys are %s", path, k, strings.Join(names, ", "))
		}
		switch v := v.(type) {
		case string:
			out[k] = v
		case int, float64, bool:
			out[k] = fmt.Sprint(v)
		case nil:
		default:
			return nil, fmt.Errorf("config file %s: key %q must be a single value, not %T", path, k, v)
		}
	}
	return out, nil
}

func parseLevel(s string) (slog.Level, error) {
	var l slog.Level
	if s == "" {
		return slog.LevelInfo, nil
	}
	if err := l.UnmarshalText([]byte(s)); err != nil {
		return l, fmt.Errorf("log_level %q is not one of debug, info, warn, error", s)
	}
	return l, nil
}

func cmdRun(ctx context.Context, args []string) error {
	cfg, level, err := loadConfig(args, os.Getenv)
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	lvl, err := parseLevel(level)
	if err != nil {
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
	// For developers: PGMESH_CPUPROFILE=/tmp/p writes /tmp/p.<node> (a Go
	// CPU profile) from start to shutdown, also for the daemons make bench
	// starts (PGMESH_CPUPROFILE=/tmp/p make bench).
	if dir := os.Getenv("PGMESH_CPUPROFILE"); dir != "" {
		stop, err := cpuProfile(dir + "." + cfg.NodeName)
		if err != nil {
			return err
		}
		defer stop()
	}
	return daemon.Run(ctx, cfg, log)
}

func cpuProfile(path string) (stop func(), err error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, fmt.Errorf("create CPU profile: %w", err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		return nil, fmt.Errorf("start CPU profile: %w", err)
	}
	return func() { pprof.StopCPUProfile(); f.Close() }, nil
}
