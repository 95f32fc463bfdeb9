package daemon

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/membership"
)

// tombstoneMargin is kept beyond the GC horizon: a peer commit's timestamp
// is taken a moment before its WAL is written, and peers' clocks differ a
// little. Last-update-wins already assumes clocks agree to well within this.
const tombstoneMargin = 10 * time.Second

// housekeeping prunes what pgmesh keeps in the local database, until ctx ends.
func (d *Daemon) housekeeping(ctx context.Context) {
	every(ctx, d.cfg.HousekeepingInterval, func() {
		if err := d.pruneTombstones(ctx); err != nil && ctx.Err() == nil {
			d.log.Warn("prune tombstones", "err", err)
		}
		if _, err := d.db.Exec(ctx, `DELETE FROM pgmesh.conflict_history WHERE occurred_at < now() - $1::interval`,
			fmt.Sprintf("%d seconds", int64(d.cfg.ConflictRetention.Seconds()))); err != nil && ctx.Err() == nil {
			d.log.Warn("prune conflict_history", "err", err)
		}
	})
}

// tombstoneHorizon is the peer commit time before which every active peer's
// changes have all been applied here, or false while any peer's is unknown.
// A tombstone older than that can no longer meet an older change: every
// change that could have raced it has arrived.
func (d *Daemon) tombstoneHorizon() (time.Time, bool) {
	g, _ := d.store.Group()
	if g == nil {
		return time.Time{}, false
	}
	through := map[string]*time.Time{}
	for _, s := range d.streamStatuses() {
		through[s.Peer] = s.AppliedThrough
	}
	var horizon time.Time
	for _, n := range g.Nodes {
		if n.Name == d.cfg.NodeName || n.State != membership.Active {
			continue
		}
		t := through[n.Name]
		if t == nil {
			return time.Time{}, false
		}
		if horizon.IsZero() || t.Before(horizon) {
			horizon = *t
		}
	}
	if horizon.IsZero() {
		horizon = time.Now() // no peers: nothing can race a delete
	}
	return horizon.Add(-tombstoneMargin), true
}

func (d *Daemon) pruneTombstones(ctx context.Context) error {
	// Local deletes leave their time in the tombstone's xmin; copy it out
	// before the transaction id is frozen and its commit time forgotten.
	// SKIP LOCKED: rows an apply transaction holds are done next time,
	// rather than risking a deadlock with it.
	if _, err := d.db.Exec(ctx, `UPDATE pgmesh.tombstone SET deleted_at = pg_xact_commit_timestamp(xmin)
		WHERE ctid = ANY(ARRAY(SELECT ctid FROM pgmesh.tombstone
			WHERE deleted_at IS NULL AND pg_xact_commit_timestamp(xmin) IS NOT NULL FOR UPDATE SKIP LOCKED))`); err != nil {
		return err
	}
	horizon, ok := d.tombstoneHorizon()
	if !ok {
		return nil
	}
	tag, err := d.db.Exec(ctx, `DELETE FROM pgmesh.tombstone WHERE ctid = ANY(ARRAY(
		SELECT ctid FROM pgmesh.tombstone WHERE deleted_at < $1 FOR UPDATE SKIP LOCKED))`, horizon)
	if err == nil && tag.RowsAffected() > 0 {
		d.log.Debug("pruned tombstones", "count", tag.RowsAffected(), "horizon", horizon)
	}
	return err
}

// ensureTombstoneTriggers installs the trigger recording local deletes on
// every replicated table with a primary key.
func (d *Daemon) ensureTombstoneTriggers(ctx context.Context, conn *pgx.Conn) error {
	rows, err := conn.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname),
		array(SELECT a.attname::text FROM unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum ORDER BY k.ord)
		FROM pgmesh.user_tables u JOIN pg_class c ON c.oid = u.relid JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary
		WHERE NOT EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = 'pgmesh_tombstone')`)
	if err != nil {
		return fmt.Errorf("find tables without the tombstone trigger: %w", err)
	}
	type table struct {
		name string
		keys []string
	}
	tables, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (table, error) {
		var t table
		return t, r.Scan(&t.name, &t.keys)
	})
	if err != nil {
		return fmt.Errorf("find tables without the tombstone trigger: %w", err)
	}
	for _, t := range tables {
		args := make([]string, len(t.keys))
		for i, k := range t.keys {
			args[i] = "'" + strings.ReplaceAll(k, "'", "''") + "'"
		}
		if _, err := conn.Exec(ctx, fmt.Sprintf(`CREATE TRIGGER pgmesh_tombstone AFTER DELETE ON %s
			FOR EACH ROW EXECUTE FUNCTION pgmesh.record_tombstone(%s)`, t.name, strings.Join(args, ", "))); err != nil {
			return fmt.Errorf("install tombstone trigger on %s: %w", t.name, err)
		}
	}
	return nil
}
