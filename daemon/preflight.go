package daemon

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/jackc/pgx/v5"
)

// minSlots is what one node needs at the least: a slot per peer on its own
// server and an origin per peer (PG15 bounds origins by max_replication_slots).
const minSlots = 4

// preflight checks that the local Postgres can run pgmesh. It returns one
// sentence per problem, each naming the cause and the fix.
func preflight(ctx context.Context, conn *pgx.Conn) error {
	var (
		version            int
		walLevel, commitTS string
		slots, senders     int
		super              bool
		user               string
	)
	err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
		current_setting('wal_level'), current_setting('track_commit_timestamp'),
		current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
		r.rolsuper, current_user
		FROM pg_catalog.pg_roles r WHERE r.rolname = current_user`).Scan(
		&version, &walLevel, &commitTS, &slots, &senders, &super, &user)
	if err != nil {
		return fmt.Errorf("read settings of local Postgres: %w", err)
	}
	var errs []error
	if version < 150000 {
		errs = append(errs, fmt.Errorf("local Postgres is version %s; pgmesh needs PostgreSQL 15 or later: upgrade Postgres", strconv.Itoa(version/10000)))
	}
	if walLevel != "logical" {
		errs = append(errs, fmt.Errorf("local Postgres has wal_level=%s: set wal_level = logical in postgresql.conf and restart Postgres", walLevel))
	}
	if commitTS != "on" {
		errs = append(errs, errors.New("local Postgres has track_commit_timestamp=off, and last-update-wins needs commit times: set track_commit_timestamp = on in postgresql.conf and restart Postgres"))
	}
	if slots < minSlots {
		errs = append(errs, fmt.Errorf("local Postgres has max_replication_slots=%d: set it to at least %d (two per peer is comfortable) and restart Postgres", slots, minSlots))
	}
	if senders < minSlots {
		errs = append(errs, fmt.Errorf("local Postgres has max_wal_senders=%d: set it to at least %d (one per peer plus spares) and restart Postgres", senders, minSlots))
	}
	if !super {
		// PG15 keeps publications over whole schemas, event triggers and (by
		// default) replication origins to superusers (README, Security).
		errs = append(errs, fmt.Errorf("role %q is not a superuser, which pgmesh needs on this server (schema-wide publications, replication origins, session_replication_role): connect with a role made for pgmesh, CREATE ROLE pgmesh LOGIN SUPERUSER", user))
	}
	return errors.Join(errs...)
}
