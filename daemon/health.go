package daemon

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
)

// health decides whether this node is ready to serve: its Postgres answers,
// it is an active member, and every active peer's stream is connected (or
// was only briefly not) and within health_max_lag.
func (d *Daemon) health(ctx context.Context) api.HealthReport {
	rep := api.HealthReport{Status: "ok", Node: d.cfg.NodeName}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := d.db.Ping(pctx); err != nil {
		rep.Reasons = append(rep.Reasons, "local Postgres does not answer: "+err.Error())
	}
	g, _ := d.store.Group()
	var me *membership.Node
	if g != nil {
		me = g.Nodes[d.cfg.NodeName]
	}
	switch {
	case me == nil:
		rep.Reasons = append(rep.Reasons, "this node is not in a node group")
	case me.State != membership.Active:
		rep.Reasons = append(rep.Reasons, "this node is "+string(me.State))
	default:
		streams := map[string]bool{}
		max := d.cfg.HealthMaxLag
		for _, s := range d.streamStatuses() {
			streams[s.Peer] = true
			lag := time.Duration(s.LagSeconds * float64(time.Second))
			if !s.Connected && s.DisconnectedSince != nil {
				lag = time.Since(*s.DisconnectedSince)
				if lag > max {
					rep.Reasons = append(rep.Reasons, fmt.Sprintf("stream from %s has been disconnected for %s", s.Peer, lag.Round(time.Second)))
				}
				continue
			}
			if lag > max {
				rep.Reasons = append(rep.Reasons, fmt.Sprintf("stream from %s lags %s (health_max_lag %s)", s.Peer, lag.Round(time.Second), max))
			}
			if s.ClockWarning != "" {
				rep.Reasons = append(rep.Reasons, s.ClockWarning)
			}
		}
		for _, n := range g.Nodes {
			if n.Name != me.Name && n.State == membership.Active && !streams[n.Name] {
				rep.Reasons = append(rep.Reasons, "no stream from "+n.Name+" yet")
			}
		}
	}
	if len(rep.Reasons) > 0 {
		rep.Status = "unhealthy"
	}
	return rep
}

func (d *Daemon) handleHealth(w http.ResponseWriter, r *http.Request) {
	rep := d.health(r.Context())
	code := http.StatusOK
	if rep.Status != "ok" {
		code = http.StatusServiceUnavailable
	}
	writeJSON(w, code, rep)
}

func (d *Daemon) handleWait(w http.ResponseWriter, r *http.Request) {
	var req api.WaitRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	timeout, err := time.ParseDuration(req.Timeout)
	if err != nil || timeout <= 0 {
		writeErr(w, http.StatusBadRequest, fmt.Errorf("timeout %q is not a positive duration", req.Timeout))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout+10*time.Second)
	defer cancel()
	start := time.Now()
	var peers []string
	if len(req.Peers) > 0 {
		peers = req.Peers
	}
	var ok bool
	if err := d.db.QueryRow(ctx, `SELECT pgmesh.wait_for_peers(make_interval(secs => $1), $2)`, timeout.Seconds(), peers).Scan(&ok); err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("wait_for_peers: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, api.WaitResponse{Applied: ok, WaitedMS: time.Since(start).Milliseconds()})
}

// publishProgress keeps pgmesh.peer_progress current, for
// pgmesh.wait_for_origin(), until ctx ends. A position reached by applying
// a transaction is published at once; one reached only because the peer
// reported more WAL with nothing for us in it, at most every
// idleProgressEvery: each publication writes WAL here, which moves the
// peers' positions in turn, and idle nodes would otherwise keep each other
// writing.
func (d *Daemon) publishProgress(ctx context.Context) {
	type published struct {
		lsn    string
		commit time.Time
		at     time.Time
	}
	last := map[string]published{}
	every(ctx, 50*time.Millisecond, func() {
		now := time.Now()
		var names, lsns []string
		var commits []time.Time
		for _, s := range d.streamStatuses() {
			p := last[s.Peer]
			if s.AppliedLSN == "" || s.AppliedLSN == "0/0" || p.lsn == s.AppliedLSN {
				continue
			}
			var commit time.Time
			if s.LastCommitTS != nil {
				commit = *s.LastCommitTS
			}
			if commit.Equal(p.commit) && now.Sub(p.at) < idleProgressEvery {
				continue
			}
			names, lsns, commits = append(names, s.Peer), append(lsns, s.AppliedLSN), append(commits, commit)
		}
		if len(names) == 0 {
			return
		}
		_, err := d.db.Exec(ctx, `INSERT INTO pgmesh.peer_progress AS p (node_name, applied_lsn)
			SELECT n, l::pg_lsn FROM unnest($1::text[], $2::text[]) AS x(n, l)
			ON CONFLICT (node_name) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now()
			WHERE p.applied_lsn < EXCLUDED.applied_lsn`, names, lsns)
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("publish peer progress", "err", err)
			}
			return
		}
		for i, n := range names {
			last[n] = published{lsn: lsns[i], commit: commits[i], at: now}
		}
	})
}

// idleProgressEvery bounds how often progress that no applied transaction
// made is published (see publishProgress).
const idleProgressEvery = time.Second

