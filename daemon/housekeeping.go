package daemon

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// tombstoneMargin is kept beyond the GC horizon: a peer commit's timestamp
// is taken a moment before its WAL is written, and peers' clocks differ a
// little. Last-update-wins already assumes clocks agree to well within this.
const tombstoneMargin = 10 * time.Second

// housekeeping prunes what pgmesh keeps in the local database and removes
// rows that a newer delete overtook, until ctx ends: every
// housekeeping_interval, and a second after a stream applied a delete of a
// key it had no row for (the insert that may have missed the delete has
// committed by then, as a rule; the next regular round catches a later one).
func (d *Daemon) housekeeping(ctx context.Context) {
	t := time.NewTicker(d.cfg.HousekeepingInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-d.sweepSoon:
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			d.removeOvertaken(ctx)
			continue
		case <-t.C:
		}
		if err := d.pruneTombstones(ctx); err != nil && ctx.Err() == nil {
			d.log.Warn("prune tombstones", "err", err)
		}
		d.removeOvertaken(ctx)
		if _, err := d.db.Exec(ctx, `DELETE FROM pgmesh.conflict_history WHERE occurred_at < now() - $1::interval`,
			fmt.Sprintf("%d seconds", int64(d.cfg.ConflictRetention.Seconds()))); err != nil && ctx.Err() == nil {
			d.log.Warn("prune conflict_history", "err", err)
		}
	}
}

// removeOvertaken runs replicator.RemoveOvertaken and reports what it did.
func (d *Daemon) removeOvertaken(ctx context.Context) {
	n, err := replicator.RemoveOvertaken(ctx, d.cfg.DSN, d.cfg.NodeName, d.rule(), d.nodeID)
	if err != nil && ctx.Err() == nil {
		d.log.Warn("remove rows a newer delete overtook", "err", err)
	}
	if n > 0 {
		d.log.Info("removed rows a newer delete overtook while they were being inserted (logged in conflict_history)", "rows", n)
	}
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
	for _, s := range d.streams.statuses() {
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
	// A parked table keeps its tombstones until its changes are replayed:
	// a parked update older than a delete must still lose to it.
	tag, err := d.db.Exec(ctx, `DELETE FROM pgmesh.tombstone WHERE ctid = ANY(ARRAY(
		SELECT ctid FROM pgmesh.tombstone WHERE deleted_at < $1
			AND relation NOT IN (SELECT format('%I.%I', schema_name, table_name) FROM pgmesh.parked_changes)
		FOR UPDATE SKIP LOCKED))`, horizon)
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
