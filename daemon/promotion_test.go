package daemon

import (
	"slices"
	"testing"

	"github.com/pgmesh/pgmesh/membership"
)

// Slots missing after a promotion are told apart from dropped ones: only
// those are made again.
func TestMissingSlotsAfterAPromotion(t *testing.T) {
	cases := []struct {
		missing    int
		now, whole int64
		promoted   bool
	}{
		{1, 2, 1, true},
		{3, 5, 2, true},
		{0, 2, 1, false}, // every slot is here (17+: failover slots)
		{1, 1, 1, false}, // dropped on this timeline
		{1, 2, 0, false}, // never whole here: nothing to go by
		{1, 3, 3, false},
	}
	for _, c := range cases {
		if got := promotedWithoutSlots(c.missing, c.now, c.whole); got != c.promoted {
			t.Errorf("%d missing on timeline %d, whole on %d: promoted %t, want %t", c.missing, c.now, c.whole, got, c.promoted)
		}
	}
}

// What a repair after a promotion waits for names both directions.
func TestPromotionRepairWaitsForEveryStream(t *testing.T) {
	if got := joinWaiting(nil, nil); got != "" {
		t.Errorf("nothing to wait for: %q", got)
	}
	if got, want := joinWaiting([]string{"b", "c"}, []string{"c"}), "the streams of b, c from this node and this node's streams from c"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

// Only active peers count, and only once this node is active itself.
func TestMissingSlots(t *testing.T) {
	g := &membership.Group{Nodes: map[string]*membership.Node{
		"a": {Name: "a", State: membership.Active},
		"b": {Name: "b", State: membership.Active},
		"c": {Name: "c", State: membership.Active},
		"d": {Name: "d", State: membership.Parted},
		"e": {Name: "e", State: membership.Joining},
	}}
	if got := missingSlots(g, "a", map[string]bool{"b": true}); !slices.Equal(got, []string{"c"}) {
		t.Errorf("missing %v, want [c]", got)
	}
	if got := missingSlots(g, "e", nil); got != nil {
		t.Errorf("a joining node: missing %v", got)
	}
	if got := missingSlots(nil, "a", nil); got != nil {
		t.Errorf("no group: missing %v", got)
	}
}
