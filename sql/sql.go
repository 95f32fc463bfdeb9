// Package sql holds the pgmesh schema as embedded, versioned migrations and
// installs or upgrades it in a database.
package sql

import (
	"context"
	"embed"
	"fmt"
	"io/fs"
	"sort"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"
)

//go:embed migrations/*.sql
var migrations embed.FS

// Schema is the schema pgmesh owns in every database; it is never replicated.
const Schema = "pgmesh"

// migration is one numbered SQL file.
type migration struct {
	version int
	name    string
	body    string
}

func load() ([]migration, error) {
	entries, err := fs.ReadDir(migrations, "migrations")
	if err != nil {
		return nil, err
	}
	var ms []migration
	for _, e := range entries {
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil {
			return nil, fmt.Errorf("migration file %q is not named NNNN_name.sql", e.Name())
		}
		b, err := migrations.ReadFile("migrations/" + e.Name())
		if err != nil {
			return nil, err
		}
		ms = append(ms, migration{version: v, name: e.Name(), body: string(b)})
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].version < ms[j].version })
	return ms, nil
}

// Latest is the schema version this binary installs.
func Latest() int {
	ms, err := load()
	if err != nil || len(ms) == 0 {
		return 0
	}
	return ms[len(ms)-1].version
}

// Install creates or upgrades the pgmesh schema. All pending migrations run
// in one transaction under an advisory lock, so a failed upgrade leaves the
// old schema intact and concurrent daemons on one database do not race. It
// returns the version before and after.
func Install(ctx context.Context, conn *pgx.Conn) (from, to int, err error) {
	ms, err := load()
	if err != nil {
		return 0, 0, fmt.Errorf("load embedded migrations: %w", err)
	}
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, 0, err
	}
	defer tx.Rollback(ctx)
	// One lock key for "pgmesh schema install" (arbitrary constant).
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(7400740074)`); err != nil {
		return 0, 0, fmt.Errorf("lock for schema install: %w", err)
	}
	if _, err := tx.Exec(ctx, `CREATE SCHEMA IF NOT EXISTS pgmesh;
		CREATE TABLE IF NOT EXISTS pgmesh.schema_version (version integer NOT NULL, installed_at timestamptz NOT NULL DEFAULT now())`); err != nil {
		return 0, 0, fmt.Errorf("create pgmesh schema: %w", err)
	}
	if err := tx.QueryRow(ctx, `SELECT coalesce(max(version), 0) FROM pgmesh.schema_version`).Scan(&from); err != nil {
		return 0, 0, fmt.Errorf("read pgmesh schema version: %w", err)
	}
	if from > Latest() {
		return from, from, fmt.Errorf("database has pgmesh schema version %d but this binary knows only up to %d: upgrade pgmesh", from, Latest())
	}
	to = from
	for _, m := range ms {
		if m.version <= from {
			continue
		}
		if _, err := tx.Exec(ctx, m.body); err != nil {
			return from, to, fmt.Errorf("apply migration %s: %w", m.name, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.schema_version (version) VALUES ($1)`, m.version); err != nil {
			return from, to, err
		}
		to = m.version
	}
	// Event triggers only a superuser can make: made here whenever the
	// role is one (see migration 11).
	if _, err := tx.Exec(ctx, `SELECT pgmesh.install_event_triggers()`); err != nil {
		return from, to, fmt.Errorf("create pgmesh's event triggers: %w", err)
	}
	return from, to, tx.Commit(ctx)
}
