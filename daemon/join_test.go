package daemon

import (
	"context"
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
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

// fakeMember answers as another member's daemon would, without HTTP.
type fakeMember struct {
	applied []string // AppliedLSN of peer "a" in successive Status answers
	calls   int
	paused  string // the pause ID handed out
	resumed []string
}

func (f *fakeMember) Addr() string { return "fake:7400" }

func (f *fakeMember) Status(context.Context) (api.StatusReport, error) {
	i := min(f.calls, len(f.applied)-1)
	f.calls++
	return api.StatusReport{Peers: []replicator.Status{{Peer: "a", AppliedLSN: f.applied[i]}}}, nil
}

func (f *fakeMember) Pause(context.Context) (api.PauseResponse, error) {
	f.paused = "p1"
	return api.PauseResponse{ID: f.paused}, nil
}

func (f *fakeMember) Resume(_ context.Context, req api.ResumeRequest) (api.ResumeResponse, error) {
	f.resumed = append(f.resumed, req.ID)
	return api.ResumeResponse{Held: true}, nil
}

// A join waits until the source has applied a member's changes up to the
// member's new slot, and says whom it waited for when it gives up.
func TestWaitApplied(t *testing.T) {
	ctx := context.Background()
	m := &fakeMember{applied: []string{"0/100", "0/1FF", "0/200"}}
	if err := waitApplied(ctx, m, "a", 0x200, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	if m.calls != 3 {
		t.Fatalf("asked %d times, want 3 (until 0/200 was applied)", m.calls)
	}
	stuck := &fakeMember{applied: []string{"0/100"}}
	err := waitApplied(ctx, stuck, "a", 0x200, 500*time.Millisecond)
	if err == nil || !strings.Contains(err.Error(), "fake:7400 has not applied a's changes up to 0/200") {
		t.Fatalf("stuck: %v", err)
	}
}

// The source's streams resume under the pause they were held by.
func TestPauseApplyResumesItsPause(t *testing.T) {
	ctx := context.Background()
	m := &fakeMember{}
	resume, err := pauseApply(ctx, m)
	if err != nil {
		t.Fatal(err)
	}
	held, err := resume(ctx)
	if err != nil || !held || !slices.Equal(m.resumed, []string{"p1"}) {
		t.Fatalf("resume: held %t, err %v, resumed %v", held, err, m.resumed)
	}
}
