package conflict

import (
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestNewer(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	v := func(ts time.Time, id int) Version { return Version{CommitTS: ts, NodeID: id} }
	cases := []struct {
		name string
		a, b Version
		want bool
	}{
		{"later wins", v(t0.Add(time.Microsecond), 1), v(t0, 2), true},
		{"earlier loses", v(t0, 9), v(t0.Add(time.Millisecond), 1), false},
		{"tie goes to higher node id", v(t0, 3), v(t0, 2), true},
		{"tie lower node id loses", v(t0, 2), v(t0, 3), false},
		{"sub-microsecond difference is a tie", v(t0.Add(100*time.Nanosecond), 1), v(t0, 2), false},
		{"unknown local time is oldest", v(t0, 1), Version{NodeID: 5}, true},
		{"unknown remote time loses to known", Version{NodeID: 5}, v(t0, 1), false},
	}
	for _, c := range cases {
		if got := (Rule{}).Newer(c.a, c.b); got != c.want {
			t.Errorf("%s: Newer = %v, want %v", c.name, got, c.want)
		}
		// Antisymmetry: exactly one side wins for distinct versions.
		if c.a != c.b && (Rule{}).Newer(c.a, c.b) == (Rule{}).Newer(c.b, c.a) {
			t.Errorf("%s: both or neither side wins", c.name)
		}
	}
}

func TestDecide(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	remote := Version{CommitTS: t0.Add(time.Second), NodeID: 2, Node: "b"}
	older := &Version{CommitTS: t0, NodeID: 1, Node: "a"}
	newer := &Version{CommitTS: t0.Add(time.Hour), NodeID: 1, Node: "a"}
	sameOrigin := &Version{CommitTS: t0.Add(time.Hour), NodeID: 2, Node: "b"}

	cases := []struct {
		name   string
		change Change
		local  Local
		want   Decision
	}{
		{"plain insert", Insert, Local{}, Decision{Apply: true}},
		{"insert after an older delete", Insert, Local{Tombstone: older}, Decision{Apply: true}},
		{"insert overtaken by a newer delete", Insert, Local{Tombstone: newer}, Decision{Conflict: true, Type: InsertDeleted, Resolution: Skip}},
		{"insert over older row", Insert, Local{Row: older}, Decision{Conflict: true, Type: InsertExists, Resolution: ApplyRemote, Apply: true}},
		{"insert under newer row", Insert, Local{Row: newer}, Decision{Conflict: true, Type: InsertExists, Resolution: KeepLocal}},
		{"update same origin", Update, Local{Row: sameOrigin}, Decision{Apply: true}},
		{"update row written in this txn", Update, Local{Row: newer, OwnTxn: true}, Decision{Apply: true}},
		{"update origin differs, remote newer", Update, Local{Row: older}, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: ApplyRemote, Apply: true}},
		{"update origin differs, local newer", Update, Local{Row: newer}, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: KeepLocal}},
		{"update of delta columns, local newer", Update, Local{Row: newer, Delta: true}, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: Merge, MergeDelta: true}},
		{"update of delta columns, remote newer", Update, Local{Row: older, Delta: true}, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: ApplyRemote, Apply: true}},
		{"delete, delta columns, local newer", Delete, Local{Row: newer, Delta: true}, Decision{Conflict: true, Type: DeleteOriginDiffers, Resolution: KeepLocal}},
		{"update missing, full row", Update, Local{FullRow: true}, Decision{Conflict: true, Type: UpdateMissing, Resolution: ApplyAsInsert, Apply: true}},
		{"update missing, older delete", Update, Local{FullRow: true, Tombstone: older}, Decision{Conflict: true, Type: UpdateMissing, Resolution: ApplyAsInsert, Apply: true}},
		{"update missing, TOAST not sent", Update, Local{}, Decision{Conflict: true, Type: UpdateMissing, Resolution: Skip}},
		{"update deleted later", Update, Local{FullRow: true, Tombstone: newer}, Decision{Conflict: true, Type: UpdateDeleted, Resolution: Skip}},
		{"delete origin differs, local newer", Delete, Local{Row: newer}, Decision{Conflict: true, Type: DeleteOriginDiffers, Resolution: KeepLocal}},
		{"delete origin differs, remote newer", Delete, Local{Row: older}, Decision{Conflict: true, Type: DeleteOriginDiffers, Resolution: ApplyRemote, Apply: true}},
		{"delete missing", Delete, Local{}, Decision{Conflict: true, Type: DeleteMissing, Resolution: Skip}},
	}
	for _, c := range cases {
		got := (Rule{}).Decide(c.change, c.local, remote)
		got.Reason = ""
		if got != c.want {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}

func TestUnique(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	remote := Version{CommitTS: t0.Add(time.Second), NodeID: 2}
	older := Version{CommitTS: t0, NodeID: 1}
	newer := Version{CommitTS: t0.Add(time.Hour), NodeID: 1}

	d, losers := (Rule{}).Unique(Update, []Version{older}, remote)
	if d.Type != UpdateExists || !d.Apply || d.DeleteSelf || d.Resolution != ApplyRemote || len(losers) != 1 {
		t.Errorf("newer remote update: %+v losers %v", d, losers)
	}
	d, losers = (Rule{}).Unique(Insert, []Version{newer}, remote)
	if d.Type != InsertExists || d.Apply || d.DeleteSelf || d.Resolution != KeepLocal || len(losers) != 0 {
		t.Errorf("older remote insert: %+v losers %v", d, losers)
	}
	// Against two rows, one older and one newer: the remote row loses, and
	// so does the older blocker.
	d, losers = (Rule{}).Unique(Update, []Version{older, newer}, remote)
	if d.Type != MultipleUniqueConflicts || d.Apply || !d.DeleteSelf || len(losers) != 1 || losers[0] != 0 {
		t.Errorf("mixed blockers: %+v losers %v", d, losers)
	}
}

func TestRoundAtIntervalEdges(t *testing.T) {
	ms := Rule{Resolution: time.Millisecond}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC) // on an edge
	us := t0.UnixMicro()
	cases := []struct {
		name string
		rule Rule
		at   time.Time
		want int64
	}{
		{"on an edge stays", ms, t0, us},
		{"one microsecond past an edge goes to the next", ms, t0.Add(time.Microsecond), us + 1000},
		{"just before an edge goes to it", ms, t0.Add(999 * time.Microsecond), us + 1000},
		{"nanoseconds are below PostgreSQL's precision", ms, t0.Add(500 * time.Nanosecond), us},
		{"zero resolution keeps microseconds", Rule{}, t0.Add(1234 * time.Microsecond), us + 1234},
		{"1us resolution keeps microseconds", Rule{Resolution: time.Microsecond}, t0.Add(7 * time.Microsecond), us + 7},
		{"10ms resolution", Rule{Resolution: 10 * time.Millisecond}, t0.Add(10001 * time.Microsecond), us + 20000},
		{"before 1970 rounds up too", ms, time.UnixMicro(-1500).UTC(), -1000},
		{"before 1970 on an edge", ms, time.UnixMicro(-2000).UTC(), -2000},
	}
	for _, c := range cases {
		if got := c.rule.Round(c.at); got != c.want {
			t.Errorf("%s: Round = %d, want %d", c.name, got, c.want)
		}
		if got := c.rule.Round(c.at); got < c.at.UnixMicro() {
			t.Errorf("%s: rounded time %d is before the real one", c.name, got)
		}
	}
}

