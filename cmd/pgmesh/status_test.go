package main

import (
	"strings"
	"testing"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/replicator"
)

// What keeps a failover from being safe is in the text status, not only
// in --json.
func TestStatusShowsStandbys(t *testing.T) {
	var out strings.Builder
	printStatus(&out, api.StatusReport{Node: "a", State: "active",
		Peers: []replicator.Status{{Peer: "b", Connected: true, HeldForStandbys: "the standbys have flushed only up to 0/3000000"}},
		Standbys: []api.StandbyStatus{
			{Server: "10.0.1.6:5432", Ready: true},
			{Server: "10.0.1.7:5432", Reason: "hot_standby_feedback is off"},
		}})
	for _, want := range []string{
		"confirmations to b held: the standbys have flushed only up to 0/3000000",
		"10.0.1.6:5432  ready",
		"10.0.1.7:5432  not ready: hot_standby_feedback is off",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("status lacks %q:\n%s", want, out.String())
		}
	}
}
