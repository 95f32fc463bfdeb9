//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// The receiving daemon is SIGKILLed several times while it applies a
// 20k-transaction backlog. Afterwards every change is there exactly once:
// the ledger has no primary key, so a change applied twice would show as a
// duplicate row, and one lost as a missing row.
func TestKillDuringBacklogAppliesExactlyOnce(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	const schema = `CREATE TABLE ledger (seq int NOT NULL, note text);
		ALTER TABLE ledger REPLICA IDENTITY FULL`
	nodes := mesh(t, ctx, schema, "a", "b")
	a, b := nodes[0], nodes[1]
	// A trigger on b (enabled ALWAYS, so it fires for applied rows) holds
	// it to about 10k rows/s, so that the kills land mid-backlog. With it,
	// and without a primary key, every transaction takes the careful mode;
	// TestKillDuringGroupedBacklogAppliesExactlyOnce covers the grouped one.
	mustExec(t, ctx, b, `CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$
		BEGIN IF NEW.seq % 10 = 0 THEN PERFORM pg_sleep(0.001); END IF; RETURN NEW; END $$;
		CREATE TRIGGER slow BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION slow();
		ALTER TABLE ledger ENABLE ALWAYS TRIGGER slow`)
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	const total = 20000
	mustExec(t, ctx, a, fmt.Sprintf(`DO $$ BEGIN FOR i IN 1..%d LOOP
		INSERT INTO ledger VALUES (i, 'from a'); COMMIT; END LOOP; END $$`, total))

	kills := killDuringBacklog(t, ctx, b, total)
	var n, distinct, minSeq, maxSeq int64
	c := connect(t, ctx, b)
	if err := c.QueryRow(ctx, `SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM ledger`).Scan(&n, &distinct, &minSeq, &maxSeq); err != nil {
		t.Fatal(err)
	}
	if n != total || distinct != total || minSeq != 1 || maxSeq != total {
		t.Fatalf("after %d kills b has %d rows, %d distinct, seq %d..%d; want exactly %d once each", kills, n, distinct, minSeq, maxSeq, total)
	}
	t.Logf("%d kills during the backlog; %d rows, each exactly once", kills, n)
}

// The same through the grouped mode: a backlog of 20-row transactions to a
// keyed table is applied in set-based groups, streamed behind one another
// (heavyTxnRows), while b is SIGKILLed several times. Each group commits
// with its origin's progress, so none is applied twice: an insert applied
// again would meet its own row and be logged as a conflict.
func TestKillDuringGroupedBacklogAppliesExactlyOnce(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	// A CHECK (not a trigger, which would take the careful mode) holds b
	// to about 20k rows/s, so that the kills land mid-backlog.
	const schema = `CREATE FUNCTION slow(seq int) RETURNS bool LANGUAGE plpgsql AS $$
			BEGIN IF seq % 20 = 0 THEN PERFORM pg_sleep(0.001); END IF; RETURN true; END $$;
		CREATE TABLE ledger (seq int PRIMARY KEY CHECK (slow(seq)), note text)`
	nodes := mesh(t, ctx, schema, "a", "b")
	a, b := nodes[0], nodes[1]
	// On a the check costs nothing (plain DDL stays local here), so a
	// commits its backlog densely however busy the machine is: many
	// transactions share each 10 ms of commit time and form groups.
	mustExec(t, ctx, a, `CREATE OR REPLACE FUNCTION slow(seq int) RETURNS bool LANGUAGE sql AS 'SELECT true'`)
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	const total, perTxn = 60000, 20
	mustExec(t, ctx, a, fmt.Sprintf(`DO $$ BEGIN FOR i IN 0..%d LOOP
		INSERT INTO ledger SELECT i * %d + g, 'from a' FROM generate_series(1, %d) g; COMMIT; END LOOP; END $$`,
		total/perTxn-1, perTxn, perTxn))
	kills := killDuringBacklog(t, ctx, b, total)
	var n, distinct, conflicts int64
	c := connect(t, ctx, b)
	if err := c.QueryRow(ctx, `SELECT count(*), count(DISTINCT seq), (SELECT count(*) FROM pgmesh.conflict_history) FROM ledger`).Scan(&n, &distinct, &conflicts); err != nil {
		t.Fatal(err)
	}
	if n != total || distinct != total || conflicts != 0 {
		t.Fatalf("after %d kills b has %d rows, %d distinct, %d conflicts logged; want %d rows once each and no conflict", kills, n, distinct, conflicts, total)
	}
	st := streamFrom(t, ctx, b, "a")
	t.Logf("%d kills during the backlog; %d rows, each exactly once; after the last start, %d source transactions in %d local commits (grouped), %d applied carefully",
		kills, n, st.AppliedTxns, st.LocalCommits, st.RetriedTxns)
	if st.LocalCommits*2 > st.AppliedTxns {
		t.Errorf("%d local commits for %d source transactions after the last start: groups did not form, the test did not cover the grouped mode", st.LocalCommits, st.AppliedTxns)
	}
}

