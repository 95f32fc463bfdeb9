// Package membership keeps the node group in a Raft group (hashicorp/raft,
// log on bbolt via raft-boltdb): members, their states and ids. Every daemon
// watches the replicated state and reconciles its streams from it. Raft is
// the control plane only: losing quorum stops joins and parts, never
// replication.
package membership

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"

	"github.com/pgmesh/pgmesh/repset"
)

// Config opens a Store.
type Config struct {
	// TLSServer and TLSClient, when set, put the Raft transport on mutual
	// TLS (each side verifies the other's certificate).
	TLSServer, TLSClient *tls.Config
	NodeName             string
	DataDir              string
	ListenRaft           string
	AdvertiseRaft        string
	// Timing scales Raft's timeouts to the round trips between members
	// (zero: WAN).
	Timing Timing
	// PeerAddrs overrides, by node name, the Raft address this node dials
	// (default: the one the peer advertised when it joined).
	PeerAddrs map[string]string
	// LogOutput receives Raft's own log lines (warnings and errors only).
	LogOutput io.Writer
}

// Store is this node's Raft member.
type Store struct {
	cfg       Config
	raft      *raft.Raft
	fsm       *fsm
	transport *raft.NetworkTransport
	logs      *raftboltdb.BoltStore
	// committed wakes the goroutine that tells followers about a new
	// commit (see announce); it ends when done closes.
	committed chan struct{}
	done      chan struct{}
	announcer sync.WaitGroup
	// restarted is set when the node opened Raft state of an earlier run:
	// it is in a group, even while its state is not applied yet.
	restarted bool
}

// idleCommitTimeout is how often an idle leader sends followers its commit
// index anyway. Raft's default (50 ms) makes an idle leader read its log
// and send every follower an AppendEntries 20 to 40 times a second; here
// every write announces its own commit (announce), so this is only a
// safety net.
const idleCommitTimeout = 5 * time.Second

// ErrNotLeader is returned by writes on a follower; callers forward them.
var ErrNotLeader = errors.New("not the raft leader")

// Open starts the Raft member. A node with no Raft state waits idle until it
// bootstraps a group or is added to one.
func Open(cfg Config) (*Store, error) {
	if cfg.LogOutput == nil {
		cfg.LogOutput = os.Stderr
	}
	dir := filepath.Join(cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create raft directory %s: %w", dir, err)
	}
	logs, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(dir, "raft.db")})
	if err != nil {
		return nil, fmt.Errorf("open raft log %s: %w (is another pgmesh using this data_dir?)", filepath.Join(dir, "raft.db"), err)
	}
	snaps, err := raft.NewFileSnapshotStore(dir, 2, cfg.LogOutput)
	if err != nil {
		logs.Close()
		return nil, fmt.Errorf("open raft snapshots: %w", err)
	}
	adv, err := net.ResolveTCPAddr("tcp", cfg.AdvertiseRaft)
	if err != nil {
		logs.Close()
		return nil, fmt.Errorf("advertise_raft %q is not a host:port address: %w", cfg.AdvertiseRaft, err)
	}
	logger := hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Error, Output: cfg.LogOutput})
	tcfg := &raft.NetworkTransportConfig{MaxPool: 3, Timeout: 10 * time.Second, Logger: logger,
		ServerAddressProvider: peerAddrs(cfg.PeerAddrs)}
	var transport *raft.NetworkTransport
	if cfg.TLSServer != nil {
		if tcfg.Stream, err = newTLSStream(cfg.ListenRaft, adv, cfg.TLSServer, cfg.TLSClient); err == nil {
			transport = raft.NewNetworkTransportWithConfig(tcfg)
		}
	} else {
		transport, err = raft.NewTCPTransportWithConfig(cfg.ListenRaft, adv, tcfg)
	}
	if err != nil {
		logs.Close()
		return nil, fmt.Errorf("listen for raft on %s: %w: choose a free port with listen_raft", cfg.ListenRaft, err)
	}
	if cfg.Timing == 0 {
		cfg.Timing = WAN
	}
	rc := cfg.Timing.raftConfig()
	rc.LocalID = raft.ServerID(cfg.NodeName)
	rc.Logger = logger
	restarted, err := raft.HasExistingState(logs, logs, snaps)
	if err != nil {
		transport.Close()
		logs.Close()
		return nil, fmt.Errorf("read raft state in %s: %w", dir, err)
	}
	f := newFSM()
	r, err := raft.NewRaft(rc, f, logs, logs, snaps, transport)
	if err != nil {
		transport.Close()
		logs.Close()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	s := &Store{cfg: cfg, raft: r, fsm: f, transport: transport, logs: logs, restarted: restarted,
		committed: make(chan struct{}, 1), done: make(chan struct{})}
	s.announcer.Go(s.announce)
	return s, nil
}

