//go:build integration

package systemtest

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

const parkSchema = `CREATE TABLE t (id int PRIMARY KEY, v text NOT NULL);
	CREATE TABLE u (id int PRIMARY KEY, v text NOT NULL)`

// parkedOn is what `pgmesh parked --json` lists on n.
func parkedOn(t *testing.T, ctx context.Context, n *localmesh.Node) []api.ParkedTable {
	t.Helper()
	out, stderr, err := n.CLI(ctx, "parked", "--json")
	if err != nil {
		t.Fatalf("pgmesh parked: %v: %s", err, stderr)
	}
	var list []api.ParkedTable
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatalf("pgmesh parked --json: %v: %s", err, out)
	}
	return list
}

// The scenario: c cannot take a's values of t (its column is
// narrower). With on_apply_error park for t, u and b's changes keep
// flowing while a's changes of t wait on c, counted in parked, status,
// health and metrics; a replay before the fix stops and changes nothing;
// after the fix it brings c level with a and b while a keeps writing t,
// each parked change settled by last-update-wins against what c holds now.
func TestParkAndReplay(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, parkSchema, []string{"--housekeeping-interval", "1s"}, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	if out, stderr, err := a.CLI(ctx, "on-apply-error", "t", "park"); err != nil || !strings.Contains(out, "a, b, c") {
		t.Fatalf("on-apply-error: %v: %s %s", err, out, stderr)
	}
	for i := 1; i <= 20; i++ {
		mustExec(t, ctx, a, `INSERT INTO t VALUES ($1, 'ok')`, i)
	}
	converged(t, ctx, 30*time.Second, "t", nodes...)

	// Only c narrows the column: a's long values no longer fit there.
	mustExec(t, ctx, c, `ALTER TABLE t ALTER COLUMN v TYPE varchar(3)`)
	for i := 1; i <= 10; i++ {
		mustExec(t, ctx, a, `UPDATE t SET v = 'from a, too long for c' WHERE id = $1`, i)
		mustExec(t, ctx, a, `INSERT INTO u VALUES ($1, 'a')`, i)
		mustExec(t, ctx, b, `INSERT INTO u VALUES ($1, 'b')`, 100+i)
	}
	// u converges everywhere meanwhile: the stream from a goes on.
	converged(t, ctx, 30*time.Second, "u", nodes...)
	eventually(t, 30*time.Second, "a's ten updates of t parked on c", func() error {
		list := parkedOn(t, ctx, c)
		if len(list) != 1 || list[0].Table != "public.t" || list[0].Peer != "a" || list[0].Changes != 10 {
			return fmt.Errorf("parked: %+v", list)
		}
		if !strings.Contains(list[0].Error, "22001") || !strings.Contains(list[0].Error, "widen the column") {
			return fmt.Errorf("the first parked change does not carry its error: %q", list[0].Error)
		}
		return nil
	})

	// After a's updates, b deletes row 1 and overwrites row 2: both later
	// than a's parked updates of them.
	eventually(t, 30*time.Second, "b has a's updates", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM t WHERE v LIKE 'from a%'`); n != 10 {
			return fmt.Errorf("%d of 10", n)
		}
		return nil
	})
	mustExec(t, ctx, b, `DELETE FROM t WHERE id = 1`)
	mustExec(t, ctx, b, `UPDATE t SET v = 'b2' WHERE id = 2`)
	mustExec(t, ctx, b, `DELETE FROM u WHERE id = 101`)
	eventually(t, 30*time.Second, "c has b's deletes and update", func() error {
		if n := count(t, ctx, c, `SELECT count(*) FROM t WHERE id = 1 OR v = 'b2'`); n != 1 {
			return fmt.Errorf("%d rows of 1", n)
		}
		if n := count(t, ctx, c, `SELECT count(*) FROM u WHERE id = 101`); n != 0 {
			return fmt.Errorf("u 101 is still there")
		}
		return nil
	})
	// Housekeeping prunes the tombstones every peer has moved past, but
	// keeps those of a parked table: a parked update older than a delete
	// must still lose to it, however long it waits.
	eventually(t, time.Minute, "c prunes u's tombstone of 101", func() error {
		if n := count(t, ctx, c, `SELECT count(*) FROM pgmesh.tombstone WHERE relation = 'public.u'`); n != 0 {
			return fmt.Errorf("%d tombstones of u left", n)
		}
		return nil
	})
	if n := count(t, ctx, c, `SELECT count(*) FROM pgmesh.tombstone WHERE relation = 'public.t' AND key = '{"id": 1}'`); n != 1 {
		t.Fatalf("c pruned the tombstone of t's row 1, which a parked update of it needs")
	}

	// Seen in status, health (a warning, not a failure) and metrics.
	rep, err := c.Status(ctx)
	if err != nil || len(rep.Parked) != 1 {
		t.Fatalf("status of c: %v, parked %+v", err, rep.Parked)
	}
	code, health, err := getHealth(ctx, c)
	if err != nil || code != 200 || !strings.Contains(strings.Join(health.Warnings, "\n"), "pgmesh replay public.t --peer a") {
		t.Fatalf("health of c: %v %d %+v", err, code, health)
	}
	metrics, err := scrape(ctx, c)
	if err != nil {
		t.Fatal(err)
	}
	if v := metrics[`pgmesh_parked_changes{peer="a",table="public.t"}`]; v != 10 {
		t.Fatalf("pgmesh_parked_changes for a's t is %v, want 10", v)
	}

	// A replay before the fix stops at the first change, changing nothing.
	if out, stderr, err := c.CLI(ctx, "replay", "t"); err == nil || !strings.Contains(stderr, "stopped at parked change") {
		t.Fatalf("replay before the fix: %v: %s %s", err, out, stderr)
	}
	if list := parkedOn(t, ctx, c); len(list) != 1 || list[0].Changes != 10 {
		t.Fatalf("a failed replay changed the queue: %+v", list)
	}

	mustExec(t, ctx, c, `ALTER TABLE t ALTER COLUMN v TYPE text`)
	out, stderr, err := c.CLI(ctx, "replay", "t", "--dry-run")
	if err != nil || !strings.Contains(out, "would replay 10 changes") {
		t.Fatalf("dry run: %v: %s %s", err, out, stderr)
	}
	if list := parkedOn(t, ctx, c); len(list) != 1 || list[0].Changes != 10 {
		t.Fatalf("a dry run changed the queue: %+v", list)
	}

	// a keeps writing t throughout the replay.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writeErr error
	wg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			if err := a.PG.Exec(ctx, fmt.Sprintf(`UPDATE t SET v = 'a writes on %d' WHERE id = %d`, i, 11+i%10)); err != nil {
				writeErr = err
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	})
	time.Sleep(300 * time.Millisecond) // some of them parked, some after
	out, stderr, err = c.CLI(ctx, "replay", "t")
	close(stop)
	wg.Wait()
	if err != nil || writeErr != nil {
		t.Fatalf("replay: %v %v: %s %s", err, writeErr, out, stderr)
	}
	if !strings.Contains(out, "0 left parked") {
		t.Fatalf("replay left changes parked: %s", out)
	}
	if list := parkedOn(t, ctx, c); len(list) != 0 {
		t.Fatalf("still parked after the replay: %+v", list)
	}
	converged(t, ctx, time.Minute, "t", nodes...)
	if n := count(t, ctx, c, `SELECT count(*) FROM t WHERE id = 1`); n != 0 {
		t.Fatal("row 1, deleted by b after a's parked update, is back on c")
	}
	if n := count(t, ctx, c, `SELECT count(*) FROM t WHERE id = 2 AND v = 'b2'`); n != 1 {
		t.Fatal("b's later write of row 2 lost to a's older parked update on c")
	}
	got := strings.Join(conflicts(t, ctx, c), "\n")
	for _, want := range []string{`public.t update_deleted skip {"id": 1}`, `public.t update_origin_differs keep_local {"id": 2}`} {
		if !strings.Contains(got, want) {
			t.Errorf("c's conflict log lacks %q:\n%s", want, got)
		}
	}
	if out, stderr, err := a.CLI(ctx, "compare", "t", "u"); err != nil {
		t.Fatalf("compare after the replay: %v: %s %s", err, out, stderr)
	}
}

// Without a policy a failing change stops its peer's stream at the change,
// as always, and parks nothing; discard drops parked changes, each logged;
// bad input to the new commands gets one sentence and changes nothing.
func TestStopDiscardAndBadInput(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, parkSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	mustExec(t, ctx, b, `ALTER TABLE u ADD CONSTRAINT short CHECK (length(v) < 5)`)
	mustExec(t, ctx, a, `INSERT INTO u VALUES (1, 'much too long')`)
	eventually(t, 30*time.Second, "b's stream from a stops at the change", func() error {
		if s := streamFrom(t, ctx, b, "a"); !strings.Contains(s.LastError, "23514") {
			return fmt.Errorf("last error %q", s.LastError)
		}
		return nil
	})
	if list := parkedOn(t, ctx, b); len(list) != 0 {
		t.Fatalf("stop parked changes: %+v", list)
	}

	// Park instead: the same change is parked, and the stream goes on.
	if _, stderr, err := a.CLI(ctx, "on-apply-error", "u", "park"); err != nil {
		t.Fatalf("on-apply-error: %v: %s", err, stderr)
	}
	mustExec(t, ctx, a, `INSERT INTO u VALUES (2, 'also too long')`)
	mustExec(t, ctx, a, `INSERT INTO t VALUES (1, 'fine')`)
	converged(t, ctx, 30*time.Second, "t", nodes...)
	if list := parkedOn(t, ctx, b); len(list) != 1 || list[0].Changes != 2 {
		t.Fatalf("parked on b: %+v", list)
	}

	for _, bad := range []struct {
		args []string
		want string
	}{
		{[]string{"replay", "nosuch"}, "no changes of nosuch are parked on this node"},
		{[]string{"replay", "u", "--peer", "zed"}, "no changes of u from peer zed are parked"},
		{[]string{"discard", "u"}, "add --yes to confirm"},
		{[]string{"on-apply-error", "u", "skip"}, "is not park, stop or default"},
		{[]string{"on-apply-error", "nosuch", "park"}, "nosuch"},
	} {
		if out, stderr, err := b.CLI(ctx, bad.args...); err == nil || !strings.Contains(stderr, bad.want) {
			t.Errorf("pgmesh %s: %v: %s %s (want an error saying %q)", strings.Join(bad.args, " "), err, out, stderr, bad.want)
		}
	}
	if list := parkedOn(t, ctx, b); len(list) != 1 || list[0].Changes != 2 {
		t.Fatalf("bad input changed the queue: %+v", list)
	}

	out, stderr, err := b.CLI(ctx, "discard", "u", "--yes")
	if err != nil || !strings.Contains(out, "discarded 2 parked changes") {
		t.Fatalf("discard: %v: %s %s", err, out, stderr)
	}
	if list := parkedOn(t, ctx, b); len(list) != 0 {
		t.Fatalf("parked after discard: %+v", list)
	}
	if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.conflict_history
		WHERE relation = 'public.u' AND conflict_type = 'parked_discarded' AND resolution = 'skip' AND remote_tuple->>'v' LIKE '%too long'`); n != 2 {
		t.Fatalf("conflict_history holds %d discarded changes, want 2", n)
	}
	// Unparked: u's next change from a applies directly.
	mustExec(t, ctx, a, `INSERT INTO u VALUES (3, 'ok')`)
	eventually(t, 30*time.Second, "u's next change applies on b", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM u WHERE id = 3`); n != 1 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
}

// kill -9 of the daemon while it parks and again while it replays: every
// failed change is parked exactly once, and after the replay (resumed by a
// second pgmesh replay) the nodes agree and nothing is left parked.
func TestParkAndReplaySurviveKill(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, parkSchema, []string{"--on-apply-error", "park"}, "a", "b")
	a, b := nodes[0], nodes[1]
	const rows, updates = 20, 300
	for i := 1; i <= rows; i++ {
		mustExec(t, ctx, a, `INSERT INTO t VALUES ($1, 'ok')`, i)
	}
	converged(t, ctx, 30*time.Second, "t", nodes...)
	mustExec(t, ctx, b, `ALTER TABLE t ALTER COLUMN v TYPE varchar(3)`)

	// a's updates, one transaction each, while b's daemon is killed twice.
	done := make(chan error, 1)
	go func() {
		conn, err := a.PG.Connect(ctx)
		if err != nil {
			done <- err
			return
		}
		defer conn.Close(ctx)
		for i := range updates {
			if _, err := conn.Exec(ctx, `UPDATE t SET v = 'update ' || $1::int WHERE id = $2`, i, 1+i%rows); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	for range 2 {
		eventually(t, 30*time.Second, "b parks some of a's updates", func() error {
			if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.parked_changes`); n == 0 || n == updates {
				return fmt.Errorf("%d parked", n)
			}
			return nil
		})
		if err := b.Kill(); err != nil {
			t.Fatal(err)
		}
		if err := b.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	eventually(t, time.Minute, "every update parked on b once", func() error {
		n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.parked_changes`)
		distinct := count(t, ctx, b, `SELECT count(DISTINCT source_lsn) FROM pgmesh.parked_changes`)
		if n != updates || distinct != updates {
			return fmt.Errorf("%d parked changes of %d source transactions, want %d of each", n, distinct, updates)
		}
		return nil
	})

	mustExec(t, ctx, b, `ALTER TABLE t ALTER COLUMN v TYPE text`)
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	replayed := make(chan error, 1)
	go func() {
		_, stderr, err := b.CLI(ctx, "replay", "t")
		if err != nil {
			err = fmt.Errorf("%w: %s", err, stderr)
		}
		replayed <- err
	}()
	eventually(t, time.Minute, "the replay under way", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.parked_changes`); n == updates {
			return fmt.Errorf("nothing replayed yet")
		}
		return nil
	})
	if err := b.Kill(); err != nil {
		t.Fatal(err)
	}
	<-replayed // cut off with the daemon
	left := count(t, ctx, b, `SELECT count(*) FROM pgmesh.parked_changes`)
	t.Logf("%d of %d parked changes were replayed when the daemon was killed", updates-left, updates)
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	if left > 0 {
		if out, stderr, err := b.CLI(ctx, "replay", "t"); err != nil || !strings.Contains(out, fmt.Sprintf("replayed %d changes", left)) {
			t.Fatalf("second replay: %v: %s %s", err, out, stderr)
		}
	}
	if n := count(t, ctx, b, `SELECT count(*) FROM pgmesh.parked_changes`); n != 0 {
		t.Fatalf("%d changes still parked", n)
	}
	converged(t, ctx, 30*time.Second, "t", nodes...)
}
