package daemon

import (
	"bytes"
	"log/slog"
	"slices"
	"strings"
	"testing"
)

// Each check's problems replace that check's earlier ones only, and a
// problem is logged when it first appears, not on every pass.
func TestProblemLogKeepsEachCheckAndLogsOnce(t *testing.T) {
	var logged bytes.Buffer
	p := problemLog{log: slog.New(slog.NewTextHandler(&logged, nil))}
	p.set("sequences", []string{"chunk low"})
	p.set("reconcile", []string{"no key", "no slot"})
	p.set("reconcile", []string{"no key", "no slot"})
	if got := p.all(); !slices.Equal(got, []string{"no key", "no slot", "chunk low"}) {
		t.Fatalf("problems %q", got)
	}
	if n := strings.Count(logged.String(), "no key"); n != 1 {
		t.Fatalf("a standing problem was logged %d times:\n%s", n, logged.String())
	}
	p.set("reconcile", nil)
	if got := p.all(); !slices.Equal(got, []string{"chunk low"}) {
		t.Fatalf("after the reconcile found nothing: %q", got)
	}
	p.set("reconcile", []string{"no key"})
	if n := strings.Count(logged.String(), "no key"); n != 2 {
		t.Fatalf("a problem that came back was not logged again (%d):\n%s", n, logged.String())
	}
}
