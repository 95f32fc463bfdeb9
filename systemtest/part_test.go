//go:build integration

package systemtest

import (
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// Parting waits until the remaining members have applied everything the
// parting node wrote: right after `node part` returns, they hold all of it.
// A stopped node needs --force; a parted node can join again once cleared.
func TestPartDrainForceAndRejoin(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, joinSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]

	// A burst on c, and the part right behind it.
	mustExec(t, ctx, c, `DO $$ BEGIN FOR i IN 1..3000 LOOP
		INSERT INTO ledger (id, node, n) VALUES (3000000 + i, 'c', i); COMMIT; END LOOP; END $$`)
	if out, stderr, err := a.CLI(ctx, "node", "part", "c"); err != nil {
		t.Fatalf("part: %v %s %s", err, out, stderr)
	}
	for _, n := range []*localmesh.Node{a, b} {
		if got := count(t, ctx, n, `SELECT count(*) FROM ledger WHERE node = 'c'`); got != 3000 {
			t.Fatalf("right after the part, %s has %d of c's 3000 rows", n.Name, got)
		}
	}

	// Rejoin c: stop it, clear its data and state, join again (new id).
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(c.DataDir); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, c, `DROP TABLE ledger, counters, "Other Schema"."Mixed Case"; DROP SCHEMA "Other Schema"`)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := c.CLI(ctx, "group", "join", "--via", b.API, "--token", joinToken(t, ctx, a)); err != nil {
		t.Fatalf("rejoin: %v\n%s\n%s", err, out, stderr)
	}
	rep, err := a.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range rep.Nodes {
		if n.Name == "c" && (n.ID != 4 || n.State != "active") {
			t.Fatalf("rejoined c: id %d state %s, want a new id 4, active", n.ID, n.State)
		}
	}
	mustExec(t, ctx, c, `INSERT INTO ledger (id, node, n) VALUES (7000000, 'c again', 1)`)
	converged(t, ctx, 30*time.Second, "ledger", nodes...)

	// A node that is down cannot be drained: --force is required.
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	if err := c.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	_, stderr, err := a.CLI(ctx, "node", "part", "c")
	if err == nil || !strings.Contains(stderr, "--force") {
		t.Fatalf("part of an unreachable node without --force: err=%v %s", err, stderr)
	}
	if _, stderr, err := a.CLI(ctx, "node", "part", "c", "--force"); err != nil {
		t.Fatalf("part --force: %v %s", err, stderr)
	}
	eventually(t, 30*time.Second, "c's slots and origins gone from a and b", func() error {
		for _, n := range []*localmesh.Node{a, b} {
			if left := count(t, ctx, n, `SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_c')
				+ (SELECT count(*) FROM pg_replication_origin WHERE roname = 'pgmesh_c')`); left != 0 {
				return fmt.Errorf("%s still has %d", n.Name, left)
			}
		}
		return nil
	})
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) VALUES (8000000, 'a', 1)`)
	converged(t, ctx, 30*time.Second, "ledger", a, b)
}

// A peer that stays away crosses wal_retention_warn (status says lagging)
// and then wal_retention_max (its slot is dropped, status says so, and the
// peer is told to rejoin).
func TestWALRetentionLimits(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, joinSchema, []string{"--wal-retention-warn", "512kB", "--wal-retention-max", "8MB"}, "a", "b")
	a, b := nodes[0], nodes[1]
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, repeat('x', 100), g FROM generate_series(1, 5000) g`)
	eventually(t, 30*time.Second, "a reports b lagging", func() error {
		out, _, err := a.CLI(ctx, "status")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "peer b is lagging: its slot holds") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, repeat('x', 100), g FROM generate_series(5001, 100000) g`)
	eventually(t, 30*time.Second, "a drops b's slot", func() error {
		out, _, err := a.CLI(ctx, "status")
		if err != nil {
			return err
		}
		if !strings.Contains(out, "peer b has no slot here") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})
	if n := count(t, ctx, a, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_b'`); n != 0 {
		t.Fatal("b's slot still exists on a")
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "b is told to rejoin", func() error {
		out, _, err := b.CLI(ctx, "status")
		if err != nil {
			return err
		}
		if !strings.Contains(out, `replication slot pgmesh_b is missing on peer "a"`) || !strings.Contains(out, "join it again") {
			return fmt.Errorf("status:\n%s", out)
		}
		return nil
	})
}

// A node whose daemon and Postgres were down while a peer committed a
// backlog of 200k changes catches up completely when it returns.
func TestLongAbsenceCatchUp(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, joinSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := b.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// 20,000 transactions of 10 rows each.
	mustExec(t, ctx, a, `DO $$ BEGIN FOR i IN 0..19999 LOOP
		INSERT INTO ledger (id, node, n) SELECT i * 10 + g, 'a', g FROM generate_series(1, 10) g; COMMIT; END LOOP; END $$`)
	if err := b.PG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 180*time.Second, "b caught up", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM ledger`); n != 200000 {
			return fmt.Errorf("b has %d of 200000 rows", n)
		}
		return nil
	})
	took := time.Since(start)
	t.Logf("caught up 200000 rows in 20000 transactions in %s (%.0f rows/s)", took.Round(time.Millisecond), 200000/took.Seconds())
	assertNoConflicts(t, ctx, b)
}

// The Raft leader dies while a part is draining: the part waits for it to
// come back (it must have the parting node's changes too), then commits
// through the new leader, and nothing the parted node wrote is lost.
func TestPartSurvivesLeaderKill(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, joinSchema, "a", "b", "c", "d")
	a, b, c, d := nodes[0], nodes[1], nodes[2], nodes[3]
	const burst = 20000
	mustExec(t, ctx, d, fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
		INSERT INTO ledger (id, node, n) VALUES (4000000 + i, 'd', i); COMMIT; END LOOP; END $$`, burst))

	type result struct {
		out, stderr string
		err         error
	}
	done := make(chan result, 1)
	go func() {
		out, stderr, err := b.CLI(ctx, "node", "part", "d")
		done <- result{out, stderr, err}
	}()
	if err := a.Kill(); err != nil { // a created the group: it leads Raft
		t.Fatal(err)
	}
	time.Sleep(2 * time.Second) // the drain waits for a; a new leader is elected
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatalf("part with the leader killed: %v\n%s\n%s", r.err, r.out, r.stderr)
		}
	case <-ctx.Done():
		t.Fatal("part did not finish")
	}
	rest := []*localmesh.Node{a, b, c}
	for _, n := range rest {
		if got := count(t, ctx, n, `SELECT count(*) FROM ledger WHERE node = 'd'`); got != burst {
			t.Fatalf("after the part, %s has %d of d's %d rows", n.Name, got, burst)
		}
	}
	eventually(t, 60*time.Second, "every remaining node sees d parted, its slots and origins gone", func() error {
		for _, n := range rest {
			rep, err := n.Status(ctx)
			if err != nil {
				return err
			}
			for _, m := range rep.Nodes {
				if m.Name == "d" && m.State != "parted" {
					return fmt.Errorf("%s sees d %s", n.Name, m.State)
				}
			}
			if left := count(t, ctx, n, `SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_d')
				+ (SELECT count(*) FROM pg_replication_origin WHERE roname = 'pgmesh_d')`); left != 0 {
				return fmt.Errorf("%s still has %d of d's slots and origins", n.Name, left)
			}
		}
		return nil
	})
	mustExec(t, ctx, c, `INSERT INTO ledger (id, node, n) VALUES (8000001, 'c', 1)`)
	converged(t, ctx, 30*time.Second, "ledger", rest...)
}
