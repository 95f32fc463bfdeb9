package daemon

import (
	"maps"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"

	"github.com/pgmesh/pgmesh/membership"
)

func TestPlanJoin(t *testing.T) {
	g := &membership.Group{Nodes: map[string]*membership.Node{
		"a":   {Name: "a", ID: 1, State: membership.Active},
		"b":   {Name: "b", ID: 2, State: membership.Active},
		"c":   {Name: "c", ID: 3, State: membership.Parted},
		"d":   {Name: "d", ID: 4, State: membership.Active},
		"new": {Name: "new", ID: 5, State: membership.Joining},
	}}
	source, others, err := planJoin(g, "new", "b", "b:7400")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, n := range others {
		names = append(names, n.Name)
	}
	if source.Name != "b" || strings.Join(names, ",") != "a,d" {
		t.Fatalf("source %s, others %v: want b, [a d] (active, neither the source nor the joining node)", source.Name, names)
	}
	for _, bad := range []string{"c", "new", "nobody"} {
		if _, _, err := planJoin(g, "new", bad, "x:7400"); err == nil || !strings.Contains(err.Error(), "join through an active member") {
			t.Errorf("joining through %s: %v", bad, err)
		}
	}
}

// Each member's stream starts after what the copy holds of its changes,
// and never before its slot for the new node.
func TestStreamStarts(t *testing.T) {
	slots := map[string]pglogrepl.LSN{"a": 100, "d": 300}
	progress := map[string]pglogrepl.LSN{"a": 150, "d": 250, "b": 999}
	got := streamStarts(slots, "b", 500, progress)
	want := map[string]pglogrepl.LSN{"a": 150, "d": 300, "b": 500}
	if !maps.Equal(got, want) {
		t.Fatalf("starts %v, want %v", got, want)
	}
}
