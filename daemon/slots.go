package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"sort"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/bytesize"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
)

// slotCheck watches the slots peers consume here.
type slotCheck struct {
	self      string
	db        *pgxpool.Pool
	max, warn int64 // wal_retention_max, wal_retention_warn
	log       *slog.Logger
	promotion *promotion
	// found is what the last check found, for status.
	found latest[api.SlotStatus]
}

// check reports the WAL each peer's slot retains here, warns past
// wal_retention_warn, and drops a slot whose peer is away past
// wal_retention_max, so a region that is gone cannot fill this disk. A peer
// whose slot is gone must be parted and join again.
func (sc *slotCheck) check(ctx context.Context, g *membership.Group, problems *[]string) error {
	slots, err := readSlots(ctx, sc.db)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	kept := slots[:0]
	for _, s := range slots {
		have[s.Peer] = true
		max, warn := sc.max, sc.warn
		switch {
		case max > 0 && s.RetainedBytes > max && !s.Active:
			conn, err := sc.db.Acquire(ctx)
			if err != nil {
				return err
			}
			err = dropSlot(ctx, conn.Conn(), origin.SlotName(s.Peer))
			conn.Release()
			if err != nil {
				return err
			}
			msg := fmt.Sprintf("dropped the slot of peer %s: it held %s of WAL here, past wal_retention_max (%s); %s must be parted and join again", s.Peer, bytesize.Format(s.RetainedBytes), bytesize.Format(max), s.Peer)
			sc.log.Error(msg)
			delete(have, s.Peer)
			continue
		case warn > 0 && s.RetainedBytes > warn:
			s.Lagging = true
			*problems = append(*problems, fmt.Sprintf("peer %s is lagging: its slot holds %s of WAL here (wal_retention_warn %s); if it is gone for good, part it (pgmesh node part %s --force)", s.Peer, bytesize.Format(s.RetainedBytes), bytesize.Format(warn), s.Peer))
		}
		kept = append(kept, s)
	}
	// Slots lost to a promotion are made again; only the others are missing.
	missing, err := sc.promotion.check(ctx, missingSlots(g, sc.self, have))
	if err != nil {
		return err
	}
	for _, peer := range missing {
		*problems = append(*problems, fmt.Sprintf("peer %s has no slot here (dropped?), so it cannot receive this node's changes: part it and join it again", peer))
	}
	sort.Slice(kept, func(i, j int) bool { return kept[i].Peer < kept[j].Peer })
	sc.found.set(kept)
	return nil
}

// readSlots reads the pgmesh slots of this database: whose, how much WAL
// each retains, and whether a peer is streaming from it.
func readSlots(ctx context.Context, db *pgxpool.Pool) ([]api.SlotStatus, error) {
	rows, err := db.Query(ctx, `SELECT slot_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, active
		FROM pg_replication_slots WHERE slot_name LIKE 'pgmesh\_%' AND database = current_database()`)
	if err != nil {
		return nil, fmt.Errorf("read replication slots: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (api.SlotStatus, error) {
		var name string
		var s api.SlotStatus
		err := r.Scan(&name, &s.RetainedBytes, &s.Active)
		s.Peer, _ = origin.NodeOf(name)
		return s, err
	})
}

// missingSlots lists the active peers with no slot here (have: the peers
// that have one), once this node is active itself: before, its slots are
// still being made.
func missingSlots(g *membership.Group, self string, have map[string]bool) []string {
	var missing []string
	if g == nil {
		return nil
	}
	if me := g.Nodes[self]; me == nil || me.State != membership.Active {
		return nil
	}
	for _, n := range g.Sorted() {
		if n.Name != self && n.State == membership.Active && !have[n.Name] {
			missing = append(missing, n.Name)
		}
	}
	return missing
}
