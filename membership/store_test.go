package membership

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// oneMember is a single member's configuration on a free port, and how to
// open it (again) as a restart would.
type oneMember struct {
	t    *testing.T
	cfg  Config
	addr string
}

func newOneMember(t *testing.T) *oneMember {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return &oneMember{t: t, addr: addr, cfg: Config{NodeName: "a", DataDir: t.TempDir(), ListenRaft: addr,
		AdvertiseRaft: addr, Timing: LAN, LogOutput: io.Discard}}
}

func (m *oneMember) open() *Store {
	m.t.Helper()
	s, err := Open(m.cfg)
	if err != nil {
		m.t.Fatal(err)
	}
	return s
}

// A member that restarts before its group took a snapshot has an empty
// state until a leader commits its log. CI saw a call reach such a node
// (just elected leader) and be told it was in no group; Loaded waits for
// the state instead, and the node cannot create a second group meanwhile.
func TestRestartedMemberWaitsForItsState(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := newOneMember(t)
	open, addr, dir := m.open, m.addr, m.cfg.DataDir

	s := open()
	if g, err := s.Loaded(ctx); g != nil || err != nil || s.Loading() {
		t.Fatalf("a node that never was in a group: Loaded = %v, %v; Loading = %v; want nil, nil, false", g, err, s.Loading())
	}
	if _, err := s.Create(ctx, "g", HashToken("secret"), Node{Name: "a", Raft: addr}, nil); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// As after a crash before any snapshot: Close takes one.
	if err := os.RemoveAll(filepath.Join(dir, "raft", "snapshots")); err != nil {
		t.Fatal(err)
	}

	s = open()
	defer s.Close()
	// Its only member elects itself after an election timeout (hundreds
	// of milliseconds), and only then applies the log.
	if !s.Loading() {
		t.Fatal("the restarted node has its state at once: this test no longer shows the wait it is about")
	}
	if _, err := s.Create(ctx, "other", HashToken("x"), Node{Name: "a", Raft: addr}, nil); !errors.Is(err, ErrNotLoaded) {
		t.Fatalf("create on a restarted node: %v, want ErrNotLoaded", err)
	}
	g, err := s.Loaded(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if g == nil || g.Name != "g" || g.Nodes["a"] == nil || s.Loading() {
		t.Fatalf("loaded %+v (loading %v), want group g with node a", g, s.Loading())
	}

	short, stop := context.WithTimeout(ctx, time.Millisecond)
	defer stop()
	if g, err := s.Loaded(short); g == nil || err != nil {
		t.Fatalf("a loaded node answers at once: %v, %v", g, err)
	}
}

// A member restarted from a snapshot has the group's state at once,
// without a leader: its streams need no majority (ARCHITECTURE.md, Raft
// is the control plane only).
func TestRestartedMemberStartsFromItsSnapshot(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	m := newOneMember(t)
	s := m.open()
	if _, err := s.Create(ctx, "g", HashToken("secret"), Node{Name: "a", Raft: m.addr}, nil); err != nil {
		t.Fatal(err)
	}
	// Close takes a snapshot, as Raft does by itself after
	// snapshotThreshold entries.
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if got := m.cfg.Timing.raftConfig().SnapshotThreshold; got != snapshotThreshold {
		t.Fatalf("raft config snapshots after %d entries, want %d", got, snapshotThreshold)
	}

	s = m.open()
	defer s.Close()
	g, _ := s.Group()
	if g == nil || g.Name != "g" || g.Nodes["a"] == nil || s.Loading() {
		t.Fatalf("state right after the restart: %+v (loading %v), want group g with node a", g, s.Loading())
	}
	if s.IsLeader() {
		t.Fatal("the node leads already: the test no longer shows a state without a leader")
	}
}