// peerAddrs is the peer_raft_addrs override of where to dial a member. A
// member it does not name is dialled at the address it advertised (Raft
// falls back to that on the error).
type peerAddrs map[string]string

var errNoOverride = errors.New("no peer_raft_addrs entry")

func (p peerAddrs) ServerAddr(id raft.ServerID) (raft.ServerAddress, error) {
	if a, ok := p[string(id)]; ok {
		return raft.ServerAddress(a), nil
	}
	return "", errNoOverride
}

// Close shuts the Raft member down, after a snapshot of what changed since
// the last (best effort): restarted, it has its state without a leader.
func (s *Store) Close() error {
	close(s.done)
	s.announcer.Wait()
	_ = s.raft.Snapshot().Error() // ErrNothingNewToSnapshot, or a member that never joined
	err := s.raft.Shutdown().Error()
	s.transport.Close()
	s.logs.Close()
	return err
}

// announce tells the followers about each new commit at once. A follower
// learns that an entry is committed only from the leader's next
// AppendEntries (heartbeats do not carry it), which an idle leader sends
// only after idleCommitTimeout: so after every write the leader appends a
// barrier, whose AppendEntries carries the commit index. Bursts of writes
// share one barrier. A new leader's first entry (Raft's no-op for its term)
// commits followers' logs too, after a restart the whole log: the first
// barrier waits for it, the second tells them.
func (s *Store) announce() {
	for {
		barriers := 1
		select {
		case <-s.done:
			return
		case <-s.committed:
		case leader := <-s.raft.LeaderCh():
			if !leader {
				continue
			}
			barriers = 2
		}
		// Best effort: a lost leadership or a shutdown leaves it to the
		// next leader, or to the idle commit timeout.
		for range barriers {
			if s.raft.Barrier(s.cfg.Timing.Failover()).Error() != nil {
				break
			}
		}
	}
}

// wrote records that this leader committed an entry, for announce.
func (s *Store) wrote() {
	select {
	case s.committed <- struct{}{}:
	default: // one announcement pending already covers this write
	}
}

// Group returns a copy of the current state (nil before any group exists)
// and a channel closed at the next change.
func (s *Store) Group() (*Group, <-chan struct{}) { return s.fsm.snapshotState() }

// ErrNotLoaded is Loaded's error when the state did not arrive in time.
var ErrNotLoaded = errors.New("this node restarted and has not yet applied the group's Raft log: " +
	"a leader commits it, which needs a majority of the members up; try again in a moment")

// Loaded returns the current state like Group, but on a node that restarted
// before its log is applied (a leader must commit it first: until then the
// state is empty, unless a snapshot restored it) it waits for the state,
// until ctx ends (ErrNotLoaded). A node that never was in a group gets nil
// at once.
func (s *Store) Loaded(ctx context.Context) (*Group, error) {
	for {
		g, changed := s.Group()
		if g != nil || !s.restarted {
			return g, nil
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return nil, ErrNotLoaded
		}
	}
}

// Loading reports whether this node restarted and has not yet applied the
// group's state (see Loaded).
func (s *Store) Loading() bool {
	g, _ := s.Group()
	return g == nil && s.restarted
}

// IsLeader reports whether this node leads the Raft group.
func (s *Store) IsLeader() bool { return s.raft.State() == raft.Leader }

// Leader returns the leader's node name, or "" when there is none.
func (s *Store) Leader() string {
	_, id := s.raft.LeaderWithID()
	return string(id)
}

// RaftState is this member's Raft role (Leader, Follower, Candidate, Shutdown).
func (s *Store) RaftState() string { return s.raft.State().String() }

// HashToken returns the hex SHA-256 of a join token.
func HashToken(token string) string {
	h := sha256.Sum256([]byte(token))
	return hex.EncodeToString(h[:])
}

// CheckToken compares a presented token with the group's, in constant time.
func (g *Group) CheckToken(token string) bool {
	want, err := hex.DecodeString(g.TokenHash)
	if err != nil {
		return false
	}
	got := sha256.Sum256([]byte(token))
	return subtle.ConstantTimeCompare(want, got[:]) == 1
}

