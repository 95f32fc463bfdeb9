//go:build integration

package systemtest

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/membership"
)

// repset runs `pgmesh repset ARGS` on n and fails the test if it fails.
func repset(t *testing.T, ctx context.Context, n *localmesh.Node, args ...string) string {
	t.Helper()
	out, stderr, err := n.CLI(ctx, append([]string{"repset"}, args...)...)
	if err != nil {
		t.Fatalf("pgmesh repset %s: %v\n%s%s", strings.Join(args, " "), err, out, stderr)
	}
	return out
}

// repsetFails runs `pgmesh repset ARGS` on n, expecting one error line that
// contains want.
func repsetFails(t *testing.T, ctx context.Context, n *localmesh.Node, want string, args ...string) {
	t.Helper()
	out, stderr, err := n.CLI(ctx, append([]string{"repset"}, args...)...)
	if err == nil {
		t.Fatalf("pgmesh repset %s succeeded, want an error containing %q:\n%s", strings.Join(args, " "), want, out)
	}
	if !strings.Contains(stderr, want) || strings.Count(strings.TrimSpace(stderr), "\n") > 0 {
		t.Fatalf("pgmesh repset %s: stderr %q, want one line containing %q", strings.Join(args, " "), stderr, want)
	}
}

// onEachNode runs fn concurrently on a connection to each node, and returns
// their first error once all have returned.
func onEachNode(ctx context.Context, nodes []*localmesh.Node, fn func(i int, n *localmesh.Node, conn *pgx.Conn) error) error {
	var g errgroup.Group
	for i, n := range nodes {
		g.Go(func() error {
			conn, err := n.PG.Connect(ctx)
			if err != nil {
				return err
			}
			defer conn.Close(ctx)
			return fn(i, n, conn)
		})
	}
	return g.Wait()
}

