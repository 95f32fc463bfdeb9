//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/faultproxy"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/membership"
)

// guideRTT is the round trip between the BDR guide's four regions, and a
// fifth that joins later.
var guideRTT = map[[2]string]time.Duration{
	{"dallas", "dubai"}: 230 * time.Millisecond, {"dallas", "sydney"}: 205 * time.Millisecond,
	{"dallas", "tokyo"}: 145 * time.Millisecond, {"dubai", "sydney"}: 445 * time.Millisecond,
	{"dubai", "tokyo"}: 145 * time.Millisecond, {"sydney", "tokyo"}: 195 * time.Millisecond,
	{"dallas", "frankfurt"}: 120 * time.Millisecond, {"dubai", "frankfurt"}: 115 * time.Millisecond,
	{"sydney", "frankfurt"}: 290 * time.Millisecond, {"tokyo", "frankfurt"}: 230 * time.Millisecond,
}

func rttBetween(a, b string) time.Duration {
	if d, ok := guideRTT[[2]string{a, b}]; ok {
		return d
	}
	return guideRTT[[2]string{b, a}]
}

// regionMesh makes nodes whose every link to each other, Postgres, Raft and
// the API alike, goes through a proxy with that pair's latency (half the
// round trip each way, 5% jitter), with Raft at its default (wan) timing.
// Only the first form daemons are started; the others are started by the
// test (they are set up now, so that the first know how to reach them).
func regionMesh(t *testing.T, ctx context.Context, schema string, names ...string) []*localmesh.Node {
	t.Helper()
	nodes := newNodes(t, ctx, schema, names...)
	proxy := func(from, to *localmesh.Node, target string) string {
		p, err := faultproxy.New(target)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		oneWay := rttBetween(from.Name, to.Name) / 2
		p.SetLatency(oneWay, oneWay/20)
		return p.Addr()
	}
	for _, from := range nodes {
		var pg, raft, api []string
		for _, to := range nodes {
			if from == to {
				continue
			}
			pg = append(pg, fmt.Sprintf("%s=postgres://postgres@%s/postgres?sslmode=disable", to.Name, proxy(from, to, fmt.Sprintf("127.0.0.1:%d", to.PG.Port))))
			raft = append(raft, to.Name+"="+proxy(from, to, to.Raft))
			api = append(api, to.Name+"="+proxy(from, to, to.API))
		}
		from.RaftTiming = "" // the default, wan
		from.ExtraArgs = []string{"--peer-dsns", strings.Join(pg, ";"),
			"--peer-raft-addrs", strings.Join(raft, ";"), "--peer-api-addrs", strings.Join(api, ";")}
	}
	return nodes
}

// apiVia is the proxy from's daemon reaches to's API through.
func apiVia(from, to *localmesh.Node) string {
	for i, a := range from.ExtraArgs {
		if a == "--peer-api-addrs" {
			for _, e := range strings.Split(from.ExtraArgs[i+1], ";") {
				if name, addr, _ := strings.Cut(e, "="); name == to.Name {
					return addr
				}
			}
		}
	}
	return to.API
}

// leaderSeen is the Raft leader as node n sees it ("" if none).
func leaderSeen(ctx context.Context, n *localmesh.Node) string {
	rep, err := n.Status(ctx)
	if err != nil {
		return ""
	}
	return rep.RaftLeader
}

