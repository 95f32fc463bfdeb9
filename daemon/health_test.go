package daemon

import (
	"slices"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

func TestStreamReasons(t *testing.T) {
	now := time.Date(2026, 12, 2, 12, 0, 0, 0, time.UTC)
	g := &membership.Group{Nodes: map[string]*membership.Node{
		"a": {Name: "a", ID: 1, State: membership.Active},
		"b": {Name: "b", ID: 2, State: membership.Active},
		"c": {Name: "c", ID: 3, State: membership.Active},
		"d": {Name: "d", ID: 4, State: membership.Active},
		"e": {Name: "e", ID: 5, State: membership.Joining},
	}}
	briefly, long := now.Add(-5*time.Second), now.Add(-time.Minute)
	cases := []struct {
		name     string
		statuses []replicator.Status
		want     []string
	}{
		{"all connected and current", []replicator.Status{
			{Peer: "b", Connected: true, LagSeconds: 1}, {Peer: "c", Connected: true}, {Peer: "d", Connected: true}}, nil},
		{"briefly disconnected is healthy", []replicator.Status{
			{Peer: "b", DisconnectedSince: &briefly, LagSeconds: 99}, {Peer: "c", Connected: true}, {Peer: "d", Connected: true}}, nil},
		{"long disconnected, lagging, clock ahead, missing", []replicator.Status{
			{Peer: "b", DisconnectedSince: &long}, {Peer: "c", Connected: true, LagSeconds: 31},
			{Peer: "d", Connected: true, ClockWarning: "d's clock is ahead"}}, []string{
			"stream from b has been disconnected for 1m0s",
			"stream from c lags 31s (health_max_lag 30s)",
			"d's clock is ahead"}},
		{"an active peer without a stream; a joining one is not missed", []replicator.Status{
			{Peer: "c", Connected: true}}, []string{"no stream from b yet", "no stream from d yet"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := streamReasons(g, "a", c.statuses, 30*time.Second, now)
			if !slices.Equal(got, c.want) {
				t.Fatalf("got %q, want %q", got, c.want)
			}
		})
	}
}
