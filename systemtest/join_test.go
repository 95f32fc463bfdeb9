//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

const joinSchema = `CREATE TABLE ledger (id bigserial PRIMARY KEY, node text NOT NULL, n int NOT NULL);
CREATE TABLE counters (k int PRIMARY KEY, v bigint NOT NULL, touched text);
CREATE SCHEMA "Other Schema";
CREATE TABLE "Other Schema"."Mixed Case" (id int PRIMARY KEY, payload text)`

// writeLoad appends to the ledger (keys from node-local ranges, so nothing
// collides) and updates and deletes counters on n until stop is closed,
// pausing between transactions. It returns how many ledger rows it wrote.
func writeLoad(ctx context.Context, n *localmesh.Node, base int64, pause time.Duration, stop <-chan struct{}) (int64, error) {
	conn, err := n.PG.Connect(ctx)
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	var i int64
	for {
		select {
		case <-stop:
			return i, nil
		default:
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if _, err := tx.Exec(ctx, `INSERT INTO ledger (id, node, n) VALUES ($1, $2, $3)`, base+i, n.Name, i); err != nil {
				return err
			}
			k := int(base/1_000_000) + int(i%50)
			_, err := tx.Exec(ctx, `INSERT INTO counters VALUES ($1, 1, $2) ON CONFLICT (k) DO UPDATE SET v = counters.v + 1, touched = $2`, k, n.Name)
			return err
		})
		if isTransient(err) {
			continue
		}
		if err != nil {
			return i, err
		}
		i++
		time.Sleep(pause)
	}
}

