//go:build integration

package replicator

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/origin"
)

// The fast path's SQL guard (lastWriterIs) applies an update or delete by
// itself only where conflict.Sequential says the change is no conflict, and
// defers every other case to the careful path (SQLSTATE PM100), where
// conflict.Rule decides. Each row of the case table is written in Postgres
// as its name says; the local version is read as the careful path reads it.
func TestFastPathGuardMatchesSequential(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := pgtest.WithSchema(t, ctx)
	const local, peer, other = "a", "b", "c"
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := conn.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec(`CREATE TABLE g (id int PRIMARY KEY, v int)`)
	for _, n := range []string{peer, other} {
		exec(`SELECT pg_replication_origin_create($1)`, origin.Name(n))
	}
	// writeAs commits a row as if applied from node (or locally, "").
	writeAs := func(id int, node string) {
		t.Helper()
		if node != "" {
			exec(`SELECT pg_replication_origin_session_setup($1)`, origin.Name(node))
			defer exec(`SELECT pg_replication_origin_session_reset()`)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if node != "" {
				if _, err := tx.Exec(ctx, `SELECT pg_replication_origin_xact_setup('0/1', now())`); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `INSERT INTO g VALUES ($1, 0)`, id)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	var roident uint32
	if err := conn.QueryRow(ctx, `SELECT roident FROM pg_replication_origin WHERE roname = $1`, origin.Name(peer)).Scan(&roident); err != nil {
		t.Fatal(err)
	}

	// rewriteAs rewrites g (ALTER TABLE ... TYPE) in a transaction of
	// node's, as replicated DDL applies it, or locally (""): every row's
	// xmin is then the rewrite's, and its version unknown.
	types := []string{"bigint", "int"}
	rewriteAs := func(node string) {
		t.Helper()
		if node != "" {
			exec(`SELECT pg_replication_origin_session_setup($1)`, origin.Name(node))
			defer exec(`SELECT pg_replication_origin_session_reset()`)
		}
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if node != "" {
				if _, err := tx.Exec(ctx, `SET LOCAL session_replication_role = replica; SELECT pg_replication_origin_xact_setup('0/1', now())`); err != nil {
					return err
				}
			}
			_, err := tx.Exec(ctx, `ALTER TABLE g ALTER COLUMN v TYPE `+types[0])
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		types[0], types[1] = types[1], types[0]
	}

	cases := []struct {
		name    string
		id      int
		prepare func()
		ownTxn  bool // written earlier in the transaction the guard runs in
	}{
		{"last written by the peer", 1, func() { writeAs(1, peer) }, false},
		{"last written by another peer", 2, func() { writeAs(2, other) }, false},
		{"last written here", 3, func() { writeAs(3, "") }, false},
		{"written by the peer, then updated here", 4, func() { writeAs(4, peer); exec(`UPDATE g SET v = 1 WHERE id = 4`) }, false},
		{"written here earlier in this transaction", 5, func() { writeAs(5, other) }, true},
		// Last: a rewrite writes every row of g again.
		{"written by the peer, then the table rewritten here", 6, func() { writeAs(6, peer); rewriteAs("") }, false},
		{"written by the peer, then the table rewritten by the peer's DDL", 7, func() { writeAs(7, peer); rewriteAs(peer) }, false},
	}
	remote := conflict.Version{Node: peer, CommitTS: time.Now().Add(time.Hour)}
	for _, c := range cases {
		c.prepare()
		var accepted bool
		var l conflict.Local
		err := pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
			if c.ownTxn {
				if _, err := tx.Exec(ctx, `UPDATE g SET v = v + 1 WHERE id = $1`, c.id); err != nil {
					return err
				}
			}
			// The careful path's view of the row.
			var us *int64
			var ro uint32
			if err := tx.QueryRow(ctx, lockedVersions(`g`, `SELECT t.ctid, t.xmin FROM g t WHERE t.id = $1 FOR UPDATE`), c.id).
				Scan(new(pgtype.TID), &us, &ro, &l.OwnTxn); err != nil {
				return err
			}
			v := conflict.Version{Node: local}
			if us != nil {
				v.CommitTS = time.UnixMicro(*us).UTC()
			}
			if ro != 0 {
				var name string
				if err := tx.QueryRow(ctx, `SELECT roname FROM pg_replication_origin WHERE roident = $1`, ro).Scan(&name); err != nil {
					return err
				}
				v.Node, _ = origin.NodeOf(name)
			}
			l.Row = &v
			// The fast path's guard on the same row.
			_, err := tx.Exec(ctx, `SAVEPOINT guard`)
			if err == nil {
				_, err = tx.Exec(ctx, `SELECT `+(&relation{qualified: `g`}).lastWriterIs(roident)+` FROM g t WHERE t.id = $1`, c.id)
			}
			var pe *pgconn.PgError
			switch {
			case err == nil:
				accepted = true
			case errors.As(err, &pe) && pe.Code == "PM100":
				_, err = tx.Exec(ctx, `ROLLBACK TO SAVEPOINT guard`)
			}
			return err
		})
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		t.Logf("%s: guard accepts %v; local version by %q, time known %v, own txn %v", c.name, accepted, l.Row.Node, l.Row.Known(), l.OwnTxn)
		if want := conflict.Sequential(l, remote); accepted != want {
			t.Errorf("%s: the guard accepts %v, conflict.Sequential says %v (local version %+v, own txn %v)", c.name, accepted, want, *l.Row, l.OwnTxn)
		}
		// Where the guard defers, the careful path must find a conflict
		// for an update or a delete (it never applies silently what the
		// fast path refused).
		for _, change := range []conflict.Change{conflict.Update, conflict.Delete} {
			d := (conflict.Rule{}).Decide(change, l, remote)
			if accepted == d.Conflict {
				t.Errorf("%s: guard accepted %v, but Decide says conflict=%v", c.name, accepted, d.Conflict)
			}
		}
	}
}
