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

const kvSchema = `CREATE TABLE kv (k int PRIMARY KEY, v text, email text UNIQUE);
CREATE TABLE people (id int PRIMARY KEY, email text UNIQUE, phone text UNIQUE)`

// Each conflict type, provoked deterministically: both daemons are stopped,
// a writes first and b second (so b's commit is newer), then they heal.
// Node a has id 1 and b id 2.
func TestConflictTypes(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, kvSchema, "a", "b")
	a := nodes[0]
	provokeConflictTypes(t, ctx, nodes...)

	// The history row has both versions, who won, and the commit times.
	c := connect(t, ctx, a)
	var local, remote, applied, localOrigin string
	var localTS, remoteTS time.Time
	if err := c.QueryRow(ctx, `SELECT local_tuple->>'v', remote_tuple->>'v', applied_tuple->>'v', local_origin,
		local_commit_ts, remote_commit_ts FROM pgmesh.conflict_history
		WHERE conflict_type = 'update_origin_differs' AND key_tuple = '{"k": 2}'`).Scan(&local, &remote, &applied, &localOrigin, &localTS, &remoteTS); err != nil {
		t.Fatal(err)
	}
	if local != "a" || remote != "b" || applied != "b" || localOrigin != "a" || !remoteTS.After(localTS) {
		t.Errorf("conflict row: local %q remote %q applied %q origin %q, times %v < %v", local, remote, applied, localOrigin, localTS, remoteTS)
	}

	out, _, err := a.CLI(ctx, "conflicts", "--type", "update_exists")
	if err != nil || !strings.Contains(out, "update_exists") || strings.Contains(out, "insert_exists") {
		t.Errorf("pgmesh conflicts --type update_exists:\n%s (err %v)", out, err)
	}
	out, _, err = a.CLI(ctx, "status")
	if err != nil || !strings.Contains(out, "conflicts from b:") || !strings.Contains(out, "update_exists 3") {
		t.Errorf("pgmesh status lacks conflicts by type:\n%s (err %v)", out, err)
	}
}

// An insert whose key a newer delete already removed here is skipped: c
// receives b's delete of a row before a's insert of it.
func TestInsertOvertakenByDelete(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, kvSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO kv VALUES (1, 'a', NULL)`)
	eventually(t, 30*time.Second, "b has the row", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM kv`); n != 1 {
			return fmt.Errorf("b has %d rows", n)
		}
		return nil
	})
	mustExec(t, ctx, b, `DELETE FROM kv WHERE k = 1`)
	// With a's Postgres down, c can only hear from b.
	if err := a.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitConflicts(t, ctx, c, `public.kv delete_missing skip {"k": 1}`)
	if err := a.PG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	waitConflicts(t, ctx, c, `public.kv delete_missing skip {"k": 1}`, `public.kv insert_deleted skip {"k": 1}`)
	if got := converged(t, ctx, 30*time.Second, "kv", nodes...); got != "" {
		t.Fatalf("row resurrected: %s", got)
	}
}

