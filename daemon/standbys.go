package daemon

import (
	"context"
	"fmt"
	"slices"
	"strings"
)

// checkStandbys reports what, as far as this primary can tell, would make a
// failover to one of its standbys (standby_slots) lose changes or stop the
// peers' streams. Only PostgreSQL 17+ keeps the peers' slots on a standby
// (failover slots); before it there is nothing to check here
// (docs/high-availability.md).
func (d *Daemon) checkStandbys(ctx context.Context, problems *[]string) error {
	if len(d.cfg.StandbySlots) == 0 {
		return nil
	}
	var version int
	if err := d.db.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		return fmt.Errorf("read the server version: %w", err)
	}
	if version < 170000 {
		return nil
	}
	var synchronized string
	var notFailover []string
	err := d.db.QueryRow(ctx, `SELECT current_setting('synchronized_standby_slots'),
		ARRAY(SELECT slot_name FROM pg_catalog.pg_replication_slots WHERE slot_name LIKE 'pgmesh\_%'
		      AND database = current_database() AND NOT failover ORDER BY 1)`).Scan(&synchronized, &notFailover)
	if err != nil {
		return fmt.Errorf("read the failover settings of the standbys: %w", err)
	}
	have := strings.Split(synchronized, ",")
	for i := range have {
		have[i] = strings.Trim(strings.TrimSpace(have[i]), `"`)
	}
	var missing []string
	for _, s := range d.cfg.StandbySlots {
		if !slices.Contains(have, s) {
			missing = append(missing, s)
		}
	}
	if len(missing) > 0 {
		*problems = append(*problems, fmt.Sprintf("standby slots %s are not in synchronized_standby_slots, so peers may receive changes those standbys lack, which a failover to one of them would lose here but not there: ALTER SYSTEM SET synchronized_standby_slots = '%s'; SELECT pg_reload_conf();",
			strings.Join(missing, ", "), strings.Join(d.cfg.StandbySlots, ",")))
	}
	if len(notFailover) > 0 {
		*problems = append(*problems, fmt.Sprintf("slots %s are not failover slots (made before PostgreSQL 17 or by an older pgmesh), so no standby keeps them and those peers' streams from this node stop at a failover: while the peer's daemon is stopped, run ALTER_REPLICATION_SLOT name (FAILOVER) on a replication connection here, or part and rejoin the peer",
			strings.Join(notFailover, ", ")))
	}
	return nil
}
