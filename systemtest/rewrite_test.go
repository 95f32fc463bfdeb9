//go:build integration

package systemtest

import (
	"fmt"
	"testing"
	"time"
)

// A table rewrite (ALTER TABLE ... TYPE, as `pgmesh sequences audit
// --apply` runs on every node) writes every row again in the rewriting
// transaction, so that PostgreSQL dates each row at the rewrite. The rows'
// data is as it was: a peer's change committed before the rewrite, and
// arriving after it, must still win over the row it changes, as it does
// on every other node, or the nodes disagree for good. (Found by
// TestParkAndReplay: its first update from a can share a luw_resolution
// interval with c's ALTER, which then won the tie by node id.)
func TestTableRewriteKeepsRowVersions(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL, v text NOT NULL)`, "a", "b")
	a, b := nodes[0], nodes[1]
	for i := 1; i <= 10; i++ {
		mustExec(t, ctx, a, `INSERT INTO t VALUES ($1, $1, 'first')`, i)
	}
	converged(t, ctx, 30*time.Second, "t", nodes...)

	// b is away while a changes rows 1 to 5 and deletes row 6; then b
	// widens a column, which rewrites t there, before a's changes arrive.
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 5; i++ {
		mustExec(t, ctx, a, `UPDATE t SET v = 'from a' WHERE id = $1`, i)
	}
	mustExec(t, ctx, a, `DELETE FROM t WHERE id = 6`)
	time.Sleep(20 * time.Millisecond) // the rewrite is later in every resolution
	mustExec(t, ctx, b, `ALTER TABLE t ALTER COLUMN n TYPE bigint`)
	mustExec(t, ctx, a, `ALTER TABLE t ALTER COLUMN n TYPE bigint`)
	if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.table_rewrite WHERE relid = 'public.t'::regclass`); n != 1 {
		t.Fatalf("b recorded %d rewrites of t, want 1", n)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	got := converged(t, ctx, 30*time.Second, "t", nodes...)
	eventually(t, 10*time.Second, "a's changes on b", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM t WHERE v = 'from a'`); n != 5 {
			return fmt.Errorf("%d of a's 5 updates on b:\n%s", n, got)
		}
		if n := count(t, ctx, b, `SELECT count(*) FROM t WHERE id = 6`); n != 0 {
			return fmt.Errorf("a's delete of row 6 is not on b")
		}
		return nil
	})

	// Local writes after the rewrite are dated as ever: a later change of
	// b's wins over an earlier one of a's that arrives after it.
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `UPDATE t SET v = 'a, earlier' WHERE id = 7`)
	time.Sleep(20 * time.Millisecond)
	mustExec(t, ctx, b, `UPDATE t SET v = 'b, later' WHERE id = 7`)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "b's later update of row 7 everywhere", func() error {
		for _, n := range nodes {
			if c := count(t, ctx, n, `SELECT count(*) FROM t WHERE id = 7 AND v = 'b, later'`); c != 1 {
				return fmt.Errorf("not on %s", n.Name)
			}
		}
		return nil
	})
	converged(t, ctx, 30*time.Second, "t", nodes...)

	// A rewrite through pgmesh ddl is noted on every node, the applying
	// one included.
	if out, stderr, err := a.CLI(ctx, "ddl", "ALTER TABLE t ALTER COLUMN n TYPE int"); err != nil {
		t.Fatalf("pgmesh ddl: %v: %s %s", err, out, stderr)
	}
	eventually(t, 30*time.Second, "the replicated rewrite noted on b", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.table_rewrite WHERE relid = 'public.t'::regclass`); n != 2 {
			return fmt.Errorf("%d rewrites of t noted on b, want 2", n)
		}
		return nil
	})
}