// The BDR guide's four regions, with its round trips (145 to 445 ms) on
// every link: Postgres, Raft and the API. The group forms at the default
// Raft timing, a fifth region joins while all write, a DDL runs under the
// global lock, a galloc sequence draws chunks from Raft, a node parts, the
// leader stays the same while the group is idle, and when the leader's
// daemon dies another is elected within the documented failover time.
func TestGuideLatenciesOnEveryLink(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	idle := 20 * time.Second
	if os.Getenv("PGMESH_SOAK") != "" {
		idle = time.Minute
	}
	nodes := regionMesh(t, ctx, joinSchema+`; CREATE TABLE ids (id bigint PRIMARY KEY, node text NOT NULL); CREATE SEQUENCE ids_seq`,
		"dallas", "dubai", "sydney", "tokyo", "frankfurt")
	first, late := nodes[:4], nodes[4]
	for _, n := range first {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	start := time.Now()
	out, stderr, err := first[0].CLI(ctx, "group", "create", "guide")
	if err != nil {
		t.Fatalf("group create: %v: %s", err, stderr)
	}
	token := strings.TrimSpace(out[strings.LastIndex(strings.TrimSpace(out), "\n")+1:])
	join := func(n *localmesh.Node) {
		t.Helper()
		if _, stderr, err := n.CLI(ctx, "group", "join", "--via", apiVia(n, first[0]), "--token", token); err != nil {
			t.Fatalf("group join of %s: %v: %s", n.Name, err, stderr)
		}
	}
	for _, n := range first[1:] {
		join(n)
	}
	if err := localmesh.WaitConnected(ctx, 2*time.Minute, first...); err != nil {
		t.Fatal(err)
	}
	t.Logf("four regions formed a group in %s", time.Since(start).Round(time.Millisecond))

	// A fifth region joins while the four write, each about 25 transactions
	// a second: what five clusters on one small test machine apply as fast
	// as they come (unpaced writers put every node minutes behind, and this
	// test is about the links, not throughput).
	stop := make(chan struct{})
	var wg sync.WaitGroup
	errs := make([]error, len(first))
	for i, n := range first {
		wg.Go(func() { _, errs[i] = writeLoad(ctx, n, int64(i+1)*1_000_000, 40*time.Millisecond, stop) })
	}
	if err := late.Start(ctx); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	join(late)
	if err := localmesh.WaitConnected(ctx, 2*time.Minute, nodes...); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s joined under writes in %s", late.Name, time.Since(start).Round(time.Millisecond))

	// DDL under the group's lock, and a galloc sequence drawing chunks.
	if out, stderr, err := nodes[2].CLI(ctx, "ddl", "ALTER TABLE counters ADD COLUMN note text"); err != nil {
		logStreams(t, ctx, nodes...)
		t.Fatalf("ddl: %v %s %s", err, out, stderr)
	}
	if out, stderr, err := nodes[1].CLI(ctx, "sequences", "convert", "--kind", "galloc", "--chunk-size", "10", "ids_seq"); err != nil {
		t.Fatalf("convert galloc: %v %s %s", err, out, stderr)
	}
	for _, n := range nodes {
		for range 25 { // crosses chunk boundaries: more chunks from Raft
			mustExec(t, ctx, n, `INSERT INTO ids VALUES (pgmesh.galloc_nextval('ids_seq'), $1)`, n.Name)
		}
	}
	close(stop)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if err := localmesh.CaughtUp(ctx, 3*time.Minute, nodes...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, time.Minute, "ledger", nodes...)
	converged(t, ctx, time.Minute, "ids", nodes...)
	if got := count(t, ctx, nodes[0], `SELECT count(DISTINCT id) FROM ids`); got != int64(25*len(nodes)) {
		t.Fatalf("ids holds %d distinct galloc values, want %d", got, 25*len(nodes))
	}
	converged(t, ctx, time.Minute, "(SELECT k, note FROM counters)", nodes...)

	// The fifth region parts again.
	if out, stderr, err := nodes[0].CLI(ctx, "node", "part", late.Name); err != nil {
		t.Fatalf("part: %v %s %s", err, out, stderr)
	}
	nodes = first

	// Idle: one leader throughout.
	leader := leaderSeen(ctx, nodes[0])
	if leader == "" {
		t.Fatal("the group has no leader")
	}
	for deadline := time.Now().Add(idle); time.Now().Before(deadline); time.Sleep(time.Second) {
		for _, n := range nodes {
			if l := leaderSeen(ctx, n); l != leader {
				t.Fatalf("while idle, %s sees leader %q, not %q", n.Name, l, leader)
			}
		}
	}
	t.Logf("%s led throughout %s idle", leader, idle)

	// The leader's daemon dies: another is elected within the documented
	// failover time of the timing.
	var dead *localmesh.Node
	var rest []*localmesh.Node
	for _, n := range nodes {
		if n.Name == leader {
			dead = n
		} else {
			rest = append(rest, n)
		}
	}
	if err := dead.Kill(); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	bound := membership.WAN.Failover()
	if err := poll.Until(ctx, 100*time.Millisecond, bound, func() error {
		for _, n := range rest {
			if l := leaderSeen(ctx, n); l == "" || l == dead.Name {
				return fmt.Errorf("%s sees leader %q", n.Name, l)
			}
		}
		return nil
	}); err != nil {
		t.Fatalf("no new leader within the documented failover time %s: %v", bound, err)
	}
	t.Logf("a new leader (%s) %s after %s's daemon died", leaderSeen(ctx, rest[0]), time.Since(start).Round(time.Millisecond), dead.Name)
}

// logStreams logs how far each node has applied each peer, for a failure
// that waited on a peer.
func logStreams(t *testing.T, ctx context.Context, nodes ...*localmesh.Node) {
	t.Helper()
	for _, n := range nodes {
		rep, err := n.Status(ctx)
		if err != nil {
			t.Logf("%s: status: %v", n.Name, err)
			continue
		}
		for _, p := range rep.Peers {
			t.Logf("%s from %s: connected %v, applied %s of %s (lag %d bytes, %.1fs), %d txns in %d commits, %d retried, %d errors",
				n.Name, p.Peer, p.Connected, p.AppliedLSN, p.PeerWALLSN, p.LagBytes, p.LagSeconds, p.AppliedTxns, p.LocalCommits, p.RetriedTxns, p.Errors)
		}
	}
}
