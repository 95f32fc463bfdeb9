//go:build integration

package replicator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/origin"
)

// A group that fails is applied again on the careful path when its results
// are read, and that can happen in the middle of the next transaction:
// preparing a statement the connection has not seen before reads back the
// batch in flight first. An error of that careful replay must stop the
// stream like any other. It was once taken for "this statement cannot be
// prepared": the next transaction went careful inside the local
// transaction the failed replay had left open, and committed it with the
// origin's progress past the failed transaction, which was lost. That is
// the divergence TestRandomizedConvergence found: right after a reconnect
// every statement is new, and a row had appeared here while the replayed
// update, applied as an insert, waited for it.
//
// The peer's messages are real pgoutput, decoded from a slot in another
// database of the same cluster, and fed to the applier one by one, so the
// failed group is in flight exactly when the next transaction prepares.
func TestReplayErrorInsidePrepareStopsTheStream(t *testing.T) {
	cases := []struct {
		name string
		// local is the table t here, and meanwhile runs beside the
		// replay of the transaction that fails.
		local     string
		meanwhile func(t *testing.T, ctx context.Context, local *pgx.Conn) func()
		// failed checks the error the stream stopped with; fix removes
		// its cause.
		failed func(err error) bool
		fix    string
		// want is t's row 5 once the stream went on from the failure.
		want int
	}{
		{
			// The update finds no row and no delete here, so it is applied
			// as an insert, which waits for a local insert of the key.
			name:      "a row appeared while the insert waited",
			local:     `CREATE TABLE t (k int PRIMARY KEY, v int)`,
			meanwhile: insertWhileApplyWaits,
			failed:    func(err error) bool { return errors.Is(err, errRowAppeared) && transient(err) },
			want:      100, // the local insert is newer than the update
		},
		{
			name:   "a change that cannot be applied here",
			local:  `CREATE TABLE t (k int PRIMARY KEY, v int CONSTRAINT not_13 CHECK (v <> 13))`,
			failed: func(err error) bool { return err != nil && strings.Contains(err.Error(), `"not_13"`) },
			fix:    `ALTER TABLE t DROP CONSTRAINT not_13`,
			want:   13,
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			local, src := twoDatabases(t, ctx)
			mustExec(t, ctx, src, `CREATE TABLE t (k int PRIMARY KEY, v int);
				INSERT INTO t VALUES (5, 1); -- before the slot: this node never had it
				CREATE TABLE u (k int PRIMARY KEY, note text);
				CREATE PUBLICATION p FOR ALL TABLES`)
			mustExec(t, ctx, src, `SELECT pg_create_logical_replication_slot('s', 'pgoutput')`)
			mustExec(t, ctx, local, c.local+`; CREATE TABLE u (k int PRIMARY KEY, note text)`)
			mustExec(t, ctx, src, `INSERT INTO u VALUES (1, 'before')`)      // a group of its own
			mustExec(t, ctx, src, `UPDATE t SET v = 13 WHERE k = 5`)         // its group fails: in flight when...
			mustExec(t, ctx, src, `UPDATE u SET note = 'after' WHERE k = 1`) // ...this update prepares its statement
			msgs := peerMessages(t, ctx, src, "s", "p")

			a, apply := newTestApplier(t, ctx, local, "peer")
			done := func() {}
			if c.meanwhile != nil {
				done = c.meanwhile(t, ctx, local)
			}
			var err error
			for _, m := range msgs {
				if _, err = a.handle(ctx, m); err != nil {
					break
				}
			}
			if err == nil {
				err = a.drain(ctx)
			}
			done()
			if !c.failed(err) {
				t.Fatalf("the stream did not stop on the transaction that failed: got error %v", err)
			}
			t.Logf("the stream stopped: %v", err)
			a.rollback(ctx)
			apply.Close(ctx)

			// Nothing after the failed transaction committed.
			if note := queryString(t, ctx, local, `SELECT note FROM u WHERE k = 1`); note != "before" {
				t.Fatalf("u holds %q: the update committed after the transaction before it had failed", note)
			}
			// The stream starts again from the failed transaction (once
			// its cause is fixed) and applies everything.
			if c.fix != "" {
				mustExec(t, ctx, local, c.fix)
			}
			a, _ = newTestApplier(t, ctx, local, "peer")
			for _, m := range msgs {
				if _, err := a.handle(ctx, m); err != nil {
					t.Fatalf("streamed again: %v", err)
				}
			}
			if err := a.drain(ctx); err != nil {
				t.Fatal(err)
			}
			got := queryString(t, ctx, local, `SELECT t.v || ' ' || u.note FROM t, u WHERE t.k = 5 AND u.k = 1`)
			if want := fmt.Sprintf("%d after", c.want); got != want {
				t.Fatalf("streamed again: t.v and u.note are %q, want %q", got, want)
			}
		})
	}
}

