package daemon

import (
	"context"
	"io"
	"log/slog"
	"slices"
	"testing"

	"github.com/pgmesh/pgmesh/replicator"
)

// The supervisor runs exactly the streams it is asked for, restarts one
// whose peer moved to another DSN, and leaves the others running.
func TestSupervisorMatchesWantedStreams(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	// Nothing listens on port 1: each stream keeps retrying until stopped.
	peer := func(name, db string) replicator.Config {
		return replicator.Config{LocalNode: "here", LocalDSN: "postgres://127.0.0.1:1/here", Logger: quiet,
			Peer: replicator.Peer{Name: name, DSN: "postgres://127.0.0.1:1/" + db}}
	}
	var s supervisor
	defer s.stopAll()
	peers := func() []string {
		var names []string
		for _, st := range s.statuses() {
			names = append(names, st.Peer)
		}
		return names
	}

	s.match(ctx, map[string]replicator.Config{"b": peer("b", "one"), "a": peer("a", "one")})
	if got := peers(); !slices.Equal(got, []string{"a", "b"}) {
		t.Fatalf("streams %v, want [a b]", got)
	}
	a, b := s.streams["a"], s.streams["b"]

	s.match(ctx, map[string]replicator.Config{"a": peer("a", "one"), "b": peer("b", "two"), "c": peer("c", "one")})
	if got := peers(); !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("streams %v, want [a b c]", got)
	}
	if s.streams["a"] != a {
		t.Fatal("a's stream was restarted although nothing about it changed")
	}
	if s.streams["b"] == b {
		t.Fatal("b's stream still runs with its old DSN")
	}
	select {
	case <-b.done:
	default:
		t.Fatal("b's old stream is still running after match returned")
	}

	s.match(ctx, map[string]replicator.Config{"c": peer("c", "one")})
	if got := peers(); !slices.Equal(got, []string{"c"}) {
		t.Fatalf("streams %v, want [c]", got)
	}
	s.stopAll()
	if got := peers(); len(got) != 0 {
		t.Fatalf("streams %v after stopAll", got)
	}
}