// A table removed from every set stays on the node that wrote it, while
// the others replicate under writes on every node; a table created later
// joins the default set in the very transaction that creates it.
func TestLocalTableStaysLocal(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE kv (id int PRIMARY KEY, v text);
		CREATE TABLE sessions (id int PRIMARY KEY, node text NOT NULL, n serial)`, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]

	out := repset(t, ctx, a, "remove", "default", "sessions")
	if !strings.Contains(out, "local (in no set, never sent): public.sessions") || !strings.Contains(out, "in effect on every node") {
		t.Fatalf("repset remove output:\n%s", out)
	}
	err := onEachNode(ctx, nodes, func(i int, n *localmesh.Node, conn *pgx.Conn) (err error) {
		for j := 1; j <= 200 && err == nil; j++ {
			id := (i+1)*1000 + j
			if _, err = conn.Exec(ctx, `INSERT INTO kv VALUES ($1, $2)`, id, n.Name); err == nil {
				_, err = conn.Exec(ctx, `INSERT INTO sessions VALUES ($1, $2)`, id, n.Name)
			}
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := localmesh.CaughtUp(ctx, 60*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	for _, n := range nodes {
		if got := count(t, ctx, n, `SELECT count(*) FROM kv`); got != 600 {
			t.Fatalf("%s has %d kv rows, want 600", n.Name, got)
		}
		if got := count(t, ctx, n, `SELECT count(*) FROM sessions WHERE node <> $1`, n.Name); got != 0 {
			t.Fatalf("%s received %d rows of the local table sessions", n.Name, got)
		}
		if got := count(t, ctx, n, `SELECT count(*) FROM pgmesh.local_tables WHERE relation = 'public.sessions'`); got != 1 {
			t.Fatalf("pgmesh.local_tables on %s does not list public.sessions", n.Name)
		}
	}
	status, _, err := c.CLI(ctx, "status")
	if err != nil || !strings.Contains(status, "local tables (in no replication set; their changes stay here): public.sessions") {
		t.Fatalf("status on c (err %v):\n%s", err, status)
	}

	// The sequence audit covers local tables as any other.
	if audit, _, _ := c.CLI(ctx, "sequences", "audit"); !strings.Contains(audit, "public.sessions") {
		t.Fatalf("sequences audit does not list the local table's int serial:\n%s", audit)
	}

	// A table created and written in one transaction replicates from its
	// first row, and from the nodes that applied its DDL too.
	mustExec(t, ctx, c, `BEGIN; SELECT pgmesh.replicate_ddl('CREATE TABLE later (id int PRIMARY KEY)');
		INSERT INTO later VALUES (1); COMMIT`)
	eventually(t, 30*time.Second, "later's first row on a and b", func() error {
		for _, n := range []*localmesh.Node{a, b} {
			if got := count(t, ctx, n, `SELECT count(*) FROM pg_class WHERE relname = 'later'`); got == 0 {
				return fmt.Errorf("%s has no table later yet", n.Name)
			}
			if got := count(t, ctx, n, `SELECT count(*) FROM later`); got != 1 {
				return fmt.Errorf("%s has %d rows of later", n.Name, got)
			}
		}
		return nil
	})
	mustExec(t, ctx, b, `INSERT INTO later VALUES (2)`)
	for _, n := range nodes {
		setsAgree(t, ctx, n)
	}
	converged(t, ctx, 30*time.Second, "later", nodes...)
	if got := count(t, ctx, a, `SELECT count(*) FROM later`); got != 2 {
		t.Fatalf("a has %d rows of later, want 2", got)
	}
}

// A residency set: rows of European customers go to a and b only. The
// members converge, c never holds a European row, and rows that move into
// or out of the filter by UPDATE arrive at c as inserts and deletes.
func TestResidencySet(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE customers (region text, id int, name text, PRIMARY KEY (region, id))`, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]

	repset(t, ctx, a, "create", "eu", "--nodes", "a,b")
	repset(t, ctx, b, "add", "eu", "customers", "--where", "region = 'eu'")
	repset(t, ctx, c, "remove", "default", "customers")
	out := repset(t, ctx, a, "add", "default", "customers", "--where", "region <> 'eu'")
	for _, want := range []string{"default: received by every node; new tables join it", "  public.customers where region <> 'eu'",
		"eu: received by nodes a, b", "  public.customers where region = 'eu'", "in effect on every node"} {
		if !strings.Contains(out, want) {
			t.Fatalf("repset output lacks %q:\n%s", want, out)
		}
	}

	// Every node shows the definitions in SQL, as the daemon's rules say.
	for _, n := range nodes {
		setsAgree(t, ctx, n)
		if got := count(t, ctx, n, `SELECT count(*) FROM pgmesh.replication_set_tables
			WHERE set_name = 'eu' AND relation = 'public.customers' AND row_filter = $1`, "region = 'eu'"); got != 1 {
			t.Fatalf("pgmesh.replication_set_tables on %s does not show customers in eu with its filter", n.Name)
		}
		if got := count(t, ctx, n, `SELECT count(*) FROM pgmesh.replication_sets WHERE set_name = 'eu' AND nodes = '{a,b}'`); got != 1 {
			t.Fatalf("pgmesh.replication_sets on %s does not show eu's members", n.Name)
		}
	}

	// Bad input: one sentence each, and nothing changes.
	repsetFails(t, ctx, a, `replication set "nope" does not exist`, "add", "nope", "customers")
	repsetFails(t, ctx, a, "table nosuch does not exist", "add", "eu", "nosuch")
	repsetFails(t, ctx, a, `node "zz" is not a member`, "create", "eu2", "--nodes", "a,zz")
	repsetFails(t, ctx, a, "is not valid for table public.customers", "add", "eu", "customers", "--where", "region ===")
	repsetFails(t, ctx, a, "uses columns outside its key", "add", "eu", "customers", "--where", "name = 'x'")
	repsetFails(t, ctx, a, `must include its key column "id"`, "add", "eu", "customers", "--columns", "region,name")
	repsetFails(t, ctx, a, "the default replication set cannot be dropped", "drop", "default")
	if now := repset(t, ctx, b, "list"); !strings.Contains(now, "  public.customers where region = 'eu'") || strings.Contains(now, "eu2") {
		t.Fatalf("bad input changed the sets:\n%s", now)
	}

	mustExec(t, ctx, a, `INSERT INTO customers SELECT 'eu', g, 'a' FROM generate_series(1, 100) g;
		INSERT INTO customers SELECT 'us', g, 'a' FROM generate_series(201, 300) g`)
	mustExec(t, ctx, b, `INSERT INTO customers SELECT 'eu', g, 'b' FROM generate_series(101, 200) g`)
	mustExec(t, ctx, c, `INSERT INTO customers SELECT 'us', g, 'c' FROM generate_series(301, 400) g`)
	if err := localmesh.CaughtUp(ctx, 60*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	// Into the filter on a (c must lose them), out of it on b (c gets them).
	mustExec(t, ctx, a, `UPDATE customers SET region = 'eu' WHERE region = 'us' AND id <= 210`)
	mustExec(t, ctx, b, `UPDATE customers SET region = 'us', name = 'moved' WHERE region = 'eu' AND id BETWEEN 101 AND 105`)
	if err := localmesh.CaughtUp(ctx, 60*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "customers", a, b)
	converged(t, ctx, 30*time.Second, "(SELECT * FROM customers WHERE region <> 'eu')", a, b, c)
	if got := count(t, ctx, c, `SELECT count(*) FROM customers WHERE region = 'eu'`); got != 0 {
		t.Fatalf("c holds %d European rows", got)
	}
	if got := count(t, ctx, c, `SELECT count(*) FROM customers`); got != 195 {
		t.Fatalf("c holds %d rows, want 195 (200 written outside the EU, 10 moved in, 5 moved out)", got)
	}
	if got := count(t, ctx, a, `SELECT count(*) FROM customers WHERE region = 'eu'`); got != 205 {
		t.Fatalf("a holds %d European rows, want 205", got)
	}

	// compare checks each share among the nodes that receive it.
	cmp, stderr, err := a.CLI(ctx, "compare", "customers")
	if err != nil || !strings.Contains(cmp, "identical on nodes a, b") {
		t.Fatalf("compare: %v\n%s%s", err, cmp, stderr)
	}
}

