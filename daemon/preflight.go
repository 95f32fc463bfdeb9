package daemon

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"

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
		pluginLibs         *string
	)
	err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
		current_setting('wal_level'), current_setting('track_commit_timestamp'),
		current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
		r.rolsuper, current_user,
		(SELECT s.setting FROM pg_catalog.pg_settings s WHERE s.name = 'output_plugin_libraries')
		FROM pg_catalog.pg_roles r WHERE r.rolname = current_user`).Scan(
		&version, &walLevel, &commitTS, &slots, &senders, &super, &user, &pluginLibs)
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
	if pluginLibs != nil && !allowsPlugin(*pluginLibs, "pgoutput") {
		errs = append(errs, fmt.Errorf("local Postgres has output_plugin_libraries = '%s', which does not allow pgoutput, so peers cannot stream from this node: add pgoutput to output_plugin_libraries in postgresql.conf and restart Postgres", *pluginLibs))
	}
	if !super {
		// PG15 keeps publications over whole schemas, event triggers and (by
		// default) replication origins to superusers (README, Security).
		errs = append(errs, fmt.Errorf("role %q is not a superuser, which pgmesh needs on this server (publications of every user table, event triggers, replication origins, session_replication_role): connect with a role made for pgmesh, CREATE ROLE pgmesh LOGIN SUPERUSER", user))
	}
	return errors.Join(errs...)
}

// allowsPlugin reports whether the output_plugin_libraries setting (a
// comma-separated list, in PostgreSQL's minor releases from 15.19, 16.15,
// 17.11 and 18.6 on) lets logical decoding load the named output plugin.
func allowsPlugin(setting, plugin string) bool {
	for _, lib := range strings.Split(setting, ",") {
		lib = strings.Trim(strings.TrimSpace(lib), `"`)
		// A name may be given as for LOAD, with a directory.
		if lib == plugin || strings.HasSuffix(lib, "/"+plugin) {
			return true
		}
	}
	return false
}
