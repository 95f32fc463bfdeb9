//go:build integration

package systemtest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// Joining needs the group's token and empty replicated tables, and says so.
func TestJoinRefusals(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := startNodes(t, ctx, itemsSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	token, err := localmesh.Form(ctx, "test", a)
	if err != nil {
		t.Fatal(err)
	}
	_, stderr, err := b.CLI(ctx, "group", "join", "--via", a.API, "--token", "pgmesh_wrong")
	if err == nil || !strings.Contains(stderr, "join token was refused") {
		t.Fatalf("wrong token: err=%v stderr=%s", err, stderr)
	}
	if strings.Contains(a.LogTail(100000), "pgmesh_wrong") || strings.Contains(a.LogTail(100000), token) {
		t.Fatal("a token appears in the daemon log")
	}
	mustExec(t, ctx, b, `INSERT INTO items VALUES (1, 'b', 0)`)
	_, stderr, err = b.CLI(ctx, "group", "join", "--via", a.API, "--token", token)
	if err == nil || !strings.Contains(stderr, "table public.items on this node already holds rows") {
		t.Fatalf("non-empty table: err=%v stderr=%s", err, stderr)
	}
	mustExec(t, ctx, b, `DELETE FROM items`)
	if _, stderr, err := b.CLI(ctx, "group", "join", "--via", a.API, "--token", token); err != nil {
		t.Fatalf("join after fixing: %v: %s", err, stderr)
	}
	if _, stderr, err := b.CLI(ctx, "group", "join", "--via", a.API, "--token", token); err == nil || !strings.Contains(stderr, "already") || !strings.Contains(stderr, "active") {
		t.Fatalf("second join: err=%v stderr=%s", err, stderr)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
}

// A daemon stopped and restarted (SIGTERM) resumes from its origin's
// progress; a parted node is dropped from every member with its slots and
// origins, and writes keep flowing between the rest.
func TestRestartAndPart(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]

	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO items SELECT g, 'a', 0 FROM generate_series(1, 100) g`)
	mustExec(t, ctx, c, `INSERT INTO items SELECT g, 'c', 0 FROM generate_series(101, 200) g`)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "items", nodes...)
	assertNoConflicts(t, ctx, nodes...)

	if out, stderr, err := a.CLI(ctx, "node", "part", "c"); err != nil {
		t.Fatalf("part: %v: %s %s", err, out, stderr)
	}
	eventually(t, 30*time.Second, "c's slots and origins are gone from a and b", func() error {
		for _, n := range []*localmesh.Node{a, b} {
			left := count(t, ctx, n, `SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_c')
				+ (SELECT count(*) FROM pg_replication_origin WHERE roname = 'pgmesh_c')`)
			if left != 0 {
				return fmt.Errorf("%s still has %d slot/origin for c", n.Name, left)
			}
		}
		return nil
	})
	eventually(t, 30*time.Second, "c dropped its own slots and origins", func() error {
		if left := count(t, ctx, c, `SELECT (SELECT count(*) FROM pg_replication_slots) + (SELECT count(*) FROM pg_replication_origin)`); left != 0 {
			return fmt.Errorf("c still has %d slots/origins", left)
		}
		return nil
	})
	rep, err := a.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range rep.Nodes {
		if n.Name == "c" && n.State != "parted" {
			t.Fatalf("c is %s after part", n.State)
		}
	}
	mustExec(t, ctx, b, `INSERT INTO items VALUES (1000, 'b after part', 0)`)
	converged(t, ctx, 30*time.Second, "items", a, b)
	mustExec(t, ctx, c, `INSERT INTO items VALUES (2000, 'c after part', 0)`)
	time.Sleep(2 * time.Second) // an observation window: nothing may arrive from c
	if n := count(t, ctx, a, `SELECT count(*) FROM items WHERE id = 2000`); n != 0 {
		t.Fatal("a write on the parted node reached a member")
	}
}

// Raft is the control plane only: a daemon restarted while a majority of
// the group's daemons are down (their Postgres up and written to) streams
// from its last state, without a leader. Before Close took a snapshot, a
// young group's restarted member had no state until a leader committed
// its log, so no streams.
func TestRestartWithoutQuorumKeepsReplicating(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]

	for _, n := range []*localmesh.Node{a, b, c} {
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO items VALUES (1, 'a, no quorum', 0)`)
	mustExec(t, ctx, b, `INSERT INTO items VALUES (2, 'b, no quorum', 0)`)
	eventually(t, 30*time.Second, "a's and b's writes on c, without a Raft leader", func() error {
		if n := count(t, ctx, c, `SELECT count(*) FROM items WHERE id IN (1, 2)`); n != 2 {
			return fmt.Errorf("c has %d of the 2 rows", n)
		}
		return nil
	})
	rep, err := c.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if rep.RaftLeader != "" {
		t.Fatalf("c sees leader %q with two of three daemons down: the test no longer shows replication without quorum", rep.RaftLeader)
	}

	for _, n := range []*localmesh.Node{a, b} {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	converged(t, ctx, 30*time.Second, "items", nodes...)
}
