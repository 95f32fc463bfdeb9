package daemon

import (
	"context"
	"fmt"
	"net/http"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// health decides whether this node is ready to serve: its Postgres answers,
// it is an active member, and every active peer's stream is connected (or
// was only briefly not) and within health_max_lag.
func (d *Daemon) health(ctx context.Context) api.HealthReport {
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	parked, err := d.parked(pctx)
	return d.healthWith(pctx, parked, err)
}

// healthWith is health with the parked tables already read (status has
// them, so a metrics scrape reads them once).
func (d *Daemon) healthWith(pctx context.Context, parked []api.ParkedTable, parkedErr error) api.HealthReport {
	rep := api.HealthReport{Status: "ok", Node: d.cfg.NodeName}
	if err := d.db.Ping(pctx); err != nil {
		rep.Reasons = append(rep.Reasons, "local Postgres does not answer: "+err.Error())
	}
	g, _ := d.store.Group()
	var me *membership.Node
	if g != nil {
		me = g.Nodes[d.cfg.NodeName]
	}
	switch {
	case me == nil && d.store.Loading():
		rep.Reasons = append(rep.Reasons, membership.ErrNotLoaded.Error())
	case me == nil:
		rep.Reasons = append(rep.Reasons, "this node is not in a node group")
	case me.State != membership.Active:
		rep.Reasons = append(rep.Reasons, "this node is "+string(me.State))
	default:
		rep.Reasons = append(rep.Reasons, streamReasons(g, me.Name, d.reconciler.streams.statuses(), d.cfg.HealthMaxLag, time.Now())...)
	}
	// Parked changes wait for an operator, but the node serves its
	// applications meanwhile: a warning, not a reason.
	if parkedErr != nil {
		rep.Warnings = append(rep.Warnings, parkedErr.Error())
	}
	for _, p := range parked {
		rep.Warnings = append(rep.Warnings, parkedNote(p))
	}
	for _, s := range d.standbys.last.get() {
		if !s.Ready {
			rep.Warnings = append(rep.Warnings, fmt.Sprintf("standby %s is not ready for a failover: %s", s.Server, s.Reason))
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

// wait waits until this node has applied what its peers had committed when
// it was asked, or the request's timeout passes (pgmesh.wait_for_peers).
func (d *Daemon) wait(ctx context.Context, req api.WaitRequest) (api.WaitResponse, error) {
	timeout, err := time.ParseDuration(req.Timeout)
	if err != nil || timeout <= 0 {
		return api.WaitResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("timeout %q is not a positive duration", req.Timeout))
	}
	ctx, cancel := context.WithTimeout(ctx, timeout+10*time.Second)
	defer cancel()
	start := time.Now()
	var peers []string
	if len(req.Peers) > 0 {
		peers = req.Peers
	}
	var ok bool
	if err := d.db.QueryRow(ctx, `SELECT pgmesh.wait_for_peers(make_interval(secs => $1), $2)`, timeout.Seconds(), peers).Scan(&ok); err != nil {
		return api.WaitResponse{}, fmt.Errorf("wait_for_peers: %w", err)
	}
	return api.WaitResponse{Applied: ok, WaitedMS: time.Since(start).Milliseconds()}, nil
}

// streamReasons are why this node's streams make it unhealthy: an active
// peer without a stream, a stream disconnected or lagging past max, a
// clock warning.
func streamReasons(g *membership.Group, self string, statuses []replicator.Status, max time.Duration, now time.Time) []string {
	var reasons []string
	streams := map[string]bool{}
	for _, s := range statuses {
		streams[s.Peer] = true
		if !s.Connected && s.DisconnectedSince != nil {
			if away := now.Sub(*s.DisconnectedSince); away > max {
				reasons = append(reasons, fmt.Sprintf("stream from %s has been disconnected for %s", s.Peer, away.Round(time.Second)))
			}
			continue
		}
		if lag := time.Duration(s.LagSeconds * float64(time.Second)); lag > max {
			reasons = append(reasons, fmt.Sprintf("stream from %s lags %s (health_max_lag %s)", s.Peer, lag.Round(time.Second), max))
		}
		if s.ClockWarning != "" {
			reasons = append(reasons, s.ClockWarning)
		}
	}
	for _, n := range g.Sorted() {
		if n.Name != self && n.State == membership.Active && !streams[n.Name] {
			reasons = append(reasons, "no stream from "+n.Name+" yet")
		}
	}
	return reasons
}
