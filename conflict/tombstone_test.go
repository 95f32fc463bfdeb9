package conflict

import (
	"testing"
	"time"
)

// No deleted_by means this node deleted the row; no time means unknown,
// which Rule.Newer treats as older than every known time.
func TestTombstoneVersion(t *testing.T) {
	us := time.Date(2026, 12, 1, 4, 0, 0, 123456000, time.UTC).UnixMicro()
	peer := "tokyo"
	for _, c := range []struct {
		micros *int64
		by     *string
		want   Version
	}{
		{&us, &peer, Version{Node: "tokyo", CommitTS: time.UnixMicro(us).UTC()}},
		{&us, nil, Version{Node: "dallas", CommitTS: time.UnixMicro(us).UTC()}},
		{nil, nil, Version{Node: "dallas"}},
	} {
		if got := TombstoneVersion(c.micros, c.by, "dallas"); got != c.want {
			t.Errorf("TombstoneVersion(%v, %v) = %+v, want %+v", c.micros, c.by, got, c.want)
		}
	}
	if got, want := TombstoneAt("t"), "coalesce(t.deleted_at, pg_catalog.pg_xact_commit_timestamp(t.xmin))"; got != want {
		t.Errorf("TombstoneAt(t) = %s, want %s", got, want)
	}
}
