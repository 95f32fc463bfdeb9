//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/replicator"
)

// One node's Postgres clock runs 2 s behind the others (libfaketime on its
// postmaster). A row inserted on a and, once b has it, updated on b: b's
// update causally follows a's insert, so it must win everywhere. Without
// the causality guard b would stamp its update 2 s before the version it
// overwrote, a and c would keep a's value and b its own, for good. b also
// reports a's clock as ahead, in status and /health.
func TestClockSkewConverges(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	env, err := pgtest.FakeClock(-2)
	if err != nil {
		t.Fatal(err)
	}
	const schema = `CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL)`
	var nodes []*localmesh.Node
	for _, name := range []string{"a", "b", "c"} {
		opts := pgtest.Options{}
		if name == "b" {
			opts.Env = env
		}
		n, err := localmesh.NewNode(ctx, bin, name, opts)
		if err != nil {
			t.Fatal(err)
		}
		keepLogs(t, n)
		mustExec(t, ctx, n, schema)
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	a, b, c := nodes[0], nodes[1], nodes[2]
	var skew, bNow float64
	if err := connect(t, ctx, b).QueryRow(ctx, `SELECT extract(epoch FROM clock_timestamp())::float8`).Scan(&bNow); err != nil {
		t.Fatal(err)
	}
	if behind := float64(time.Now().UnixMicro())/1e6 - bNow; behind < 1.5 || behind > 2.5 {
		t.Fatalf("b's Postgres clock is %.2fs behind, not about 2s: libfaketime did not take", behind)
	}
	if _, err := localmesh.Form(ctx, "test", nodes...); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}

	const rows = 20
	for k := 1; k <= rows; k++ {
		mustExec(t, ctx, a, `INSERT INTO kv VALUES ($1, 'from a')`, k)
	}
	eventually(t, 30*time.Second, "b has a's rows", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM kv`); n != rows {
			return fmt.Errorf("b has %d of %d rows", n, rows)
		}
		return nil
	})
	mustExec(t, ctx, b, `UPDATE kv SET v = 'from b'`)
	want := converged(t, ctx, time.Minute, "kv", a, b, c)
	if n := strings.Count(want, "from b"); n != rows {
		t.Fatalf("the group converged, but on %d of %d rows holding b's later update:\n%s", n, rows, want)
	}

	eventually(t, 30*time.Second, "b reports a's clock 2s ahead", func() error {
		p := streamFrom(t, ctx, b, "a")
		if p.ClockSkew == nil || *p.ClockSkew < 1.5 || *p.ClockSkew > 2.5 {
			return fmt.Errorf("clock_skew_seconds of a on b: %v", p.ClockSkew)
		}
		skew = *p.ClockSkew
		if !strings.Contains(p.ClockWarning, "peer a") || !strings.Contains(p.ClockWarning, "max_clock_skew") {
			return fmt.Errorf("clock warning of a on b: %q", p.ClockWarning)
		}
		return nil
	})
	if p := streamFrom(t, ctx, b, "a"); p.ClockWaits == 0 {
		t.Errorf("b applied a's fresh writes without waiting for its clock (clock_waits 0)")
	}
	if p := streamFrom(t, ctx, a, "b"); p.ClockWarning != "" || p.ClockSkew == nil || *p.ClockSkew > -1.5 {
		t.Errorf("a sees b's clock behind, which needs no warning; got skew %v, warning %q", p.ClockSkew, p.ClockWarning)
	}
	resp, err := http.Get("http://" + b.API + "/health")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "clock of peer a") {
		t.Errorf("b's /health: %d %s; want 503 naming a's clock", resp.StatusCode, body)
	}
	out, _, err := b.CLI(ctx, "status")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "clock: the clock of peer a is") {
		t.Errorf("pgmesh status on b does not show the skew:\n%s", out)
	}
	t.Logf("b measured a's clock %.3fs ahead; %d rows converged on b's update", skew, rows)
}

// During a catch-up of one-row transactions, consecutive ones of the same
// rounded commit time share a local commit: far fewer local transactions
// than source transactions, read from status counters.
func TestGroupedCommitsForm(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE ledger (id int PRIMARY KEY, note text)`, "a", "b")
	a, b := nodes[0], nodes[1]
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	const total = 20000
	mustExec(t, ctx, a, fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
		INSERT INTO ledger VALUES (i, 'one-row transaction'); COMMIT; END LOOP; END $$`, total))
	st := catchUpBacklog(t, ctx, b, "ledger", total)
	perHundred := 100 * float64(st.LocalCommits) / float64(st.AppliedTxns)
	t.Logf("%d source transactions applied in %d local commits: %.1f per 100", st.AppliedTxns, st.LocalCommits, perHundred)
	if perHundred > 50 {
		t.Errorf("groups did not form: %.1f local commits per 100 source transactions", perHundred)
	}
	converged(t, ctx, time.Minute, "ledger", a, b)
}

// A backlog of pgbench-like transactions (three updates of one account,
// one teller and the branch, and an insert into a history without a key)
// is applied set-based: each group's changes collapse to a few statements
// per table, so far fewer statements run than source transactions, and the
// nodes agree.
func TestPgbenchLikeBacklogCollapses(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE accounts (aid int PRIMARY KEY, abalance int, filler text);
		CREATE TABLE tellers (tid int PRIMARY KEY, tbalance int);
		CREATE TABLE branches (bid int PRIMARY KEY, bbalance int);
		CREATE TABLE history (tid int, aid int, delta int, mtime timestamptz)`, "a", "b")
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, a, `INSERT INTO accounts SELECT i, 0, 'x' FROM generate_series(1, 1000) i;
		INSERT INTO tellers SELECT i, 0 FROM generate_series(1, 10) i;
		INSERT INTO branches VALUES (1, 0)`)
	converged(t, ctx, time.Minute, "accounts", a, b)
	converged(t, ctx, time.Minute, "tellers", a, b)
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	const total = 5000
	mustExec(t, ctx, a, fmt.Sprintf(`DO $$ DECLARE a_id int; t_id int; d int; BEGIN
		FOR i IN 1..%d LOOP
			a_id := 1 + (i * 7919) %% 1000; t_id := 1 + i %% 10; d := i %% 100 - 50;
			UPDATE accounts SET abalance = abalance + d WHERE aid = a_id;
			UPDATE tellers SET tbalance = tbalance + d WHERE tid = t_id;
			UPDATE branches SET bbalance = bbalance + d WHERE bid = 1;
			INSERT INTO history VALUES (t_id, a_id, d, now());
			COMMIT;
		END LOOP; END $$`, total))
	st := catchUpBacklog(t, ctx, b, "history", total)
	txns, commits, stmts, collapsed := st.AppliedTxns, st.LocalCommits, st.Statements, st.CollapsedCommits
	t.Logf("%d source transactions in %d local commits (%d set-based) by %d statements: %.2f per source transaction, %.1f per commit; %d retried carefully",
		txns, commits, collapsed, stmts, float64(stmts)/float64(txns), float64(stmts)/float64(commits), st.RetriedTxns)
	if collapsed == 0 {
		t.Error("no group was applied set-based")
	}
	// One by one, each source transaction takes four statements; collapsed,
	// a group takes about one per table.
	if perCommit := float64(stmts) / float64(commits); perCommit > 2*4 {
		t.Errorf("%.1f statements per local commit, want at most two per table (8)", perCommit)
	}
	if perTxn := float64(stmts) / float64(txns); perTxn > 1 {
		t.Errorf("%.2f statements per source transaction, want far fewer than the four of one by one", perTxn)
	}
	for _, table := range []string{"accounts", "tellers", "branches"} {
		converged(t, ctx, time.Minute, table, a, b)
	}
	for _, sum := range []string{`SELECT sum(abalance) FROM accounts`, `SELECT sum(tbalance) FROM tellers`,
		`SELECT sum(bbalance) FROM branches`, `SELECT sum(delta) FROM history`} {
		if got, want := count(t, ctx, b, sum), count(t, ctx, a, sum); got != want {
			t.Errorf("%s: %d on b, %d on a", sum, got, want)
		}
	}
}

