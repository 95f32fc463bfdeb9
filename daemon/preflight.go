package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/privilege"
)

// minSlots is what one node needs at the least: a slot per peer on its own
// server and an origin per peer (PG15 bounds origins by max_replication_slots).
const minSlots = 4

// preflight checks that the local Postgres can run pgmesh, and that a role
// that is not a superuser holds what pgmesh needs before its schema is
// installed (package privilege; ownership is checked after). It returns one
// sentence per problem, each naming the cause and the fix.
func preflight(ctx context.Context, conn *pgx.Conn) error {
	var (
		version            int
		walLevel, commitTS string
		slots, senders     int
		pluginLibs         *string
		standby            bool
	)
	err := conn.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
		current_setting('wal_level'), current_setting('track_commit_timestamp'),
		current_setting('max_replication_slots')::int, current_setting('max_wal_senders')::int,
		(SELECT s.setting FROM pg_catalog.pg_settings s WHERE s.name = 'output_plugin_libraries'),
		pg_catalog.pg_is_in_recovery()`).Scan(
		&version, &walLevel, &commitTS, &slots, &senders, &pluginLibs, &standby)
	if err != nil {
		return fmt.Errorf("read settings of local Postgres: %w", err)
	}
	if standby {
		// Nothing else matters: a standby takes no writes.
		return errors.New("local Postgres is a standby (in recovery), and pgmesh applies changes only to a primary: point dsn at the primary, or list the primary and its standbys with target_session_attrs=read-write (host=a,b target_session_attrs=read-write) so that it finds whichever is primary")
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
	missing, err := privilege.CheckRole(ctx, conn)
	if err != nil {
		return err
	}
	errs = append(errs, privilege.Join(missing))
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

// afterInstall checks what can be checked only with the pgmesh schema in
// place (the replicated tables' owners), and says at start what a role
// that is not a superuser goes without: event triggers, so DDL is not
// captured, and a table made outside pgmesh ddl joins replication sets
// late.
func afterInstall(ctx context.Context, conn *pgx.Conn, cfg *Config, log *slog.Logger) error {
	missing, err := privilege.CheckOwners(ctx, conn)
	if err != nil {
		return err
	}
	if len(missing) > 0 {
		return privilege.Join(missing)
	}
	super, err := privilege.Superuser(ctx, conn)
	if err != nil || super {
		return err
	}
	if cfg.CaptureDDL {
		log.Warn("capture_ddl is off on this node: its role is not a superuser, and only a superuser can create the event trigger that captures DDL; run DDL through 'pgmesh ddl' (or connect as a superuser)")
		cfg.CaptureDDL = false
	}
	log.Warn("no event triggers on this node (its role is not a superuser): a table made by a plain CREATE TABLE joins replication sets only at the daemon's next pass, and rows written to it before then are not sent; create tables with 'pgmesh ddl', which adds them in the creating transaction on every node, or add them afterwards with 'pgmesh repset add SET TABLE --sync'; and run DDL that rewrites a table (ALTER COLUMN ... TYPE) through 'pgmesh ddl', which notes the rewrite, or that table's rows look newly written here (docs/conflicts.md, table rewrites)")
	return nil
}
