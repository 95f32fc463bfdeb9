package daemon

import (
	"context"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metricsHandler serves the Prometheus metrics, read from status at each
// scrape, so they never disagree with pgmesh status.
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
	descParked       = prometheus.NewDesc("pgmesh_parked_changes", "Changes from a peer parked here until pgmesh replay, by table.", []string{"peer", "table"}, nil)
	descStandbyReady = prometheus.NewDesc("pgmesh_standby_ready", "1 while a failover to the standby would lose nothing and keep every peer streaming.", []string{"server"}, nil)
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
	for _, p := range rep.Parked {
		g(descParked, float64(p.Changes), p.Peer, p.Table)
	}
	for _, s := range rep.Standbys {
		g(descStandbyReady, b2f(s.Ready), s.Server)
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
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	g(descHealthy, b2f(c.d.healthWith(ctx, rep.Parked, nil).Status == "ok"))
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
