package daemon

import (
	"context"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/pgsession"
)

// standbyWatch is the owner of what this node knows of its standbys.
type standbyWatch struct {
	dsn      string   // the node's dsn, which names the standbys too
	slots    []string // standby_slots
	db       *pgxpool.Pool
	problems *problemLog
	last     latest[api.StandbyStatus] // for status, /health and /metrics
}

// run looks, every few seconds, at what would make a failover
// of this node's primary to one of its standbys lose changes or stop the
// peers' streams: from the primary (checkStandbySettings) and from each
// standby that dsn names (checkStandby). Both are reported in status, the
// second also in /health (as a warning) and /metrics.
func (sw *standbyWatch) run(ctx context.Context) {
	servers, err := otherServers(sw.dsn)
	if err != nil || (len(servers) == 0 && len(sw.slots) == 0) {
		return // a single server, and no standby to wait for: nothing to watch
	}
	for {
		// The primary is read once a pass, for both checks.
		p, err := sw.readPrimary(ctx)
		problems := sw.checkStandbySettings(p)
		if err != nil {
			problems = []string{err.Error()}
		}
		sw.problems.set("standbys", problems)
		var report []api.StandbyStatus
		for _, s := range servers {
			if st, ok := sw.checkStandby(ctx, s, p, err); ok {
				report = append(report, st)
			}
		}
		sw.last.set(report)
		select {
		case <-ctx.Done():
			return
		case <-time.After(reconcileEvery):
		}
	}
}

// otherServers returns a session config for each server dsn names, one
// host each, without the check that picks the primary.
func otherServers(dsn string) ([]*pgx.ConnConfig, error) {
	cfg, err := pgsession.Config(dsn, "pgmesh standby check")
	if err != nil {
		return nil, err
	}
	all := append([]*pgconn.FallbackConfig{{Host: cfg.Host, Port: cfg.Port, TLSConfig: cfg.TLSConfig}}, cfg.Fallbacks...)
	// One config per server, trying its variants (with TLS and without,
	// under sslmode=prefer) in order.
	var out []*pgx.ConnConfig
	byAddr := map[string]*pgx.ConnConfig{}
	for _, f := range all {
		addr := net.JoinHostPort(f.Host, strconv.Itoa(int(f.Port)))
		if c, ok := byAddr[addr]; ok {
			c.Fallbacks = append(c.Fallbacks, f)
			continue
		}
		c := cfg.Copy()
		c.Host, c.Port, c.TLSConfig = f.Host, f.Port, f.TLSConfig
		c.Fallbacks, c.ValidateConnect = nil, nil
		c.ConnectTimeout = 5 * time.Second
		byAddr[addr] = c
		out = append(out, c)
	}
	if len(out) < 2 {
		return nil, nil // the primary alone
	}
	return out, nil
}

// primaryView is what the standby checks need of this node's primary.
type primaryView struct {
	version int
	// synchronized is synchronized_standby_slots (17+): the standbys whose
	// flush logical walsenders wait for.
	synchronized []string
	// slots are the pgmesh slots here, and notFailover those of them no
	// standby keeps (17+).
	slots, notFailover []string
}

func (sw *standbyWatch) readPrimary(ctx context.Context) (primaryView, error) {
	var p primaryView
	var synchronized string
	err := sw.db.QueryRow(ctx, `SELECT current_setting('server_version_num')::int,
		coalesce(current_setting('synchronized_standby_slots', true), ''),
		ARRAY(SELECT slot_name FROM pg_catalog.pg_replication_slots
		      WHERE slot_name LIKE 'pgmesh\_%' AND database = current_database() ORDER BY 1)`).Scan(&p.version, &synchronized, &p.slots)
	if err != nil {
		return p, fmt.Errorf("read this primary's slots and failover settings: %w", err)
	}
	for _, s := range strings.Split(synchronized, ",") {
		if s = strings.Trim(strings.TrimSpace(s), `"`); s != "" {
			p.synchronized = append(p.synchronized, s)
		}
	}
	if p.version >= 170000 {
		err = sw.db.QueryRow(ctx, `SELECT ARRAY(SELECT slot_name FROM pg_catalog.pg_replication_slots
			WHERE slot_name LIKE 'pgmesh\_%' AND database = current_database() AND NOT failover ORDER BY 1)`).Scan(&p.notFailover)
		if err != nil {
			return p, fmt.Errorf("read which pgmesh slots are failover slots: %w", err)
		}
	}
	return p, nil
}