func TestNewerAtResolution(t *testing.T) {
	ms := Rule{Resolution: time.Millisecond}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	v := func(offset time.Duration, id int) Version { return Version{CommitTS: t0.Add(offset), NodeID: id} }
	cases := []struct {
		name string
		a, b Version
		want bool
	}{
		{"same interval: higher node id wins though earlier", v(100*time.Microsecond, 3), v(900*time.Microsecond, 2), true},
		{"same interval: lower node id loses though later", v(900*time.Microsecond, 2), v(100*time.Microsecond, 3), false},
		{"an edge belongs to the interval it ends", v(time.Millisecond, 1), v(500*time.Microsecond, 2), false},
		{"next interval wins whatever the node id", v(time.Millisecond+time.Microsecond, 1), v(time.Millisecond, 9), true},
		{"same time, same node: neither wins", v(0, 4), v(0, 4), false},
		{"unknown is oldest", v(0, 1), Version{NodeID: 9}, true},
		{"two unknowns: higher node id", Version{NodeID: 2}, Version{NodeID: 1}, true},
	}
	for _, c := range cases {
		if got := ms.Newer(c.a, c.b); got != c.want {
			t.Errorf("%s: Newer = %v, want %v", c.name, got, c.want)
		}
		if c.a != c.b && ms.Newer(c.a, c.b) == ms.Newer(c.b, c.a) {
			t.Errorf("%s: both or neither side wins", c.name)
		}
	}
	// A group of one peer's transactions is stamped with its last commit
	// time; against any third version it must decide as each member would.
	third := v(500*time.Microsecond, 2)
	for _, member := range []time.Duration{1, 200 * time.Microsecond, 999 * time.Microsecond} {
		alone, grouped := v(member, 1), v(time.Millisecond, 1)
		if ms.Newer(alone, third) != ms.Newer(grouped, third) || ms.Newer(third, alone) != ms.Newer(third, grouped) {
			t.Errorf("member at %s decides differently once stamped with the group's time", member)
		}
	}
}

