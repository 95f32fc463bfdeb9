//go:build integration

package systemtest

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// recordedResolutions is each member's luw_resolution as the group
// recorded it, seen from n.
func recordedResolutions(t *testing.T, ctx context.Context, n *localmesh.Node) map[string]string {
	t.Helper()
	rep, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, m := range rep.Nodes {
		out[m.Name] = m.LUWResolution
	}
	return out
}

// A group formed at luw_resolution 1ms, as every group formed before 10ms
// became the default, keeps it: a node joining with no luw_resolution in its
// config takes the group's, and a member restarted without one keeps its
// own. A node configured with another value is refused with the fix, and a
// new group gets 10ms.
func TestResolutionOfAnOlderGroup(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := newNodes(t, ctx, `CREATE TABLE t (k int PRIMARY KEY, v text)`, "a", "b", "c", "d")
	a, b, c, d := nodes[0], nodes[1], nodes[2], nodes[3]
	a.ExtraArgs = []string{"--luw-resolution", "1ms"}
	for _, n := range []*localmesh.Node{a, b} {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	token, err := localmesh.Form(ctx, "older", a, b)
	if err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	if got := recordedResolutions(t, ctx, a); got["a"] != "1ms" || got["b"] != "1ms" {
		t.Fatalf("recorded luw_resolution %v, want 1ms for a and for b (which took the group's)", got)
	}
	if got := count(t, ctx, b, `SELECT value::bigint FROM pgmesh.setting WHERE name = 'luw_resolution_us'`); got != 1000 {
		t.Fatalf("b's SQL rule rounds to %d µs, want 1000 (the group's)", got)
	}

	// a restarts without the key: it keeps 1ms, and the pair replicates.
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	a.ExtraArgs = nil
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, a, `SELECT value::bigint FROM pgmesh.setting WHERE name = 'luw_resolution_us'`); got != 1000 {
		t.Fatalf("after a restart without luw_resolution, a rounds to %d µs, want 1000", got)
	}
	mustExec(t, ctx, a, `INSERT INTO t VALUES (1, 'from a')`)
	mustExec(t, ctx, b, `INSERT INTO t VALUES (2, 'from b')`)
	converged(t, ctx, 30*time.Second, "t", a, b)

	// c names another value: refused, with the value to set.
	c.ExtraArgs = []string{"--luw-resolution", "10ms"}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := c.CLI(ctx, "group", "join", "--via", a.API, "--token", token)
	if err == nil || !strings.Contains(stderr, "set luw_resolution: 1ms on c") {
		t.Fatalf("join of c configured at 10ms into a 1ms group: err %v, stderr %q; want a refusal naming luw_resolution: 1ms", err, stderr)
	}

	// A new group: 10ms.
	if err := d.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := localmesh.Form(ctx, "newer", d); err != nil {
		t.Fatal(err)
	}
	if got := recordedResolutions(t, ctx, d); got["d"] != "10ms" {
		t.Fatalf("a new group records luw_resolution %q, want 10ms", got["d"])
	}
}
