//go:build integration

package systemtest

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// statusSays waits until n's status names the problem.
func statusSays(t *testing.T, n *localmesh.Node, want ...string) {
	t.Helper()
	eventually(t, 30*time.Second, n.Name+"'s status names the cause", func() error {
		out, _, err := n.CLI(ctxFor(t), "status")
		if err != nil {
			return err
		}
		for _, w := range want {
			if !strings.Contains(out, w) {
				return fmt.Errorf("status lacks %q:\n%s", w, out)
			}
		}
		return nil
	})
}

// A change that does not fit this node's schema stops the stream at that
// change, with the cause in status; the peer's slot keeps the WAL; once the
// schema is fixed the stream resumes from the same change and nothing is
// lost (ARCHITECTURE.md, invariants: nothing lost on bad input).
func TestBadInputStopsAndResumes(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE items (id int PRIMARY KEY, name varchar(50), extra text);
		CREATE TABLE notes (id int PRIMARY KEY, body text);
		CREATE TABLE nums (id int PRIMARY KEY, v text)`, "a", "b")
	a, b := nodes[0], nodes[1]

	// 1. b lacks a column a sends.
	mustExec(t, ctx, b, `ALTER TABLE items DROP COLUMN extra`)
	mustExec(t, ctx, a, `INSERT INTO items VALUES (1, 'one', 'x'), (2, 'two', 'y')`)
	statusSays(t, b, `sends column "extra" of table "public"."items", which this node lacks`, "add the column")
	if n := count(t, ctx, b, `SELECT count(*) FROM items`); n != 0 {
		t.Fatalf("b applied part of the transaction: %d rows", n)
	}
	// The slot on a still holds the change.
	if n := count(t, ctx, a, `SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'pgmesh_b' AND confirmed_flush_lsn < pg_current_wal_lsn()`); n != 1 {
		t.Fatal("a's slot for b moved past the change b could not apply")
	}
	mustExec(t, ctx, b, `ALTER TABLE items ADD COLUMN extra text`)
	converged(t, ctx, 30*time.Second, "items", a, b)

	// 2. A value too large for b's column.
	mustExec(t, ctx, b, `ALTER TABLE items ALTER COLUMN name TYPE varchar(5)`)
	mustExec(t, ctx, a, `INSERT INTO items VALUES (3, 'much too long for five', 'z')`)
	statusSays(t, b, "value too long for type character varying(5)")
	mustExec(t, ctx, b, `ALTER TABLE items ALTER COLUMN name TYPE varchar(50)`)
	converged(t, ctx, 30*time.Second, "items", a, b)

	// 3. A column of another type on b, which a's values do not fit.
	mustExec(t, ctx, b, `ALTER TABLE nums ALTER COLUMN v TYPE int USING v::int`)
	mustExec(t, ctx, a, `INSERT INTO nums VALUES (1, '12'), (2, 'not a number')`)
	statusSays(t, b, `invalid input syntax for type integer: "not a number"`)
	if n := count(t, ctx, b, `SELECT count(*) FROM nums`); n != 0 {
		t.Fatalf("b applied part of the transaction: %d rows", n)
	}
	mustExec(t, ctx, b, `ALTER TABLE nums ALTER COLUMN v TYPE text`)
	converged(t, ctx, 30*time.Second, "nums", a, b)

	// 4. A table dropped on b.
	mustExec(t, ctx, b, `DROP TABLE notes`)
	mustExec(t, ctx, a, `INSERT INTO notes VALUES (1, 'kept')`)
	statusSays(t, b, `table "public"."notes" sent by peer "a" does not exist on this node`)
	mustExec(t, ctx, b, `CREATE TABLE notes (id int PRIMARY KEY, body text)`)
	converged(t, ctx, 30*time.Second, "notes", a, b)
	assertNoConflicts(t, ctx, b)
}

// Table, schema and column names built to break naive quoting replicate
// like any other.
func TestHostileIdentifiers(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	const schema = `CREATE SCHEMA "x""; DROP SCHEMA public; --";
		CREATE TABLE "x""; DROP SCHEMA public; --"."t' OR '1'='1" ("id""" int PRIMARY KEY, "$1" text, "a.b" text, "ünï côdé" text)`
	nodes := mesh(t, ctx, schema, "a", "b")
	a := nodes[0]
	table := `"x""; DROP SCHEMA public; --"."t' OR '1'='1"`
	mustExec(t, ctx, a, `INSERT INTO `+table+` VALUES (1, '$2', 'a.b', 'ü')`)
	mustExec(t, ctx, a, `UPDATE `+table+` SET "$1" = 'changed'`)
	mustExec(t, ctx, a, `INSERT INTO `+table+` VALUES (2, NULL, NULL, NULL); DELETE FROM `+table+` WHERE "id""" = 2`)
	if got := converged(t, ctx, 30*time.Second, table, nodes...); got != "(1,changed,a.b,ü)" {
		t.Fatalf("converged to %q", got)
	}
	for _, n := range nodes {
		if count(t, ctx, n, `SELECT count(*) FROM pg_namespace WHERE nspname = 'public'`) != 1 {
			t.Fatalf("%s lost its public schema", n.Name)
		}
	}
}
