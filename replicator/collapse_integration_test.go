//go:build integration

package replicator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
)

// A group applied set-based leaves exactly what its transactions applied
// one by one leave: the rows (the peer's, here its own database), the
// tombstones with each delete's commit time, and the order a firing
// trigger sees. What cannot collapse exactly is applied one by one, and
// what conflicts then goes careful, as before.
//
// The peer's transactions are real pgoutput from a slot. Their commit times
// are set to one value, so that every transaction after the first (applied
// alone while the server is idle) joins one group, whatever the clock did
// between them.
func TestGroupsCollapseExactly(t *testing.T) {
	const table = `CREATE TABLE t (k int PRIMARY KEY, email text UNIQUE, n int, big text);
		ALTER TABLE t ALTER big SET STORAGE EXTERNAL`
	cases := []struct {
		name  string
		local string // besides the table, on this node only
		txns  []string
		// collapsed: the group went set-based; retried: it then went
		// careful.
		collapsed, retried bool
		tombstones         []string // keys with a tombstone, each stamped with its delete's commit time
		check              func(t *testing.T, ctx context.Context, local *pgx.Conn)
	}{
		{
			name: "updates of several rows and an insert collapse",
			txns: []string{`UPDATE t SET n = n + 1 WHERE k = 1`, `UPDATE t SET n = n + 1 WHERE k = 2`,
				`UPDATE t SET n = n + 1 WHERE k = 1; INSERT INTO t VALUES (10, 'ten', 10)`, `UPDATE t SET email = 'one' WHERE k = 1`},
			collapsed: true,
		},
		{
			name:       "insert, update and delete of one key leave its tombstone",
			txns:       []string{`INSERT INTO t VALUES (10, 'ten', 10)`, `UPDATE t SET n = 11 WHERE k = 10`, `DELETE FROM t WHERE k = 10`, `DELETE FROM t WHERE k = 2`},
			collapsed:  true,
			tombstones: []string{`{"k": 2}`, `{"k": 10}`},
		},
		{
			name:       "a delete, then an insert of the key",
			txns:       []string{`DELETE FROM t WHERE k = 2`, `INSERT INTO t VALUES (2, 'again', 20)`, `UPDATE t SET n = 3 WHERE k = 1`},
			retried:    true,                 // one by one too: the insert meets the tombstone
			tombstones: []string{`{"k": 2}`}, // it stays: the insert won over it
		},
		{
			name:    "two rows swapping a unique value fall back and converge",
			txns:    []string{`UPDATE t SET email = 'x' WHERE k = 1`, `UPDATE t SET email = 'e1' WHERE k = 2`, `UPDATE t SET email = 'e2' WHERE k = 1`},
			retried: true, // the set-based update meets the unique index: careful, one by one
		},
		{
			name: "an unchanged TOAST value survives several updates",
			txns: []string{`UPDATE t SET n = 5 WHERE k = 3`, `UPDATE t SET email = 'c3' WHERE k = 3`,
				`INSERT INTO t SELECT 11, 'eleven', 0, big FROM t WHERE k = 3`, `UPDATE t SET n = 6 WHERE k = 11`},
			collapsed: true,
			check: func(t *testing.T, ctx context.Context, local *pgx.Conn) {
				if n := queryString(t, ctx, local, `SELECT count(*) FROM t WHERE length(big) = 6400`); n != "2" {
					t.Errorf("%s rows hold their 6400-byte value, want 2", n)
				}
			},
		},
		{
			name: "a table whose trigger fires sees every change in order",
			local: `CREATE TABLE seen (i serial, k int, n int);
				CREATE FUNCTION note() RETURNS trigger LANGUAGE plpgsql AS
					'BEGIN INSERT INTO public.seen (k, n) VALUES (NEW.k, NEW.n); RETURN NEW; END';
				CREATE TRIGGER note AFTER INSERT OR UPDATE ON t FOR EACH ROW EXECUTE FUNCTION note();
				ALTER TABLE t ENABLE ALWAYS TRIGGER note`,
			txns: []string{`UPDATE t SET n = 7 WHERE k = 1`, `UPDATE t SET n = 8 WHERE k = 2`, `UPDATE t SET n = 9 WHERE k = 1`},
			check: func(t *testing.T, ctx context.Context, local *pgx.Conn) {
				got := queryString(t, ctx, local, `SELECT string_agg(k || '=' || n, ' ' ORDER BY i) FROM seen WHERE n > 3`)
				if got != "1=7 2=8 1=9" {
					t.Errorf("the trigger saw %q, want every change in source order", got)
				}
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			local, src := twoDatabases(t, ctx)
			const rows = `INSERT INTO t SELECT k, 'e' || k, k, CASE WHEN k = 3 THEN (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 200) i) END
				FROM generate_series(1, 3) k`
			mustExec(t, ctx, src, table+"; CREATE PUBLICATION p FOR ALL TABLES")
			mustExec(t, ctx, local, table)
			if c.local != "" {
				mustExec(t, ctx, local, c.local)
			}
			mustExec(t, ctx, src, `SELECT pg_create_logical_replication_slot('s', 'pgoutput')`)
			// The first transaction writes the rows and describes the table
			// (a relation message closes a group); it is applied alone.
			mustExec(t, ctx, src, rows)
			for _, txn := range c.txns {
				mustExec(t, ctx, src, "BEGIN; "+txn+"; COMMIT")
			}
			msgs := sameCommitTime(t, peerMessages(t, ctx, src, "s", "p"))

			a, _ := newTestApplier(t, ctx, local, "peer")
			for _, m := range msgs {
				if _, err := a.handle(ctx, m); err != nil {
					t.Fatal(err)
				}
			}
			if err := a.drain(ctx); err != nil {
				t.Fatal(err)
			}
			st := a.stats.snapshot()
			t.Logf("%d local commits for %d transactions, %d collapsed, %d statements, %d retried carefully",
				st.LocalCommits, st.AppliedTxns, st.CollapsedCommits, st.Statements, st.RetriedTxns)
			if got := st.CollapsedCommits > 0; got != c.collapsed {
				t.Errorf("the group was applied set-based: %v, want %v", got, c.collapsed)
			}
			if got := st.RetriedTxns > 0; got != c.retried {
				t.Errorf("transactions applied again carefully: %d, want some: %v", st.RetriedTxns, c.retried)
			}

			const all = `SELECT coalesce(string_agg(format('%s %s %s %s', k, email, n, md5(big)), E'\n' ORDER BY k), '') FROM t`
			if got, want := queryString(t, ctx, local, all), queryString(t, ctx, src, all); got != want {
				t.Errorf("rows here:\n%s\nthe peer's:\n%s", got, want)
			}
			// Every tombstone is stamped with its delete's commit time (all
			// one value here) and the peer.
			tombs := queryString(t, ctx, local, `SELECT coalesce(string_agg(key::text || ' ' || deleted_by, ',' ORDER BY (key->>'k')::int), '')
				FROM pgmesh.tombstone`)
			var want []string
			for _, k := range c.tombstones {
				want = append(want, k+" peer")
			}
			if tombs != strings.Join(want, ",") {
				t.Errorf("tombstones %q, want %q", tombs, strings.Join(want, ","))
			}
			if len(c.tombstones) > 0 {
				var at time.Time
				if err := local.QueryRow(ctx, `SELECT max(deleted_at) FROM pgmesh.tombstone HAVING max(deleted_at) = min(deleted_at)`).Scan(&at); err != nil {
					t.Fatalf("tombstones' times: %v", err)
				}
				if want := commitTime(msgs[0]); !at.Equal(want) {
					t.Errorf("tombstones at %s, want the deletes' commit time %s", at, want)
				}
			}
			if c.check != nil {
				c.check(t, ctx, local)
			}
		})
	}
}

