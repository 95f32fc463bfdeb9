package replicator

import (
	"context"
	"testing"

	"github.com/jackc/pglogrepl"
)

// A change applied here is confirmed only once the standbys have flushed
// its local commit; what the peer sent with nothing for us is confirmed
// with the last commit the standbys have.
func TestHoldBackConfirmsWhatTheStandbysHave(t *testing.T) {
	var h holdBack
	step := func(flushed pglogrepl.LSN, at originSample, standby, want pglogrepl.LSN) {
		t.Helper()
		if got := h.confirmable(flushed, at, standby); got != want {
			t.Fatalf("flushed %s, last commit %s here at %s, standbys at %s: confirmed %s, want %s",
				flushed, at.remote, at.local, standby, got, want)
		}
	}
	// Nothing applied yet: the peer's keepalive positions are confirmed.
	step(100, originSample{}, 0, 100)
	// Remote 200 committed here at local 1000; the standbys are at 900.
	step(200, originSample{remote: 200, local: 1000}, 900, 100)
	// Remote 300 at local 1100; the standbys got 1000 but not 1100.
	step(300, originSample{remote: 300, local: 1100}, 1050, 200)
	// A keepalive beyond: still held to what the standbys have.
	step(350, originSample{remote: 300, local: 1100}, 1050, 200)
	// The standbys stopped: nothing moves.
	step(400, originSample{remote: 400, local: 1200}, 1050, 200)
	// They caught up past the last commit: everything flushed is confirmed.
	step(420, originSample{remote: 400, local: 1200}, 1200, 420)
	// Never backwards, whatever the samples say.
	step(500, originSample{remote: 500, local: 1300}, 0, 420)
}

// The samples kept are bounded; dropping old ones makes the hold coarser,
// never unsafe.
func TestHoldBackBoundsItsSamples(t *testing.T) {
	var h holdBack
	for i := range pglogrepl.LSN(2 * maxPending) {
		if got := h.confirmable(i+1, originSample{remote: i + 1, local: 10_000 + i}, 0); got != 0 {
			t.Fatalf("confirmed %s with the standbys at 0", got)
		}
	}
	if len(h.pending) != maxPending {
		t.Fatalf("%d samples kept, want %d", len(h.pending), maxPending)
	}
	// The standbys reach a local position whose sample was dropped: the
	// newest kept sample at or below it counts.
	got := h.confirmable(2*maxPending, originSample{remote: 2 * maxPending, local: 10_000 + 2*maxPending - 1}, 10_000+maxPending+10)
	if want := pglogrepl.LSN(maxPending + 11); got != want {
		t.Fatalf("confirmed %s, want %s", got, want)
	}
}

// A watch that last found every local commit flushed confirms what the
// stream passed over since without reading anything; a commit since makes
// it read again, and what it cannot read is held.
func TestFlushWatchReadsOnlyAfterACommit(t *testing.T) {
	w := &flushWatch{dsn: "postgres://nobody@127.0.0.1:1/none?connect_timeout=1", settled: true}
	w.hold.safe = 100
	if got, why := w.limit(context.Background(), 300); got != 300 || why != "" {
		t.Fatalf("settled: confirmed %s (%q), want 0/12C", got, why)
	}
	w.committed()
	got, why := w.limit(context.Background(), 500)
	if got != 300 || why == "" {
		t.Fatalf("after a commit, unreadable: confirmed %s (%q), want 0/12C held with a reason", got, why)
	}
}