// Once the local clock has passed VisibleAfter, every later local write
// wins over the change, whichever node ids and resolution; a lower id
// waits for the whole interval, a higher one only for its start.
func TestVisibleAfterLetsEveryLaterWriteWin(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := range 100000 {
		rule := Rule{Resolution: []time.Duration{0, time.Microsecond, time.Millisecond, 10 * time.Millisecond, 100 * time.Millisecond}[i%5]}
		commit := t0.Add(time.Duration(rng.Int64N(int64(time.Second))) / time.Microsecond * time.Microsecond)
		from, here := 1+rng.IntN(4), 1+rng.IntN(4)
		if from == here {
			continue
		}
		after := rule.VisibleAfter(commit, from, here)
		later := after.Add(time.Duration(1+rng.Int64N(int64(2*rule.Resolution/time.Microsecond)+2)) * time.Microsecond)
		if !rule.Newer(Version{CommitTS: later, NodeID: here}, Version{CommitTS: commit, NodeID: from}) {
			t.Fatalf("%v: a write at %s on node %d, after VisibleAfter %s, loses to node %d's change at %s",
				rule.Resolution, later.Format(time.StampMicro), here, after.Format(time.StampMicro), from, commit.Format(time.StampMicro))
		}
	}
	ten := Rule{Resolution: 10 * time.Millisecond}
	commit := t0.Add(3 * time.Millisecond)
	for _, c := range []struct {
		from, here int
		want       time.Duration
	}{
		{2, 1, 10 * time.Millisecond}, // a lower id waits for the interval's end
		{1, 2, 0},                     // a higher one for its start
		{0, 2, 10 * time.Millisecond}, // an unknown sender: the whole interval
		{1, 0, 10 * time.Millisecond}, // an unknown local id, too
	} {
		if got := ten.VisibleAfter(commit, c.from, c.here); !got.Equal(t0.Add(c.want)) {
			t.Errorf("from %d to %d: VisibleAfter %s, want %s", c.from, c.here, got.Sub(t0), c.want)
		}
	}
}

// A conflict_history row says what the key holds afterwards, and binds every
// value as a parameter.
func TestRecord(t *testing.T) {
	rec := Record{LocalNode: "a", OriginNode: "b", Relation: "public.t", KeyTuple: "K", LocalTuple: "L", RemoteTuple: "R",
		Decision:       Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: KeepLocal, Reason: "local row is newer"},
		Local:          &Version{Node: "a", CommitTS: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)},
		RemoteCommitTS: time.Date(2026, 1, 1, 0, 0, 1, 0, time.UTC), RemoteLSN: "0/1", RemoteXID: 7}
	for _, c := range []struct {
		d      Decision
		remote string
		want   string
	}{
		{Decision{Apply: true, Resolution: ApplyRemote}, "R", "R"},
		{Decision{Resolution: KeepLocal}, "R", "L"},
		{Decision{Apply: true, Resolution: ApplyRemote}, "", "NULL::jsonb"}, // a delete applied
		{Decision{Resolution: Skip}, "R", "NULL::jsonb"},
	} {
		r := rec
		r.Decision, r.RemoteTuple = c.d, c.remote
		if got := r.AppliedTuple(); got != c.want {
			t.Errorf("%+v with remote %q: applied %s, want %s", c.d, c.remote, got, c.want)
		}
	}
	var bound []string
	sql := rec.InsertSQL(func(v []byte) string { bound = append(bound, string(v)); return "$" + strconv.Itoa(len(bound)) })
	if len(bound) != 11 || bound[5] != "2026-01-01 00:00:00.000000+00" || bound[6] != "a" || bound[10] != "local row is newer" {
		t.Errorf("bound %q", bound)
	}
	if !strings.Contains(sql, "K, L, R, L, $6::timestamptz") {
		t.Errorf("statement: %s", sql)
	}
}
