package main

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// compareTimes times pgmesh compare on a three-node group holding a table
// of rows rows: identical, then with 100 rows changed on one node only (in
// a session with a replication origin of its own, so never sent).
func compareTimes(ctx context.Context, bin string, rows int) ([]result, error) {
	const table = `CREATE TABLE cmp (id bigint PRIMARY KEY, payload text NOT NULL, n int NOT NULL)`
	var nodes []*localmesh.Node
	defer func() {
		for _, n := range nodes {
			_ = n.Stop()
			n.Remove()
		}
	}()
	for _, name := range []string{"x", "y", "z"} {
		n, err := localmesh.NewNode(ctx, bin, name, pgtest.Options{})
		if err != nil {
			return nil, err
		}
		nodes = append(nodes, n)
		if err := n.PG.Exec(ctx, table); err != nil {
			return nil, err
		}
		if err := n.Start(ctx); err != nil {
			return nil, err
		}
	}
	if _, err := localmesh.Form(ctx, "cmp", nodes...); err != nil {
		return nil, err
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		return nil, err
	}
	if err := nodes[0].PG.Exec(ctx, fmt.Sprintf(`INSERT INTO cmp SELECT g, 'payload ' || g, 0 FROM generate_series(1, %d) g`, rows)); err != nil {
		return nil, err
	}
	for _, n := range nodes[1:] {
		if err := waitFor(ctx, n.PG, `SELECT count(*) = $1 FROM cmp`, rows); err != nil {
			return nil, err
		}
	}
	// Compare first waits until every stream has caught up; on PostgreSQL
	// 15 that includes reading back (and dropping) what each node applied.
	// Timed is the comparison of a settled group.
	if err := localmesh.CaughtUp(ctx, 10*time.Minute, nodes...); err != nil {
		return nil, err
	}
	timed := func() (time.Duration, int, error) {
		start := time.Now()
		out, stderr, err := nodes[0].CLI(ctx, "compare", "--json", "cmp")
		took := time.Since(start)
		var rep api.CompareResponse
		if jerr := json.Unmarshal([]byte(out), &rep); jerr != nil || len(rep.Tables) != 1 {
			return 0, 0, fmt.Errorf("pgmesh compare: %v %s", err, stderr)
		}
		return took, len(rep.Tables[0].Diffs), nil
	}
	same, diffs, err := timed()
	if err != nil || diffs != 0 {
		return nil, fmt.Errorf("compare of identical nodes: %d diffs, %v", diffs, err)
	}
	step := max(rows/100, 1)
	if err := nodes[1].PG.Exec(ctx, `SELECT pg_replication_origin_create('pgmesh_bench_drift')`); err != nil {
		return nil, err
	}
	conn, err := nodes[1].PG.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer conn.Close(ctx)
	// Each its own transaction: the origin must be set at the commit.
	for _, s := range []string{`SELECT pg_replication_origin_session_setup('pgmesh_bench_drift')`,
		fmt.Sprintf(`UPDATE cmp SET n = 1 WHERE id %% %d = 0`, step), `SELECT pg_replication_origin_session_reset()`} {
		if _, err := conn.Exec(ctx, s); err != nil {
			return nil, err
		}
	}
	differ, diffs, err := timed()
	if err != nil {
		return nil, err
	}
	return []result{
		{what: fmt.Sprintf("8. compare %d rows x 3 nodes, identical", rows), vals: []string{fmt.Sprintf("%.1f s", same.Seconds())}},
		{what: fmt.Sprintf("8. same, %d rows differing", diffs), vals: []string{fmt.Sprintf("%.1f s", differ.Seconds())}},
	}, nil
}
