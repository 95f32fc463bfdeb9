//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// leastPrivilege gives n's database to the application's role, app_owner,
// creates the role pgmesh with exactly what `pgmesh grants` prints, and
// points n's daemon at it.
func leastPrivilege(t *testing.T, ctx context.Context, n *localmesh.Node) {
	t.Helper()
	mustExec(t, ctx, n, `CREATE ROLE app_owner LOGIN; ALTER DATABASE postgres OWNER TO app_owner`)
	script, stderr, err := n.CLI(ctx, "grants", "--role", "pgmesh", "--owner", "app_owner", "--create-role")
	if err != nil {
		t.Fatalf("pgmesh grants: %v %s", err, stderr)
	}
	mustExec(t, ctx, n, script)
	n.DSN = n.PG.RoleDSN("pgmesh", "postgres")
}

// asApp runs sql on n as the application's role.
func asApp(t *testing.T, ctx context.Context, n *localmesh.Node, sql string) {
	t.Helper()
	mustExec(t, ctx, n, "SET ROLE app_owner; "+sql)
}

// A group whose daemons are not superusers, holding only what `pgmesh
// grants` gives them, does everything a superuser's does: writes of the
// application's own role everywhere, each conflict type, a replication set
// with a row filter, global sequences, a join with data, compare and
// repair, and a part.
func TestLeastPrivilegeRole(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := newNodes(t, ctx, "", "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	for _, n := range nodes {
		leastPrivilege(t, ctx, n)
	}
	// c has the tables too, so that its join copies rows only (the
	// servers fetched for 16+ have no pg_dump to copy a schema with;
	// TestJoinAfterSequenceConversion copies one under this role).
	for _, n := range nodes {
		asApp(t, ctx, n, kvSchema+`; CREATE TABLE orders (id bigserial PRIMARY KEY, region text NOT NULL, amount int NOT NULL)`)
	}
	for _, n := range nodes[:2] {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := localmesh.Form(ctx, "g", a, b); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	for _, n := range []*localmesh.Node{a, b} {
		if out := n.LogTail(100000); !strings.Contains(out, "no event triggers on this node (its role is not a superuser)") {
			t.Errorf("%s's daemon did not say that it has no event triggers:\n%s", n.Name, out)
		}
		// Every session of the daemons, streams included, is pgmesh's.
		if got := count(t, ctx, n, `SELECT count(*) FROM pg_stat_activity
			WHERE (application_name LIKE 'pgmesh%' OR backend_type = 'walsender') AND usename <> 'pgmesh'`); got != 0 {
			t.Errorf("%s has %d pgmesh sessions of another role", n.Name, got)
		}
	}

	// The application's own writes, deletes included (they leave
	// tombstones, through a trigger of pgmesh's).
	asApp(t, ctx, a, `INSERT INTO orders (region, amount) SELECT 'eu', g FROM generate_series(1, 20) g`)
	asApp(t, ctx, b, `INSERT INTO orders (id, region, amount) SELECT 1000 + g, 'us', g FROM generate_series(1, 20) g;
		DELETE FROM orders WHERE id = 1001`)
	converged(t, ctx, 30*time.Second, "orders", a, b)
	if got := count(t, ctx, a, `SELECT count(*) FROM pgmesh.tombstone WHERE key = '{"id": 1001}'`); got != 1 {
		t.Errorf("a has %d tombstones of b's delete, want 1", got)
	}

	provokeConflictTypes(t, ctx, a, b)

	// A table created through pgmesh ddl joins the default set in the
	// transaction that creates it, on both nodes, without event triggers:
	// rows written right after it reach the other node.
	if out, stderr, err := a.CLI(ctx, "ddl", "CREATE TABLE fresh (id int PRIMARY KEY, node text)"); err != nil {
		t.Fatalf("ddl: %v\n%s%s", err, out, stderr)
	}
	mustExec(t, ctx, a, `INSERT INTO fresh VALUES (1, 'a')`)
	eventually(t, 30*time.Second, "fresh on b", func() error {
		if count(t, ctx, b, `SELECT count(*) FROM pg_class WHERE relname = 'fresh'`) == 0 {
			return fmt.Errorf("no table fresh on b yet")
		}
		return nil
	})
	mustExec(t, ctx, b, `INSERT INTO fresh VALUES (2, 'b')`)
	if got := converged(t, ctx, 30*time.Second, "fresh", a, b); got != "(1,a)\n(2,b)" {
		t.Errorf("fresh converged to %q, want both rows", got)
	}

	// A replication set with a row filter: b receives odd ids only.
	repset(t, ctx, a, "remove", "default", "orders")
	repset(t, ctx, a, "create", "eu_orders", "--nodes", "a,b")
	repset(t, ctx, a, "add", "eu_orders", "orders", "--where", "id % 2 = 1", "--sync")
	asApp(t, ctx, a, `INSERT INTO orders (id, region, amount) VALUES (2001, 'eu', 1), (2002, 'us', 1)`)
	eventually(t, 30*time.Second, "b has the order the filter lets through", func() error {
		if got := count(t, ctx, b, `SELECT count(*) FROM orders WHERE id = 2001`); got != 1 {
			return fmt.Errorf("b has %d of order 2001", got)
		}
		return nil
	})
	if err := localmesh.CaughtUp(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, b, `SELECT count(*) FROM orders WHERE id = 2002`); got != 0 {
		t.Errorf("b received an order the row filter keeps out")
	}
	mustExec(t, ctx, a, `DELETE FROM orders WHERE id = 2002`)
	repset(t, ctx, a, "add", "default", "orders", "--sync")
	repset(t, ctx, a, "drop", "eu_orders")

	// Global sequences: the application's inserts draw galloc values.
	if out, stderr, err := a.CLI(ctx, "sequences", "convert", "--kind", "galloc", "--chunk-size", "1000", "orders_id_seq"); err != nil {
		t.Fatalf("convert galloc: %v %s %s", err, out, stderr)
	}
	for _, n := range []*localmesh.Node{a, b} {
		asApp(t, ctx, n, fmt.Sprintf(`INSERT INTO orders (region, amount) SELECT %s, g FROM generate_series(1, 50) g`, pgquote.Literal(n.Name)))
	}
	converged(t, ctx, 30*time.Second, "orders", a, b)
	if got := count(t, ctx, a, `SELECT count(DISTINCT id) FROM orders WHERE region IN ('a', 'b')`); got != 100 {
		t.Errorf("galloc gave the two nodes' 100 orders %d distinct ids", got)
	}

	// A join with data: c gets the rows, and converts the galloc sequence
	// as the others did.
	asApp(t, ctx, c, `CREATE TABLE fresh (id int PRIMARY KEY, node text)`)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := c.CLI(ctx, "group", "join", "--via", a.API, "--token", joinToken(t, ctx, a)); err != nil {
		t.Fatalf("join: %v\n%s\n%s", err, out, stderr)
	}
	for _, table := range []string{"orders", "kv", "people", "fresh"} {
		converged(t, ctx, time.Minute, table, nodes...)
	}
	asApp(t, ctx, c, `INSERT INTO orders (region, amount) VALUES ('c', 1)`)
	converged(t, ctx, 30*time.Second, "orders", nodes...)

	// Compare and repair.
	drift(t, ctx, c, `UPDATE orders SET amount = -1 WHERE id = 1002`)
	if _, _, err := compareJSON(t, ctx, a, "orders"); err == nil {
		t.Fatal("compare exited 0 with a row differing on c")
	}
	if out, stderr, err := a.CLI(ctx, "repair", "orders"); err != nil {
		t.Fatalf("repair: %v\n%s%s", err, out, stderr)
	}
	eventually(t, time.Minute, "compare exits 0 after repair", func() error {
		if rep, stderr, err := compareJSON(t, ctx, b, "orders"); err != nil {
			return fmt.Errorf("%v %s %+v", err, stderr, rep.Tables)
		}
		return nil
	})

	// A part: c's slots and streams go, on both sides.
	if out, stderr, err := a.CLI(ctx, "node", "part", "c"); err != nil {
		t.Fatalf("part: %v %s %s", err, out, stderr)
	}
	eventually(t, 30*time.Second, "c's slots are gone", func() error {
		for _, n := range []*localmesh.Node{a, b} {
			if got := count(t, ctx, n, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_c'`); got != 0 {
				return fmt.Errorf("%s keeps %d slots for c", n.Name, got)
			}
		}
		return nil
	})
}
