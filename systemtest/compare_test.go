//go:build integration

package systemtest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// drift runs sql on n inside a session that carries a replication origin
// of its own, so the change is never sent to the others: divergence made
// on purpose, as a missed change or a manual fix on one node would be.
func drift(t *testing.T, ctx context.Context, n *localmesh.Node, sql string) {
	t.Helper()
	conn := connect(t, ctx, n)
	// Each its own transaction: the origin must still be set at the
	// change's commit.
	for _, s := range []string{`SELECT pg_replication_origin_create('pgmesh_drift')
		WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = 'pgmesh_drift')`,
		`SELECT pg_replication_origin_session_setup('pgmesh_drift')`, sql, `SELECT pg_replication_origin_session_reset()`} {
		if _, err := conn.Exec(ctx, s); err != nil {
			t.Fatalf("%s on %s: %v", s, n.Name, err)
		}
	}
}

func compareJSON(t *testing.T, ctx context.Context, n *localmesh.Node, args ...string) (api.CompareResponse, string, error) {
	t.Helper()
	out, stderr, err := n.CLI(ctx, append([]string{"compare", "--json"}, args...)...)
	var rep api.CompareResponse
	if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil {
		t.Fatalf("pgmesh compare --json printed no JSON (%v): %s %s", jerr, out, stderr)
	}
	return rep, stderr, err
}

// Rows made to differ on purpose (a row written on one node only, a column
// updated on another only, a row deleted on a third only) are found by
// compare, which names exactly those keys and the version last-update-wins
// keeps; repair writes the winners again, and the nodes agree after it.
func TestCompareFindsAndRepairsDrift(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0);
		CREATE TABLE nokey (x int)`, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	mustExec(t, ctx, a, `INSERT INTO kv SELECT g, 'row ' || g FROM generate_series(1, 3000) g`)
	converged(t, ctx, time.Minute, "kv", nodes...)

	rep, stderr, err := compareJSON(t, ctx, b, "--chunk-rows", "500")
	if err != nil {
		t.Fatalf("compare of identical nodes failed: %v %s", err, stderr)
	}
	for _, tr := range rep.Tables {
		switch tr.Table {
		case "public.kv":
			if tr.Rows != 3000 || len(tr.Diffs) != 0 {
				t.Errorf("identical kv: %d rows compared, %d diffs", tr.Rows, len(tr.Diffs))
			}
		case "public.nokey":
			if !strings.Contains(tr.NotComparable, "no primary key") {
				t.Errorf("nokey should be reported not comparable, got %+v", tr)
			}
		}
	}

	drift(t, ctx, a, `INSERT INTO kv VALUES (5000, 'only on a')`)
	drift(t, ctx, b, `UPDATE kv SET v = 'changed on b only' WHERE k = 10`)
	drift(t, ctx, c, `DELETE FROM kv WHERE k = 20`)

	// One chunk of 3,001 rows: found by hashing narrower ranges.
	rep, _, err = compareJSON(t, ctx, a, "kv")
	if err == nil {
		t.Fatal("compare exited 0 with three keys differing")
	}
	type winner struct {
		node   string
		delete bool
	}
	want := map[string]winner{"10": {"b", false}, "20": {"c", true}, "5000": {"a", false}}
	got := map[string]winner{}
	for _, d := range rep.Tables[0].Diffs {
		var key struct{ K json.Number }
		if err := json.Unmarshal(d.Key, &key); err != nil {
			t.Fatalf("key %s: %v", d.Key, err)
		}
		got[key.K.String()] = winner{d.Winner, d.WinnerIsDelete}
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("compare found %v, want %v", got, want)
	}

	out, stderr, err := a.CLI(ctx, "repair", "kv", "--dry-run")
	if err != nil || !strings.Contains(out, "would write on a: delete public.kv key {\"k\":20}") {
		t.Fatalf("repair --dry-run: %v\n%s\n%s", err, out, stderr)
	}
	if _, _, err := compareJSON(t, ctx, a, "kv"); err == nil {
		t.Fatal("a dry run repaired something")
	}
	if out, stderr, err := a.CLI(ctx, "repair", "kv"); err != nil {
		t.Fatalf("repair: %v\n%s%s", err, out, stderr)
	}
	eventually(t, time.Minute, "compare exits 0 after repair", func() error {
		if rep, stderr, err := compareJSON(t, ctx, c, "kv"); err != nil {
			return fmt.Errorf("%v %s %+v", err, stderr, rep.Tables)
		}
		return nil
	})
	dump := converged(t, ctx, time.Minute, "kv", nodes...)
	if !strings.Contains(dump, "only on a") || !strings.Contains(dump, "changed on b only") || strings.Contains(dump, "row 20\n") {
		t.Errorf("after repair the nodes agree, but not on the winners:\n%s", clip(dump))
	}
}

// Writes in flight on every node while compare runs are not drift.
func TestCompareUnderWriteLoadReportsNoDrift(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0)`, "a", "b", "c")
	mustExec(t, ctx, nodes[0], `INSERT INTO kv SELECT g, 'row ' || g FROM generate_series(1, 20000) g`)
	converged(t, ctx, time.Minute, "kv", nodes...)

	lctx, stop := context.WithCancel(ctx)
	var wg sync.WaitGroup
	written := make([]int, len(nodes))
	for i, n := range nodes {
		conn := connect(t, ctx, n)
		wg.Go(func() {
			for j := 0; lctx.Err() == nil && j < 100000; j++ {
				// New rows from the node's own range, and updates of rows
				// only this node updates: no conflicts, just traffic.
				if _, err := conn.Exec(lctx, `INSERT INTO kv VALUES ($1, 'new')`, 100000*(i+1)+j); err != nil {
					return
				}
				if _, err := conn.Exec(lctx, `UPDATE kv SET n = n + 1 WHERE k = $1`, 3*(j%6666)+i+1); err != nil {
					return
				}
				written[i]++
				// A steady load the three nodes apply as it comes on a
				// small machine: at 2 ms pauses a 2-core machine fell a
				// minute behind, and settle rightly gave up.
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	time.Sleep(500 * time.Millisecond) // let the load get going
	rep, stderr, err := compareJSON(t, ctx, nodes[1], "kv", "--chunk-rows", "2000")
	stop()
	wg.Wait()
	if err != nil {
		t.Fatalf("compare under load reported drift: %v %s\n%+v", err, stderr, rep.Tables)
	}
	if slices.Contains(written, 0) {
		t.Fatalf("the load did not run on every node: %v", written)
	}
	t.Logf("compared %d rows under a load of %v transactions per node; %d keys in flight", rep.Tables[0].Rows, written, rep.Tables[0].InFlight)
	converged(t, ctx, time.Minute, "kv", nodes...)
}
