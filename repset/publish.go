package repset

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/origin"
)

// Every node keeps one publication per receiver, pgmesh_<receiver>, holding
// exactly that receiver's shares; each stream subscribes to the one named
// for its own node. A change of the sets therefore takes effect in each
// sender's WAL at one point, the commit of the ALTER PUBLICATION its daemon
// runs: pgoutput reads publications as of each change it decodes, so every
// change committed before that point goes out under the old definition and
// every later one under the new, to every receiver alike.

// Statements holding user SQL (row filters) go by the extended protocol,
// which runs exactly one statement.
var oneStatement = pgx.QueryExecModeExec

// UserTables lists the tables pgmesh can replicate on conn's node.
func UserTables(ctx context.Context, conn *pgx.Conn) ([]string, error) {
	rows, err := conn.Query(ctx, `SELECT relation FROM pgmesh.user_tables ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("list user tables: %w", err)
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("list user tables: %w", err)
	}
	return tables, nil
}

// Sync makes this node's publications hold what sets give each receiver,
// drops the publications of nodes no longer receiving, and mirrors the sets
// into pgmesh.repset for SQL. It writes only what changed.
//
// index is the Raft index of the group state the sets and receivers come
// from. Sync never follows a state older than the one it last followed
// (after a restart the daemon sees the group rebuilt entry by entry: a
// receiver's publication dropped and made again would leave its stream
// unable to decode the WAL written in between); it then changes nothing.
func Sync(ctx context.Context, conn *pgx.Conn, sets Sets, receivers []string, index uint64) (Synced, error) {
	done := Synced{Current: true}
	err := publishing(ctx, conn, func(tx pgx.Tx, tables []string) error {
		done.Local = sets.Local(tables)
		var last uint64
		err := tx.QueryRow(ctx, `SELECT coalesce((SELECT value::numeric FROM pgmesh.setting WHERE name = 'publications_raft_index'), 0)`).Scan(&last)
		if err != nil {
			return fmt.Errorf("read the group state the publications follow: %w", err)
		}
		if index < last {
			done.Current = false
			return nil
		}
		if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('publications_raft_index', $1)
			ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, strconv.FormatUint(index, 10)); err != nil {
			return fmt.Errorf("record the group state the publications follow: %w", err)
		}
		if err := mirror(ctx, tx, sets); err != nil {
			return err
		}
		for _, r := range receivers {
			if err := publish(ctx, tx, r, sets.Shares(r, tables)); err != nil {
				return err
			}
		}
		rows, err := tx.Query(ctx, `SELECT pubname FROM pg_publication WHERE pubname LIKE 'pgmesh\_%' OR pubname = 'pgmesh'`)
		if err != nil {
			return fmt.Errorf("list publications: %w", err)
		}
		have, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return fmt.Errorf("list publications: %w", err)
		}
		for _, p := range have {
			// "pgmesh" is the one schema-wide publication of versions before sets.
			if node, ok := origin.NodeOf(p); !ok || !slices.Contains(receivers, node) {
				if _, err := tx.Exec(ctx, "DROP PUBLICATION "+pgquote.Ident(p)); err != nil {
					return fmt.Errorf("drop publication %s: %w", p, err)
				}
			}
		}
		return nil
	})
	return done, err
}

// Synced is what Sync did.
type Synced struct {
	// Current is false when the state given was older than the one the
	// publications follow: nothing was changed.
	Current bool
	// Local are the user tables in no set.
	Local []string
}

// Publish creates or updates the publication of one receiver on conn's node.
// A joining node calls it on each member before making its slot there, so
// that the slot never sees a change from before the publication existed.
func Publish(ctx context.Context, conn *pgx.Conn, sets Sets, receiver string) error {
	return publishing(ctx, conn, func(tx pgx.Tx, tables []string) error {
		return publish(ctx, tx, receiver, sets.Shares(receiver, tables))
	})
}

// publishing runs fn in a transaction that alone on this node edits
// pgmesh's publications (the daemon and a joining node may both be at it),
// given the user tables there are.
func publishing(ctx context.Context, conn *pgx.Conn, fn func(pgx.Tx, []string) error) error {
	tables, err := UserTables(ctx, conn)
	if err != nil {
		return err
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin publication update: %w", err)
	}
	defer tx.Rollback(context.Background())
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(hashtext('pgmesh publications'))`); err != nil {
		return fmt.Errorf("lock publications: %w", err)
	}
	if err := fn(tx, tables); err != nil {
		return err
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("update publications: %w", err)
	}
	return nil
}

