package daemon

import (
	"context"
	"errors"
	"log/slog"
	"maps"
	"net/http"
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
	// report, when set, is every Status answer.
	report      *api.StatusReport
	registerErr error
	registered  []api.RegisterRequest
	asked       []string // the addresses a join called it by
}

func (f *fakeMember) Addr() string { return "fake:7400" }

func (f *fakeMember) Status(context.Context) (api.StatusReport, error) {
	if f.report != nil {
		return *f.report, nil
	}
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

func (f *fakeMember) Register(_ context.Context, req api.RegisterRequest) (api.JoinResponse, error) {
	f.registered = append(f.registered, req)
	return api.JoinResponse{Group: "g", Node: &req.Node}, f.registerErr
}

func (f *fakeMember) SetState(context.Context, api.StateRequest) (api.JoinResponse, error) {
	return api.JoinResponse{}, errors.New("not in these tests")
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

// fakeLocal is this node as the join changes it; it records what was done.
type fakeLocal struct {
	joinLocal // what these tests do not reach panics
	empty     error
	token     string
	adopted   []string
}

func (l *fakeLocal) self() membership.Node { return membership.Node{Name: "new", API: "new:7400"} }
func (l *fakeLocal) checkEmpty(context.Context) error {
	return l.empty
}
func (l *fakeLocal) adoptResolution(_ context.Context, nodes map[string]*membership.Node) error {
	l.adopted = slices.Sorted(maps.Keys(nodes))
	return nil
}
func (l *fakeLocal) saveToken(token string) error { l.token = token; return nil }

type fakeStore struct{ g *membership.Group }

func (s fakeStore) Group() (*membership.Group, <-chan struct{}) { return s.g, nil }

func testJoining(g *membership.Group, m *fakeMember, l *fakeLocal) *joining {
	log := slog.New(slog.DiscardHandler)
	return &joining{name: "new", store: fakeStore{g}, local: l, status: &joiner{log: log},
		members: func(addr, token string) member { m.asked = append(m.asked, addr); return m },
		queue:   make(chan api.JoinRequest, 1), log: log}
}

func TestJoinStartRefuses(t *testing.T) {
	active := &membership.Group{Name: "g", Nodes: map[string]*membership.Node{"new": {Name: "new", State: membership.Active}}}
	cases := []struct {
		name   string
		g      *membership.Group
		req    api.JoinRequest
		status int // of the *api.Error, 0 for a plain error (400)
		want   string
	}{
		{"without --via", nil, api.JoinRequest{Token: "t"}, 0, "join needs --via"},
		{"without --token", nil, api.JoinRequest{Via: "a:7400"}, 0, "join needs --via"},
		{"a node already active", active, api.JoinRequest{Via: "a:7400", Token: "t"}, http.StatusConflict, `node "new" is already active in node group "g"`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			j := testJoining(c.g, &fakeMember{}, &fakeLocal{})
			_, err := j.start(context.Background(), c.req)
			ae, _ := errors.AsType[*api.Error](err)
			if err == nil || !strings.Contains(err.Error(), c.want) || (ae != nil) != (c.status != 0) || (ae != nil && ae.Status != c.status) {
				t.Fatalf("got %v, want %q with status %d", err, c.want, c.status)
			}
			if len(j.queue) != 0 {
				t.Fatal("a refused join was queued")
			}
		})
	}
}

func TestJoinStartRegistersAndQueues(t *testing.T) {
	m := &fakeMember{report: &api.StatusReport{Node: "a", Nodes: []*api.Node{{Name: "a", LUWResolution: "10ms"}}}}
	l := &fakeLocal{}
	j := testJoining(nil, m, l)
	req := api.JoinRequest{Via: "a:7400", Token: "secret"}
	reg, err := j.start(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Group != "g" || len(m.registered) != 1 || m.registered[0].Node.Name != "new" {
		t.Fatalf("registered %+v, answered %+v", m.registered, reg)
	}
	if strings.Join(l.adopted, ",") != "a" || l.token != "secret" || !slices.Equal(m.asked, []string{"a:7400", "a:7400"}) {
		t.Errorf("adopted the resolution of %v, saved token %q, asked %v", l.adopted, l.token, m.asked)
	}
	if got := <-j.queue; got != req {
		t.Errorf("queued %+v, want %+v", got, req)
	}
	// One join at a time: a second start is refused while this one runs.
	if _, err := j.start(context.Background(), req); err == nil || !strings.Contains(err.Error(), "a join is already running") {
		t.Fatalf("a second join while one runs: %v", err)
	}
}

func TestJoinStartReportsAFailedRegistration(t *testing.T) {
	for _, c := range []struct {
		name  string
		m     *fakeMember
		l     *fakeLocal
		want  string
		asked bool // the member was asked to register this node
	}{
		{"a database that is not empty", &fakeMember{}, &fakeLocal{empty: errors.New("table t holds rows")}, "table t holds rows", false},
		{"a registration refused", &fakeMember{report: &api.StatusReport{}, registerErr: errors.New("bad token")}, &fakeLocal{}, "join through a:7400: bad token", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			j := testJoining(nil, c.m, c.l)
			_, err := j.start(context.Background(), api.JoinRequest{Via: "a:7400", Token: "t"})
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("got %v, want %q", err, c.want)
			}
			if (len(c.m.registered) > 0) != c.asked || len(j.queue) != 0 || c.l.token != "" {
				t.Errorf("registered %v, queued %d, token saved %q", c.m.registered, len(j.queue), c.l.token)
			}
			if st := j.status.snapshot(); st == nil || st.Phase != "failed" || !strings.Contains(st.Error, c.want) {
				t.Errorf("status %+v, want failed with the cause", st)
			}
			if !j.status.start("a:7400") {
				t.Error("a failed join still blocks the next")
			}
		})
	}
}
