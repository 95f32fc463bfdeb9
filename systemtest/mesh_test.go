//go:build integration

package systemtest

import (
	"fmt"

	"github.com/pgmesh/pgmesh/internal/localmesh"
	"testing"
	"time"
)

const itemsSchema = `CREATE TABLE items (id bigint PRIMARY KEY, origin text NOT NULL, n int NOT NULL DEFAULT 0)`

// Writes on every node reach every other node exactly once, and once writes
// stop, replication goes quiet (a loop would keep applying).
func TestThreeNodesWriteEverywhere(t *testing.T) {
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
	walLSN := func(n *localmesh.Node) int64 {
		return count(t, ctx, n, `SELECT pg_current_wal_lsn() - '0/0'::pg_lsn`)
	}
	before := applied()
	var wal []int64
	for _, n := range nodes {
		wal = append(wal, walLSN(n))
	}
	time.Sleep(3 * time.Second) // an observation window, not synchronisation
	if after := applied(); after != before {
		t.Fatalf("replication kept applying after writes stopped (a loop?):\nbefore %s\nafter  %s", before, after)
	}
	for i, n := range nodes {
		// Background records (checkpoints, running-xacts) are a few hundred
		// bytes; a loop would write a transaction per round trip.
		if grew := walLSN(n) - wal[i]; grew > 16<<10 {
			t.Fatalf("%s wrote %d bytes of WAL while idle (a loop?)", n.Name, grew)
		}
	}
}
