//go:build integration

package sql_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// A table rewrite dates every row at the rewrite; pgmesh.row_version reads
// the rows it wrote as unknown. The rewrite is noted by the event trigger
// (a superuser's install) and, without it, by the DDL pgmesh runs itself;
// DDL that does not rewrite is not noted, and rows written after the
// rewrite are dated as ever.
func TestRewritesAreNoted(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	conn := pgtest.WithSchema(t, ctx)
	exec := func(sql string) {
		t.Helper()
		if _, err := conn.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	// noted: rewrites of t noted; unknown: rows of t whose version is unknown.
	state := func() (noted, unknown int) {
		t.Helper()
		if err := conn.QueryRow(ctx, `SELECT (SELECT count(*) FROM pgmesh.table_rewrite WHERE relid = 't'::regclass),
			(SELECT count(*) FROM t, LATERAL pgmesh.row_version('t'::regclass, t.xmin) v WHERE v.timestamp IS NULL)`).Scan(&noted, &unknown); err != nil {
			t.Fatal(err)
		}
		return noted, unknown
	}
	want := func(step string, noted, unknown int) {
		t.Helper()
		if n, u := state(); n != noted || u != unknown {
			t.Fatalf("%s: %d rewrites noted and %d rows of unknown version, want %d and %d", step, n, u, noted, unknown)
		}
	}
	exec(`CREATE TABLE t (id int PRIMARY KEY, n int NOT NULL)`)
	exec(`INSERT INTO t SELECT g, g FROM generate_series(1, 100) g`)
	want("before", 0, 0)
	exec(`ALTER TABLE t ADD COLUMN note text`) // no rewrite
	want("a column added", 0, 0)
	exec(`ALTER TABLE t ALTER COLUMN n TYPE bigint`)
	want("rewritten by a plain ALTER TABLE", 1, 100)
	exec(`UPDATE t SET note = 'later' WHERE id <= 10`)
	want("ten rows written after it", 1, 90)
	exec(`BEGIN; SAVEPOINT s; ALTER TABLE t ALTER COLUMN n TYPE int; RELEASE s; COMMIT`)
	want("rewritten in a subtransaction", 2, 100)
	exec(`SELECT pgmesh.replicate_ddl('ALTER TABLE t ALTER COLUMN n TYPE bigint', proceed => true)`)
	want("rewritten through pgmesh ddl, noted once", 3, 100)

	// Without the event trigger (a role that is not a superuser).
	exec(`DROP EVENT TRIGGER pgmesh_note_table_rewrite`)
	exec(`UPDATE t SET note = 'again'`)
	exec(`ALTER TABLE t ALTER COLUMN n TYPE int`)
	want("a plain ALTER TABLE without the trigger", 3, 0)
	exec(`SELECT pgmesh.replicate_ddl('ALTER TABLE t ALTER COLUMN n TYPE bigint', proceed => true)`)
	want("pgmesh ddl without the trigger", 4, 100)
	exec(`SELECT pgmesh.replicate_ddl('CREATE INDEX ON t (n)', proceed => true)`)
	want("an index made through pgmesh ddl", 4, 100)
}