// A column list sends only some columns; adding a table that holds rows
// needs --sync, which copies them; a joining node copies only its share.
func TestColumnListSyncAndJoinShare(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	const schema = `CREATE TABLE profiles (id int PRIMARY KEY, email text, secret text);
		CREATE TABLE scratch (id int PRIMARY KEY, v int);
		CREATE TABLE customers (region text, id int, PRIMARY KEY (region, id))`
	members := mesh(t, ctx, schema, "a", "b")
	a, b := members[0], members[1]

	repset(t, ctx, a, "remove", "default", "profiles")
	repset(t, ctx, a, "add", "default", "profiles", "--columns", "id,email")
	setsAgree(t, ctx, b)
	mustExec(t, ctx, a, `INSERT INTO profiles VALUES (1, 'x@example.com', 's3cret')`)
	mustExec(t, ctx, b, `INSERT INTO profiles VALUES (2, 'y@example.com', 'hidden')`)
	if err := localmesh.CaughtUp(ctx, 30*time.Second, members...); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, b, `SELECT count(*) FROM profiles WHERE id = 1 AND email = 'x@example.com' AND secret IS NULL`); got != 1 {
		rows, _ := dump(ctx, b, "profiles")
		t.Fatalf("b does not hold a's profile with its email and without its secret; it holds:\n%s", rows)
	}
	if got := count(t, ctx, a, `SELECT count(*) FROM profiles WHERE secret IS NOT NULL`); got != 1 {
		t.Fatal("a received b's secret")
	}

	// A local table with rows is not added silently.
	repset(t, ctx, a, "remove", "default", "scratch")
	mustExec(t, ctx, a, `INSERT INTO scratch SELECT g, g FROM generate_series(1, 50) g`)
	mustExec(t, ctx, b, `INSERT INTO scratch SELECT g, g FROM generate_series(51, 60) g`)
	repsetFails(t, ctx, b, "add it with --sync", "add", "default", "scratch")
	out := repset(t, ctx, b, "add", "default", "scratch", "--sync")
	if !strings.Contains(out, "synced: 60 rows written again") {
		t.Fatalf("add --sync output:\n%s", out)
	}
	if err := localmesh.CaughtUp(ctx, 30*time.Second, members...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "scratch", a, b)

	// A residency set on the members; c joins and gets only its share.
	repset(t, ctx, a, "create", "eu", "--nodes", "a,b")
	repset(t, ctx, a, "add", "eu", "customers", "--where", "region = 'eu'")
	repset(t, ctx, a, "remove", "default", "customers")
	repset(t, ctx, a, "add", "default", "customers", "--where", "region <> 'eu'")
	mustExec(t, ctx, a, `INSERT INTO customers SELECT CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g FROM generate_series(1, 100) g`)
	if err := localmesh.CaughtUp(ctx, 30*time.Second, members...); err != nil {
		t.Fatal(err)
	}
	c := startNodes(t, ctx, schema, "c")[0] // the schema exists, empty: no pg_dump needed
	if out, stderr, err := c.CLI(ctx, "group", "join", "--via", b.API, "--token", joinToken(t, ctx, a)); err != nil {
		t.Fatalf("join: %v\n%s\n%s", err, out, stderr)
	}
	all := []*localmesh.Node{a, b, c}
	if got := count(t, ctx, c, `SELECT count(*) FROM customers WHERE region = 'eu'`); got != 0 {
		t.Fatalf("c copied %d European rows", got)
	}
	converged(t, ctx, 30*time.Second, "(SELECT * FROM customers WHERE region = 'us')", all...)
	converged(t, ctx, 30*time.Second, "scratch", all...)
	if got := count(t, ctx, c, `SELECT count(*) FROM profiles WHERE secret IS NULL`); got != 2 {
		t.Fatalf("c holds %d profiles without secrets, want 2 (copied without the column)", got)
	}
	// And streams from every member continue with the same shares.
	mustExec(t, ctx, b, `INSERT INTO customers VALUES ('eu', 1000), ('us', 1000)`)
	if err := localmesh.CaughtUp(ctx, 30*time.Second, all...); err != nil {
		t.Fatal(err)
	}
	if got := count(t, ctx, c, `SELECT count(*) FROM customers WHERE id = 1000`); got != 1 {
		t.Fatalf("c holds %d of b's two new rows, want only the one outside the EU", got)
	}
}

