package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/membership"
)

// This file owns which luw_resolution a node rounds commit times to.
//
// A value in the config is used as is, and must match the group's. Without
// one, a node keeps the value it already recorded in pgmesh.setting (a node
// of a group formed by an older pgmesh keeps that group's 1ms), a node
// joining a group takes the group's, and a node creating a group uses
// DefaultLUWResolution. Streams start only once the value agrees with every
// member's recorded one (reconcile), so nothing is applied under another.

// resolution is the luw_resolution in use here.
type resolution struct {
	self string
	// configured is the config's value, if set.
	configured    time.Duration
	configuredSet bool
	// db is the daemon's pool, once open (init runs before).
	db    *pgxpool.Pool
	log   *slog.Logger
	nanos atomic.Int64
}

// get is the resolution in use.
func (r *resolution) get() time.Duration { return time.Duration(r.nanos.Load()) }

// rule is the group's last-update-wins rule, as this node applies it (the
// reconcile refuses to stream while members disagree on luw_resolution).
func (r *resolution) rule() conflict.Rule { return conflict.Rule{Resolution: r.get()} }

// init settles the resolution at startup and records it in pgmesh.setting,
// where the SQL copy of the rule reads it.
func (r *resolution) init(ctx context.Context, conn *pgx.Conn) error {
	v := r.configured
	if !r.configuredSet {
		v = DefaultLUWResolution
		var us string
		err := conn.QueryRow(ctx, `SELECT value FROM pgmesh.setting WHERE name = 'luw_resolution_us'`).Scan(&us)
		switch {
		case err == nil:
			n, perr := strconv.ParseInt(us, 10, 64)
			if perr != nil || n < 0 {
				return fmt.Errorf("pgmesh.setting holds luw_resolution_us %q, which is not a number of microseconds: set luw_resolution in this node's config", us)
			}
			v = time.Duration(n) * time.Microsecond
		case err != pgx.ErrNoRows:
			return fmt.Errorf("read luw_resolution_us: %w", err)
		}
	}
	return r.record(ctx, conn, v)
}

// adopt takes the resolution members recorded, when the config sets none:
// this node's own record first, then any member's.
func (r *resolution) adopt(ctx context.Context, nodes map[string]*membership.Node) error {
	if r.configuredSet {
		return nil
	}
	recorded := ""
	if me := nodes[r.self]; me != nil && me.LUWResolution != "" {
		recorded = me.LUWResolution
	} else {
		for _, name := range slices.Sorted(maps.Keys(nodes)) {
			if n := nodes[name]; n.State != membership.Parted && n.LUWResolution != "" {
				recorded = n.LUWResolution
				break
			}
		}
	}
	if recorded == "" {
		return nil
	}
	v, err := time.ParseDuration(recorded)
	if err != nil {
		return fmt.Errorf("the group records luw_resolution %q, which is not a duration: set luw_resolution in this node's config", recorded)
	}
	if v == r.get() {
		return nil
	}
	if err := withConn(ctx, r.db, func(conn *pgx.Conn) error { return r.record(ctx, conn, v) }); err != nil {
		return err
	}
	r.log.Info("using the group's luw_resolution (this node's config sets none)", "luw_resolution", v)
	return nil
}

func (r *resolution) record(ctx context.Context, conn *pgx.Conn, v time.Duration) error {
	if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('luw_resolution_us', $1)
		ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, strconv.FormatInt(v.Microseconds(), 10)); err != nil {
		return fmt.Errorf("record luw_resolution: %w", err)
	}
	r.nanos.Store(int64(v))
	return nil
}
