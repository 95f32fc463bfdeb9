//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

const typesSchema = `
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE TABLE every_type (
	id bigint PRIMARY KEY,
	i2 int2, i4 int4, i8 int8, num numeric(30,10), f4 float4, f8 float8,
	t text, vc varchar(20), bin bytea, j jsonb, js json, arr int[], tarr text[],
	u uuid, ts timestamptz, tsn timestamp, d date, iv interval, b bool, m mood,
	big text
);
CREATE TABLE "Order Items" ("select" int PRIMARY KEY, "Quantity Ordered" int, "we""ird" text);
`

// Every common type round-trips identically; quoted names replicate;
// unchanged TOAST values survive updates of other columns; TRUNCATE replicates.
func TestTypesNamesToastTruncate(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, typesSchema, "a", "b")
	a := nodes[0]
	mustExec(t, ctx, a, `INSERT INTO every_type VALUES
		(1, -32768, 2147483647, -9223372036854775808, 12345678901234567890.0123456789, 1.5, -2.25e-300,
		 E'unicode ✓ Ωμέγα 日本 \'quotes\' "dq" back\\slash tab\t newline\n', 'short', '\x00ff10'::bytea,
		 '{"a": [1, 2, {"b": null}], "ü": "x"}', '{"keep":  "spacing"}', '{1,NULL,3}', '{"a b","c,d",NULL}',
		 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '2026-11-22 10:11:12.123456+09', '1999-12-31 23:59:59.999999',
		 '2000-02-29', '1 year 2 mons 3 days 04:05:06.789', true, 'happy', NULL),
		(2, NULL, NULL, NULL, NULL, 'NaN', '-Infinity', '', NULL, '', 'null', '[]', '{}', '{}',
		 NULL, 'infinity', NULL, NULL, NULL, false, NULL, NULL)`)
	// A large, poorly compressible value is stored out of line (TOAST).
	mustExec(t, ctx, a, `UPDATE every_type SET big = (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 20000) g) WHERE id = 1`)
	mustExec(t, ctx, a, `INSERT INTO "Order Items" VALUES (1, 5, 'x''y"z')`)
	converged(t, ctx, 30*time.Second, "every_type", nodes...)
	converged(t, ctx, 30*time.Second, `"Order Items"`, nodes...)

	// Update another column: the TOASTed value arrives as 'unchanged' and
	// must be left alone on the receiving side.
	mustExec(t, ctx, a, `UPDATE every_type SET i4 = 7 WHERE id = 1`)
	mustExec(t, ctx, a, `UPDATE "Order Items" SET "Quantity Ordered" = 6`)
	converged(t, ctx, 30*time.Second, "every_type", nodes...)
	converged(t, ctx, 30*time.Second, `"Order Items"`, nodes...)
	if n := count(t, ctx, nodes[1], `SELECT length(big) FROM every_type WHERE id = 1`); n != 640000 {
		t.Fatalf("TOASTed column has length %d on b, want 640000", n)
	}

	mustExec(t, ctx, a, `TRUNCATE "Order Items"`)
	eventually(t, 30*time.Second, "TRUNCATE replicated", func() error {
		if n := count(t, ctx, nodes[1], `SELECT count(*) FROM "Order Items"`); n != 0 {
			return fmt.Errorf("b still has %d rows", n)
		}
		return nil
	})
}

// A table without a primary key or replica identity is named, with the fix,
// in the daemon's status; Postgres itself refuses updates of it.
func TestTableWithoutKeyIsReported(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE "no key" (x int)`, "a", "b")
	want := `table public."no key" has no primary key or replica identity`
	eventually(t, 20*time.Second, "status names the table", func() error {
		out, _, err := nodes[0].CLI(ctx, "status")
		if err != nil {
			return err
		}
		if !strings.Contains(out, want) || !strings.Contains(out, "add a primary key") {
			return fmt.Errorf("status lacks %q:\n%s", want, out)
		}
		return nil
	})
	// Inserts still replicate.
	mustExec(t, ctx, nodes[0], `INSERT INTO "no key" VALUES (1)`)
	converged(t, ctx, 20*time.Second, `"no key"`, nodes...)
	err := nodes[0].PG.Exec(ctx, `UPDATE "no key" SET x = 2`)
	if err == nil || !strings.Contains(err.Error(), "does not have a replica identity") {
		t.Fatalf("update of a table without key: err = %v, want Postgres' replica identity error", err)
	}
}

// A peer's Postgres restarting (cleanly, then crash-stopped) while its
// changes stream: the stream reconnects and catches up, nothing lost.
func TestPeerPostgresRestart(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	// synchronous_commit on: the test clusters default to off, and a crash
	// would then lose the last commits on a itself.
	insertRange := func(from, to int) {
		mustExec(t, ctx, a, `DO $$ BEGIN PERFORM set_config('synchronous_commit', 'on', false); FOR i IN `+fmt.Sprint(from)+`..`+fmt.Sprint(to)+` LOOP
			INSERT INTO items VALUES (i, 'a', 0); COMMIT; END LOOP; END $$`)
	}
	insertRange(1, 500)
	if err := a.PG.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	insertRange(501, 1000)
	if err := a.PG.Crash(ctx); err != nil {
		t.Fatal(err)
	}
	if err := a.PG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	insertRange(1001, 1500)
	// b's daemon starts while a's Postgres is down: it runs, says why the
	// stream from a is not there, and streams once a is back.
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := a.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	statusSays(t, b, "stream from a:", "connect to peer \"a\"")
	if err := a.PG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	insertRange(1501, 2000)
	eventually(t, 60*time.Second, "b caught up", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM items`); n != 2000 {
			return fmt.Errorf("b has %d of 2000 rows", n)
		}
		return nil
	})
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	assertNoConflicts(t, ctx, b)
}

