//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// convergedByKey is converged for a public table keyed by the integer
// column k, comparing the rows that where selects. When the nodes still
// differ at the deadline, the failure explains every key they disagree on,
// node by node: the row with the commit time and origin of its version, the
// key's tombstone, and the conflicts logged for it, so that a rare
// divergence tells its own story.
func convergedByKey(t *testing.T, ctx context.Context, timeout time.Duration, table, where string, nodes ...*localmesh.Node) string {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		rows := make([]map[int]string, len(nodes))
		var err error
		for i, n := range nodes {
			if rows[i], err = keyedRows(ctx, n, table, where); err != nil {
				break
			}
		}
		var differ []int
		if err == nil {
			differ = differingKeys(rows)
			if len(differ) == 0 {
				return joinRows(rows[0])
			}
		}
		if time.Now().After(deadline) {
			if err != nil {
				t.Fatalf("%s: read rows: %v", table, err)
			}
			t.Fatalf("%s (%s) differs between nodes after %s on %d keys:\n%s", table, where, timeout, len(differ),
				explainKeys(ctx, table, differ, nodes))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// keyedRows reads the selected rows of table by key.
func keyedRows(ctx context.Context, n *localmesh.Node, table, where string) (map[int]string, error) {
	c, err := n.PG.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, fmt.Sprintf("SELECT r.k, r::text FROM %s r WHERE %s", table, where))
	if err != nil {
		return nil, err
	}
	out := map[int]string{}
	var k int
	var row string
	_, err = pgx.ForEachRow(rows, []any{&k, &row}, func() error { out[k] = row; return nil })
	return out, err
}

// differingKeys returns, in order, the keys whose rows are not the same on
// every node (missing on some counts).
func differingKeys(rows []map[int]string) []int {
	all := map[int]bool{}
	for _, m := range rows {
		for k := range m {
			all[k] = true
		}
	}
	var differ []int
	for _, k := range slices.Sorted(maps.Keys(all)) {
		v, ok := rows[0][k]
		for _, m := range rows[1:] {
			if w, ok2 := m[k]; ok2 != ok || w != v {
				differ = append(differ, k)
				break
			}
		}
	}
	return differ
}

func joinRows(m map[int]string) string {
	var out []string
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, m[k])
	}
	return strings.Join(out, "\n")
}

// explainKeys describes each key on each node: the row and who wrote its
// version when, the tombstone, and the conflicts logged for the key.
func explainKeys(ctx context.Context, table string, keys []int, nodes []*localmesh.Node) string {
	var b strings.Builder
	for _, k := range keys {
		fmt.Fprintf(&b, "key %d:\n", k)
		for _, n := range nodes {
			fmt.Fprintf(&b, "  on %s:\n", n.Name)
			lines, err := keyHistory(ctx, n, table, k)
			if err != nil {
				fmt.Fprintf(&b, "    (could not read: %v)\n", err)
			}
			for _, l := range lines {
				fmt.Fprintf(&b, "    %s\n", l)
			}
		}
	}
	return b.String()
}

func keyHistory(ctx context.Context, n *localmesh.Node, table string, k int) ([]string, error) {
	c, err := n.PG.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	rel := "public." + table
	rows, err := c.Query(ctx, fmt.Sprintf(`
SELECT 'row ' || r::text || ' written ' || coalesce(v.timestamp::text, '(time unknown)') || ' by '
	|| CASE WHEN v.roident IS NULL THEN '(unknown)' WHEN v.roident = 0 THEN 'this node'
	        ELSE coalesce(o.roname, v.roident::text) END
FROM public.%s r
LEFT JOIN LATERAL pg_catalog.pg_xact_commit_timestamp_origin(r.xmin) v ON true
LEFT JOIN pg_catalog.pg_replication_origin o ON o.roident = v.roident
WHERE r.k = $1
UNION ALL
SELECT 'tombstone: deleted ' || coalesce(t.deleted_at, pg_catalog.pg_xact_commit_timestamp(t.xmin))::text
	|| ' by ' || coalesce(t.deleted_by, 'this node')
FROM pgmesh.tombstone t WHERE t.relation = $2 AND t.key = jsonb_build_object('k', $1::int)
UNION ALL
(SELECT format('conflict at %%s: %%s/%%s from %%s (remote %%s, lsn %%s, xid %%s), local %%s by %%s: local %%s remote %%s applied %%s%%s',
	h.occurred_at, h.conflict_type, h.resolution, h.origin_node, h.remote_commit_ts, h.remote_commit_lsn, h.remote_xid,
	h.local_commit_ts, h.local_origin, h.local_tuple, h.remote_tuple, h.applied_tuple, ' (' || h.reason || ')')
FROM pgmesh.conflict_history h WHERE h.relation = $2 AND h.key_tuple = jsonb_build_object('k', $1::int)
ORDER BY h.id)`, pgx.Identifier{table}.Sanitize()), k, rel)
	if err != nil {
		return nil, err
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err == nil && len(lines) == 0 {
		lines = []string{"no row, no tombstone, no conflict"}
	}
	return lines, err
}
