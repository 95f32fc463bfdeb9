//go:build integration

package systemtest

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

func hasColumn(t *testing.T, n *localmesh.Node, table, column string) bool {
	t.Helper()
	return count(t, ctxFor(t), n, `SELECT count(*) FROM information_schema.columns WHERE table_name = $1 AND column_name = $2`, table, column) == 1
}

func waitColumn(t *testing.T, table, column string, nodes ...*localmesh.Node) {
	t.Helper()
	eventually(t, 30*time.Second, fmt.Sprintf("%s.%s on every node", table, column), func() error {
		for _, n := range nodes {
			if !hasColumn(t, n, table, column) {
				return fmt.Errorf("%s lacks it", n.Name)
			}
		}
		return nil
	})
}

// DDL run through pgmesh.replicate_ddl (or pgmesh ddl) reaches every node in
// order with the data: rows written with a new column arrive everywhere.
func TestReplicatedDDL(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE orders (id int PRIMARY KEY, item text)`, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	mustExec(t, ctx, a, `INSERT INTO orders VALUES (1, 'before')`)
	// The DDL and a row using it, in one transaction on a.
	mustExec(t, ctx, a, `BEGIN; SELECT pgmesh.replicate_ddl('ALTER TABLE orders ADD COLUMN note text');
		INSERT INTO orders VALUES (2, 'x', 'from a'); COMMIT`)
	waitColumn(t, "orders", "note", b)
	var wg sync.WaitGroup
	for i, n := range []*localmesh.Node{a, b} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 50; j++ {
				if err := n.PG.Exec(ctx, `INSERT INTO orders VALUES ($1, 'y', $2)`, 100*(i+1)+j, n.Name); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	if got := converged(t, ctx, 60*time.Second, "orders", nodes...); !strings.Contains(got, "(2,x,\"from a\")") {
		t.Fatalf("orders converged without the row written with the new column:\n%s", got)
	}
	if n := count(t, ctx, c, `SELECT count(*) FROM orders`); n != 102 {
		t.Fatalf("c has %d orders, want 102", n)
	}

	// Create a table, use it, rename a column, drop the table.
	mustExec(t, ctx, b, `SELECT pgmesh.replicate_ddl('CREATE TABLE extra (id int PRIMARY KEY, v text)')`)
	waitColumn(t, "extra", "v", a, c)
	mustExec(t, ctx, c, `INSERT INTO extra VALUES (1, 'from c')`)
	converged(t, ctx, 30*time.Second, "extra", nodes...)
	if out, stderr, err := a.CLI(ctx, "ddl", "ALTER TABLE extra RENAME COLUMN v TO value"); err != nil {
		t.Fatalf("pgmesh ddl: %v %s %s", err, out, stderr)
	}
	waitColumn(t, "extra", "value", nodes...)
	mustExec(t, ctx, a, `SELECT pgmesh.replicate_ddl('DROP TABLE extra')`)
	eventually(t, 30*time.Second, "extra dropped everywhere", func() error {
		for _, n := range nodes {
			if count(t, ctx, n, `SELECT count(*) FROM pg_tables WHERE tablename = 'extra'`) != 0 {
				return fmt.Errorf("%s still has it", n.Name)
			}
		}
		return nil
	})
	for _, n := range nodes {
		rep, err := n.Status(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range rep.Peers {
			if !p.Connected {
				t.Fatalf("%s's stream from %s is down after the DDL: %s", n.Name, p.Peer, p.LastError)
			}
		}
	}
}

// Two nodes issue DDL at the same moment: the global lock runs them one
// after the other.
func TestConcurrentDDLIsSerialized(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE t (id int PRIMARY KEY)`, "a", "b")
	start := time.Now()
	var wg sync.WaitGroup
	for i, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sql := fmt.Sprintf("ALTER TABLE t ADD COLUMN c%d int; SELECT pg_sleep(1)", i)
			if out, stderr, err := n.CLI(ctx, "ddl", sql); err != nil {
				t.Errorf("%s: %v %s %s", n.Name, err, out, stderr)
			}
		}()
	}
	wg.Wait()
	if took := time.Since(start); took < 2*time.Second {
		t.Fatalf("two 1s DDLs took %s in all: they overlapped", took)
	}
	waitColumn(t, "t", "c0", nodes...)
	waitColumn(t, "t", "c1", nodes...)
}

// DDL while a peer is cut off times out with the documented error; with
// --proceed it runs, and the peer applies it in order when it returns.
func TestDDLWithPeerCutOff(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	// Three nodes: with b cut off, a and c still hold the Raft majority
	// the DDL lock needs.
	nodes := mesh(t, ctx, `CREATE TABLE t (id int PRIMARY KEY)`, "a", "b", "c")
	a, b := nodes[0], nodes[1]
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO t VALUES (1)`)
	_, stderr, err := a.CLI(ctx, "ddl", "--timeout", "1s", "ALTER TABLE t ADD COLUMN late text")
	if err == nil || !strings.Contains(stderr, "not every peer has applied this node's changes within") {
		t.Fatalf("DDL with b cut off: err=%v %s", err, stderr)
	}
	if hasColumn(t, a, "t", "late") {
		t.Fatal("the refused DDL ran anyway")
	}
	if _, stderr, err := a.CLI(ctx, "ddl", "--timeout", "1s", "--proceed", "ALTER TABLE t ADD COLUMN late text"); err != nil {
		t.Fatalf("DDL --proceed: %v %s", err, stderr)
	}
	mustExec(t, ctx, a, `INSERT INTO t VALUES (2, 'after')`)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitColumn(t, "t", "late", b)
	converged(t, ctx, 30*time.Second, "t", nodes...)
}

// With capture_ddl on, a plain ALTER TABLE replicates; a temporary table
// and CREATE INDEX CONCURRENTLY stay local.
func TestDDLCapture(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, `CREATE TABLE t (id int PRIMARY KEY)`, []string{"--capture-ddl", "true"}, "a", "b")
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, a, `ALTER TABLE t ADD COLUMN captured text`)
	waitColumn(t, "t", "captured", b)
	mustExec(t, ctx, a, `CREATE TEMP TABLE scratch (x int); DROP TABLE scratch`)
	mustExec(t, ctx, a, `CREATE INDEX CONCURRENTLY t_captured ON t (captured)`)
	mustExec(t, ctx, a, `INSERT INTO t VALUES (1, 'row after')`)
	converged(t, ctx, 30*time.Second, "t", nodes...)
	if n := count(t, ctx, b, `SELECT count(*) FROM pg_indexes WHERE indexname = 't_captured'`); n != 0 {
		t.Fatal("CREATE INDEX CONCURRENTLY was replicated")
	}
	rep, err := b.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Peers {
		if p.LastError != "" || p.Errors != 0 {
			t.Fatalf("b's stream from %s failed: %s", p.Peer, p.LastError)
		}
	}
}
