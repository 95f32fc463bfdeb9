package replicator

import (
	"testing"
	"time"
)

func TestReadDeadlineIsSetAgainOnlyWhenItMatters(t *testing.T) {
	now := time.Now()
	for _, c := range []struct {
		name      string
		set, want time.Time
		keep      bool
	}{
		{"never set", time.Time{}, now.Add(time.Millisecond), false},
		{"the same", now.Add(time.Millisecond), now.Add(time.Millisecond), true},
		{"moved by a few microseconds", now.Add(time.Millisecond), now.Add(time.Millisecond + 5*time.Microsecond), true},
		{"moved by a millisecond", now.Add(time.Millisecond), now.Add(2 * time.Millisecond), false},
		{"wanted much sooner", now.Add(time.Second), now.Add(time.Millisecond), false},
		{"both passed", now.Add(-time.Second), now, true},
		{"passed, wanted later", now.Add(-time.Second), now.Add(time.Millisecond), false},
		{"wanted now, set a little later", now.Add(50 * time.Microsecond), now, false},
		{"wanted a little later, passed", now.Add(-time.Microsecond), now.Add(50 * time.Microsecond), false},
	} {
		if got := closeEnough(c.set, c.want, now); got != c.keep {
			t.Errorf("%s: closeEnough = %v, want %v", c.name, got, c.keep)
		}
	}
}