func assertNoConflicts(t *testing.T, ctx context.Context, nodes ...*localmesh.Node) {
	t.Helper()
	for _, n := range nodes {
		if c := count(t, ctx, n, `SELECT count(*) FROM pgmesh.conflict_history`); c != 0 {
			rows, _ := dump(ctx, n, "pgmesh.conflict_history")
			t.Fatalf("%s recorded %d conflicts where none should be (a change applied twice?):\n%s", n.Name, c, clip(rows))
		}
	}
}

// A transaction too large to hold (50,000 rows) is applied in bulk; when
// one of its rows collides with a local row, the whole transaction is
// applied again on the careful path, which settles and logs the conflict.
func TestLargeTransactionWithConflict(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE big (id int PRIMARY KEY, who text NOT NULL)`, "a", "b")
	a, b := nodes[0], nodes[1]
	for _, n := range nodes { // both write while neither replicates
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, ctx, b, `INSERT INTO big VALUES (25000, 'b')`)
	// A small transaction first: it carries the table's description, which
	// sends the first transaction after a reconnect down the careful path.
	mustExec(t, ctx, a, `INSERT INTO big VALUES (0, 'a')`)
	mustExec(t, ctx, a, `INSERT INTO big SELECT g, 'a' FROM generate_series(1, 50000) g`)
	for _, n := range nodes {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := localmesh.CaughtUp(ctx, 120*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "big", a, b)
	if got := count(t, ctx, b, `SELECT count(*) FROM big WHERE who = 'a'`); got != 50001 {
		t.Fatalf("b has %d of a's 50001 rows", got)
	}
	if got := count(t, ctx, b, `SELECT count(*) FROM pgmesh.conflict_history WHERE conflict_type = 'insert_exists' AND key_tuple = '{"id": 25000}'`); got != 1 {
		t.Fatalf("b logged %d insert_exists conflicts for id 25000, want 1", got)
	}
	rep, err := b.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Peers {
		if p.Peer == "a" && p.RetriedTxns < 1 {
			t.Fatalf("b's stream from a retried %d transactions carefully, want the large one", p.RetriedTxns)
		}
	}
}

// Ordinary transactions stay on the fast path: inserts, an update of a row
// the same transaction inserted, updates and deletes of rows the peer wrote
// earlier. None is retried carefully, and none is a conflict.
func TestPlainChangesStayFast(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE acct (id int PRIMARY KEY, balance int NOT NULL, note text)`, "a", "b")
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, a, `INSERT INTO acct SELECT g, 100, NULL FROM generate_series(1, 100) g`)
	mustExec(t, ctx, a, `BEGIN;
		INSERT INTO acct VALUES (1000, 0, 'new');
		UPDATE acct SET balance = 5 WHERE id = 1000;
		UPDATE acct SET balance = balance - 10 WHERE id <= 10;
		DELETE FROM acct WHERE id BETWEEN 91 AND 100;
		COMMIT`)
	mustExec(t, ctx, a, `UPDATE acct SET note = 'twice' WHERE id = 1000`)
	converged(t, ctx, 30*time.Second, "acct", a, b)
	assertNoConflicts(t, ctx, a, b)
	rep, err := b.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Peers {
		if p.Peer == "a" && (p.RetriedTxns != 0 || p.AppliedTxns < 3) {
			t.Fatalf("b applied %d transactions from a, retried %d carefully; want all 3 fast", p.AppliedTxns, p.RetriedTxns)
		}
	}
}
