//go:build integration

package systemtest

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// updateAll runs one transaction on n that updates every row of items,
// again when it was chosen as a deadlock's victim: it locks rows in table
// order, and an apply stream updating the same rows in the peer's order
// may lock them in another (as with any two concurrent writers; the
// applier retries the same way).
func updateAll(ctx context.Context, n *localmesh.Node, tag string) error {
	for {
		err := n.PG.Exec(ctx, `UPDATE items SET origin = $1, n = n + 1`, tag)
		var pe *pgconn.PgError
		if !errors.As(err, &pe) || pe.Code != "40P01" {
			return err
		}
	}
}

// Two nodes update the same rows in large concurrent transactions; the third
// node's two apply streams then contend for the same row locks. Every node
// must settle on the same winner per row (the later commit).
func TestConcurrentAppliesOnThirdNodeConverge(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b", "c")
	mustExec(t, ctx, nodes[0], `INSERT INTO items SELECT g, 'seed', 0 FROM generate_series(1, 2000) g`)
	converged(t, ctx, 30*time.Second, "items", nodes...)
	for round := 0; round < 5; round++ {
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, n := range nodes[:2] {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = updateAll(ctx, n, n.Name)
			}()
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
	rows := converged(t, ctx, 60*time.Second, "items", nodes...)
	if rows == "" {
		t.Fatal("no rows")
	}
}