// Sets change while every node writes: the table's filter is switched off
// (with --sync) and on again, and other sets come and go. No row is lost:
// once the filter is off for good and synced, every node holds every row.
func TestRepsetChangesUnderLoad(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE events (id bigint PRIMARY KEY, node text NOT NULL);
		CREATE TABLE other (id int PRIMARY KEY)`, "a", "b", "c")
	a := nodes[0]
	repset(t, ctx, a, "remove", "default", "events")
	repset(t, ctx, a, "add", "default", "events", "--where", "id % 2 = 0")

	stop := make(chan struct{})
	var written atomic.Int64
	wrote := make(chan error, 1)
	go func() {
		wrote <- onEachNode(ctx, nodes, func(i int, n *localmesh.Node, conn *pgx.Conn) error {
			for id := int64(i+1) * 1_000_000; ; id++ {
				select {
				case <-stop:
					return nil
				default:
				}
				if _, err := conn.Exec(ctx, `INSERT INTO events VALUES ($1, $2)`, id, n.Name); err != nil {
					return err
				}
				written.Add(1)
				time.Sleep(4 * time.Millisecond)
			}
		})
	}()
	for round := range 2 {
		set := fmt.Sprintf("s%d", round)
		repset(t, ctx, nodes[round%3], "create", set, "--nodes", "a,b")
		repset(t, ctx, nodes[(round+1)%3], "add", set, "events", "--where", "id % 3 = 0", "--sync")
		repset(t, ctx, nodes[(round+2)%3], "remove", "default", "other")
		repset(t, ctx, nodes[round%3], "add", "default", "events", "--sync") // filter off: every row
		repset(t, ctx, nodes[(round+1)%3], "add", "default", "other")
		repset(t, ctx, nodes[(round+2)%3], "add", "default", "events", "--where", "id % 2 = 0") // on again
		repset(t, ctx, nodes[round%3], "drop", set)
	}
	close(stop)
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	// Rows written while the filter was on reached only where it let them:
	// off for good, synced, every node holds every row. The writers wrote
	// for as long as the changes took, so on a busy machine the nodes have
	// more to apply: they catch up first, and the sync's compare then waits
	// only for rows in flight (its limit), not for that backlog.
	if err := localmesh.CaughtUp(ctx, 120*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	repset(t, ctx, a, "add", "default", "events", "--sync")
	if err := localmesh.CaughtUp(ctx, 60*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, 30*time.Second, "events", nodes...)
	if got, want := count(t, ctx, a, `SELECT count(*) FROM events`), written.Load(); got != want {
		t.Fatalf("a holds %d events, %d were written", got, want)
	}
	t.Logf("%d events written while the sets changed 14 times", written.Load())
}

// With repset_new_tables off, tables created later start local until they
// are added to a set.
func TestNewTablesStartLocalWhenConfigured(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, `CREATE TABLE kv (id int PRIMARY KEY)`, []string{"--repset-new-tables", "false"}, "a", "b")
	a, b := nodes[0], nodes[1]
	if out, stderr, err := a.CLI(ctx, "ddl", "CREATE TABLE fresh (id int PRIMARY KEY)"); err != nil {
		t.Fatalf("ddl: %v\n%s%s", err, out, stderr)
	}
	eventually(t, 30*time.Second, "fresh on b", func() error {
		if count(t, ctx, b, `SELECT count(*) FROM pg_class WHERE relname = 'fresh'`) == 0 {
			return fmt.Errorf("no table fresh on b yet")
		}
		return nil
	})
	mustExec(t, ctx, a, `INSERT INTO kv VALUES (1); INSERT INTO fresh VALUES (1)`)
	if err := localmesh.CaughtUp(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	if count(t, ctx, b, `SELECT count(*) FROM kv`) != 1 || count(t, ctx, b, `SELECT count(*) FROM fresh`) != 0 {
		t.Fatal("b should hold kv's row (a table of the group's start) and not fresh's (created later, local)")
	}
	if out := repset(t, ctx, b, "list"); !strings.Contains(out, "local (in no set, never sent): public.fresh") || strings.Contains(out, "new tables join it") {
		t.Fatalf("repset list:\n%s", out)
	}
	repset(t, ctx, b, "add", "default", "fresh", "--sync")
	converged(t, ctx, 30*time.Second, "fresh", a, b)
}

// Restarting every daemon never rewrites a publication from an older group
// state (the Raft log is applied again only after a leader is elected, one
// entry after the other): a receiver's publication dropped and made again
// would leave its stream unable to decode the WAL written in between.
func TestRestartKeepsPublications(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := startNodes(t, ctx, `CREATE TABLE kv (id int PRIMARY KEY)`, "a", "b", "c")
	a := nodes[0]
	token, err := localmesh.Form(ctx, "test", a)
	if err != nil {
		t.Fatal(err)
	}
	// A long Raft log before the others join, so that after a restart the
	// group is for a while a single node as it is applied again.
	leader := a.Client(token)
	for i := range 300 {
		for _, action := range []string{"create", "drop"} {
			if _, err := leader.EditRepsets(ctx, membership.RepsetEdit{Action: action, Set: fmt.Sprintf("tmp%d", i)}); err != nil {
				t.Fatal(err)
			}
		}
	}
	for _, n := range nodes[1:] {
		if out, stderr, err := n.CLI(ctx, "group", "join", "--via", a.API, "--token", token); err != nil {
			t.Fatalf("join %s: %v\n%s%s", n.Name, err, out, stderr)
		}
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	pubs := func() string {
		var all []string
		for _, n := range nodes {
			d, err := dump(ctx, n, `(SELECT pubname, oid FROM pg_publication)`)
			if err != nil {
				t.Fatal(err)
			}
			all = append(all, n.Name+": "+d)
		}
		return strings.Join(all, "\n")
	}
	before := pubs()
	for round := range 2 {
		partitioned(t, ctx, nodes, func() {
			for i, n := range nodes {
				mustExec(t, ctx, n, `INSERT INTO kv VALUES ($1)`, round*10+i)
			}
		})
		if err := localmesh.CaughtUp(ctx, 60*time.Second, nodes...); err != nil {
			t.Fatal(err)
		}
	}
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	if after := pubs(); after != before {
		t.Fatalf("publications were made again across restarts:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// setsAgree checks that n's SQL views (pgmesh.replication_set_tables,
// pgmesh.local_tables), the copy of the sets for SQL users, say what the
// daemon's own rules (pgmesh repset list) say.
func setsAgree(t *testing.T, ctx context.Context, n *localmesh.Node) {
	t.Helper()
	out, stderr, err := n.CLI(ctx, "repset", "list", "--json")
	if err != nil {
		t.Fatalf("repset list on %s: %v %s", n.Name, err, stderr)
	}
	var rep api.RepsetsResponse
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, s := range rep.Sets {
		for _, tb := range s.Tables {
			want = append(want, fmt.Sprintf("(%s,%s,%s,%s)", s.Name, tb.Table, tb.Where, strings.Join(tb.Columns, ",")))
		}
	}
	slices.Sort(want)
	sqlTables, err := dump(ctx, n, `(SELECT set_name, relation, coalesce(row_filter, ''), coalesce(array_to_string(columns, ','), '')
		FROM pgmesh.replication_set_tables)`)
	if err != nil {
		t.Fatal(err)
	}
	// dump prints rows as record text: quote nothing for the comparison.
	got := strings.ReplaceAll(sqlTables, `"`, "")
	if got != strings.Join(want, "\n") {
		t.Fatalf("pgmesh.replication_set_tables on %s:\n%s\nthe daemon's sets:\n%s", n.Name, got, strings.Join(want, "\n"))
	}
	local, err := dump(ctx, n, `(SELECT relation FROM pgmesh.local_tables)`)
	if err != nil {
		t.Fatal(err)
	}
	var wantLocal []string
	for _, l := range rep.LocalTables {
		wantLocal = append(wantLocal, "("+l+")")
	}
	if local != strings.Join(wantLocal, "\n") {
		t.Fatalf("pgmesh.local_tables on %s: %q, the daemon says %q", n.Name, local, wantLocal)
	}
}