// objects renders shares as ALTER PUBLICATION ... SET TABLE's list, sorted.
func objects(shares map[string]Share) string {
	var objs []string
	for t, sh := range shares {
		o := "TABLE " + t
		if len(sh.Columns) > 0 {
			cols := make([]string, len(sh.Columns))
			for i, c := range sh.Columns {
				cols[i] = pgquote.Ident(c)
			}
			o += " (" + strings.Join(cols, ", ") + ")"
		}
		if sh.Where != "" {
			o += " WHERE (" + sh.Where + ")"
		}
		objs = append(objs, o)
	}
	slices.Sort(objs)
	return strings.Join(objs, ", ")
}

func publish(ctx context.Context, tx pgx.Tx, receiver string, shares map[string]Share) error {
	pub := origin.PublicationName(receiver)
	objs := objects(shares)
	sum := sha256.Sum256([]byte(objs))
	want := "pgmesh shares " + hex.EncodeToString(sum[:8])
	var have *string
	err := tx.QueryRow(ctx, `SELECT coalesce(obj_description(oid, 'pg_publication'), '') FROM pg_publication WHERE pubname = $1`, pub).Scan(&have)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("read publication %s: %w", pub, err)
	}
	if have != nil && *have == want {
		return nil
	}
	q := pgquote.Ident(pub)
	switch {
	case have == nil:
		sql := "CREATE PUBLICATION " + q
		if objs != "" {
			sql += " FOR " + objs
		}
		_, err = tx.Exec(ctx, sql, oneStatement)
	case objs != "":
		_, err = tx.Exec(ctx, "ALTER PUBLICATION "+q+" SET "+objs, oneStatement)
	default:
		var held string
		if err = tx.QueryRow(ctx, `SELECT coalesce(string_agg(prrelid::regclass::text, ', '), '') FROM pg_publication_rel
			WHERE prpubid = (SELECT oid FROM pg_publication WHERE pubname = $1)`, pub).Scan(&held); err == nil && held != "" {
			_, err = tx.Exec(ctx, "ALTER PUBLICATION "+q+" DROP TABLE "+held)
		}
	}
	if err != nil {
		return fmt.Errorf("publish %s's share in %s: %w", receiver, pub, err)
	}
	if _, err := tx.Exec(ctx, "COMMENT ON PUBLICATION "+q+" IS "+pgquote.Literal(want)); err != nil {
		return fmt.Errorf("mark publication %s: %w", pub, err)
	}
	return nil
}

// mirror rewrites pgmesh.repset and pgmesh.repset_table when the sets differ
// from what they hold.
func mirror(ctx context.Context, tx pgx.Tx, sets Sets) error {
	want := sets.Hash()
	var have string
	err := tx.QueryRow(ctx, `SELECT value FROM pgmesh.setting WHERE name = 'repsets'`).Scan(&have)
	if err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("read the replication sets' mirror: %w", err)
	}
	if have == want {
		return nil
	}
	if _, err := tx.Exec(ctx, `DELETE FROM pgmesh.repset`); err != nil {
		return fmt.Errorf("rewrite pgmesh.repset: %w", err)
	}
	for _, s := range sets.Sorted() {
		if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.repset VALUES ($1, $2, $3, $4)`,
			s.Name, s.Nodes, s.AllTables, append([]string{}, s.Except...)); err != nil {
			return fmt.Errorf("rewrite pgmesh.repset: %w", err)
		}
		for t, spec := range s.Tables {
			var where *string
			if spec.Where != "" {
				where = &spec.Where
			}
			var cols []string
			if len(spec.Columns) > 0 {
				cols = spec.Columns
			}
			if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.repset_table VALUES ($1, $2, $3, $4)`, s.Name, t, where, cols); err != nil {
				return fmt.Errorf("rewrite pgmesh.repset_table: %w", err)
			}
		}
	}
	_, err = tx.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('repsets', $1)
		ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, want)
	return err
}