// metricsHandler serves the Prometheus metrics, read from status at each
// scrape.
func (d *Daemon) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(&collector{d: d}, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return promhttp.HandlerFor(reg, promhttp.HandlerOpts{})
}

var (
	descConnected    = prometheus.NewDesc("pgmesh_peer_connected", "1 while the stream from the peer is connected.", []string{"peer"}, nil)
	descLagBytes     = prometheus.NewDesc("pgmesh_peer_lag_bytes", "Peer WAL not yet applied here, in bytes.", []string{"peer"}, nil)
	descLagSeconds   = prometheus.NewDesc("pgmesh_peer_lag_seconds", "How long the oldest peer change not applied here has waited.", []string{"peer"}, nil)
	descTxns         = prometheus.NewDesc("pgmesh_applied_transactions_total", "Peer transactions applied here.", []string{"peer"}, nil)
	descRows         = prometheus.NewDesc("pgmesh_applied_rows_total", "Row changes applied here.", []string{"peer"}, nil)
	descDropped      = prometheus.NewDesc("pgmesh_forwarded_transactions_dropped_total", "Transactions a peer forwarded from a third node, dropped (loop prevention).", []string{"peer"}, nil)
	descErrors       = prometheus.NewDesc("pgmesh_apply_errors_total", "Times the stream from the peer stopped on an error.", []string{"peer"}, nil)
	descCommits      = prometheus.NewDesc("pgmesh_apply_local_commits_total", "Local transactions that applied the peer's transactions (consecutive ones share a commit).", []string{"peer"}, nil)
	descClockWaits   = prometheus.NewDesc("pgmesh_apply_clock_waits_total", "Local commits that waited for this node's clock to pass the peer's commit time.", []string{"peer"}, nil)
	descClockSkew    = prometheus.NewDesc("pgmesh_peer_clock_skew_seconds", "How far the peer's Postgres clock is ahead of this node's (negative: behind).", []string{"peer"}, nil)
	descRetried      = prometheus.NewDesc("pgmesh_apply_retried_transactions_total", "Transactions that left the pipelined fast path and were applied again carefully.", []string{"peer"}, nil)
	descConflicts    = prometheus.NewDesc("pgmesh_conflicts_total", "Conflicts settled here, by type and resolution.", []string{"peer", "type", "resolution"}, nil)
	descSlotRetained = prometheus.NewDesc("pgmesh_slot_retained_wal_bytes", "WAL the peer's slot holds back on this node.", []string{"peer"}, nil)
	descSlotLagging  = prometheus.NewDesc("pgmesh_slot_lagging", "1 when the peer's slot holds more WAL than wal_retention_warn.", []string{"peer"}, nil)
	descRaftLeader   = prometheus.NewDesc("pgmesh_raft_leader", "1 while this node leads the Raft group.", nil, nil)
	descRaftState    = prometheus.NewDesc("pgmesh_raft_state", "This node's Raft state (1 for the current one).", []string{"state"}, nil)
	descNodes        = prometheus.NewDesc("pgmesh_nodes", "Members of the node group by state.", []string{"state"}, nil)
	descHealthy      = prometheus.NewDesc("pgmesh_healthy", "1 while GET /health answers 200.", nil, nil)
)

type collector struct{ d *Daemon }

func (c *collector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	rep := c.d.Status()
	g := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.GaugeValue, v, labels...)
	}
	counter := func(desc *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(desc, prometheus.CounterValue, v, labels...)
	}
	for _, p := range rep.Peers {
		g(descConnected, b2f(p.Connected), p.Peer)
		g(descLagBytes, float64(p.LagBytes), p.Peer)
		g(descLagSeconds, p.LagSeconds, p.Peer)
		counter(descTxns, float64(p.AppliedTxns), p.Peer)
		counter(descRows, float64(p.AppliedRows), p.Peer)
		counter(descDropped, float64(p.DroppedTxns), p.Peer)
		counter(descErrors, float64(p.Errors), p.Peer)
		counter(descRetried, float64(p.RetriedTxns), p.Peer)
		counter(descCommits, float64(p.LocalCommits), p.Peer)
		counter(descClockWaits, float64(p.ClockWaits), p.Peer)
		if p.ClockSkew != nil {
			g(descClockSkew, *p.ClockSkew, p.Peer)
		}
		for kind, n := range p.ConflictsByResolution {
			typ, res := splitKind(kind)
			counter(descConflicts, float64(n), p.Peer, typ, res)
		}
	}
	for _, s := range rep.Slots {
		g(descSlotRetained, float64(s.RetainedBytes), s.Peer)
		g(descSlotLagging, b2f(s.Lagging), s.Peer)
	}
	g(descRaftLeader, b2f(rep.RaftLeader == rep.Node && rep.RaftLeader != ""))
	g(descRaftState, 1, rep.RaftState)
	states := map[string]float64{}
	for _, n := range rep.Nodes {
		states[string(n.State)]++
	}
	for st, n := range states {
		g(descNodes, n, st)
	}
	g(descHealthy, b2f(c.d.health(context.Background()).Status == "ok"))
}

func splitKind(kind string) (string, string) {
	for i := range kind {
		if kind[i] == '/' {
			return kind[:i], kind[i+1:]
		}
	}
	return kind, ""
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
