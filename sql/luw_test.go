//go:build integration

package sql_test

import (
	"context"
	"fmt"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// The tombstone upsert keeps the newest delete with pgmesh.luw_newer, the
// SQL copy of conflict.Rule.Newer; both must decide every pair alike, at
// every resolution, or nodes would keep different tombstones.
func TestSQLRuleMatchesGo(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := pgtest.WithSchema(t, ctx)
	ids := map[string]int{"a": 1, "b": 2, "c": 3}
	if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.node (node_name, node_id, state, is_local)
		VALUES ('a', 1, 'active', false), ('b', 2, 'active', true), ('c', 3, 'active', false)`); err != nil {
		t.Fatal(err)
	}
	edge := time.Date(2026, 11, 30, 12, 0, 0, 0, time.UTC)
	var times []time.Time
	for _, us := range []int64{-1001, -1000, -999, -1, 0, 1, 499, 500, 999, 1000, 1001, 9999, 10000, 10001} {
		times = append(times, edge.Add(time.Duration(us)*time.Microsecond))
	}
	times = append(times, time.UnixMicro(-1500).UTC(), time.UnixMicro(-2000).UTC(), time.Time{}) // before 1970; unknown
	nodes := []string{"a", "b", "c", ""}                                                         // "": this node (NULL)

	for _, res := range []time.Duration{0, time.Microsecond, time.Millisecond, 10 * time.Millisecond} {
		rule := conflict.Rule{Resolution: res}
		if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('luw_resolution_us', $1)
			ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, strconv.FormatInt(res.Microseconds(), 10)); err != nil {
			t.Fatal(err)
		}
		for _, at := range times {
			if at.IsZero() {
				continue
			}
			var got int64
			if err := conn.QueryRow(ctx, `SELECT pgmesh.luw_round($1)`, at).Scan(&got); err != nil {
				t.Fatal(err)
			}
			if want := rule.Round(at); got != want {
				t.Errorf("resolution %s: luw_round(%s) = %d, Go rounds to %d", res, at.Format(time.RFC3339Nano), got, want)
			}
		}
		version := func(at time.Time, node string) (conflict.Version, *time.Time, *string) {
			name := node
			if node == "" {
				name = "b"
			}
			var ts *time.Time
			var nd *string
			if !at.IsZero() {
				ts = &at
			}
			if node != "" {
				nd = &node
			}
			return conflict.Version{CommitTS: at, Node: name, NodeID: ids[name]}, ts, nd
		}
		// Every pair in one statement: thousands of round trips would make
		// the test slow for no gain.
		var ts1, ts2 []*time.Time
		var nd1, nd2 []*string
		var want []bool
		var pairs []string
		for _, at1 := range times {
			for _, at2 := range times {
				for _, n1 := range nodes {
					for _, n2 := range nodes {
						v1, t1, d1 := version(at1, n1)
						v2, t2, d2 := version(at2, n2)
						ts1, nd1, ts2, nd2 = append(ts1, t1), append(nd1, d1), append(ts2, t2), append(nd2, d2)
						want = append(want, rule.Newer(v1, v2))
						pairs = append(pairs, fmt.Sprintf("luw_newer(%v %q, %v %q)", t1, n1, t2, n2))
					}
				}
			}
		}
		rows, err := conn.Query(ctx, `SELECT pgmesh.luw_newer(x.t1, x.n1, x.t2, x.n2)
			FROM unnest($1::timestamptz[], $2::text[], $3::timestamptz[], $4::text[]) WITH ORDINALITY AS x(t1, n1, t2, n2, i)
			ORDER BY x.i`, ts1, nd1, ts2, nd2)
		if err != nil {
			t.Fatal(err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[bool])
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != len(want) {
			t.Fatalf("resolution %s: %d answers for %d pairs", res, len(got), len(want))
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("resolution %s: %s = %v, Go says %v", res, pairs[i], got[i], want[i])
			}
		}
		t.Logf("resolution %s: %d pairs decided alike", res, len(want))
	}
}