// Check resolves a table named by a user (schema.table, or a table on the
// search path) to the name sets record, and checks that spec can hold it:
// the columns exist and include the key, and the row filter is valid SQL
// that PostgreSQL can evaluate on updates and deletes. It changes nothing.
func Check(ctx context.Context, conn *pgx.Conn, name string, spec Table) (string, error) {
	var rel *string
	var exists bool
	if err := conn.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL,
		(SELECT relation FROM pgmesh.user_tables WHERE relid = to_regclass($1))`, name).Scan(&exists, &rel); err != nil {
		return "", fmt.Errorf("look up table %s: %w", name, err)
	}
	if !exists {
		return "", fmt.Errorf("table %s does not exist: name an existing table, as schema.table", name)
	}
	if rel == nil {
		return "", fmt.Errorf("%s is not a permanent table in a user schema, the only kind pgmesh replicates", name)
	}
	t := *rel
	if len(spec.Columns) > 0 {
		var cols, key []string
		if err := conn.QueryRow(ctx, `SELECT
			array(SELECT attname::text FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped),
			array(SELECT a.attname::text FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
			      WHERE i.indrelid = $1::regclass AND (i.indisreplident OR (i.indisprimary AND
			            (SELECT relreplident FROM pg_class WHERE oid = $1::regclass) = 'd')))`, t).Scan(&cols, &key); err != nil {
			return "", fmt.Errorf("read the columns of %s: %w", t, err)
		}
		for _, c := range spec.Columns {
			if !slices.Contains(cols, c) {
				return "", fmt.Errorf("table %s has no column %q: --columns names columns of the table", t, c)
			}
		}
		for _, k := range key {
			if !slices.Contains(spec.Columns, k) {
				return "", fmt.Errorf("--columns for %s must include its key column %q: updates and deletes find their row by the key", t, k)
			}
		}
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return "", err
	}
	defer tx.Rollback(context.Background())
	trial := objects(map[string]Share{t: {Where: spec.Where, Columns: spec.Columns}})
	if _, err := tx.Exec(ctx, "CREATE PUBLICATION \"pgmesh trial\" FOR "+trial, oneStatement); err != nil {
		if spec.Where != "" {
			return "", fmt.Errorf("row filter %q is not valid for table %s (%s): write one boolean SQL expression over its columns, using immutable built-in functions only", spec.Where, t, pgMessage(err))
		}
		return "", fmt.Errorf("table %s cannot be published as given (%s)", t, pgMessage(err))
	}
	// PostgreSQL checks a publication's row filter and column list against
	// the replica identity when a row is updated or deleted: try both.
	for _, stmt := range []string{"UPDATE " + t + " SET " + firstColumn(ctx, tx, t) + " WHERE false", "DELETE FROM " + t + " WHERE false"} {
		if _, err := tx.Exec(ctx, stmt); err != nil {
			if spec.Where != "" {
				return "", fmt.Errorf("row filter %q of table %s uses columns outside its key (%s): updates and deletes send only the old row's key, so a filter may test key columns only; filter on a key column, or give the table a replica identity that includes the column", spec.Where, t, pgMessage(err))
			}
			return "", fmt.Errorf("table %s cannot be published as given (%s)", t, pgMessage(err))
		}
	}
	return t, nil
}

// firstColumn returns "col = col" for some column of t, for a no-op UPDATE.
func firstColumn(ctx context.Context, tx pgx.Tx, t string) string {
	var c string
	_ = tx.QueryRow(ctx, `SELECT quote_ident(attname) FROM pg_attribute WHERE attrelid = $1::regclass
		AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum LIMIT 1`, t).Scan(&c)
	return c + " = " + c
}

// pgMessage is the server's message and detail, without the SQLSTATE.
func pgMessage(err error) string {
	var pe *pgconn.PgError
	if errors.As(err, &pe) {
		if pe.Detail != "" {
			return pe.Message + ": " + pe.Detail
		}
		return pe.Message
	}
	return err.Error()
}
