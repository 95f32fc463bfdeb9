package daemon

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
)

// After this node's Postgres is promoted from a standby that held no copy
// of the peers' slots (PostgreSQL 15 and 16 keep none; 17+ none that was
// not ready), the peers cannot stream from it. Rather than part and join
// again, the node recovers by itself, in three steps that each survive a
// restart, as their state is in the database (migration 13):
//
//  1. remakeSlots makes each missing slot again at the current position,
//     announcing it in pgmesh.recreated_slot before the slot exists.
//  2. Each peer's stream sees the announcement and moves its origin for
//     this node to the slot's start, once (replicator checkSlot/startOver).
//  3. repairPromotions, once every peer streams again both ways, compares
//     every replicated table among the nodes and repairs what differs:
//     what this node committed before the slots existed, what the old
//     primary sent a peer but not its standby, and what a peer sent past
//     the standby's position that the old timeline ended without.
//
// Only a promotion starts this: timeline now is higher than the one on
// which every peer's slot was last here (slotTimelines). A slot that
// disappeared any other way still needs a part and a join.

// remakeSlots makes the slots of peers again after a promotion to
// timeline, and records the promotion for repairPromotions.
func (d *Daemon) remakeSlots(ctx context.Context, peers []string, timeline int64) error {
	// The announcement is committed before any slot exists, so that a peer
	// that finds its slot also finds where it starts.
	_, err := d.db.Exec(ctx, `WITH p AS (
			INSERT INTO pgmesh.promotion (timeline, peers) VALUES ($1, $2)
			ON CONFLICT (timeline) DO UPDATE SET
				peers = ARRAY(SELECT DISTINCT unnest(pgmesh.promotion.peers || EXCLUDED.peers) ORDER BY 1),
				repaired_at = NULL, repaired_rows = NULL)
		INSERT INTO pgmesh.recreated_slot (peer, timeline) SELECT unnest($2::text[]), $1
		ON CONFLICT (peer) DO UPDATE SET timeline = EXCLUDED.timeline, start_lsn = NULL, created_at = now()`, timeline, peers)
	if err != nil {
		return fmt.Errorf("record the slots to make again after the promotion: %w", err)
	}
	conn, err := d.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect to local Postgres: %w", err)
	}
	defer conn.Release()
	for _, peer := range peers {
		start, err := replicator.CreateSlot(ctx, conn.Conn(), origin.SlotName(peer))
		if pe, ok := errors.AsType[*pgconn.PgError](err); ok && pe.Code == "42710" {
			err = nil // made before a restart; announceSlots reads its start
		}
		if err != nil {
			return fmt.Errorf("make the slot of peer %s again after the promotion: %w", peer, err)
		}
		d.log.Warn("this server was promoted from a standby without the peers' slots: made the slot of a peer again; the group repairs what no stream carried once the peers stream",
			"peer", peer, "timeline", timeline, "start_lsn", start)
	}
	if err := d.announceSlots(ctx); err != nil {
		return err
	}
	select {
	case d.promoted <- struct{}{}:
	default: // one pending signal covers many
	}
	return nil
}

