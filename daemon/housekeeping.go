package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// tombstoneMargin is kept beyond the GC horizon: a peer commit's timestamp
// is taken a moment before its WAL is written, and peers' clocks differ a
// little. Last-update-wins already assumes clocks agree to well within this.
const tombstoneMargin = 10 * time.Second

// housekeeper prunes what pgmesh keeps in the local database and removes
// rows that a newer delete overtook.
type housekeeper struct {
	db        *pgxpool.Pool
	dsn, node string // the local Postgres and this node's name
	interval  time.Duration
	retention time.Duration // conflict_history
	log       *slog.Logger
	rule      func() conflict.Rule
	nodeID    func(name string) int
	// horizon is the tombstone horizon now (tombstoneHorizon).
	horizon func() (time.Time, bool)
	// sweepSoon asks for a look for overtaken rows soon (a stream deleted
	// a key it had no row for); one pending request covers many.
	sweepSoon chan struct{}
}

// sweep asks run to look for overtaken rows soon.
func (h *housekeeper) sweep() {
	select {
	case h.sweepSoon <- struct{}{}:
	default:
	}
}

// run does the housekeeping until ctx ends: every housekeeping_interval,
// and a second after a stream applied a delete of a key it had no row for
// (the insert that may have missed the delete has committed by then, as a
// rule; the next regular round catches a later one).
func (h *housekeeper) run(ctx context.Context) {
	t := time.NewTicker(h.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-h.sweepSoon:
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Second):
			}
			h.removeOvertaken(ctx)
			continue
		case <-t.C:
		}
		if err := h.pruneTombstones(ctx); err != nil && ctx.Err() == nil {
			h.log.Warn("prune tombstones", "err", err)
		}
		h.removeOvertaken(ctx)
		if _, err := h.db.Exec(ctx, `DELETE FROM pgmesh.conflict_history WHERE occurred_at < now() - $1::interval`,
			fmt.Sprintf("%d seconds", int64(h.retention.Seconds()))); err != nil && ctx.Err() == nil {
			h.log.Warn("prune conflict_history", "err", err)
		}
	}
}

// removeOvertaken runs replicator.RemoveOvertaken and reports what it did.
func (h *housekeeper) removeOvertaken(ctx context.Context) {
	n, err := replicator.RemoveOvertaken(ctx, h.dsn, h.node, h.rule(), h.nodeID)
	if err != nil && ctx.Err() == nil {
		h.log.Warn("remove rows a newer delete overtook", "err", err)
	}
	if n > 0 {
		h.log.Info("removed rows a newer delete overtook while they were being inserted (logged in conflict_history)", "rows", n)
	}
}

// tombstoneHorizon is the peer commit time before which every active peer's
// changes have all been applied here (streams: this node's streams from
// them), or false while any peer's is unknown. A tombstone older than that
// can no longer meet an older change: every change that could have raced
// it has arrived.
func tombstoneHorizon(g *membership.Group, self string, streams []replicator.Status, now time.Time) (time.Time, bool) {
	if g == nil {
		return time.Time{}, false
	}
	through := map[string]*time.Time{}
	for _, s := range streams {
		through[s.Peer] = s.AppliedThrough
	}
	var horizon time.Time
	for _, n := range g.Nodes {
		if n.Name == self || n.State != membership.Active {
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
		horizon = now // no peers: nothing can race a delete
	}
	return horizon.Add(-tombstoneMargin), true
}

func (h *housekeeper) pruneTombstones(ctx context.Context) error {
	// Local deletes leave their time in the tombstone's xmin; copy it out
	// before the transaction id is frozen and its commit time forgotten.
	// SKIP LOCKED: rows an apply transaction holds are done next time,
	// rather than risking a deadlock with it.
	if _, err := h.db.Exec(ctx, `UPDATE pgmesh.tombstone SET deleted_at = pg_xact_commit_timestamp(xmin)
		WHERE ctid = ANY(ARRAY(SELECT ctid FROM pgmesh.tombstone
			WHERE deleted_at IS NULL AND pg_xact_commit_timestamp(xmin) IS NOT NULL FOR UPDATE SKIP LOCKED))`); err != nil {
		return err
	}
	horizon, ok := h.horizon()
	if !ok {
		return nil
	}
	// A parked table keeps its tombstones until its changes are replayed:
	// a parked update older than a delete must still lose to it.
	tag, err := h.db.Exec(ctx, `DELETE FROM pgmesh.tombstone WHERE ctid = ANY(ARRAY(
		SELECT ctid FROM pgmesh.tombstone WHERE deleted_at < $1
			AND relation NOT IN (SELECT format('%I.%I', schema_name, table_name) FROM pgmesh.parked_changes)
		FOR UPDATE SKIP LOCKED))`, horizon)
	if err == nil && tag.RowsAffected() > 0 {
		h.log.Debug("pruned tombstones", "count", tag.RowsAffected(), "horizon", horizon)
	}
	return err
}

// ensureTombstoneTriggers installs the trigger recording local deletes on
// every replicated table with a primary key.
func ensureTombstoneTriggers(ctx context.Context, conn *pgx.Conn) error {
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
