package daemon

import (
	"context"
	"fmt"
	"sort"
	"strconv"
	"strings"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
)

// checkSlots reports the WAL each peer's slot retains here, warns past
// wal_retention_warn, and drops a slot whose peer is away past
// wal_retention_max, so a region that is gone cannot fill this disk. A peer
// whose slot is gone must be parted and join again.
func (d *Daemon) checkSlots(ctx context.Context, g *membership.Group, problems *[]string) error {
	rows, err := d.db.Query(ctx, `SELECT slot_name, coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn), 0)::bigint, active
		FROM pg_replication_slots WHERE slot_name LIKE 'pgmesh\_%' AND database = current_database()`)
	if err != nil {
		return fmt.Errorf("read replication slots: %w", err)
	}
	var slots []api.SlotStatus
	for rows.Next() {
		var name string
		var s api.SlotStatus
		if err := rows.Scan(&name, &s.RetainedBytes, &s.Active); err != nil {
			return err
		}
		s.Peer, _ = origin.NodeOf(name)
		slots = append(slots, s)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	have := map[string]bool{}
	kept := slots[:0]
	for _, s := range slots {
		have[s.Peer] = true
		max, warn := d.cfg.WALRetentionMax, d.cfg.WALRetentionWarn
		switch {
		case max > 0 && s.RetainedBytes > max && !s.Active:
			conn, err := d.db.Acquire(ctx)
			if err != nil {
				return err
			}
			err = dropSlot(ctx, conn.Conn(), origin.SlotName(s.Peer))
			conn.Release()
			if err != nil {
				return err
			}
			msg := fmt.Sprintf("dropped the slot of peer %s: it held %s of WAL here, past wal_retention_max (%s); %s must be parted and join again", s.Peer, FormatSize(s.RetainedBytes), FormatSize(max), s.Peer)
			d.log.Error(msg)
			delete(have, s.Peer)
			continue
		case warn > 0 && s.RetainedBytes > warn:
			s.Lagging = true
			*problems = append(*problems, fmt.Sprintf("peer %s is lagging: its slot holds %s of WAL here (wal_retention_warn %s); if it is gone for good, part it (pgmesh node part %s --force)", s.Peer, FormatSize(s.RetainedBytes), FormatSize(warn), s.Peer))
		}
		kept = append(kept, s)
	}
	if g != nil {
		if me := g.Nodes[d.cfg.NodeName]; me != nil && me.State == membership.Active {
			for _, n := range g.Sorted() {
				if n.Name != me.Name && n.State == membership.Active && !have[n.Name] {
					*problems = append(*problems, fmt.Sprintf("peer %s has no slot here (dropped?), so it cannot receive this node's changes: part it and join it again", n.Name))
				}
			}
		}
	}
	sort.Slice(kept, func(i, j int) bool { return kept[i].Peer < kept[j].Peer })
	d.mu.Lock()
	d.slots = kept
	d.mu.Unlock()
	return nil
}

// ParseSize reads a size like 512MB, 1GB, 64kB or a plain byte count
// (units of 1024, as in postgresql.conf).
func ParseSize(s string) (int64, error) {
	s = strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   int64
	}{{"TB", 1 << 40}, {"GB", 1 << 30}, {"MB", 1 << 20}, {"kB", 1 << 10}, {"KB", 1 << 10}, {"B", 1}}
	mult := int64(1)
	for _, u := range units {
		if strings.HasSuffix(s, u.suffix) {
			s, mult = strings.TrimSpace(strings.TrimSuffix(s, u.suffix)), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("not a size")
	}
	return n * mult, nil
}

// FormatSize prints a byte count the way ParseSize reads it.
func FormatSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1fGB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1fMB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1fkB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%dB", n)
}