// announceSlots tells the peers where their slots made again start. Until
// a peer is told, it does not stream, so its slot has not moved since it
// was made.
func (d *Daemon) announceSlots(ctx context.Context) error {
	_, err := d.db.Exec(ctx, `UPDATE pgmesh.recreated_slot r SET start_lsn = s.confirmed_flush_lsn
		FROM pg_catalog.pg_replication_slots s
		WHERE r.start_lsn IS NULL AND s.slot_name = 'pgmesh_' || r.peer AND s.database = current_database()
		  AND s.confirmed_flush_lsn IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("record where the slots made again start: %w", err)
	}
	return nil
}

// repairPromotions runs the repair of each promotion this node recovered
// from, once every peer streams again in both directions, until it has
// run to the end. It looks at start and when remakeSlots made slots, and
// every 5 s while a repair is pending.
func (d *Daemon) repairPromotions(ctx context.Context) {
	for {
		pending, problem, err := d.repairPromotion(ctx)
		if err != nil {
			problem = err.Error()
		}
		var problems []string
		if problem != "" {
			problems = []string{problem}
		}
		d.problems.set("promotion", problems)
		var retry <-chan time.Time
		if pending || err != nil {
			retry = time.After(reconcileEvery)
		}
		select {
		case <-ctx.Done():
			return
		case <-d.promoted:
		case <-retry:
		}
	}
}

// repairPromotion repairs the latest promotion not yet repaired, if the
// peers stream. It says whether one is still pending, and what keeps it
// waiting, if anything.
func (d *Daemon) repairPromotion(ctx context.Context) (pending bool, waiting string, err error) {
	p, err := d.readPromotion(ctx)
	if p == nil || err != nil {
		return false, "", err
	}
	if p.RepairedAt != nil {
		return false, "", nil
	}
	if waiting := d.streamsBack(ctx, p.Peers); waiting != "" {
		return true, fmt.Sprintf("after the promotion to timeline %d, the repair of what no stream carried waits for %s", p.Timeline, waiting), nil
	}
	nodes, err := d.compareNodes()
	if err != nil {
		return true, "", err
	}
	d.log.Info("repairing what the promotion left different: comparing every replicated table with the peers", "timeline", p.Timeline)
	res, rerr := d.compareShares(ctx, nodes, api.CompareRequest{Repair: true})
	if rerr != nil {
		msg := fmt.Sprintf("the repair after the promotion to timeline %d failed and is tried again: %v", p.Timeline, rerr)
		if _, err := d.db.Exec(ctx, `UPDATE pgmesh.promotion SET last_error = $2 WHERE timeline = $1`, p.Timeline, rerr.Error()); err != nil {
			return true, "", errors.Join(rerr, err)
		}
		return true, msg, nil
	}
	if _, err := d.db.Exec(ctx, `UPDATE pgmesh.promotion SET repaired_at = now(), repaired_rows = $2, last_error = NULL WHERE timeline = $1`,
		p.Timeline, len(res.Actions)); err != nil {
		return true, "", fmt.Errorf("record the repair after the promotion: %w", err)
	}
	d.log.Warn("repaired what the promotion left different", "timeline", p.Timeline, "rows", len(res.Actions), "tables", len(res.Tables))
	_, err = d.readPromotion(ctx)
	return false, "", err
}

// readPromotion reads the last promotion this node recovered from (nil:
// none), for status too.
func (d *Daemon) readPromotion(ctx context.Context) (*api.PromotionStatus, error) {
	var p api.PromotionStatus
	err := d.db.QueryRow(ctx, `SELECT timeline, peers, detected_at, repaired_at, repaired_rows, coalesce(last_error, '')
		FROM pgmesh.promotion ORDER BY timeline DESC LIMIT 1`).Scan(&p.Timeline, &p.Peers, &p.DetectedAt, &p.RepairedAt, &p.RepairedRows, &p.LastError)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the last promotion: %w", err)
	}
	d.promotion.set([]api.PromotionStatus{p})
	return &p, nil
}

// streamsBack says which of peers do not yet stream from this node or to
// it ("" once all do): compare settles on what each node has applied of
// the others, which needs every stream.
func (d *Daemon) streamsBack(ctx context.Context, peers []string) string {
	if g, _ := d.store.Group(); g != nil {
		// A peer parted since is not waited for.
		peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool {
			n := g.Nodes[p]
			return n == nil || n.State != membership.Active
		})
	}
	var idle []string
	if err := d.db.QueryRow(ctx, `SELECT ARRAY(SELECT p FROM unnest($1::text[]) p
		WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_replication_slots s
		                  WHERE s.slot_name = 'pgmesh_' || p AND s.database = current_database() AND s.active))`, peers).Scan(&idle); err != nil {
		return "the peers' slots (" + err.Error() + ")"
	}
	var waiting []string
	if len(idle) > 0 {
		waiting = append(waiting, "the streams of "+strings.Join(idle, ", ")+" from this node")
	}
	var down []string
	for _, s := range d.streams.statuses() {
		if !s.Connected {
			down = append(down, s.Peer)
		}
	}
	if len(down) > 0 {
		waiting = append(waiting, "this node's streams from "+strings.Join(down, ", "))
	}
	return strings.Join(waiting, " and ")
}
