package conflict

import (
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
		if got := Newer(c.a, c.b); got != c.want {
			t.Errorf("%s: Newer = %v, want %v", c.name, got, c.want)
		}
		// Antisymmetry: exactly one side wins for distinct versions.
		if c.a != c.b && Newer(c.a, c.b) == Newer(c.b, c.a) {
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
		local  *Version
		own    bool
		want   Decision
	}{
		{"plain insert", Insert, nil, false, Decision{Apply: true}},
		{"insert over older row", Insert, older, false, Decision{Conflict: true, Type: InsertExists, Resolution: ApplyRemote, Apply: true}},
		{"insert under newer row", Insert, newer, false, Decision{Conflict: true, Type: InsertExists, Resolution: KeepLocal}},
		{"update same origin", Update, sameOrigin, false, Decision{Apply: true}},
		{"update row written in this txn", Update, newer, true, Decision{Apply: true}},
		{"update origin differs, remote newer", Update, older, false, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: ApplyRemote, Apply: true}},
		{"update origin differs, local newer", Update, newer, false, Decision{Conflict: true, Type: UpdateOriginDiffers, Resolution: KeepLocal}},
		{"update missing", Update, nil, false, Decision{Conflict: true, Type: UpdateMissing, Resolution: Skip}},
		{"delete origin differs, local newer", Delete, newer, false, Decision{Conflict: true, Type: DeleteOriginDiffers, Resolution: KeepLocal}},
		{"delete missing", Delete, nil, false, Decision{Conflict: true, Type: DeleteMissing, Resolution: Skip}},
	}
	for _, c := range cases {
		got := Decide(c.change, c.local, c.own, remote)
		got.Reason = ""
		if got != c.want {
			t.Errorf("%s: got %+v, want %+v", c.name, got, c.want)
		}
	}
}