// catchUpBacklog starts b, which was stopped while a wrote total
// transactions each adding a row to table, waits until b has them all, and
// returns b's stream status: its counters started with the restart, so
// they count the backlog.
func catchUpBacklog(t *testing.T, ctx context.Context, b *localmesh.Node, table string, total int64) replicator.Status {
	t.Helper()
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 2*time.Minute, "b catches up", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM `+table); n != total {
			return fmt.Errorf("b has %d of %d rows of %s", n, total, table)
		}
		return nil
	})
	var st replicator.Status
	eventually(t, 10*time.Second, "b counts every transaction", func() error {
		if st = streamFrom(t, ctx, b, "a"); st.AppliedTxns < total {
			return fmt.Errorf("applied_txns %d", st.AppliedTxns)
		}
		return nil
	})
	return st
}

// Inside one luw_resolution interval (100ms here), a write that follows a
// peer's write it saw wins everywhere, in both directions. Towards the
// higher node id the peer's write becomes visible as soon as it arrives, so
// the following write often shares its interval and wins the tie by node
// id; towards the lower id it waits for the interval's end, so the
// following write is always in a later interval (conflict.Rule.VisibleAfter).
func TestFollowingWriteWinsInsideOneInterval(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, `CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL)`,
		[]string{"--luw-resolution", "100ms"}, "a", "b")
	a, b := nodes[0], nodes[1]
	id := func(n *localmesh.Node) int64 {
		return count(t, ctx, a, `SELECT node_id FROM pgmesh.node WHERE node_name = $1`, n.Name)
	}
	if id(a) >= id(b) {
		t.Fatalf("node ids a %d, b %d: the test expects the node that formed the group to have the lower", id(a), id(b))
	}
	rule := conflict.Rule{Resolution: 100 * time.Millisecond}
	const keys = 20
	shared := map[string]int{}
	for dir, pair := range [][2]*localmesh.Node{{a, b}, {b, a}} {
		first, then := connect(t, ctx, pair[0]), connect(t, ctx, pair[1])
		way := pair[0].Name + " to " + pair[1].Name
		// Flushed at once: the clusters run synchronous_commit off, and the
		// walsender would see the insert only at the WAL writer's next
		// round, 200 ms on.
		if _, err := first.Exec(ctx, `SET synchronous_commit = on`); err != nil {
			t.Fatal(err)
		}
		for i := range keys {
			k := dir*keys + i
			var xid string
			if err := first.QueryRow(ctx, `INSERT INTO kv VALUES ($1, 'first') RETURNING xmin::text`, k).Scan(&xid); err != nil {
				t.Fatal(err)
			}
			// The update runs as soon as the insert is visible on then.
			var uxid string
			if err := poll.Until(ctx, time.Millisecond, 30*time.Second, func() error {
				return then.QueryRow(ctx, `UPDATE kv SET v = 'then' WHERE k = $1
					RETURNING xmin::text`, k).Scan(&uxid)
			}); err != nil {
				t.Fatalf("%s: key %d never arrived: %v", way, k, err)
			}
			committed := func(c *pgx.Conn, xid string) (ts time.Time) {
				if err := c.QueryRow(ctx, `SELECT pg_xact_commit_timestamp($1::xid)`, xid).Scan(&ts); err != nil {
					t.Fatal(err)
				}
				return ts
			}
			inserted, updated := committed(first, xid), committed(then, uxid)
			if rule.Round(inserted) == rule.Round(updated) {
				shared[way]++
			}
		}
	}
	want := converged(t, ctx, time.Minute, "kv", a, b)
	if n := strings.Count(want, "then"); n != 2*keys {
		t.Fatalf("the nodes agree, but on %d of %d rows holding the following update:\n%s", n, 2*keys, want)
	}
	t.Logf("updates in the interval of the insert they followed: %v of %d each way", shared, keys)
	if shared["b to a"] != 0 {
		t.Errorf("%d of a's updates shared the interval of b's insert: a (the lower id) applied it before the interval ended", shared["b to a"])
	}
	if shared["a to b"] == 0 {
		t.Errorf("none of b's updates shared the interval of a's insert: b (the higher id) still waits for the interval's end")
	}
}
