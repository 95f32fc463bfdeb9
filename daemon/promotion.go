package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

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
//  1. remake makes each missing slot again at the current position,
//     announcing it in pgmesh.recreated_slot before the slot exists.
//  2. Each peer's stream sees the announcement and moves its origin for
//     this node to the slot's start, once (replicator checkSlot/startOver).
//  3. run, once every peer streams again both ways, compares every
//     replicated table among the nodes and repairs what differs: what this
//     node committed before the slots existed, and what the old primary
//     sent a peer but not its standby.
//
// Only a promotion starts this: the slot check (slots.go) finds peers'
// slots missing on a later timeline than the one on which every slot was
// last here. A slot that disappeared any other way still needs a part and
// a join.

// promotion is the owner of that recovery.
type promotion struct {
	db  *pgxpool.Pool
	log *slog.Logger
	// repair compares and repairs every replicated table among the active
	// members, and returns how many rows it wrote again.
	repair func(ctx context.Context) (rows int, err error)
	// waiting names the streams, of peers among those given that are
	// still active members, that are not back yet ("" once all are).
	waiting func(peers []string) string
	// problems receives what keeps a repair from running or ending.
	problems *problemLog

	last latest[api.PromotionStatus] // the last promotion, for status
	// wake tells run that remake made slots again.
	wake chan struct{}
}

func newPromotion(db *pgxpool.Pool, log *slog.Logger, problems *problemLog,
	repair func(context.Context) (int, error), waiting func([]string) string) *promotion {
	return &promotion{db: db, log: log, problems: problems, repair: repair, waiting: waiting, wake: make(chan struct{}, 1)}
}

// check is the slot check's part in it: given the active peers whose slots
// are missing here, it makes them again if a promotion lost them, and
// returns those still missing (dropped some other way). It keeps the
// timeline on which every slot was here, and announces slots made again.
func (p *promotion) check(ctx context.Context, missing []string) ([]string, error) {
	now, whole, err := p.timelines(ctx, len(missing) == 0)
	if err != nil {
		return nil, err
	}
	if promotedWithoutSlots(len(missing), now, whole) {
		if err := p.remake(ctx, missing, now); err != nil {
			return nil, err
		}
		if _, _, err := p.timelines(ctx, true); err != nil {
			return nil, err
		}
		missing = nil
	}
	return missing, p.announce(ctx)
}

// timelines returns the WAL timeline this Postgres writes on, and the
// last one on which every active peer's slot was here (0: not known). A
// higher timeline means this server was promoted from a standby since.
// allHere records now as that timeline.
func (p *promotion) timelines(ctx context.Context, allHere bool) (now, whole int64, err error) {
	if err := p.db.QueryRow(ctx, `SELECT pgmesh.wal_timeline(),
			coalesce((SELECT value::bigint FROM pgmesh.setting WHERE name = 'slots_timeline'), 0)`).Scan(&now, &whole); err != nil {
		return 0, 0, fmt.Errorf("read this server's timeline: %w", err)
	}
	if allHere && now != whole {
		if _, err := p.db.Exec(ctx, `INSERT INTO pgmesh.setting VALUES ('slots_timeline', $1)
			ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value`, strconv.FormatInt(now, 10)); err != nil {
			return 0, 0, fmt.Errorf("record the timeline of the slots: %w", err)
		}
		whole = now
	}
	return now, whole, nil
}

// promotedWithoutSlots says whether missing peers' slots were lost to a
// promotion (this server writes on a later timeline than the one on which
// every slot was last here), rather than dropped.
func promotedWithoutSlots(missing int, now, whole int64) bool {
	return missing > 0 && whole > 0 && now > whole
}

// remake makes the slots of peers again after a promotion to timeline,
// and records the promotion for run.
func (p *promotion) remake(ctx context.Context, peers []string, timeline int64) error {
	// The announcement is committed before any slot exists, so that a peer
	// that finds its slot also finds where it starts.
	_, err := p.db.Exec(ctx, `WITH p AS (
			INSERT INTO pgmesh.promotion (timeline, peers) VALUES ($1, $2)
			ON CONFLICT (timeline) DO UPDATE SET
				peers = ARRAY(SELECT DISTINCT unnest(pgmesh.promotion.peers || EXCLUDED.peers) ORDER BY 1),
				repaired_at = NULL, repaired_rows = NULL)
		INSERT INTO pgmesh.recreated_slot (peer, timeline) SELECT unnest($2::text[]), $1
		ON CONFLICT (peer) DO UPDATE SET timeline = EXCLUDED.timeline, start_lsn = NULL, created_at = now()`, timeline, peers)
	if err != nil {
		return fmt.Errorf("record the slots to make again after the promotion: %w", err)
	}
	conn, err := p.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("connect to local Postgres: %w", err)
	}
	defer conn.Release()
	for _, peer := range peers {
		start, err := replicator.CreateSlot(ctx, conn.Conn(), origin.SlotName(peer))
		if pe, ok := errors.AsType[*pgconn.PgError](err); ok && pe.Code == "42710" {
			err = nil // made before a restart; announce reads its start
		}
		if err != nil {
			return fmt.Errorf("make the slot of peer %s again after the promotion: %w", peer, err)
		}
		p.log.Warn("this server was promoted from a standby without the peers' slots: made the slot of a peer again; the group repairs what no stream carried once the peers stream",
			"peer", peer, "timeline", timeline, "start_lsn", start)
	}
	if err := p.announce(ctx); err != nil {
		return err
	}
	select {
	case p.wake <- struct{}{}:
	default: // one pending signal covers many
	}
	return nil
}

