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
}

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
	var transport *raft.NetworkTransport
	if cfg.TLSServer != nil {
		var stream *tlsStream
		if stream, err = newTLSStream(cfg.ListenRaft, adv, cfg.TLSServer, cfg.TLSClient); err == nil {
			transport = raft.NewNetworkTransport(stream, 3, 10*time.Second, cfg.LogOutput)
		}
	} else {
		transport, err = raft.NewTCPTransport(cfg.ListenRaft, adv, 3, 10*time.Second, cfg.LogOutput)
	}
	if err != nil {
		logs.Close()
		return nil, fmt.Errorf("listen for raft on %s: %w: choose a free port with listen_raft", cfg.ListenRaft, err)
	}
	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeName)
	rc.HeartbeatTimeout = 500 * time.Millisecond
	rc.ElectionTimeout = 500 * time.Millisecond
	rc.LeaderLeaseTimeout = 250 * time.Millisecond
	rc.CommitTimeout = 20 * time.Millisecond
	rc.Logger = hclog.New(&hclog.LoggerOptions{Name: "raft", Level: hclog.Error, Output: cfg.LogOutput})
	f := newFSM()
	r, err := raft.NewRaft(rc, f, logs, logs, snaps, transport)
	if err != nil {
		transport.Close()
		logs.Close()
		return nil, fmt.Errorf("start raft: %w", err)
	}
	return &Store{cfg: cfg, raft: r, fsm: f, transport: transport, logs: logs}, nil
}

// Close shuts the Raft member down.
func (s *Store) Close() error {
	err := s.raft.Shutdown().Error()
	s.transport.Close()
	s.logs.Close()
	return err
}

// Group returns a copy of the current state (nil before any group exists)
// and a channel closed at the next change.
func (s *Store) Group() (*Group, <-chan struct{}) { return s.fsm.snapshotState() }

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
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	for !s.IsLeader() {
		select {
		case <-ctx.Done():
			return errors.New("this node did not become raft leader of its new group within 15s")
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
	if err := s.raft.AddVoter(raft.ServerID(n.Name), raft.ServerAddress(n.Raft), 0, 10*time.Second).Error(); err != nil {
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
	if err := s.raft.RemoveServer(raft.ServerID(name), 0, 10*time.Second).Error(); err != nil {
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
	f := s.raft.Apply(b, 10*time.Second)
	if err := f.Error(); err != nil {
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