// insertWhileApplyWaits inserts t's row 5 in a local transaction and
// commits it once the apply session waits for it; the returned func waits
// for that.
func insertWhileApplyWaits(t *testing.T, ctx context.Context, local *pgx.Conn) func() {
	t.Helper()
	cfg := local.Config().Copy()
	holder, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Close(context.Background()) })
	tx, err := holder.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO t VALUES (5, 100)`); err != nil {
		t.Fatal(err)
	}
	watcher, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { watcher.Close(context.Background()) })
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		werr = poll.Until(ctx, 10*time.Millisecond, time.Minute, func() error {
			var waiting bool
			if err := watcher.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stat_activity
				WHERE application_name = 'pgmesh test apply' AND wait_event_type = 'Lock')`).Scan(&waiting); err != nil {
				return err
			}
			if !waiting {
				return errors.New("the apply session does not wait for the local insert")
			}
			return nil
		})
		werr = errors.Join(werr, tx.Commit(ctx))
	})
	return func() {
		wg.Wait()
		if werr != nil {
			t.Fatal(werr)
		}
	}
}

func queryString(t *testing.T, ctx context.Context, conn *pgx.Conn, sql string) string {
	t.Helper()
	var s string
	if err := conn.QueryRow(ctx, sql).Scan(&s); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
	return s
}

// twoDatabases returns a connection to a throwaway cluster's database with
// the pgmesh schema (this node) and one to a second database of the same
// cluster (the peer).
func twoDatabases(t *testing.T, ctx context.Context) (local, peer *pgx.Conn) {
	t.Helper()
	local = pgtest.WithSchema(t, ctx)
	return local, peerDatabase(t, ctx, local, "peer")
}

// peerDatabase creates a database beside local's, standing for a peer.
func peerDatabase(t *testing.T, ctx context.Context, local *pgx.Conn, name string) *pgx.Conn {
	t.Helper()
	mustExec(t, ctx, local, `CREATE DATABASE `+name)
	cfg := local.Config().Copy()
	cfg.Database = name
	peer, err := pgx.ConnectConfig(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { peer.Close(context.Background()) })
	// Decoding through SQL reads only WAL that is flushed, and the test
	// clusters do not flush at commit.
	mustExec(t, ctx, peer, `SET synchronous_commit = on`)
	return peer
}

// peerMessages decodes everything in the slot as the stream would send it.
func peerMessages(t *testing.T, ctx context.Context, conn *pgx.Conn, slot, pub string) [][]byte {
	t.Helper()
	rows, err := conn.Query(ctx, `SELECT data FROM pg_logical_slot_peek_binary_changes($1, NULL, NULL,
		'proto_version', '1', 'publication_names', $2)`, slot, pub)
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := pgx.CollectRows(rows, pgx.RowTo[[]byte])
	if err != nil {
		t.Fatal(err)
	}
	return msgs
}

