//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/faultproxy"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

type link struct{ from, to string } // from's daemon reaching to's Postgres

// proxiedMesh forms a group whose every stream (and join copy) goes through
// its own fault proxy: node from reaches node to's Postgres via links[{from, to}].
func proxiedMesh(t *testing.T, ctx context.Context, schema string, names ...string) ([]*localmesh.Node, map[link]*faultproxy.Proxy) {
	t.Helper()
	nodes := newNodes(t, ctx, schema, names...)
	links := map[link]*faultproxy.Proxy{}
	for _, from := range nodes {
		var overrides []string
		for _, to := range nodes {
			if from == to {
				continue
			}
			p, err := faultproxy.New(fmt.Sprintf("127.0.0.1:%d", to.PG.Port))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(p.Close)
			links[link{from.Name, to.Name}] = p
			overrides = append(overrides, fmt.Sprintf("%s=postgres://postgres@%s/postgres?sslmode=disable", to.Name, p.Addr()))
		}
		from.ExtraArgs = []string{"--peer-dsns", strings.Join(overrides, ";")}
		if err := from.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := localmesh.Form(ctx, "test", nodes...); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 60*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	return nodes, links
}

// underLoad runs writeLoad on every node until during returns, then checks
// that every node ends with the same rows and the complete ledger.
func underLoad(t *testing.T, ctx context.Context, nodes []*localmesh.Node, during func()) {
	t.Helper()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var written atomic.Int64
	errs := make([]error, len(nodes))
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := writeLoad(ctx, n, int64(i+1)*1_000_000, 2*time.Millisecond, stop)
			written.Add(w)
			errs[i] = err
		}()
	}
	during()
	close(stop)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := localmesh.CaughtUp(ctx, 120*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "ledger", nodes...)
	converged(t, ctx, 30*time.Second, "counters", nodes...)
	for _, n := range nodes {
		if got := count(t, ctx, n, `SELECT count(*) FROM ledger`); got != written.Load() {
			t.Fatalf("%s has %d ledger rows, want %d", n.Name, got, written.Load())
		}
	}
	t.Logf("%d ledger rows written under faults, all present exactly once on %d nodes", written.Load(), len(nodes))
}

// faultTime is how long a fault scenario keeps its fault: short in make
// test, PGMESH_SOAK (a duration) in make soak.
func faultTime(t *testing.T, short time.Duration) time.Duration {
	s := os.Getenv("PGMESH_SOAK")
	if s == "" {
		return short
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		t.Fatalf("PGMESH_SOAK=%q is not a duration", s)
	}
	return max(d, short)
}

// A region is cut off (every link to and from it) under writes everywhere,
// then healed.
func TestRegionCutOffAndHealed(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes, links := proxiedMesh(t, ctx, joinSchema, "a", "b", "c")
	alone := faultTime(t, 3*time.Second)
	underLoad(t, ctx, nodes, func() {
		time.Sleep(time.Second)
		for l, p := range links {
			if l.from == "c" || l.to == "c" {
				p.Cut()
			}
		}
		time.Sleep(alone) // c is alone while everyone writes
		for _, p := range links {
			p.Heal()
		}
		time.Sleep(time.Second)
	})
}

// A link that keeps dropping its connections.
func TestFlappingLink(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes, links := proxiedMesh(t, ctx, joinSchema, "a", "b")
	flaps := int(faultTime(t, 3*time.Second) / (200 * time.Millisecond))
	underLoad(t, ctx, nodes, func() {
		for i := 0; i < flaps; i++ {
			time.Sleep(200 * time.Millisecond)
			links[link{"a", "b"}].Reset()
			links[link{"b", "a"}].Reset()
		}
	})
}

// One direction of a link goes silent without closing (a route lost one
// way): the peer's changes stop arriving at a while a's feedback still
// reaches b; then the route comes back.
func TestOneWayStall(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes, links := proxiedMesh(t, ctx, joinSchema, "a", "b")
	underLoad(t, ctx, nodes, func() {
		time.Sleep(time.Second)
		links[link{"a", "b"}].Stall(true) // b's Postgres to a's daemon
		time.Sleep(faultTime(t, 3*time.Second))
		links[link{"a", "b"}].Heal()
		time.Sleep(time.Second)
	})
}

// A thin pipe between two regions (128 kB/s each way, with latency): the
// stream falls behind under load and catches up once the load stops.
func TestThinLink(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes, links := proxiedMesh(t, ctx, joinSchema, "a", "b")
	for _, p := range links {
		p.SetBandwidth(128 << 10)
		p.SetLatency(20*time.Millisecond, 5*time.Millisecond)
	}
	underLoad(t, ctx, nodes, func() { time.Sleep(faultTime(t, 3*time.Second)) })
}

// BDR's four regions with their round-trip times, scaled down tenfold.
func TestFourRegionsWANLatency(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	rtt := map[[2]string]time.Duration{
		{"dallas", "dubai"}: 230, {"dallas", "sydney"}: 205, {"dallas", "tokyo"}: 145,
		{"dubai", "sydney"}: 445, {"dubai", "tokyo"}: 145, {"sydney", "tokyo"}: 195,
	}
	nodes, links := proxiedMesh(t, ctx, joinSchema, "dallas", "dubai", "sydney", "tokyo")
	for l, p := range links {
		ms, ok := rtt[[2]string{l.from, l.to}]
		if !ok {
			ms = rtt[[2]string{l.to, l.from}]
		}
		// A tenth of the round trip, half of it each way, with 10% jitter.
		oneWay := ms * time.Millisecond / 20
		p.SetLatency(oneWay, oneWay/10)
	}
	underLoad(t, ctx, nodes, func() { time.Sleep(faultTime(t, 3*time.Second)) })
}
