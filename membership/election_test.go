package membership

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/faultproxy"
)

// The BDR guide's round trips between four regions, in milliseconds.
var guideRTTms = map[[2]string]time.Duration{
	{"dallas", "dubai"}: 230, {"dallas", "sydney"}: 205, {"dallas", "tokyo"}: 145,
	{"dubai", "sydney"}: 445, {"dubai", "tokyo"}: 145, {"sydney", "tokyo"}: 195,
}

func guideRTT(a, b string) time.Duration {
	ms, ok := guideRTTms[[2]string{a, b}]
	if !ok {
		ms = guideRTTms[[2]string{b, a}]
	}
	return ms * time.Millisecond
}

// regionStores are four Raft members whose every link goes through a
// proxy with the guide's latency, as one group at wan timing (the
// default, made for such links).
type regionStores struct {
	t      *testing.T
	names  []string
	raft   map[string]string // node: its own Raft address
	via    map[string]map[string]string
	dirs   map[string]string
	stores map[string]*Store
}

func newRegionStores(t *testing.T, names ...string) *regionStores {
	t.Helper()
	r := &regionStores{t: t, names: names, raft: map[string]string{}, via: map[string]map[string]string{},
		dirs: map[string]string{}, stores: map[string]*Store{}}
	for _, n := range names {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		r.raft[n] = ln.Addr().String()
		ln.Close()
		r.dirs[n] = t.TempDir()
	}
	for _, from := range names {
		r.via[from] = map[string]string{}
		for _, to := range names {
			if from == to {
				continue
			}
			p, err := faultproxy.New(r.raft[to])
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			oneWay := guideRTT(from, to) / 2
			p.SetLatency(oneWay, oneWay/20)
			r.via[from][to] = p.Addr()
		}
	}
	t.Cleanup(func() {
		for _, s := range r.stores {
			s.Close()
		}
	})
	return r
}

func (r *regionStores) open(name string) {
	r.t.Helper()
	var logs io.Writer = io.Discard
	if testing.Verbose() {
		logs = os.Stderr
	}
	s, err := Open(Config{NodeName: name, DataDir: r.dirs[name], ListenRaft: r.raft[name], AdvertiseRaft: r.raft[name],
		Timing: WAN, PeerAddrs: r.via[name], LogOutput: logs})
	if err != nil {
		r.t.Fatal(err)
	}
	r.stores[name] = s
}

func (r *regionStores) kill(name string) {
	r.t.Helper()
	s := r.stores[name]
	delete(r.stores, name)
	if err := s.Close(); err != nil {
		r.t.Fatal(err)
	}
}

// agreedLeader is the leader every open member sees, other than dead, or
// an error naming a member that sees none, dead or another.
func (r *regionStores) agreedLeader(dead string) (string, error) {
	leader := ""
	for _, n := range r.names {
		s, ok := r.stores[n]
		if !ok {
			continue
		}
		l := s.Leader()
		if l == "" || l == dead || (leader != "" && l != leader) {
			return "", fmt.Errorf("%s sees leader %q", n, l)
		}
		leader = l
	}
	return leader, nil
}

// A group of four regions at the guide's latencies loses its leader again
// and again; every time, the other three agree on a new one within the
// failover time the timing documents. Three of four must agree, so each
// new leader needs the vote of every survivor: the hardest case. (CI once
// saw 7.5 s, the bound documented then, pass without a leader: the last
// survivor to notice the loss and a refused first candidate's wait make
// the tail; PGMESH_ELECTION_ROUNDS=150 gives the figures in the README.)
//
// It runs at wan timing with the guide's real round trips. At lan timing
// with the round trips scaled down alike, a CI run whose other packages
// kept both cores busy saw a new leader after 3.57 s against lan's 3 s
// (7.1 timeouts; 150 quiet rounds never passed 5.4): the process waited
// for a core for most of a second, a fifth of a timeout at wan.
func TestLeaderLossAcrossContinents(t *testing.T) {
	rounds := 8
	if v, err := strconv.Atoi(os.Getenv("PGMESH_ELECTION_ROUNDS")); err == nil {
		rounds = v
	}
	ctx := context.Background()
	r := newRegionStores(t, "dallas", "dubai", "sydney", "tokyo")
	for _, n := range r.names {
		r.open(n)
	}
	if _, err := r.stores["dallas"].Create(ctx, "guide", HashToken("t"), Node{Name: "dallas", Raft: r.raft["dallas"]}, nil); err != nil {
		t.Fatal(err)
	}
	for _, n := range r.names[1:] {
		if _, err := r.stores["dallas"].AddNode(Node{Name: n, Raft: r.raft[n]}); err != nil {
			t.Fatal(err)
		}
	}
	bound := WAN.Failover()
	var took []time.Duration
	for round := range rounds {
		var leader string
		if err := poll.Until(ctx, 10*time.Millisecond, 10*bound, func() (err error) {
			leader, err = r.agreedLeader("")
			return err
		}); err != nil {
			t.Fatalf("round %d: the group does not settle on a leader: %v", round, err)
		}
		// Followers last heard from the leader at a random point of its
		// heartbeat cycle, as after any crash.
		time.Sleep(time.Duration(round%5) * WAN.Timeout() / 5)
		r.kill(leader)
		start := time.Now()
		var next string
		err := poll.Until(ctx, 5*time.Millisecond, 10*bound, func() (err error) {
			next, err = r.agreedLeader(leader)
			return err
		})
		took = append(took, time.Since(start))
		if err != nil {
			t.Fatalf("round %d: no new leader %s after %s died: %v", round, 10*bound, leader, err)
		}
		t.Logf("round %d: %s died, %s leads after %s", round, leader, next, took[round].Round(time.Millisecond))
		r.open(leader)
	}
	slices.Sort(took)
	t.Logf("new leader after: median %s, longest %s (documented: %s)", took[len(took)/2].Round(time.Millisecond),
		took[len(took)-1].Round(time.Millisecond), bound)
	if longest := took[len(took)-1]; longest > bound {
		t.Errorf("a new leader took %s, longer than the documented failover time %s", longest.Round(time.Millisecond), bound)
	}
}