// checkStandbySettings reports, from the primary, standbys whose changes
// peers may receive before them, and slots a standby cannot keep. Only
// PostgreSQL 17+ keeps the peers' slots on a standby (failover slots).
func (sw *standbyWatch) checkStandbySettings(p primaryView) []string {
	if len(sw.slots) == 0 || p.version < 170000 {
		return nil
	}
	var problems, missing []string
	for _, s := range sw.slots {
		if !slices.Contains(p.synchronized, s) {
			missing = append(missing, s)
		}
	}
	if len(missing) > 0 {
		problems = append(problems, fmt.Sprintf("standby slots %s are not in synchronized_standby_slots, so peers may receive changes those standbys lack, which a failover to one of them would lose here but not there: ALTER SYSTEM SET synchronized_standby_slots = '%s'; SELECT pg_reload_conf();",
			strings.Join(missing, ", "), strings.Join(sw.slots, ",")))
	}
	if len(p.notFailover) > 0 {
		problems = append(problems, fmt.Sprintf("slots %s are not failover slots (made before PostgreSQL 17 or by an older pgmesh), so no standby keeps them and those peers' streams from this node stop at a failover: while the peer's daemon is stopped, run ALTER_REPLICATION_SLOT name (FAILOVER) on a replication connection here, or part and rejoin the peer",
			strings.Join(p.notFailover, ", ")))
	}
	return problems
}

// checkStandby says whether a failover to the server s would be safe,
// given the primary as p shows it (read with error primaryErr); ok is
// false when s is not a standby (it is the primary).
func (sw *standbyWatch) checkStandby(ctx context.Context, s *pgx.ConnConfig, p primaryView, primaryErr error) (st api.StandbyStatus, ok bool) {
	st.Server = net.JoinHostPort(s.Host, strconv.Itoa(int(s.Port)))
	conn, err := pgx.ConnectConfig(ctx, s)
	if err != nil {
		return api.StandbyStatus{Server: st.Server, Reason: "cannot connect: " + redactErr(err)}, true
	}
	defer conn.Close(context.Background())
	var standby bool
	var version int
	var feedback, slot string
	err = conn.QueryRow(ctx, `SELECT pg_catalog.pg_is_in_recovery(), current_setting('server_version_num')::int,
		current_setting('hot_standby_feedback'), current_setting('primary_slot_name')`).Scan(&standby, &version, &feedback, &slot)
	if err != nil {
		return api.StandbyStatus{Server: st.Server, Reason: "cannot read its settings: " + err.Error()}, true
	}
	if !standby {
		return st, false
	}
	if primaryErr != nil {
		st.Reason = "cannot tell: " + primaryErr.Error()
		return st, true
	}
	st.Reason, err = sw.standbyUnready(ctx, conn, p, version, feedback, slot)
	if err != nil {
		st.Reason = "cannot read its slots: " + err.Error()
	}
	st.Ready = st.Reason == ""
	if st.Ready && version < 170000 {
		st.Note = fmt.Sprintf("PostgreSQL %d keeps no copy of the peers' slots on a standby: after a failover to it, pgmesh makes them again and compares and repairs every replicated table with the peers (docs/high-availability.md)", version/10000)
	}
	return st, true
}

// standbyUnready returns the first reason a failover to the standby on
// conn would lose changes or stop a peer's stream, or "".
func (sw *standbyWatch) standbyUnready(ctx context.Context, conn *pgx.Conn, p primaryView, version int, feedback, slot string) (string, error) {
	switch {
	case slot == "":
		return "it streams without a slot (primary_slot_name is empty), so the primary may remove WAL it still needs: create a physical slot for it and set primary_slot_name", nil
	case !slices.Contains(sw.slots, slot):
		return fmt.Sprintf("its slot %s is not in standby_slots, so peers may free changes it lacks: add it to standby_slots", slot), nil
	case version < 170000:
		return "", nil // no slots to keep there: see checkStandby's note
	case feedback != "on":
		return "hot_standby_feedback is off, and keeping the peers' slots needs it: set hot_standby_feedback = on there", nil
	}
	var sync string
	if err := conn.QueryRow(ctx, `SELECT current_setting('sync_replication_slots')`).Scan(&sync); err != nil {
		return "", err
	}
	if sync != "on" {
		return "sync_replication_slots is off, so it keeps no copy of the peers' slots: set sync_replication_slots = on there", nil
	}
	if !slices.Contains(p.synchronized, slot) {
		return fmt.Sprintf("the primary's synchronized_standby_slots lacks its slot %s, so peers may receive changes it lacks, which a failover to it would lose here but not there", slot), nil
	}
	// A copy still temporary is dropped at promotion.
	rows, err := conn.Query(ctx, `SELECT slot_name FROM pg_catalog.pg_replication_slots WHERE synced AND NOT temporary`)
	if err != nil {
		return "", err
	}
	have, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return "", err
	}
	var missing []string
	for _, w := range p.slots {
		if !slices.Contains(have, w) {
			missing = append(missing, w)
		}
	}
	if len(missing) > 0 {
		return fmt.Sprintf("it holds no usable copy yet of slots %s (synced, not temporary), which the peers would need after a promotion: wait for it to catch up with the primary's slots", strings.Join(missing, ", ")), nil
	}
	return "", nil
}
