// Package pgsession opens the connections pgmesh makes to Postgres: each
// named in pg_stat_activity (application_name) and with the session
// settings its work needs, given as parameters of the startup message so
// that they hold from the first statement.
package pgsession

import (
	"context"
	"fmt"
	"reflect"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Settings are session settings by name.
type Settings map[string]string

// Applier is how changes from peers are written: as replicated changes
// (user triggers and foreign keys already ran on the origin), whatever the
// database's own defaults say. Apply relies on READ COMMITTED: each
// statement, and each query of a VOLATILE function, sees every transaction
// committed before it began (a delete an insert waited for, for one).
//
// Its commits are also durable before they return (see durableCommits),
// unless the session sets synchronous_commit itself.
var Applier = Settings{"session_replication_role": "replica", "default_transaction_read_only": "off",
	"default_transaction_isolation": "read committed"}

// durableCommits raises a session's synchronous_commit from off to local.
// A peer never sends again what its slot has confirmed: an asynchronous
// commit, lost in a crash before the WAL writer wrote it, would be lost for
// good if it were confirmed before the flush. Stronger settings (on,
// remote_write, remote_apply) flush locally too and are kept, so a commit
// that waits for a synchronous standby still does. A session that sets
// synchronous_commit itself takes charge: the apply session commits
// asynchronously and confirms only what the WAL has flushed.
const durableCommits = `SELECT pg_catalog.set_config('synchronous_commit', 'local', false)
	WHERE pg_catalog.current_setting('synchronous_commit') = 'off'`

// Writer may write even while the database is read-only for applications
// (a joining node).
var Writer = Settings{"default_transaction_read_only": "off"}

// Config parses dsn and names the session app, with the settings of each
// set in order (later ones win).
func Config(dsn, app string, sets ...Settings) (*pgx.ConnConfig, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse the connection string: %w", err)
	}
	name(cfg, app, sets)
	return cfg, nil
}

// Pool is Config for a pool of at most size sessions.
func Pool(dsn, app string, size int32, sets ...Settings) (*pgxpool.Config, error) {
	cfg, err := pgxpool.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse the connection string: %w", err)
	}
	cfg.MaxConns = size
	name(cfg.ConnConfig, app, sets)
	return cfg, nil
}

func name(cfg *pgx.ConnConfig, app string, sets []Settings) {
	cfg.RuntimeParams["application_name"] = app
	for _, s := range sets {
		for k, v := range s {
			cfg.RuntimeParams[k] = v
		}
	}
	// Every session that writes replicated changes commits them durably,
	// unless it chose otherwise.
	if cfg.RuntimeParams["session_replication_role"] == "replica" && cfg.RuntimeParams["synchronous_commit"] == "" {
		after := cfg.AfterConnect
		cfg.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
			if after != nil {
				if err := after(ctx, pc); err != nil {
					return err
				}
			}
			if _, err := pc.Exec(ctx, durableCommits).ReadAll(); err != nil {
				return fmt.Errorf("make the session's commits durable (synchronous_commit): %w", err)
			}
			return nil
		}
	}
	// A session read-only by its own settings fails the check of
	// target_session_attrs=read-write (SHOW transaction_read_only) on every
	// server, the primary too: what the connection string asks for then is
	// the primary, which the check of target_session_attrs=primary finds.
	if cfg.RuntimeParams["default_transaction_read_only"] == "on" && cfg.ValidateConnect != nil &&
		reflect.ValueOf(cfg.ValidateConnect).Pointer() == reflect.ValueOf(pgconn.ValidateConnectTargetSessionAttrsReadWrite).Pointer() {
		cfg.ValidateConnect = pgconn.ValidateConnectTargetSessionAttrsPrimary
	}
}

// Connect opens a session as Config describes it.
func Connect(ctx context.Context, dsn, app string, sets ...Settings) (*pgx.Conn, error) {
	cfg, err := Config(dsn, app, sets...)
	if err != nil {
		return nil, err
	}
	return pgx.ConnectConfig(ctx, cfg)
}
