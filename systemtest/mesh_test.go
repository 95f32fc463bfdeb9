//go:build integration

package systemtest

import (
	"fmt"

	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

const itemsSchema = `CREATE TABLE items (id bigint PRIMARY KEY, origin text NOT NULL, n int NOT NULL DEFAULT 0)`

// Writes on every node reach every other node exactly once, and once writes
// stop, replication goes quiet (a loop would keep applying).
func TestThreeNodesWriteEverywhere(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b", "c")
	const perNode = 200
	for i, n := range nodes {
		for j := 0; j < perNode; j++ {
			mustExec(t, ctx, n, `INSERT INTO items (id, origin) VALUES ($1, $2)`, i*1000+j, n.Name)
		}
		mustExec(t, ctx, n, `UPDATE items SET n = n + 1 WHERE origin = $1 AND id % 2 = 0`, n.Name)
	}
	converged(t, ctx, 60*time.Second, "items", nodes...)
	for _, n := range nodes {
		if got := count(t, ctx, n, `SELECT count(*) FROM items`); got != 3*perNode {
			t.Fatalf("%s has %d rows, want %d", n.Name, got, 3*perNode)
		}
		if got := count(t, ctx, n, `SELECT count(*) FROM items WHERE n = 1`); got != 3*perNode/2 {
			t.Fatalf("%s has %d updated rows, want %d", n.Name, got, 3*perNode/2)
		}
	}

	// Quiet: over a few seconds no stream applies anything more.
	applied := func() string {
		s := ""
		for _, n := range nodes {
			rep, err := n.Status(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range rep.Peers {
				s += fmt.Sprintf("%s<-%s:%d ", n.Name, p.Peer, p.AppliedTxns)
			}
		}
		return s
	}
	// A loop writes a transaction per round trip between nodes; the
	// background writes nobody can stop (autovacuum's ANALYZE, pgmesh's
	// housekeeping, progress published at most once a second per peer) are
	// a handful. Counted in transaction ids, not WAL bytes: ANALYZE's
	// catalog records alone can exceed any small byte bound.
	xid := func(n *localmesh.Node) int64 {
		return count(t, ctx, n, `SELECT pg_current_xact_id()::text::bigint`)
	}
	before := applied()
	var xids []int64
	for _, n := range nodes {
		xids = append(xids, xid(n))
	}
	time.Sleep(3 * time.Second) // an observation window, not synchronisation
	if after := applied(); after != before {
		t.Fatalf("replication kept applying after writes stopped (a loop?):\nbefore %s\nafter  %s", before, after)
	}
	for i, n := range nodes {
		// Minus one: reading the counter takes an id itself.
		wrote := xid(n) - xids[i] - 1
		t.Logf("%s: %d writing transactions while idle", n.Name, wrote)
		if wrote > 15 {
			t.Fatalf("%s committed %d writing transactions in 3s while idle (a loop?)", n.Name, wrote)
		}
	}
}