// announce tells the peers where their slots made again start. Until a
// peer is told, it does not stream, so its slot has not moved since it was
// made.
func (p *promotion) announce(ctx context.Context) error {
	_, err := p.db.Exec(ctx, `UPDATE pgmesh.recreated_slot r SET start_lsn = s.confirmed_flush_lsn
		FROM pg_catalog.pg_replication_slots s
		WHERE r.start_lsn IS NULL AND s.slot_name = 'pgmesh_' || r.peer AND s.database = current_database()
		  AND s.confirmed_flush_lsn IS NOT NULL`)
	if err != nil {
		return fmt.Errorf("record where the slots made again start: %w", err)
	}
	return nil
}

// run repairs each promotion this node recovered from, once every peer
// streams again in both directions, until the repair has run to the end.
// It looks at start and when remake made slots, and every 5 s while a
// repair is pending.
func (p *promotion) run(ctx context.Context) {
	for {
		pending, problem, err := p.repairLast(ctx)
		if err != nil {
			problem = err.Error()
		}
		var problems []string
		if problem != "" {
			problems = []string{problem}
		}
		p.problems.set("promotion", problems)
		var retry <-chan time.Time
		if pending || err != nil {
			retry = time.After(reconcileEvery)
		}
		select {
		case <-ctx.Done():
			return
		case <-p.wake:
		case <-retry:
		}
	}
}

// repairLast repairs the last promotion if it is not yet repaired and the
// peers stream. It says whether a repair is still pending, and what keeps
// it waiting, if anything.
func (p *promotion) repairLast(ctx context.Context) (pending bool, waiting string, err error) {
	last, err := p.read(ctx)
	if last == nil || err != nil {
		return false, "", err
	}
	if last.RepairedAt != nil {
		return false, "", nil
	}
	if w := p.waiting(last.Peers); w != "" {
		return true, fmt.Sprintf("after the promotion to timeline %d, the repair of what no stream carried waits for %s", last.Timeline, w), nil
	}
	p.log.Info("repairing what the promotion left different: comparing every replicated table with the peers", "timeline", last.Timeline)
	rows, rerr := p.repair(ctx)
	if rerr != nil {
		if _, err := p.db.Exec(ctx, `UPDATE pgmesh.promotion SET last_error = $2 WHERE timeline = $1`, last.Timeline, rerr.Error()); err != nil {
			return true, "", errors.Join(rerr, err)
		}
		return true, fmt.Sprintf("the repair after the promotion to timeline %d failed and is tried again: %v", last.Timeline, rerr), nil
	}
	if _, err := p.db.Exec(ctx, `UPDATE pgmesh.promotion SET repaired_at = now(), repaired_rows = $2, last_error = NULL WHERE timeline = $1`,
		last.Timeline, rows); err != nil {
		return true, "", fmt.Errorf("record the repair after the promotion: %w", err)
	}
	p.log.Warn("repaired what the promotion left different", "timeline", last.Timeline, "rows", rows)
	_, err = p.read(ctx)
	return false, "", err
}

// read reads the last promotion this node recovered from (nil: none), and
// keeps it for status.
func (p *promotion) read(ctx context.Context) (*api.PromotionStatus, error) {
	var s api.PromotionStatus
	err := p.db.QueryRow(ctx, `SELECT timeline, peers, detected_at, repaired_at, repaired_rows, coalesce(last_error, '')
		FROM pgmesh.promotion ORDER BY timeline DESC LIMIT 1`).Scan(&s.Timeline, &s.Peers, &s.DetectedAt, &s.RepairedAt, &s.RepairedRows, &s.LastError)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the last promotion: %w", err)
	}
	p.last.set([]api.PromotionStatus{s})
	return &s, nil
}

// status is the last promotion, or nil.
func (p *promotion) status() *api.PromotionStatus {
	if l := p.last.get(); len(l) > 0 {
		return &l[0]
	}
	return nil
}

// joinWaiting says what a repair waits for, from the peers whose slots
// here are idle and those whose streams to this node are down.
func joinWaiting(idle, down []string) string {
	var w []string
	if len(idle) > 0 {
		w = append(w, "the streams of "+strings.Join(idle, ", ")+" from this node")
	}
	if len(down) > 0 {
		w = append(w, "this node's streams from "+strings.Join(down, ", "))
	}
	return strings.Join(w, " and ")
}

// streamsNotBack says which streams between this node and those of peers
// still active are not back ("" once all are): compare settles on what
// each node has applied of the others, which needs every stream.
func (d *Daemon) streamsNotBack(peers []string) string {
	if g, _ := d.store.Group(); g != nil {
		peers = slices.DeleteFunc(slices.Clone(peers), func(p string) bool {
			n := g.Nodes[p]
			return n == nil || n.State != membership.Active
		})
	}
	// The slot check's last reading (every 5 s) says which slots a peer
	// streams from.
	active := map[string]bool{}
	for _, s := range d.slots.found.get() {
		active[s.Peer] = s.Active
	}
	var idle []string
	for _, p := range peers {
		if !active[p] {
			idle = append(idle, p)
		}
	}
	var down []string
	for _, s := range d.reconciler.streams.statuses() {
		if !s.Connected {
			down = append(down, s.Peer)
		}
	}
	return joinWaiting(idle, down)
}
