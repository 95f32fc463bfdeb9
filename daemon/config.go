// Package daemon is the pgmesh node daemon: it checks and prepares the local
// Postgres, keeps the node's Raft membership, runs one replication stream per
// active peer, and serves the HTTP API the CLI and peers use.
package daemon

import (
	"errors"
	"fmt"
	"net"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/bytesize"
	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/membership"
)

// Config holds the daemon's settings (the README lists them as config keys).
type Config struct {
	NodeName      string
	DSN           string
	PublicDSN     string
	ListenAPI     string
	AdvertiseAPI  string
	ListenRaft    string
	AdvertiseRaft string
	// RaftTiming scales Raft's timeouts to the round trips between members
	// (config key raft_timing; zero: membership.WAN).
	RaftTiming membership.Timing
	DataDir    string
	// ConflictRetention is how long conflict_history rows are kept.
	ConflictRetention time.Duration
	// HousekeepingInterval is how often tombstones and old conflicts are pruned.
	HousekeepingInterval time.Duration
	// PeerDSNs overrides, by node name, how this node reaches a peer's
	// Postgres (e.g. through a private endpoint); default: its public_dsn.
	PeerDSNs map[string]string
	// PeerAPIAddrs and PeerRaftAddrs override, by node name, how this node
	// reaches a peer's API and Raft port; default: what the peer advertises.
	PeerAPIAddrs, PeerRaftAddrs map[string]string
	// CaptureDDL replicates plain DDL statements automatically.
	CaptureDDL bool
	// NewTablesLocal (config key repset_new_tables: false) makes a group
	// this node creates keep new tables local until they are added to a
	// replication set; by default they join the default set.
	NewTablesLocal bool
	// HealthMaxLag is how far (or how long disconnected) a peer's stream
	// may be behind before GET /health answers 503.
	HealthMaxLag time.Duration
	// WALRetentionWarn marks a peer lagging once its slot here holds more
	// WAL than this (0: never).
	WALRetentionWarn int64
	// WALRetentionMax drops the slot of a disconnected peer holding more
	// WAL than this (0: never); the peer must then rejoin.
	WALRetentionMax int64
	// TLSCertFile, TLSKeyFile and TLSCAFile put the API and Raft ports on
	// TLS (see tls.go).
	TLSCertFile, TLSKeyFile, TLSCAFile string
	// LUWResolution is what commit times are rounded up to before
	// last-update-wins compares them (0: exact microseconds), used when
	// LUWResolutionSet. Every member of a group must use the same; unset, a
	// node keeps or takes its group's (resolution.go).
	LUWResolution    time.Duration
	LUWResolutionSet bool
	// MaxClockSkew is how far a peer's clock may be ahead of this node's
	// before it is reported in status, health, metrics and the log.
	MaxClockSkew time.Duration
	// StandbySlots are the physical slots of the standbys of this node's
	// Postgres that may be promoted: changes applied here are confirmed
	// to peers only once those standbys have flushed them.
	StandbySlots []string
	// OnApplyError is on_apply_error: what a change that fails with an
	// error of its own does to its table's stream, stop (default, "") or
	// park (replicator/park.go). A table's own setting wins.
	OnApplyError string
}

// Defaults for the optional keys.
const (
	DefaultListenAPI  = "127.0.0.1:7400"
	DefaultListenRaft = "127.0.0.1:7401"
	DefaultDataDir    = "./pgmesh-data"
	// DefaultConflictRetention keeps a month of conflict_history.
	DefaultConflictRetention    = 30 * 24 * time.Hour
	DefaultHousekeepingInterval = 30 * time.Second
	DefaultWALRetentionWarn     = 1 << 30
	DefaultHealthMaxLag         = 30 * time.Second
	// DefaultLUWResolution, for new groups: about what NTP can order
	// between servers anyway, and wide enough for a busy peer's consecutive
	// transactions to share a local commit (docs/conflicts.md).
	DefaultLUWResolution = 10 * time.Millisecond
	// MaxLUWResolution bounds luw_resolution: writes from different nodes
	// within one interval are ordered by node id, not by time.
	MaxLUWResolution = 100 * time.Millisecond
	// DefaultMaxClockSkew: NTP keeps servers within a few milliseconds;
	// half a second ahead means a clock is not synchronised.
	DefaultMaxClockSkew = 500 * time.Millisecond
)

var nodeNameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,39}$`)

// validSlotName is what PostgreSQL accepts as a replication slot name.
var validSlotName = regexp.MustCompile(`^[a-z0-9_]{1,63}$`)

// ValidNodeName reports whether name is a legal node name.
func ValidNodeName(name string) bool { return nodeNameRE.MatchString(name) }

// Normalize fills defaults and checks every key, returning one sentence per
// problem.
func (c *Config) Normalize() error {
	identity := c.identityErrors()
	c.setDefaults()
	return errors.Join(slices.Concat(identity, c.addressErrors(), c.peerErrors(), c.limitErrors())...)
}

// setDefaults fills in what was left unset (public_dsn: identityErrors).
func (c *Config) setDefaults() {
	if c.ListenAPI == "" {
		c.ListenAPI = DefaultListenAPI
	}
	if c.AdvertiseAPI == "" {
		c.AdvertiseAPI = c.ListenAPI
	}
	if c.ListenRaft == "" {
		c.ListenRaft = DefaultListenRaft
	}
	if c.AdvertiseRaft == "" {
		c.AdvertiseRaft = c.ListenRaft
	}
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.RaftTiming == 0 {
		c.RaftTiming = membership.WAN
	}
	if c.ConflictRetention == 0 {
		c.ConflictRetention = DefaultConflictRetention
	}
	if c.HousekeepingInterval == 0 {
		c.HousekeepingInterval = DefaultHousekeepingInterval
	}
	if c.HealthMaxLag == 0 {
		c.HealthMaxLag = DefaultHealthMaxLag
	}
	if c.WALRetentionWarn == 0 {
		c.WALRetentionWarn = DefaultWALRetentionWarn
	}
	if c.MaxClockSkew == 0 {
		c.MaxClockSkew = DefaultMaxClockSkew
	}
}

// identityErrors checks the node's name and its connection strings, and
// makes public_dsn from dsn when it is not set.
func (c *Config) identityErrors() []error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("node_name is not set: give each node a unique name with --node-name, PGMESH_NODE_NAME or node_name in the config file"))
	} else if !ValidNodeName(c.NodeName) {
		errs = append(errs, fmt.Errorf("node_name %q is not valid: use 1 to 40 lowercase letters, digits or underscores, starting with a letter", c.NodeName))
	}
	if c.DSN == "" {
		errs = append(errs, errors.New("dsn is not set: point it at the local Postgres database, e.g. --dsn 'postgres://pgmesh@127.0.0.1:5432/app'"))
	} else if _, err := pgconn.ParseConfig(c.DSN); err != nil {
		errs = append(errs, fmt.Errorf("dsn cannot be parsed (%v): use a postgres:// URL or key=value connection string", redactErr(err)))
	}
	if c.PublicDSN == "" {
		// Peers must never receive our password: they use their own.
		c.PublicDSN = dsn.StripPassword(c.DSN)
	} else if dsn.HasPassword(c.PublicDSN) {
		errs = append(errs, errors.New("public_dsn contains a password, which would be shared with every node: remove it and give peers the password through their own PGPASSWORD or ~/.pgpass"))
	} else if _, err := pgconn.ParseConfig(c.PublicDSN); err != nil {
		errs = append(errs, fmt.Errorf("public_dsn cannot be parsed (%v): use a postgres:// URL or key=value connection string", redactErr(err)))
	}
	return errs
}

// addressErrors checks the API and Raft addresses.
func (c *Config) addressErrors() []error {
	var errs []error
	for _, kv := range [][2]string{{"listen_api", c.ListenAPI}, {"advertise_api", c.AdvertiseAPI}, {"listen_raft", c.ListenRaft}, {"advertise_raft", c.AdvertiseRaft}} {
		if _, _, err := net.SplitHostPort(kv[1]); err != nil {
			errs = append(errs, fmt.Errorf("%s %q is not a host:port address: write it like 127.0.0.1:7400", kv[0], kv[1]))
		}
	}
	if c.ListenAPI == c.ListenRaft {
		errs = append(errs, fmt.Errorf("listen_api and listen_raft are both %s: give them different ports", c.ListenAPI))
	}
	return errs
}

// peerErrors checks the standbys' slots and the per-peer overrides.
func (c *Config) peerErrors() []error {
	var errs []error
	for _, s := range c.StandbySlots {
		if !validSlotName.MatchString(s) {
			errs = append(errs, fmt.Errorf("standby_slots names %q, which is not a replication slot name (lower-case letters, digits and underscores, at most 63): name each standby's physical slot, separated by commas", s))
		}
	}
	for name, d := range c.PeerDSNs {
		if !ValidNodeName(name) {
			errs = append(errs, fmt.Errorf("peer_dsns names %q, which is not a valid node name", name))
		} else if _, err := pgconn.ParseConfig(d); err != nil {
			errs = append(errs, fmt.Errorf("peer_dsns entry for %q cannot be parsed (%v)", name, redactErr(err)))
		}
	}
	for key, m := range map[string]map[string]string{"peer_api_addrs": c.PeerAPIAddrs, "peer_raft_addrs": c.PeerRaftAddrs} {
		for name, addr := range m {
			if !ValidNodeName(name) {
				errs = append(errs, fmt.Errorf("%s names %q, which is not a valid node name", key, name))
			} else if _, _, err := net.SplitHostPort(addr); err != nil {
				errs = append(errs, fmt.Errorf("%s entry for %q, %q, is not a host:port address: write it like 10.0.0.7:7401", key, name, addr))
			}
		}
	}
	return errs
}

// limitErrors checks the sizes, durations and TLS files.
func (c *Config) limitErrors() []error {
	var errs []error
	if c.WALRetentionMax > 0 && c.WALRetentionMax <= c.WALRetentionWarn {
		errs = append(errs, fmt.Errorf("wal_retention_max (%s) must be larger than wal_retention_warn (%s)", bytesize.Format(c.WALRetentionMax), bytesize.Format(c.WALRetentionWarn)))
	}
	if err := c.checkTLS(); err != nil {
		errs = append(errs, err)
	}
	if c.LUWResolution < 0 || c.LUWResolution > MaxLUWResolution || c.LUWResolution%time.Microsecond != 0 {
		errs = append(errs, fmt.Errorf("luw_resolution %s is out of range: use whole microseconds from 0 (exact times) to %s, the same on every node, e.g. 10ms", c.LUWResolution, MaxLUWResolution))
	}
	if c.ConflictRetention < 0 || c.HousekeepingInterval < 0 {
		errs = append(errs, errors.New("conflict_retention and housekeeping_interval must be positive durations, like 720h or 30s"))
	}
	return errs
}

// redactErr drops the connection string that pgconn's parse errors quote
// (it may hold a password) and keeps the reason.
func redactErr(err error) string {
	msg := err.Error()
	if i := strings.Index(msg, "`: "); i >= 0 {
		msg = msg[i+3:]
	}
	return msg
}
