package daemon

import (
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// Tombstones are pruned only behind what every active peer's stream has
// applied, less the margin; while any active peer's is unknown, none are.
func TestTombstoneHorizon(t *testing.T) {
	now := time.Date(2026, 12, 2, 8, 0, 0, 0, time.UTC)
	at := func(s int) *time.Time { v := now.Add(time.Duration(s) * time.Second); return &v }
	g := &membership.Group{Nodes: map[string]*membership.Node{
		"a": {Name: "a", State: membership.Active},
		"b": {Name: "b", State: membership.Active},
		"c": {Name: "c", State: membership.Active},
		"d": {Name: "d", State: membership.Parted},
	}}
	cases := []struct {
		what    string
		g       *membership.Group
		streams []replicator.Status
		want    time.Time
		ok      bool
	}{
		{"no group", nil, nil, time.Time{}, false},
		{"the slower peer bounds it", g, []replicator.Status{{Peer: "b", AppliedThrough: at(-5)}, {Peer: "c", AppliedThrough: at(-30)}}, now.Add(-30*time.Second - tombstoneMargin), true},
		{"a peer not heard of yet", g, []replicator.Status{{Peer: "b", AppliedThrough: at(-5)}}, time.Time{}, false},
		{"a peer that applied nothing yet", g, []replicator.Status{{Peer: "b", AppliedThrough: at(-5)}, {Peer: "c"}}, time.Time{}, false},
		{"alone", &membership.Group{Nodes: map[string]*membership.Node{"a": {Name: "a", State: membership.Active}}}, nil, now.Add(-tombstoneMargin), true},
	}
	for _, c := range cases {
		got, ok := tombstoneHorizon(c.g, "a", c.streams, now)
		if ok != c.ok || !got.Equal(c.want) {
			t.Errorf("%s: %v %t, want %v %t", c.what, got, ok, c.want, c.ok)
		}
	}
}
