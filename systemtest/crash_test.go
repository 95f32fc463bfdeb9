//go:build integration

package systemtest

import (
	"fmt"
	"testing"
	"time"
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
	// Grouped apply takes the whole backlog in a fraction of a second, on
	// some versions before a kill could land: a trigger on b (enabled
	// ALWAYS, so it fires for applied rows) holds it to about 10k rows/s.
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