// BDR's lost-update example: Sydney and Tokyo each add 50 to a balance of
// 100 at the same time. With a delta column, every node ends at 200.
func TestDeltaColumnsKeepEveryIncrement(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE accounts (id int PRIMARY KEY, balance numeric NOT NULL, note text)`, "sydney", "tokyo", "dallas")
	sydney, tokyo := nodes[0], nodes[1]
	mustExec(t, ctx, sydney, `INSERT INTO accounts VALUES (1, 100, 'opened')`)
	converged(t, ctx, 30*time.Second, "accounts", nodes...)

	out, stderr, err := tokyo.CLI(ctx, "delta-column", "accounts", "balance")
	if err != nil {
		t.Fatalf("delta-column: %v %s", err, stderr)
	}
	if !strings.Contains(out, "dallas, sydney, tokyo") {
		t.Fatalf("delta-column did not report every node: %s", out)
	}
	for _, n := range nodes {
		if got := count(t, ctx, n, `SELECT count(*) FROM pg_class WHERE relname = 'accounts' AND relreplident = 'f'`); got != 1 {
			t.Fatalf("%s: accounts is not REPLICA IDENTITY FULL", n.Name)
		}
	}
	partitioned(t, ctx, nodes, func() {
		mustExec(t, ctx, sydney, `UPDATE accounts SET balance = balance + 50, note = 'sydney' WHERE id = 1`)
		mustExec(t, ctx, tokyo, `UPDATE accounts SET balance = balance + 50, note = 'tokyo' WHERE id = 1`)
	})
	if got := converged(t, ctx, 30*time.Second, "accounts", nodes...); got != "(1,200,tokyo)" {
		t.Fatalf("accounts converged to %s, want (1,200,tokyo)", got)
	}
	waitConflicts(t, ctx, tokyo, `public.accounts update_origin_differs merge {"id": 1}`)
	// Ordinary, non-concurrent updates keep working as increments.
	mustExec(t, ctx, nodes[2], `UPDATE accounts SET balance = balance - 25 WHERE id = 1`)
	if got := converged(t, ctx, 30*time.Second, "accounts", nodes...); got != "(1,175,tokyo)" {
		t.Fatalf("accounts converged to %s, want (1,175,tokyo)", got)
	}
	_, stderr, err = tokyo.CLI(ctx, "delta-column", "accounts", "note")
	if err == nil || !strings.Contains(stderr, "delta columns must be numeric") {
		t.Fatalf("a text delta column: err=%v %s", err, stderr)
	}
}

// Tombstones from a delete-heavy workload are pruned once every peer's
// changes up to them are applied; old conflicts are pruned by retention.
func TestTombstonesAndConflictsArePruned(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, kvSchema, []string{"--housekeeping-interval", "1s", "--conflict-retention", "3s"}, "a", "b")
	a, b := nodes[0], nodes[1]
	peak := map[string]int64{}
	for round := 0; round < 5; round++ {
		mustExec(t, ctx, a, fmt.Sprintf(`INSERT INTO kv SELECT g, 'x', NULL FROM generate_series(%d, %d) g`, round*2000, round*2000+1999))
		mustExec(t, ctx, a, `DELETE FROM kv`)
		converged(t, ctx, 30*time.Second, "kv", nodes...)
		for _, n := range nodes {
			peak[n.Name] = max(peak[n.Name], count(t, ctx, n, `SELECT count(*) FROM pgmesh.tombstone`))
		}
	}
	if peak["a"] == 0 || peak["b"] == 0 {
		t.Fatalf("deletes left no tombstones: %v", peak)
	}
	eventually(t, 60*time.Second, "tombstones pruned", func() error {
		for _, n := range []*localmesh.Node{a, b} {
			if c := count(t, ctx, n, `SELECT count(*) FROM pgmesh.tombstone`); c != 0 {
				return fmt.Errorf("%s still has %d tombstones", n.Name, c)
			}
		}
		return nil
	})
	t.Logf("10000 deletes in 5 rounds: peak tombstones a=%d b=%d, all pruned", peak["a"], peak["b"])

	partitioned(t, ctx, nodes, func() {
		mustExec(t, ctx, a, `INSERT INTO kv VALUES (1, 'a', NULL)`)
		mustExec(t, ctx, b, `INSERT INTO kv VALUES (1, 'b', NULL)`)
	})
	waitConflicts(t, ctx, a, `public.kv insert_exists apply_remote {"k": 1}`)
	eventually(t, 30*time.Second, "old conflicts pruned", func() error {
		if n := count(t, ctx, a, `SELECT count(*) FROM pgmesh.conflict_history`); n != 0 {
			return fmt.Errorf("a still has %d conflicts", n)
		}
		return nil
	})
}

// A peer's insert can wait for a local transaction that deletes the same
// key: PostgreSQL lets the insert go on once that transaction commits, and
// the insert's own snapshot predates the delete. The delete is newer, so it
// must win on both nodes, on the fast path and on the careful one (taken
// here because the source transaction first updates a row b wrote).
func TestInsertWaitingForLocalDelete(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, kvSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, b, `INSERT INTO kv VALUES (100, 'b', NULL)`)
	converged(t, ctx, 30*time.Second, "kv", a, b)
	for _, tc := range []struct {
		path   string
		key    int
		source string
	}{
		{"fast", 1, `INSERT INTO kv VALUES (1, 'a', NULL)`},
		{"careful", 2, `BEGIN; UPDATE kv SET v = 'a' WHERE k = 100; INSERT INTO kv VALUES (2, 'a', NULL); COMMIT`},
	} {
		local := fmt.Sprintf(`INSERT INTO kv VALUES (%d, 'b', NULL); DELETE FROM kv WHERE k = %[1]d`, tc.key)
		whileApplyWaits(t, ctx, b, a, local, tc.source)
		if err := localmesh.CaughtUp(ctx, 30*time.Second, a, b); err != nil {
			t.Fatal(err)
		}
		for _, n := range nodes {
			if got := count(t, ctx, n, `SELECT count(*) FROM kv WHERE k = $1`, tc.key); got != 0 {
				t.Errorf("%s path: %s holds key %d, which b's later delete removed", tc.path, n.Name, tc.key)
			}
		}
	}
	waitConflicts(t, ctx, b, `public.kv update_origin_differs apply_remote {"k": 100}`,
		`public.kv insert_deleted skip {"k": 1}`, `public.kv insert_deleted skip {"k": 2}`)

	// An update of a row b never had is applied as an insert, which waits
	// for a local insert of the key: once that commits, the update is
	// settled against the newer local row, without stopping the stream.
	drift(t, ctx, a, `INSERT INTO kv VALUES (3, 'a', NULL)`)
	whileApplyWaits(t, ctx, b, a, `INSERT INTO kv VALUES (3, 'b', NULL)`, `UPDATE kv SET v = 'a2' WHERE k = 3`)
	if got := converged(t, ctx, 30*time.Second, "(SELECT * FROM kv WHERE k = 3)", a, b); got != "(3,b,)" {
		t.Errorf("key 3 converged on %q, want b's later insert", got)
	}
	if st := streamFrom(t, ctx, b, "a"); st.Errors != 0 {
		t.Errorf("b's stream from a stopped on an error: %s", st.LastError)
	}
}

// whileApplyWaits runs local on n in a transaction it holds open while
// peer commits remote, until n's apply of it waits for that transaction's
// locks; then it commits local.
func whileApplyWaits(t *testing.T, ctx context.Context, n, peer *localmesh.Node, local, remote string) {
	t.Helper()
	conn := connect(t, ctx, n)
	if _, err := conn.Exec(ctx, "BEGIN; "+local); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, peer, remote)
	eventually(t, 30*time.Second, n.Name+"'s apply of "+peer.Name+"'s change waits for the local transaction", func() error {
		if c := count(t, ctx, n, `SELECT count(*) FROM pg_stat_activity
			WHERE application_name = $1 AND wait_event_type = 'Lock'`, "pgmesh apply from "+peer.Name); c != 1 {
			return fmt.Errorf("%d apply sessions wait for a lock", c)
		}
		return nil
	})
	if _, err := conn.Exec(ctx, "COMMIT"); err != nil {
		t.Fatal(err)
	}
}

// provokeConflictTypes makes each conflict type happen once between nodes a
// and b (ids 1 and 2, kvSchema), and checks how each was settled and logged.
func provokeConflictTypes(t *testing.T, ctx context.Context, nodes ...*localmesh.Node) {
	t.Helper()
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, a, `INSERT INTO kv VALUES (2, 'seed', 'e2'), (3, 'seed', 'e3'), (4, 'seed', 'e4'), (5, 'seed', 'e5'), (6, 'seed', 'x6'), (7, 'seed', 'x7');
		INSERT INTO people VALUES (1, 'e1', 'p1'), (2, 'e2', 'p2')`)
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	converged(t, ctx, 30*time.Second, "people", nodes...)

	partitioned(t, ctx, nodes, func() {
		// insert_exists: both insert key 1.
		mustExec(t, ctx, a, `INSERT INTO kv VALUES (1, 'a', NULL)`)
		mustExec(t, ctx, b, `INSERT INTO kv VALUES (1, 'b', NULL)`)
		// update_origin_differs: both update key 2.
		mustExec(t, ctx, a, `UPDATE kv SET v = 'a' WHERE k = 2`)
		mustExec(t, ctx, b, `UPDATE kv SET v = 'b' WHERE k = 2`)
		// An update older than a delete: the delete wins everywhere.
		mustExec(t, ctx, a, `UPDATE kv SET v = 'a' WHERE k = 3`)
		mustExec(t, ctx, b, `DELETE FROM kv WHERE k = 3`)
		// A delete older than an update: the update wins everywhere.
		mustExec(t, ctx, a, `DELETE FROM kv WHERE k = 4`)
		mustExec(t, ctx, b, `UPDATE kv SET v = 'b' WHERE k = 4`)
		// delete_missing: both delete key 5.
		mustExec(t, ctx, a, `DELETE FROM kv WHERE k = 5`)
		mustExec(t, ctx, b, `DELETE FROM kv WHERE k = 5`)
		// update_exists: two rows take the same unique email; b's is newer.
		mustExec(t, ctx, a, `UPDATE kv SET email = 'dup' WHERE k = 6`)
		mustExec(t, ctx, b, `UPDATE kv SET email = 'dup' WHERE k = 7`)
		// multiple_unique_conflicts: b gives row 1 email E and row 2 phone P;
		// then a inserts row 3 with both, newer than both.
		mustExec(t, ctx, b, `UPDATE people SET email = 'E' WHERE id = 1`)
		mustExec(t, ctx, b, `UPDATE people SET phone = 'P' WHERE id = 2`)
		// a has the lower id: its insert is newer only from the next
		// luw_resolution interval on (10 ms by default).
		nextInterval(t, ctx, a)
		mustExec(t, ctx, a, `INSERT INTO people VALUES (3, 'E', 'P')`)
	})

	kv := converged(t, ctx, 30*time.Second, "kv", nodes...)
	if want := "(1,b,)\n(2,b,e2)\n(4,b,e4)\n(7,seed,dup)"; kv != want {
		t.Errorf("kv converged to\n%s\nwant\n%s", kv, want)
	}
	people := converged(t, ctx, 30*time.Second, "people", nodes...)
	if want := "(3,E,P)"; people != want {
		t.Errorf("people converged to\n%s\nwant\n%s", people, want)
	}
	waitConflicts(t, ctx, a,
		`public.kv insert_exists apply_remote {"k": 1}`,
		`public.kv update_origin_differs apply_remote {"k": 2}`,
		`public.kv delete_origin_differs apply_remote {"k": 3}`,
		`public.kv update_missing apply_as_insert {"k": 4}`,
		`public.kv delete_missing skip {"k": 5}`,
		// Rows a wrote and b then changed count as update_origin_differs
		// too (as in PostgreSQL 18), resolved for the newer change.
		`public.kv update_origin_differs apply_remote {"k": 7}`,
		`public.kv update_exists apply_remote {"k": 7}`,
		`public.people update_origin_differs apply_remote {"id": 1}`,
		`public.people update_exists keep_local {"id": 1}`,
		`public.people update_origin_differs apply_remote {"id": 2}`,
		`public.people update_exists keep_local {"id": 2}`,
	)
	waitConflicts(t, ctx, b,
		`public.kv insert_exists keep_local {"k": 1}`,
		`public.kv update_origin_differs keep_local {"k": 2}`,
		`public.kv update_deleted skip {"k": 3}`,
		`public.kv delete_origin_differs keep_local {"k": 4}`,
		`public.kv delete_missing skip {"k": 5}`,
		`public.kv update_exists keep_local {"k": 6}`,
		`public.people multiple_unique_conflicts apply_remote {"id": 3}`,
	)

}
