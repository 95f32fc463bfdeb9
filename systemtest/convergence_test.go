//go:build integration

package systemtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// soakSettings reads the seed and length of the randomized convergence run:
// PGMESH_SEED (default: the clock) and PGMESH_SOAK (a duration; default a
// short run of a fixed number of operations, as in `make test`).
func soakSettings(t *testing.T) (seed uint64, ops int, soak time.Duration) {
	seed = uint64(time.Now().UnixNano())
	if s := os.Getenv("PGMESH_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("PGMESH_SEED=%q is not a number", s)
		}
		seed = v
	}
	if s := os.Getenv("PGMESH_SOAK"); s != "" {
		d, err := time.ParseDuration(s)
		if err != nil {
			t.Fatalf("PGMESH_SOAK=%q is not a duration", s)
		}
		return seed, 0, d
	}
	return seed, 400, 0
}

// Three nodes write a small key space concurrently (inserts, upserts,
// updates, deletes, some in multi-statement transactions) while one node is
// cut off and healed and another's daemon is killed and restarted. Once
// writes stop every node holds identical rows.
func TestRandomizedConvergence(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	seed, ops, soak := soakSettings(t)
	t.Logf("seed %d (rerun with PGMESH_SEED=%d)", seed, seed)
	nodes := meshWith(t, ctx, `CREATE TABLE rnd (k int PRIMARY KEY, v int NOT NULL, who text NOT NULL);
		CREATE TABLE rndf (k int PRIMARY KEY, v int NOT NULL, who text NOT NULL)`,
		[]string{"--housekeeping-interval", "1s"}, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	// rndf is filtered: even keys go everywhere, keys below 10 also
	// between a and b (the union of two sets' filters).
	repset(t, ctx, a, "remove", "default", "rndf")
	repset(t, ctx, a, "add", "default", "rndf", "--where", "k % 2 = 0")
	repset(t, ctx, b, "create", "pair", "--nodes", "a,b")
	repset(t, ctx, c, "add", "pair", "rndf", "--where", "k < 10")

	var done atomic.Int64 // operations finished, all workers
	total := int64(3 * ops)
	deadline := time.Now().Add(soak)
	finished := func(i int) bool {
		if soak > 0 {
			return time.Now().After(deadline)
		}
		return i >= ops
	}
	var wg sync.WaitGroup
	errs := make([]error, len(nodes))
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// A long run is paced so that apply keeps up on a small machine;
			// the short one writes as fast as it can.
			pace := time.Duration(0)
			if soak > 0 {
				pace = 5 * time.Millisecond
			}
			errs[i] = randomWorkload(ctx, n, rand.New(rand.NewPCG(seed, uint64(i))), finished, &done, pace)
		}()
	}

	// Faults, at fixed points of the run.
	progress := func() float64 {
		if soak > 0 {
			return 1 - time.Until(deadline).Seconds()/soak.Seconds()
		}
		return float64(done.Load()) / float64(total)
	}
	waitFor := func(p float64) {
		for progress() < p && ctx.Err() == nil {
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitFor(0.2)
	if err := c.Stop(); err != nil { // c is cut off: it neither sends nor receives
		t.Error(err)
	}
	waitFor(0.4)
	if err := b.Kill(); err != nil {
		t.Error(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Error(err)
	}
	waitFor(0.7)
	if err := c.Start(ctx); err != nil {
		t.Error(err)
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("workload on %s: %v", nodes[i].Name, err)
		}
	}
	if err := localmesh.CaughtUp(ctx, 120*time.Second+soak, nodes...); err != nil {
		t.Fatal(err)
	}
	rows := convergedByKey(t, ctx, 30*time.Second, "rnd", "true", a, b, c)
	convergedByKey(t, ctx, 30*time.Second, "rndf", "k % 2 = 0", a, b, c)
	convergedByKey(t, ctx, 30*time.Second, "rndf", "k % 2 = 0 OR k < 10", a, b)
	// Rows outside a node's share were written there, never received.
	for _, n := range nodes {
		outside := `SELECT count(*) FROM rndf WHERE k % 2 = 1 AND k >= 10 AND who NOT LIKE $1`
		if n == c {
			outside = `SELECT count(*) FROM rndf WHERE k % 2 = 1 AND who NOT LIKE $1`
		}
		if got := count(t, ctx, n, outside, n.Name+"%"); got != 0 {
			t.Fatalf("%s holds %d rows of rndf outside its share that another node wrote", n.Name, got)
		}
	}
	var conflicts int64
	for _, n := range nodes {
		conflicts += count(t, ctx, n, `SELECT count(*) FROM pgmesh.conflict_history`)
	}
	t.Logf("%d operations; converged on %d rows; %d conflicts recorded", done.Load(), len(splitLines(rows)), conflicts)
	if conflicts == 0 {
		t.Fatal("no conflicts at all: the workload did not exercise conflict handling")
	}
}

func isTransient(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001")
}

func splitLines(s string) []string {
	if s == "" {
		return nil
	}
	var out []string
	start := 0
	for i := range s {
		if s[i] == '\n' {
			out = append(out, s[start:i])
			start = i + 1
		}
	}
	return append(out, s[start:])
}

// randomWorkload runs random operations against n until finished says so.
func randomWorkload(ctx context.Context, n *localmesh.Node, rng *rand.Rand, finished func(int) bool, done *atomic.Int64, pace time.Duration) error {
	conn, err := n.PG.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	const keys = 20
	for i := 0; !finished(i); i++ {
		stmts := 1 + rng.IntN(3)
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			for s := 0; s < stmts; s++ {
				k, v := rng.IntN(keys), rng.IntN(1000)
				table := "rnd"
				if rng.IntN(3) == 0 {
					table = "rndf" // filtered by replication sets
				}
				var sql string
				switch op := rng.IntN(10); {
				case op < 3:
					sql = `INSERT INTO rnd VALUES ($1, $2, $3) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v, who = EXCLUDED.who`
				case op < 4:
					sql = `INSERT INTO rnd VALUES ($1, $2, $3) ON CONFLICT DO NOTHING`
				case op < 7:
					sql = `UPDATE rnd SET v = v + $2, who = $3 WHERE k = $1`
				default:
					sql = `DELETE FROM rnd WHERE k = $1 AND $2::int >= 0 AND $3::text <> ''`
				}
				sql = strings.Replace(sql, "rnd", table, 1)
				if _, err := tx.Exec(ctx, sql, k, v, fmt.Sprintf("%s%d", n.Name, i)); err != nil {
					return err
				}
			}
			return nil
		})
		if isTransient(err) {
			// Deadlocks with apply transactions happen, as between any
			// concurrent writers; an application retries, and so do we.
			continue
		}
		if err != nil {
			return err
		}
		done.Add(1)
		time.Sleep(pace)
	}
	return nil
}