// A third node joins with an empty database while both members keep
// writing: schema and data are copied, and afterwards every node holds the
// same rows, every ledger row exactly once, and the new node's writes reach
// the others.
func TestJoinUnderWriteLoad(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	members := mesh(t, ctx, joinSchema, "a", "b")
	a, b := members[0], members[1]
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, 'seed', g FROM generate_series(1, 50000) g;
		INSERT INTO "Other Schema"."Mixed Case" VALUES (1, 'quoted names')`)
	c := startNodes(t, ctx, "", "c")[0] // an empty database: no schema at all

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var written atomic.Int64
	errs := make([]error, 2)
	for i, n := range members {
		wg.Add(1)
		go func() {
			defer wg.Done()
			w, err := writeLoad(ctx, n, int64(i+1)*1_000_000, 2*time.Millisecond, stop)
			written.Add(w)
			errs[i] = err
		}()
	}
	time.Sleep(500 * time.Millisecond) // let the load get going before the join

	token := joinToken(t, ctx, a)
	out, stderr, err := c.CLI(ctx, "group", "join", "--via", b.API, "--token", token)
	if err != nil {
		t.Fatalf("join: %v\n%s\n%s", err, out, stderr)
	}
	if !strings.Contains(out, "is active") {
		t.Fatalf("join output: %s", out)
	}
	// Keep writing a little after the join, then stop.
	time.Sleep(time.Second)
	close(stop)
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	mustExec(t, ctx, c, `INSERT INTO ledger (id, node, n) VALUES (9000000, 'c', 0)`)
	all := []*localmesh.Node{a, b, c}
	if err := localmesh.CaughtUp(ctx, 60*time.Second, all...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "ledger", all...)
	converged(t, ctx, 30*time.Second, "counters", all...)
	converged(t, ctx, 30*time.Second, `"Other Schema"."Mixed Case"`, all...)
	want := 50000 + written.Load() + 1
	for _, n := range all {
		if got := count(t, ctx, n, `SELECT count(*) FROM ledger`); got != want {
			t.Fatalf("%s has %d ledger rows, want %d", n.Name, got, want)
		}
	}
	if dup := count(t, ctx, c, `SELECT count(*) FROM pgmesh.conflict_history WHERE relation = 'public.ledger'`); dup != 0 {
		t.Fatalf("c saw %d conflicts on the append-only ledger: a change arrived twice or went missing", dup)
	}
	// The copied sequence does not hand out copied values again.
	if v := count(t, ctx, c, `SELECT nextval('ledger_id_seq')`); v < 50000 {
		t.Fatalf("c's ledger_id_seq gives %d, below copied values", v)
	}
	t.Logf("joined under load: %d ledger rows written during the join, %d in all", written.Load(), want)
}

func joinToken(t *testing.T, ctx context.Context, n *localmesh.Node) string {
	t.Helper()
	b, err := readToken(n)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// A database that already has the tables, empty and alike, may join; a
// differing definition is named.
func TestJoinChecksExistingSchema(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	members := mesh(t, ctx, joinSchema, "a")
	a := members[0]
	mustExec(t, ctx, a, `INSERT INTO counters VALUES (1, 10, 'a')`)
	token := joinToken(t, ctx, a)

	bad := startNodes(t, ctx, strings.Replace(joinSchema, "v bigint NOT NULL", "v int NOT NULL", 1), "bad")[0]
	_, stderr, err := bad.CLI(ctx, "group", "join", "--via", a.API, "--token", token)
	if err == nil || !strings.Contains(stderr, "table public.counters differs from \"a\"'s") {
		t.Fatalf("differing schema: err=%v stderr=%s", err, stderr)
	}

	good := startNodes(t, ctx, joinSchema, "good")[0]
	if out, stderr, err := good.CLI(ctx, "group", "join", "--via", a.API, "--token", token); err != nil {
		t.Fatalf("join with the same schema: %v\n%s\n%s", err, out, stderr)
	}
	converged(t, ctx, 30*time.Second, "counters", a, good)
}

// The joining daemon is killed in the middle of the copy; the same command
// run again completes the join, and no stray slot or origin is left.
func TestJoinInterruptedAndRetried(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	members := mesh(t, ctx, joinSchema, "a", "b")
	a, b := members[0], members[1]
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, repeat('x', 200), g FROM generate_series(1, 400000) g`)
	converged(t, ctx, 60*time.Second, "counters", a, b)
	eventually(t, 60*time.Second, "b has the seed rows", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM ledger`); n != 400000 {
			return fmt.Errorf("b has %d", n)
		}
		return nil
	})
	c := startNodes(t, ctx, "", "c")[0]
	token := joinToken(t, ctx, a)
	if _, stderr, err := c.CLI(ctx, "group", "join", "--no-wait", "--via", a.API, "--token", token); err != nil {
		t.Fatalf("join --no-wait: %v %s", err, stderr)
	}
	eventually(t, 60*time.Second, "copy under way", func() error {
		rep, err := c.Status(ctx)
		if err != nil {
			return err
		}
		if rep.Join == nil || rep.Join.Phase != "copying data" || rep.Join.Bytes == 0 {
			return fmt.Errorf("join status %+v", rep.Join)
		}
		return nil
	})
	if err := c.Kill(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, b, `INSERT INTO ledger (id, node, n) VALUES (5000000, 'b', 1)`)
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// While joining, applications cannot write here.
	if err := c.PG.Exec(ctx, `INSERT INTO counters VALUES (99, 1, 'c')`); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("write on a joining node: err = %v, want a read-only error", err)
	}
	if out, stderr, err := c.CLI(ctx, "group", "join", "--via", a.API, "--token", token); err != nil {
		t.Fatalf("retried join: %v\n%s\n%s", err, out, stderr)
	}
	all := []*localmesh.Node{a, b, c}
	if err := localmesh.CaughtUp(ctx, 60*time.Second, all...); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, c, `SELECT count(*) FROM ledger`); got != 400001 {
		t.Fatalf("c has %d ledger rows after the retried join, want 400001", got)
	}
	for _, n := range all {
		var slots, origins []string
		conn := connect(t, ctx, n)
		rows, _ := conn.Query(ctx, `SELECT slot_name FROM pg_replication_slots ORDER BY 1`)
		slots, _ = pgx.CollectRows(rows, pgx.RowTo[string])
		rows, _ = conn.Query(ctx, `SELECT roname FROM pg_replication_origin ORDER BY 1`)
		origins, _ = pgx.CollectRows(rows, pgx.RowTo[string])
		var want []string
		for _, m := range all {
			if m != n {
				want = append(want, "pgmesh_"+m.Name)
			}
		}
		if strings.Join(slots, ",") != strings.Join(want, ",") || strings.Join(origins, ",") != strings.Join(want, ",") {
			t.Errorf("%s has slots %v and origins %v, want %v for both", n.Name, slots, origins, want)
		}
	}
	mustExec(t, ctx, c, `INSERT INTO counters VALUES (99, 1, 'c')`)
	converged(t, ctx, 30*time.Second, "counters", all...)
}

// The Raft leader's daemon is killed while a node joins: the join finishes
// (Raft elects another leader; the leader's Postgres keeps serving its
// changes), or fails clearly and succeeds when retried.
func TestJoinSurvivesLeaderKill(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	members := mesh(t, ctx, joinSchema, "a", "b", "c")
	a, b, c := members[0], members[1], members[2]
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, repeat('x', 200), g FROM generate_series(1, 200000) g`)
	if err := localmesh.CaughtUp(ctx, 120*time.Second, a, b, c); err != nil {
		t.Fatal(err)
	}
	d := startNodes(t, ctx, "", "d")[0]
	token := joinToken(t, ctx, a)
	if _, stderr, err := d.CLI(ctx, "group", "join", "--no-wait", "--via", b.API, "--token", token); err != nil {
		t.Fatalf("join: %v %s", err, stderr)
	}
	copying(t, d)
	if err := a.Kill(); err != nil { // a created the group: it leads Raft
		t.Fatal(err)
	}
	mustExec(t, ctx, c, `INSERT INTO ledger (id, node, n) VALUES (6000000, 'c during join', 1)`)
	// Wait for the background join to end, one way or the other.
	var joinErr string
	eventually(t, 120*time.Second, "the join ends", func() error {
		rep, err := d.Status(ctx)
		if err != nil {
			return err
		}
		if rep.State == "active" {
			return nil
		}
		if rep.Join != nil && rep.Join.Error != "" {
			joinErr = rep.Join.Error
			return nil
		}
		return fmt.Errorf("state %s, join %+v", rep.State, rep.Join)
	})
	if joinErr != "" {
		t.Logf("join failed with the leader gone (%s); retrying", joinErr)
		if out, stderr, err := d.CLI(ctx, "group", "join", "--via", b.API, "--token", token); err != nil {
			t.Fatalf("retried join: %v\n%s\n%s", err, out, stderr)
		}
	}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	all := []*localmesh.Node{a, b, c, d}
	if err := localmesh.CaughtUp(ctx, 120*time.Second, all...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 60*time.Second, "ledger", all...)
	if got := count(t, ctx, d, `SELECT count(*) FROM ledger`); got != 200001 {
		t.Fatalf("d has %d ledger rows, want 200001", got)
	}
}

