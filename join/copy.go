// Package join copies a member's share of the group into a joining node:
// schema (pg_dump, when the joining database has none) and the rows its
// replication sets give it, under the snapshot the source exported when the
// joining node's slot there was made, in one local transaction that also
// records where each member's stream into the node starts. The daemon runs
// the rest of the protocol (slots, the snapshot, activation) around it; see
// ARCHITECTURE.md, "Join loses nothing".
package join

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/privilege"
)

// Snapshot is the source's exported snapshot.
type Snapshot struct {
	Name  string        // for SET TRANSACTION SNAPSHOT
	Start pglogrepl.LSN // where streaming from the source starts
	At    time.Time     // when it was taken, by the source's clock
}

// Copy is one copy from a source member into the joining node.
type Copy struct {
	Source    string // the source member
	SourceDSN string // how to reach its Postgres
	LocalDSN  string // the joining node's database
	Receiver  string // the joining node: the copy is its share
	Snapshot  Snapshot
	// Starts is where each member's stream into the joining node starts;
	// the copy records it with the data.
	Starts map[string]pglogrepl.LSN
	// Report, when set, is told of progress.
	Report func(Progress)
}

// Progress is a phase, or counters to add.
type Progress struct {
	Phase       string
	TablesTotal int
	BytesTotal  int64
	TableDone   bool
	Rows, Bytes int64
}

func (c *Copy) report(p Progress) {
	if c.Report != nil {
		c.Report(p)
	}
}

// sourceTable is a replicated table on the source, with its columns.
type sourceTable struct {
	name  string // format('%I.%I')
	cols  []string
	where string // the row filter of this node's share; empty: every row
	bytes int64
}

