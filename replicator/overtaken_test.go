//go:build integration

package replicator

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// Peer c inserts key 11, then peer a deletes it. Here, c's insert is held
// after it went in and looked for tombstones (an ALWAYS trigger waits for
// the test), while a's delete finds no row, records its tombstone and
// commits; then c's insert commits too. Neither could see the other, and
// the row stays although the newer delete removed it everywhere else
// (TestRandomizedConvergence met this with seed 1796087458277776907).
// RemoveOvertaken finds it and removes it; a row newer than its key's
// tombstone stays.
func TestOvertakenInsertIsRemoved(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	local := pgtest.WithSchema(t, ctx)
	const schema = `CREATE TABLE t (k int PRIMARY KEY, who text)`
	peers := map[string]*pgx.Conn{}
	for _, name := range []string{"pa", "pc"} {
		p := peerDatabase(t, ctx, local, name)
		mustExec(t, ctx, p, schema+`; INSERT INTO t VALUES (11, 'before'); CREATE PUBLICATION p FOR ALL TABLES`)
		mustExec(t, ctx, p, `DELETE FROM t`)                                                     // before the slot: not streamed
		mustExec(t, ctx, p, `SELECT pg_create_logical_replication_slot('`+name+`', 'pgoutput')`) // one cluster: one name each
		peers[name] = p
	}
	mustExec(t, ctx, peers["pa"], `INSERT INTO t VALUES (11, 'a')`)
	mustExec(t, ctx, peers["pa"], `SELECT pg_replication_slot_advance('pa', pg_current_wal_lsn())`) // a had the row
	mustExec(t, ctx, peers["pc"], `INSERT INTO t VALUES (11, 'c')`)                                 // older...
	// ...than this delete, at the rule's 1 ms resolution: in the same
	// millisecond the insert would win the tie (pc has the higher id) and
	// rightly stay, as the test once found.
	var insertedAt time.Time
	if err := peers["pc"].QueryRow(ctx, `SELECT pg_xact_commit_timestamp(xmin) FROM t WHERE k = 11`).Scan(&insertedAt); err != nil {
		t.Fatal(err)
	}
	if err := poll.Until(ctx, time.Millisecond, time.Minute, func() error {
		var past bool
		if err := peers["pa"].QueryRow(ctx, `SELECT clock_timestamp() > $1::timestamptz + interval '1 ms'`, insertedAt).Scan(&past); err != nil || past {
			return err
		}
		return errTryAgain
	}); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, peers["pa"], `DELETE FROM t WHERE k = 11`)
	mustExec(t, ctx, local, schema+`;
		CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NULL; END $$;
		CREATE TRIGGER hold AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION hold();
		ALTER TABLE t ENABLE ALWAYS TRIGGER hold`)
	holder := connectLike(t, ctx, local)
	mustExec(t, ctx, holder, `SELECT pg_advisory_lock(4242)`)

	// c's insert goes in, finds no tombstone, and waits in the trigger.
	fromC, _ := newTestApplier(t, ctx, local, "pc")
	var wg sync.WaitGroup
	var errC error
	wg.Go(func() { errC = applyAll(ctx, fromC, peerMessages(t, ctx, peers["pc"], "pc", "p")) })
	watcher := connectLike(t, ctx, local)
	if err := poll.Until(ctx, 10*time.Millisecond, time.Minute, func() error {
		var waiting bool
		if err := watcher.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
			WHERE application_name = 'pgmesh test apply' AND wait_event = 'advisory')`).Scan(&waiting); err != nil || waiting {
			return err
		}
		return errTryAgain
	}); err != nil {
		t.Fatalf("c's insert never waited in the trigger: %v", err)
	}
	// a's delete finds no row, remembers the delete and commits.
	fromA, _ := newTestApplier(t, ctx, local, "pa")
	deletedMissing := false
	fromA.cfg.DeletedMissing = func() { deletedMissing = true }
	if err := applyAll(ctx, fromA, peerMessages(t, ctx, peers["pa"], "pa", "p")); err != nil {
		t.Fatal(err)
	}
	if !deletedMissing {
		t.Fatal("a's delete of a key with no row here did not call DeletedMissing")
	}
	mustExec(t, ctx, holder, `SELECT pg_advisory_unlock(4242)`)
	wg.Wait()
	if errC != nil {
		t.Fatal(errC)
	}
	if got := queryString(t, ctx, local, `SELECT count(*)::text FROM t WHERE k = 11`); got != "1" {
		t.Fatalf("the race did not happen (t holds %s rows with key 11): the test no longer tests anything", got)
	}

	// A row newer than its key's tombstone is not touched.
	mustExec(t, ctx, local, `INSERT INTO pgmesh.tombstone VALUES ('public.t', '{"k": 12}', now() - interval '1 hour', 'pa');
		INSERT INTO t VALUES (12, 'newer')`)
	ids := map[string]int{"local": 1, "pa": 2, "pc": 3}
	n, err := RemoveOvertaken(ctx, local.Config().ConnString(), "local", conflict.Rule{Resolution: time.Millisecond},
		func(name string) int { return ids[name] })
	if err != nil {
		t.Fatal(err)
	}
	got := queryString(t, ctx, local, `SELECT string_agg(k || ' ' || who, ', ' ORDER BY k) FROM t`)
	if n != 1 || got != "12 newer" {
		t.Fatalf("RemoveOvertaken removed %d rows and left %q; want 1 removed and 12 newer left", n, got)
	}
	logged := queryString(t, ctx, local, `SELECT string_agg(concat_ws(' ', origin_node, conflict_type, resolution, key_tuple::text, local_tuple->>'who'), '; ')
		FROM pgmesh.conflict_history WHERE reason LIKE '%while the row was being inserted%'`)
	if logged != `pa delete_origin_differs apply_remote {"k": 11} c` {
		t.Fatalf("conflict_history holds %q for the removal", logged)
	}
	// The removal is not a change of this node's for peers to apply: it
	// committed under an origin (dropped again after the sweep).
	var roident, origins int
	if err := local.QueryRow(ctx, `SELECT (pg_xact_commit_timestamp_origin(h.xmin)).roident::int,
		(SELECT count(*)::int FROM pg_replication_origin WHERE roname = $1)
		FROM pgmesh.conflict_history h WHERE h.reason LIKE '%while the row was being inserted%'`, sweepOrigin).Scan(&roident, &origins); err != nil {
		t.Fatal(err)
	}
	if roident == 0 || origins != 0 {
		t.Fatalf("the removal committed under origin id %d (0: none), and %d %s origins remain", roident, origins, sweepOrigin)
	}
}

var errTryAgain = errors.New("not yet")

// applyAll feeds msgs to a and commits what is pending.
func applyAll(ctx context.Context, a *applier, msgs [][]byte) error {
	for _, m := range msgs {
		if _, err := a.handle(ctx, m); err != nil {
			return err
		}
	}
	return a.drain(ctx)
}

// connectLike opens another connection with conn's settings.
func connectLike(t *testing.T, ctx context.Context, conn *pgx.Conn) *pgx.Conn {
	t.Helper()
	c, err := pgx.ConnectConfig(ctx, conn.Config().Copy())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}