// Create bootstraps a new group with this node as its only member.
func (s *Store) Create(ctx context.Context, group, tokenHash string, self Node, sets repset.Sets) (*Node, error) {
	if g, _ := s.Group(); g != nil {
		return nil, fmt.Errorf("this node already belongs to node group %q", g.Name)
	}
	if s.Loading() {
		return nil, fmt.Errorf("this node already belongs to a node group: %w", ErrNotLoaded)
	}
	cfg := raft.Configuration{Servers: []raft.Server{{ID: raft.ServerID(self.Name), Address: raft.ServerAddress(s.cfg.AdvertiseRaft)}}}
	if err := s.raft.BootstrapCluster(cfg).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return nil, fmt.Errorf("bootstrap raft: %w", err)
	}
	if err := s.waitLeader(ctx); err != nil {
		return nil, err
	}
	self.State = Active
	self.JoinedAt = time.Now().UTC()
	return s.apply(command{Op: "create_group", Group: group, TokenHash: tokenHash, Node: &self, Repsets: sets})
}

func (s *Store) waitLeader(ctx context.Context) error {
	// A new group's only member elects itself after one to two timeouts.
	wait := max(15*time.Second, 2*s.cfg.Timing.Failover())
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for !s.IsLeader() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("this node did not become raft leader of its new group within %s", wait)
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// AddNode registers a node (state joining) and makes it a Raft voter.
// Leader only.
func (s *Store) AddNode(n Node) (*Node, error) {
	n.State = Joining
	n.JoinedAt = time.Now().UTC()
	added, err := s.apply(command{Op: "add_node", Node: &n})
	if err != nil {
		return nil, err
	}
	err = s.raft.AddVoter(raft.ServerID(n.Name), raft.ServerAddress(n.Raft), 0, s.writeTimeout()).Error()
	s.wrote()
	if err != nil {
		return nil, fmt.Errorf("add %q to raft: %w", n.Name, err)
	}
	return added, nil
}

// SetState changes a node's state. Leader only.
func (s *Store) SetState(name string, st State) (*Node, error) {
	return s.apply(command{Op: "set_state", Name: name, State: st})
}

// Part marks a node parted and removes it from Raft. Leader only.
func (s *Store) Part(name string) (*Node, error) {
	n, err := s.SetState(name, Parted)
	if err != nil {
		return nil, err
	}
	err = s.raft.RemoveServer(raft.ServerID(name), 0, s.writeTimeout()).Error()
	s.wrote()
	if err != nil {
		return n, fmt.Errorf("remove %q from raft: %w", name, err)
	}
	return n, nil
}

// EditRepsets changes the replication sets and returns them as changed.
// Leader only.
func (s *Store) EditRepsets(e RepsetEdit) (repset.Sets, error) {
	r, err := s.applyRaw(command{Op: "repset", Repset: &e})
	if err != nil {
		return nil, err
	}
	return r.(repset.Sets), nil
}

// AllocChunk draws the next chunk of size values of a galloc sequence for
// node, never below minStart. Leader only.
func (s *Store) AllocChunk(seq, node string, size, minStart int64) (*Chunk, error) {
	r, err := s.applyRaw(command{Op: "alloc_chunk", Seq: seq, Name: node, Size: size, MinStart: minStart})
	if err != nil {
		return nil, err
	}
	return r.(*Chunk), nil
}

// AcquireLock takes a group-wide lock for node for at most ttl, or returns
// *LockHeld while another node holds it. Leader only.
func (s *Store) AcquireLock(lock, node string, ttl time.Duration) error {
	now := time.Now().UTC()
	_, err := s.applyRaw(command{Op: "lock_acquire", Lock: lock, Name: node, At: now, Expires: now.Add(ttl)})
	return err
}

// ReleaseLock gives a lock up. Leader only.
func (s *Store) ReleaseLock(lock, node string) error {
	_, err := s.applyRaw(command{Op: "lock_release", Lock: lock, Name: node})
	return err
}

// writeTimeout bounds a write to the group: ten round trips on the slowest
// link the timing is made for, and at least 10s.
func (s *Store) writeTimeout() time.Duration {
	return max(10*time.Second, 10*s.cfg.Timing.MaxRoundTrip())
}

func (s *Store) apply(c command) (*Node, error) {
	r, err := s.applyRaw(c)
	if n, ok := r.(*Node); ok {
		return n, err
	}
	return nil, err
}

func (s *Store) applyRaw(c command) (any, error) {
	if !s.IsLeader() {
		return nil, ErrNotLeader
	}
	b, err := json.Marshal(c)
	if err != nil {
		return nil, err
	}
	f := s.raft.Apply(b, s.writeTimeout())
	err = f.Error()
	s.wrote()
	if err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return nil, ErrNotLeader
		}
		return nil, fmt.Errorf("raft apply %s: %w", c.Op, err)
	}
	if err, ok := f.Response().(error); ok {
		return nil, err
	}
	return f.Response(), nil
}