// killDuringBacklog starts b and SIGKILLs it each time it has applied past
// one of a few marks of a backlog of total rows in ledger, then lets it
// apply the rest. At least two kills must land mid-backlog, or the test
// proves nothing. It returns how many did.
func killDuringBacklog(t *testing.T, ctx context.Context, b *localmesh.Node, total int64) int {
	t.Helper()
	rows := func() int64 { return count(t, ctx, b, `SELECT count(*) FROM ledger`) }
	kills := 0
	for _, at := range []int64{total / 10, total / 3, total / 2, 3 * total / 4} {
		if err := b.Start(ctx); err != nil {
			t.Fatal(err)
		}
		eventually(t, 60*time.Second, fmt.Sprintf("b applies past %d", at), func() error {
			if n := rows(); n <= at {
				return fmt.Errorf("b has %d rows", n)
			}
			return nil
		})
		if n := rows(); n >= total {
			break // applied everything before the kill could land
		}
		if err := b.Kill(); err != nil {
			t.Fatal(err)
		}
		kills++
	}
	if kills < 2 {
		t.Fatalf("only %d kills landed mid-backlog; the test proves nothing", kills)
	}
	if !b.Running() {
		if err := b.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, 120*time.Second, "b applied the whole backlog", func() error {
		if n := rows(); n < total {
			return fmt.Errorf("b has %d of %d rows", n, total)
		}
		return nil
	})
	return kills
}

// The receiver's Postgres commits asynchronously (synchronous_commit =
// off, as many run it, and as these clusters do) and crashes right after
// its daemon confirmed a peer's transactions to the peer's slot. Those
// commits may not have reached its WAL on disk: the crash loses them with
// their origin progress, and the peer, whose slot has moved past them,
// would never send them again. The apply must therefore commit durably
// before it confirms. A WAL writer held to 10 s makes the loss near
// certain where the apply commits asynchronously.
func TestReceiverCrashLosesNothingConfirmed(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, itemsSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	for _, set := range []string{"synchronous_commit = off", "wal_writer_delay = '10s'", "bgwriter_lru_maxpages = 0"} {
		mustExec(t, ctx, b, `ALTER SYSTEM SET `+set)
	}
	if err := b.PG.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	ac := connect(t, ctx, a)
	const rounds, perRound = 3, 70
	for round := range rounds {
		from, to := round*perRound+1, (round+1)*perRound
		mustExec(t, ctx, a, fmt.Sprintf(`DO $$ BEGIN FOR i IN %d..%d LOOP
			INSERT INTO items VALUES (i, 'a', 0); COMMIT; END LOOP; END $$`, from, to))
		var end string
		if err := ac.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()::text`).Scan(&end); err != nil {
			t.Fatal(err)
		}
		// The crash comes as soon as b's daemon has confirmed all of it.
		eventually(t, 30*time.Second, "b confirms a's writes", func() error {
			if n := count(t, ctx, a, `SELECT count(*) FROM pg_replication_slots
				WHERE slot_name = 'pgmesh_b' AND confirmed_flush_lsn >= $1::pg_lsn`, end); n != 1 {
				return fmt.Errorf("a's slot for b is not confirmed up to %s", end)
			}
			return nil
		})
		if err := b.PG.Crash(ctx); err != nil {
			t.Fatal(err)
		}
		if err := b.PG.Start(ctx); err != nil {
			t.Fatal(err)
		}
		eventually(t, 30*time.Second, fmt.Sprintf("b has rows 1..%d after its crash", to), func() error {
			if n := count(t, ctx, b, `SELECT count(*) FROM items`); n != int64(to) {
				return fmt.Errorf("b has %d of %d rows", n, to)
			}
			return nil
		})
	}
	assertNoConflicts(t, ctx, b)
}