// copyFrom copies schema (when this database has none) and every
// replicated table from the source under its exported snapshot, in one
// local transaction that also records where each member's stream starts.
func (c *Copy) Run(ctx context.Context) error {
	snap, starts := c.Snapshot, c.Starts
	snapshot := snap.Name
	src, err := pgsession.Connect(ctx, c.SourceDSN, "pgmesh join copy")
	if err != nil {
		return fmt.Errorf("connect to source %q: %w", c.Source, err)
	}
	defer src.Close(context.Background())
	if _, err := src.Exec(ctx, "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"); err != nil {
		return err
	}
	if _, err := src.Exec(ctx, "SET TRANSACTION SNAPSHOT "+pgquote.Literal(snapshot)); err != nil {
		return fmt.Errorf("use the source's snapshot: %w", err)
	}
	tables, err := sourceTables(ctx, src, c.Receiver)
	if err != nil {
		return err
	}
	dst, err := pgsession.Connect(ctx, c.LocalDSN, "pgmesh join copy", pgsession.Applier)
	if err != nil {
		return fmt.Errorf("connect to local Postgres: %w", err)
	}
	defer dst.Close(context.Background())

	c.report(Progress{Phase: "copying schema"})
	if err := c.copySchema(ctx, src, dst, tables); err != nil {
		return err
	}
	var total int64
	for _, t := range tables {
		total += t.bytes
	}
	c.report(Progress{TablesTotal: len(tables), BytesTotal: total})
	c.report(Progress{Phase: "copying data"})
	// The copied rows carry the source's origin and the snapshot's time, as
	// if the source had written them then: its later changes to them are
	// ordinary sequential changes here, not conflicts (which they would
	// lose against the copy's own, later commit time).
	for name := range starts {
		if _, err := dst.Exec(ctx, `SELECT pg_replication_origin_create($1)
			WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)`, origin.Name(name)); err != nil {
			return fmt.Errorf("create the replication origin of %s: %w", name, err)
		}
	}
	if _, err := dst.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, origin.Name(c.Source)); err != nil {
		return fmt.Errorf("copy as %s's changes: %w", c.Source, err)
	}
	tx, err := dst.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(context.Background())
	if len(tables) > 0 {
		var names []string
		for _, t := range tables {
			names = append(names, t.name)
		}
		if _, err := tx.Exec(ctx, "TRUNCATE "+strings.Join(names, ", ")+" CASCADE"); err != nil {
			return fmt.Errorf("empty the local tables: %w", err)
		}
	}
	for _, t := range tables {
		n, err := c.copyTable(ctx, src.PgConn(), dst.PgConn(), t)
		if err != nil {
			return fmt.Errorf("copy table %s: %w", t.name, err)
		}
		c.report(Progress{TableDone: true, Rows: n})
	}
	if err := copySequences(ctx, src, tx); err != nil {
		return err
	}
	// Streaming starts where the copy ends, atomically with the data.
	for name, lsn := range starts {
		if name == c.Source {
			// The source's origin is this session's: its commit sets it.
			_, err = tx.Exec(ctx, `SELECT pg_replication_origin_xact_setup($1::text::pg_lsn, $2)`, lsn.String(), snap.At)
		} else {
			_, err = tx.Exec(ctx, `SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)`, origin.Name(name), lsn.String())
		}
		if err != nil {
			return fmt.Errorf("set the start of %s's stream: %w", name, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit the copy: %w", err)
	}
	_, _ = src.Exec(ctx, "COMMIT")
	return nil
}

// sourceTables lists what the source publishes to receiver (tables, their
// columns and row filters) as of the copy's snapshot: exactly what the
// stream from the source then continues.
func sourceTables(ctx context.Context, src *pgx.Conn, receiver string) ([]sourceTable, error) {
	rows, err := src.Query(ctx, `SELECT format('%I.%I', pt.schemaname, pt.tablename),
		array(SELECT quote_ident(a.attname) FROM pg_attribute a
		      WHERE a.attrelid = format('%I.%I', pt.schemaname, pt.tablename)::regclass
		        AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = ''
		        AND a.attname = ANY (pt.attnames) ORDER BY a.attnum),
		coalesce(pt.rowfilter, ''),
		pg_table_size(format('%I.%I', pt.schemaname, pt.tablename)::regclass)
		FROM pg_publication_tables pt WHERE pt.pubname = $1 ORDER BY 1`, origin.PublicationName(receiver))
	if err != nil {
		return nil, fmt.Errorf("list the source's tables: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (sourceTable, error) {
		var t sourceTable
		return t, r.Scan(&t.name, &t.cols, &t.where, &t.bytes)
	})
}

// copyTable streams one table from the source's COPY into the local COPY.
func (c *Copy) copyTable(ctx context.Context, src, dst *pgconn.PgConn, t sourceTable) (int64, error) {
	cols := strings.Join(t.cols, ", ")
	pr, pw := io.Pipe()
	outErr := make(chan error, 1)
	go func() {
		_, err := src.CopyTo(ctx, &countingWriter{w: pw, add: func(n int) {
			c.report(Progress{Bytes: int64(n)})
		}}, copyOut(t))
		pw.CloseWithError(err)
		outErr <- err
	}()
	tag, err := dst.CopyFrom(ctx, pr, fmt.Sprintf("COPY %s (%s) FROM STDIN", t.name, cols))
	pr.CloseWithError(err)
	if oerr := <-outErr; oerr != nil && err == nil {
		err = oerr
	}
	return tag.RowsAffected(), err
}

// copyOut is the source's COPY of this node's share of t.
func copyOut(t sourceTable) string {
	cols := strings.Join(t.cols, ", ")
	if t.where == "" {
		return fmt.Sprintf("COPY %s (%s) TO STDOUT", t.name, cols)
	}
	return fmt.Sprintf("COPY (SELECT %s FROM %s WHERE %s) TO STDOUT", cols, t.name, t.where)
}

type countingWriter struct {
	w   io.Writer
	add func(int)
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.add(n)
	return n, err
}

// copySequences sets every local sequence past the source's and past the
// copied values of the column it belongs to, so values handed out here do
// not repeat copied ones.
func copySequences(ctx context.Context, src *pgx.Conn, tx pgx.Tx) error {
	rows, err := src.Query(ctx, `SELECT format('%I.%I', schemaname, sequencename), last_value
		FROM pg_sequences WHERE schemaname <> 'pgmesh' AND last_value IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("read the source's sequences: %w", err)
	}
	last := map[string]int64{}
	for rows.Next() {
		var n string
		var v int64
		if err := rows.Scan(&n, &v); err != nil {
			return err
		}
		last[n] = v
	}
	if err := rows.Err(); err != nil {
		return err
	}
	rows, err = tx.Query(ctx, `SELECT format('%I.%I', sn.nspname, s.relname),
		(SELECT format('%I.%I', tn.nspname, t.relname) || ' ' || quote_ident(a.attname)
		 FROM pg_depend d JOIN pg_class t ON t.oid = d.refobjid JOIN pg_namespace tn ON tn.oid = t.relnamespace
		 JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = d.refobjsubid
		 WHERE d.classid = 'pg_class'::regclass AND d.objid = s.oid AND d.refclassid = 'pg_class'::regclass
		   AND d.deptype IN ('a', 'i') LIMIT 1)
		FROM pg_class s JOIN pg_namespace sn ON sn.oid = s.relnamespace
		WHERE s.relkind = 'S' AND sn.nspname <> 'pgmesh'`)
	if err != nil {
		return fmt.Errorf("list local sequences: %w", err)
	}
	type seq struct {
		name  string
		owner *string // "table column"
	}
	seqs, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (seq, error) {
		var s seq
		return s, r.Scan(&s.name, &s.owner)
	})
	if err != nil {
		return err
	}
	for _, s := range seqs {
		maxExpr := "NULL::bigint"
		if s.owner != nil {
			table, col, _ := strings.Cut(*s.owner, " ")
			maxExpr = fmt.Sprintf("(SELECT max(%s)::bigint FROM %s)", col, table)
		}
		var src *int64
		if v, ok := last[s.name]; ok {
			src = &v
		}
		// A galloc sequence is fenced (MAXVALUE 0, see daemon/sequences.go)
		// and stays so: its values come from chunks, not from it.
		if _, err := tx.Exec(ctx, fmt.Sprintf(`SELECT setval($1::regclass, v, true) FROM (SELECT greatest($2::bigint, %s) AS v) x
			WHERE v IS NOT NULL AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_sequence
			  WHERE seqrelid = $1::regclass AND seqmin = -1 AND seqmax = 0)`, maxExpr), s.name, src); err != nil {
			return fmt.Errorf("set sequence %s: %w", s.name, err)
		}
	}
	return nil
}

// copySchema creates the source's schema here when this database has no
// user tables, and otherwise checks that every replicated table exists here
// with the same columns and key.
func (c *Copy) copySchema(ctx context.Context, src, dst *pgx.Conn, tables []sourceTable) error {
	var localTables int
	if err := dst.QueryRow(ctx, `SELECT count(*) FROM pgmesh.user_tables`).Scan(&localTables); err != nil {
		return err
	}
	if localTables == 0 {
		return c.restoreSchema(ctx, dst)
	}
	want, err := tableDefinitions(ctx, src)
	if err != nil {
		return err
	}
	have, err := tableDefinitions(ctx, dst)
	if err != nil {
		return err
	}
	var errs []error
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		if !slices.ContainsFunc(tables, func(t sourceTable) bool { return t.name == n }) {
			continue // not sent to this node: its own business
		}
		h, ok := have[n]
		switch {
		case !ok:
			errs = append(errs, fmt.Errorf("table %s exists on %q but not here: create it as on %q, or join with an empty database and pgmesh copies the schema", n, c.Source, c.Source))
		case h != want[n]:
			errs = append(errs, fmt.Errorf("table %s differs from %q's (here: %s; there: %s): make the definitions match, or join with an empty database", n, c.Source, h, want[n]))
		}
	}
	return errors.Join(errs...)
}

// tableDefinitions describes each replicated table by its columns (name,
// type, not null) and primary key, order-independent.
func tableDefinitions(ctx context.Context, conn *pgx.Conn) (map[string]string, error) {
	rows, err := conn.Query(ctx, `SELECT u.relation,
		(SELECT string_agg(format('%I %s%s', a.attname, format_type(a.atttypid, a.atttypmod),
		        CASE WHEN a.attnotnull THEN ' not null' ELSE '' END), ', ' ORDER BY a.attname)
		 FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
		|| coalesce((SELECT '; primary key (' || string_agg(quote_ident(a.attname), ', ' ORDER BY k.ord) || ')'
		 FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		 JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
		 WHERE i.indrelid = c.oid AND i.indisprimary), '')
		FROM pgmesh.user_tables u JOIN pg_class c ON c.oid = u.relid`)
	if err != nil {
		return nil, fmt.Errorf("read table definitions: %w", err)
	}
	out := map[string]string{}
	for rows.Next() {
		var n, def string
		if err := rows.Scan(&n, &def); err != nil {
			return nil, err
		}
		out[n] = def
	}
	return out, rows.Err()
}

// restoreSchema runs pg_dump --schema-only of the source under the exported
// snapshot and applies it here in one transaction.
func (c *Copy) restoreSchema(ctx context.Context, dst *pgx.Conn) error {
	pgDump, err := findPgDump()
	if err != nil {
		return err
	}
	// A superuser makes the objects its own, as always. A role that is not
	// one gives them the owners they have on the source, which it may as a
	// member of those roles (privilege.CheckOwners): made its own, they
	// would be out of the application's reach.
	super, err := privilege.Superuser(ctx, dst)
	if err != nil {
		return err
	}
	args := []string{"--schema-only", "--snapshot=" + c.Snapshot.Name, "--no-privileges",
		"--no-publications", "--no-subscriptions", "--exclude-schema=pgmesh", "--dbname=" + c.SourceDSN}
	if super {
		args = append(args, "--no-owner")
	}
	cmd := exec.CommandContext(ctx, pgDump, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("pg_dump --schema-only of %q failed: %v: %s", c.Source, err, strings.TrimSpace(stderr.String()))
	}
	script := filterDump(string(out))
	if _, err := dst.Exec(ctx, "BEGIN;\n"+script+"\nCOMMIT;"); err != nil {
		_, _ = dst.Exec(ctx, "ROLLBACK")
		return fmt.Errorf("create the source's schema here: %w", err)
	}
	// The connection's settings may have been changed by the dump's SETs.
	_, err = dst.Exec(ctx, "RESET ALL; SET session_replication_role = replica; SET default_transaction_read_only = off")
	return err
}

// filterDump drops from a pg_dump script what this node has or makes
// itself: pgmesh's event triggers (database-wide, so pg_dump includes them
// despite --exclude-schema) and tombstone triggers (installed by this node's
// daemon), found by pg_dump's "-- Name: ...; Type: ..." object headers; and
// psql meta-commands (recent pg_dump writes \restrict), which mean nothing
// to the server.
func filterDump(dump string) string {
	var keep []string
	skip := false
	for _, line := range strings.Split(dump, "\n") {
		if rest, ok := strings.CutPrefix(line, "-- Name: "); ok {
			name, typ, _ := strings.Cut(rest, "; Type: ")
			typ, _, _ = strings.Cut(typ, ";")
			skip = typ == "EVENT TRIGGER" && strings.HasPrefix(name, "pgmesh_") ||
				typ == "TRIGGER" && strings.HasSuffix(name, " pgmesh_tombstone")
		}
		if strings.HasPrefix(line, "\\") || skip && !strings.HasPrefix(line, "--") {
			continue
		}
		keep = append(keep, line)
	}
	return strings.Join(keep, "\n")
}

// findPgDump looks for pg_dump on PATH, then in the newest PostgreSQL
// installation under /usr/lib/postgresql.
func findPgDump() (string, error) {
	if p, err := exec.LookPath("pg_dump"); err == nil {
		return p, nil
	}
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_dump")
	sort.Strings(dirs)
	for i := len(dirs) - 1; i >= 0; i-- {
		if _, err := os.Stat(dirs[i]); err == nil {
			return dirs[i], nil
		}
	}
	return "", errors.New("pg_dump is needed to copy the schema but was not found: install the PostgreSQL client (apt-get install postgresql-client-15), or create the schema here before joining")
}