// The source updates rows while a new node copies them. Its updates commit
// before the copy does, so by commit time they look older than the copied
// rows; they must still win, as they do everywhere else: copied rows carry
// the source's origin and the snapshot's time, so the source's later
// changes are plain sequential changes, with no conflict.
func TestJoinKeepsSourceUpdatesMadeDuringCopy(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	members := mesh(t, ctx, joinSchema, "a", "b")
	a, b := members[0], members[1]
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) SELECT g, repeat('x', 200), g FROM generate_series(1, 300000) g`)
	if err := localmesh.CaughtUp(ctx, 120*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	c := startNodes(t, ctx, "", "c")[0]
	if _, stderr, err := c.CLI(ctx, "group", "join", "--no-wait", "--via", a.API, "--token", joinToken(t, ctx, a)); err != nil {
		t.Fatalf("join: %v %s", err, stderr)
	}
	copying(t, c)
	mustExec(t, ctx, a, `UPDATE ledger SET n = -n WHERE id <= 1000`)
	eventually(t, 120*time.Second, "c active", func() error {
		rep, err := c.Status(ctx)
		if err != nil {
			return err
		}
		if rep.State != "active" {
			return fmt.Errorf("state %s, join %+v", rep.State, rep.Join)
		}
		return nil
	})
	all := []*localmesh.Node{a, b, c}
	if err := localmesh.CaughtUp(ctx, 120*time.Second, all...); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, c, `SELECT count(*) FROM ledger WHERE n < 0`); got != 1000 {
		t.Fatalf("c has %d of the 1000 rows a updated during the copy", got)
	}
	converged(t, ctx, 60*time.Second, "ledger", all...)
	assertNoConflicts(t, ctx, c)
}

// copying waits until n's join is copying data.
func copying(t *testing.T, n *localmesh.Node) {
	t.Helper()
	eventually(t, 60*time.Second, "copy under way", func() error {
		rep, err := n.Status(ctxFor(t))
		if err != nil {
			return err
		}
		if rep.Join == nil || rep.Join.Phase != "copying data" {
			return fmt.Errorf("join status %+v", rep.Join)
		}
		return nil
	})
}

// The settings the group made before a node joins reach it with the join:
// without its delta column the new node would apply a peer's increment as
// a plain value and keep a different balance for good, and without its
// home column it would let through writes to rows another node owns.
func TestJoinAdoptsGroupSettings(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	const schema = `CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL);
		CREATE TABLE orders (id int PRIMARY KEY, home text NOT NULL, status text NOT NULL)`
	members := mesh(t, ctx, schema, "a", "b")
	a, b := members[0], members[1]
	for _, args := range [][]string{{"delta-column", "accounts", "balance"}, {"home-column", "orders", "home"}} {
		if _, stderr, err := a.CLI(ctx, args...); err != nil {
			t.Fatalf("%s: %v %s", args[0], err, stderr)
		}
	}
	mustExec(t, ctx, a, `INSERT INTO accounts VALUES (1, 100)`)
	mustExec(t, ctx, a, `INSERT INTO orders VALUES (1, 'a', 'new')`)

	// With the tables created beforehand, the join copies no schema.
	c := startNodes(t, ctx, schema, "c")[0]
	if _, stderr, err := c.CLI(ctx, "group", "join", "--via", a.API, "--token", joinToken(t, ctx, a)); err != nil {
		t.Fatalf("join: %v %s", err, stderr)
	}
	all := []*localmesh.Node{a, b, c}
	converged(t, ctx, 30*time.Second, "accounts", all...)
	if got := count(t, ctx, c, `SELECT count(*) FROM pg_class WHERE relname = 'accounts' AND relreplident = 'f'`); got != 1 {
		t.Fatal("c: accounts is not REPLICA IDENTITY FULL, so its increments reach no one")
	}
	partitioned(t, ctx, all, func() {
		mustExec(t, ctx, a, `UPDATE accounts SET balance = balance + 10 WHERE id = 1`)
		mustExec(t, ctx, b, `UPDATE accounts SET balance = balance + 10 WHERE id = 1`)
		mustExec(t, ctx, c, `UPDATE accounts SET balance = balance + 10 WHERE id = 1`)
	})
	if got := converged(t, ctx, 30*time.Second, "accounts", all...); got != "(1,130)" {
		t.Fatalf("accounts converged to %s, want (1,130): an increment was lost", got)
	}
	if err := c.PG.Exec(ctx, `UPDATE orders SET status = 'shipped' WHERE id = 1`); err == nil || !strings.Contains(err.Error(), `belongs to node "a"`) {
		t.Fatalf("c wrote a's order: %v", err)
	}
}