// newTestApplier opens an apply session on local for the peer's origin, as
// a stream does, and returns an applier on it.
func newTestApplier(t *testing.T, ctx context.Context, local *pgx.Conn, peer string) (*applier, *pgx.Conn) {
	t.Helper()
	conn, err := pgsession.Connect(ctx, local.Config().ConnString(), "pgmesh test apply", pgsession.Applier,
		pgsession.Settings{"search_path": ""})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if err := origin.Ensure(ctx, conn, peer); err != nil {
		t.Fatal(err)
	}
	progress, err := origin.SessionSetup(ctx, conn, peer)
	if err != nil {
		t.Fatal(err)
	}
	var roident uint32
	if err := conn.QueryRow(ctx, `SELECT roident FROM pg_replication_origin WHERE roname = $1`, origin.Name(peer)).Scan(&roident); err != nil {
		t.Fatal(err)
	}
	ids := map[string]int{"local": 1, peer: 2}
	cfg := &Config{LocalNode: "local", Peer: Peer{Name: peer, ID: 2}, NodeID: func(n string) int { return ids[n] },
		Rule: conflict.Rule{Resolution: time.Millisecond}, Logger: slog.Default()}
	return newApplier(newPgSession(conn.PgConn()), cfg, progress, roident, newStats(peer), pglogrepl.LSN(0), parkedTables{}, cfg.Logger), conn
}

func mustExec(t *testing.T, ctx context.Context, conn *pgx.Conn, sql string) {
	t.Helper()
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// A statement first sent in a group that fails is skipped by the server
// (everything after the failure is, up to the group's end): the session
// must not take it for prepared. Here the group's update meets a row
// written on this node, so the group goes careful; its insert into w was
// the first of its kind. Once the careful stretch is over, the next insert
// into w goes grouped with that statement, and must apply as it is.
func TestStatementSkippedInAFailedGroupIsPreparedAgain(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	local, src := twoDatabases(t, ctx)
	const tables = `CREATE TABLE t (k int PRIMARY KEY, v int); CREATE TABLE u (k int PRIMARY KEY); CREATE TABLE w (k int PRIMARY KEY)`
	mustExec(t, ctx, src, tables+`; INSERT INTO t VALUES (5, 1); CREATE PUBLICATION p FOR ALL TABLES`)
	mustExec(t, ctx, local, tables+`; INSERT INTO t VALUES (5, 1)`) // written here: the peer's update conflicts
	mustExec(t, ctx, src, `SELECT pg_create_logical_replication_slot('s', 'pgoutput')`)
	// w is described (a relation message in the middle of a transaction
	// would send it careful), but never by a single-row insert.
	mustExec(t, ctx, src, `INSERT INTO u VALUES (1); INSERT INTO w VALUES (1000), (1001)`)
	mustExec(t, ctx, src, `BEGIN; UPDATE t SET v = 2 WHERE k = 5; INSERT INTO w VALUES (1); COMMIT`)
	const later = carefulStretch + 5
	for i := range later {
		mustExec(t, ctx, src, fmt.Sprintf(`INSERT INTO w VALUES (%d)`, i+2))
	}
	msgs := sameCommitTime(t, peerMessages(t, ctx, src, "s", "p"))

	a, apply := newTestApplier(t, ctx, local, "peer")
	feed := func(msgs [][]byte) {
		for _, m := range msgs {
			if _, err := a.handle(ctx, m); err != nil {
				t.Fatal(err)
			}
		}
		if err := a.drain(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// The first two transactions (the second alone in its group, which
	// fails), then the rest: the stretch, and after it grouped again.
	commits := 0
	for i, m := range msgs {
		if msgType(m) == pglogrepl.MessageTypeCommit {
			if commits++; commits == 2 {
				feed(msgs[:i+1])
				feed(msgs[i+1:])
				break
			}
		}
	}
	st := a.stats.snapshot()
	t.Logf("%d transactions in %d local commits, %d applied again carefully", st.AppliedTxns, st.LocalCommits, st.RetriedTxns)
	if st.RetriedTxns != 1 {
		t.Errorf("%d transactions applied again carefully, want only the one that conflicted", st.RetriedTxns)
	}
	if got := queryString(t, ctx, local, `SELECT count(*) FROM w`); got != fmt.Sprint(later+3) {
		t.Errorf("w holds %s rows, want %d", got, later+3)
	}
	var prepared []string
	rows, err := apply.Query(ctx, `SELECT name FROM pg_prepared_statements`)
	if err == nil {
		prepared, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		t.Fatal(err)
	}
	for sql, name := range a.s.(*pgSession).names {
		if !slices.Contains(prepared, name) {
			t.Errorf("the session takes %s for prepared, but the server does not have it:\n%s", name, sql)
		}
	}
}
