package daemon

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"

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

// luw is the resolution in use.
func (d *Daemon) luw() time.Duration { return time.Duration(d.luwNanos.Load()) }

// initResolution settles the resolution at startup and records it in
// pgmesh.setting, where the SQL copy of the rule reads it.
func (d *Daemon) initResolution(ctx context.Context, conn *pgx.Conn) error {
	v := d.cfg.LUWResolution
	if !d.cfg.LUWResolutionSet {
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
	return d.recordResolution(ctx, conn, v)
}

// adoptResolution takes the resolution members recorded, when the config
// sets none: this node's own record first, then any member's.
func (d *Daemon) adoptResolution(ctx context.Context, nodes map[string]*membership.Node) error {
	if d.cfg.LUWResolutionSet {
		return nil
	}
	recorded := ""
	if me := nodes[d.cfg.NodeName]; me != nil && me.LUWResolution != "" {
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
	if v == d.luw() {
		return nil
	}
	if err := d.withConn(ctx, func(conn *pgx.Conn) error { return d.recordResolution(ctx, conn, v) }); err != nil {
		return err
	}
	d.log.Info("using the group's luw_resolution (this node's config sets none)", "luw_resolution", v)
	return nil
}

func (d *Daemon) recordResolution(ctx context.Context, conn *pgx.Conn, v time.Duration) error {
	if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('luw_resolution_us', $1)
		ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, strconv.FormatInt(v.Microseconds(), 10)); err != nil {
		return fmt.Errorf("record luw_resolution: %w", err)
	}
	d.luwNanos.Store(int64(v))
	return nil
}