// pgEpoch is where pgoutput's timestamps count from.
var pgEpoch = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

// sameCommitTime gives every transaction one commit time, a second before
// the first one's, in its Begin (byte 9 on) and Commit (byte 18 on)
// messages.
func sameCommitTime(t *testing.T, msgs [][]byte) [][]byte {
	t.Helper()
	var ts []byte
	for _, m := range msgs {
		var at []byte
		switch msgType(m) {
		case pglogrepl.MessageTypeBegin:
			at = m[9:17]
		case pglogrepl.MessageTypeCommit:
			at = m[18:26]
		default:
			continue
		}
		if ts == nil {
			// A second back: a backlog, which groups absorb (a fresh
			// group is sent after freshPause).
			ts = binary.BigEndian.AppendUint64(nil, binary.BigEndian.Uint64(at)-uint64(time.Second/time.Microsecond))
		}
		copy(at, ts)
	}
	if ts == nil {
		t.Fatal("no transaction in the slot")
	}
	return msgs
}

// commitTime reads a Begin message's commit time.
func commitTime(begin []byte) time.Time {
	return pgEpoch.Add(time.Duration(int64(binary.BigEndian.Uint64(begin[9:17]))) * time.Microsecond)
}

// A transaction too large to hold goes in bulk, and its runs of inserts
// by COPY: every value arrives as the peer has it (NULL, empty, the
// characters COPY's text format escapes, bytea, numeric scale, an identity
// column's value). A remembered delete of one of the keys fails the bulk
// apply, and the transaction, streamed again, goes careful, where the
// delete wins as it would one by one.
func TestLargeTransactionCopiesItsInserts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	rows := fastMaxTxnChanges + 2*bulkChunk + 7
	// setup returns this node, the peer and the peer's one large
	// transaction.
	setup := func(t *testing.T) (local, src *pgx.Conn, msgs [][]byte) {
		local, src = twoDatabases(t, ctx)
		const table = `CREATE TABLE big (k int PRIMARY KEY, id int GENERATED ALWAYS AS IDENTITY, s text, b bytea, n numeric(10,2))`
		mustExec(t, ctx, src, table+"; CREATE PUBLICATION p FOR ALL TABLES")
		mustExec(t, ctx, local, table)
		mustExec(t, ctx, src, `SELECT pg_create_logical_replication_slot('s', 'pgoutput')`)
		mustExec(t, ctx, src, fmt.Sprintf(`INSERT INTO big (k, s, b, n)
			SELECT i, CASE i %% 4 WHEN 0 THEN NULL WHEN 1 THEN '' WHEN 2 THEN E'a\tb\nc\\d\re \\N' ELSE 'plain ' || i END,
				CASE WHEN i %% 3 = 0 THEN NULL ELSE decode(md5(i::text), 'hex') END, i / 7.0
			FROM generate_series(1, %d) i`, rows))
		return local, src, peerMessages(t, ctx, src, "s", "p")
	}
	apply := func(a *applier, msgs [][]byte) error {
		for _, m := range msgs {
			if _, err := a.handle(ctx, m); err != nil {
				return err
			}
		}
		return a.drain(ctx)
	}

	t.Run("every value arrives", func(t *testing.T) {
		local, src, msgs := setup(t)
		a, _ := newTestApplier(t, ctx, local, "peer")
		if err := apply(a, msgs); err != nil {
			t.Fatal(err)
		}
		const all = `SELECT md5(string_agg(format('%s %s %L %s %s', k, id, s, b, n), E'\n' ORDER BY k)) FROM big`
		if got, want := queryString(t, ctx, local, all), queryString(t, ctx, src, all); got != want {
			t.Fatalf("the %d rows differ from the peer's", rows)
		}
		if got := queryString(t, ctx, local, `SELECT s FROM big WHERE k = 2`); got != "a\tb\nc\\d\re \\N" {
			t.Errorf("row 2 holds %q", got)
		}
		if st := a.stats.snapshot(); st.LocalCommits != 1 || st.RetriedTxns != 0 {
			t.Errorf("%d local commits, %d retried: want the transaction applied once, in bulk", st.LocalCommits, st.RetriedTxns)
		}
	})

	t.Run("a remembered delete sends it careful", func(t *testing.T) {
		local, _, msgs := setup(t)
		mustExec(t, ctx, local, `INSERT INTO pgmesh.tombstone (relation, key, deleted_at, deleted_by)
			VALUES ('public.big', '{"k": 7}', now() + interval '1 minute', 'peer')`)
		a, conn := newTestApplier(t, ctx, local, "peer")
		err := apply(a, msgs)
		retry, ok := errors.AsType[*retryCarefully](err)
		if !ok {
			t.Fatalf("the bulk apply ended with %v, want a careful retry for the remembered delete", err)
		}
		if got := queryString(t, ctx, local, `SELECT count(*) FROM big`); got != "0" {
			t.Fatalf("%s rows stayed from the failed bulk apply", got)
		}
		conn.Close(ctx)
		a, _ = newTestApplier(t, ctx, local, "peer")
		a.retryLSN = retry.lsn
		if err := apply(a, msgs); err != nil {
			t.Fatal(err)
		}
		if got := queryString(t, ctx, local, `SELECT count(*) || ' ' || count(*) FILTER (WHERE k = 7) FROM big`); got != fmt.Sprintf("%d 0", rows-1) {
			t.Errorf("rows, and rows with key 7: %s, want every row but 7", got)
		}
	})
}
