//go:build integration

// Package systemtest runs whole pgmesh nodes (real Postgres clusters and
// daemon processes) and checks the invariants ARCHITECTURE.md lists, end to end.
//
// Every test runs in parallel with the others (t.Parallel), bounded by go
// test's -parallel (make test: 3): each has its own clusters, ports,
// daemons and directories, and most of a test's time is spent waiting on
// them, not on the CPU. A test that changes the process's environment
// (t.Setenv) cannot, and runs first, alone.
package systemtest

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/replicator"
)

var bin string

func TestMain(m *testing.M) {
	if _, err := pgtest.FindBinDir(); err != nil {
		// Fail loudly: a run without Postgres proves nothing.
		fmt.Fprintln(os.Stderr, "systemtest:", err)
		os.Exit(2)
	}
	dir, err := os.MkdirTemp("", "pgmesh-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	bin, err = localmesh.Build(context.Background(), dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// ctxFor returns a context bounded by the test's deadline (or 5 minutes).
func ctxFor(t *testing.T) context.Context {
	deadline, ok := t.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Minute)
	}
	ctx, cancel := context.WithDeadline(context.Background(), deadline.Add(-5*time.Second))
	t.Cleanup(cancel)
	return ctx
}

// startNodes starts n Postgres clusters with their daemons (not yet in a
// group), runs schema on each, and cleans up after the test.
func startNodes(t *testing.T, ctx context.Context, schema string, names ...string) []*localmesh.Node {
	t.Helper()
	return startNodesWith(t, ctx, schema, nil, names...)
}

// startNodesWith is startNodes with extra `pgmesh run` arguments.
func startNodesWith(t *testing.T, ctx context.Context, schema string, args []string, names ...string) []*localmesh.Node {
	t.Helper()
	nodes := newNodes(t, ctx, schema, names...)
	for _, n := range nodes {
		n.ExtraArgs = args
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	return nodes
}

// newNodes starts a Postgres cluster per name with schema, its daemon not
// yet running, and removes them after the test (keeping the daemon logs of
// a failed test).
func newNodes(t *testing.T, ctx context.Context, schema string, names ...string) []*localmesh.Node {
	t.Helper()
	var nodes []*localmesh.Node
	for _, name := range names {
		n, err := localmesh.NewNode(ctx, bin, name, pgtest.Options{})
		if err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
		keepLogs(t, n)
		if schema != "" {
			if err := n.PG.Exec(ctx, schema); err != nil {
				t.Fatalf("schema on %s: %v", name, err)
			}
		}
	}
	return nodes
}

// mesh starts and forms a group of the named nodes and waits until every
// stream is connected.
func mesh(t *testing.T, ctx context.Context, schema string, names ...string) []*localmesh.Node {
	t.Helper()
	return meshWith(t, ctx, schema, nil, names...)
}

// keepLogs removes n after the test. If the test failed, it first logs
// the node's status (what each stream had applied when it gave up) and
// keeps its daemon log.
func keepLogs(t *testing.T, n *localmesh.Node) {
	t.Cleanup(func() {
		if t.Failed() {
			if n.Running() {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				out, stderr, err := n.CLI(ctx, "status")
				cancel()
				t.Logf("pgmesh status on %s (err %v):\n%s%s", n.Name, err, out, stderr)
			}
			t.Logf("daemon log of %s:\n%s", n.Name, n.LogTail(3000))
			if b, err := os.ReadFile(n.LogPath); err == nil {
				keep := filepath.Join(os.TempDir(), fmt.Sprintf("pgmesh-%s-%s.log", t.Name(), n.Name))
				if os.WriteFile(keep, b, 0o644) == nil {
					t.Logf("full daemon log of %s kept in %s", n.Name, keep)
				}
			}
		}
		n.Remove()
	})
}

// meshWith is mesh with extra `pgmesh run` arguments.
func meshWith(t *testing.T, ctx context.Context, schema string, args []string, names ...string) []*localmesh.Node {
	t.Helper()
	nodes := startNodesWith(t, ctx, schema, args, names...)
	if _, err := localmesh.Form(ctx, "test", nodes...); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	return nodes
}

func connect(t *testing.T, ctx context.Context, n *localmesh.Node) *pgx.Conn {
	t.Helper()
	c, err := n.PG.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(context.Background()) })
	return c
}

func mustExec(t *testing.T, ctx context.Context, n *localmesh.Node, sql string, args ...any) {
	t.Helper()
	if err := n.PG.Exec(ctx, sql, args...); err != nil {
		t.Fatalf("on %s: %s: %v", n.Name, sql, err)
	}
}

// dump returns a table's rows as text, ordered, for comparing nodes.
func dump(ctx context.Context, n *localmesh.Node, table string) (string, error) {
	c, err := n.PG.Connect(ctx)
	if err != nil {
		return "", err
	}
	defer c.Close(ctx)
	// An alias no column is called: a column named like the alias would
	// be selected instead of the row.
	rows, err := c.Query(ctx, fmt.Sprintf("SELECT pgmesh_dump_row::text FROM %s pgmesh_dump_row ORDER BY 1", table))
	if err != nil {
		return "", err
	}
	vals, err := pgx.CollectRows(rows, pgx.RowTo[string])
	return strings.Join(vals, "\n"), err
}

// nextInterval waits until n's clock has left the luw_resolution interval
// it is in now (and a millisecond more). The nodes of a test share one
// clock, so a write on n after it is newer, by last-update-wins, than every
// write committed before it, whichever node ids they have.
func nextInterval(t *testing.T, ctx context.Context, n *localmesh.Node) {
	t.Helper()
	mustExec(t, ctx, n, `SELECT pgmesh.wait_for_clock(to_timestamp((pgmesh.luw_round(clock_timestamp()) + 1000) / 1000000.0))`)
}

// eventually polls cond every 100ms until it returns nil or the timeout
// passes, then fails with the last error.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() error) {
	t.Helper()
	if err := poll.Until(t.Context(), 100*time.Millisecond, timeout, cond); err != nil {
		t.Fatalf("%s: not true after %s: %v", what, timeout, err)
	}
}

// converged waits until table holds the same rows on every node, and
// returns them.
func converged(t *testing.T, ctx context.Context, timeout time.Duration, table string, nodes ...*localmesh.Node) string {
	t.Helper()
	var first string
	eventually(t, timeout, table+" identical on all nodes", func() error {
		var err error
		first, err = dump(ctx, nodes[0], table)
		if err != nil {
			return err
		}
		for _, n := range nodes[1:] {
			other, err := dump(ctx, n, table)
			if err != nil {
				return err
			}
			if other != first {
				return fmt.Errorf("%s differs from %s:\n%s\n--- vs ---\n%s", n.Name, nodes[0].Name, clip(first), clip(other))
			}
		}
		return nil
	})
	return first
}

// partitioned stops the daemons of nodes, runs writes (which then cannot
// see each other, and commit in the order written), restarts the daemons
// and waits until all streams are back.
func partitioned(t *testing.T, ctx context.Context, nodes []*localmesh.Node, writes func()) {
	t.Helper()
	for _, n := range nodes {
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	writes()
	for _, n := range nodes {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
}

// conflicts returns a node's conflict_history as "relation type resolution
// key" lines, oldest first.
func conflicts(t *testing.T, ctx context.Context, n *localmesh.Node) []string {
	t.Helper()
	return column[string](t, ctx, n, `SELECT concat_ws(' ', relation, conflict_type, resolution, key_tuple::text)
		FROM pgmesh.conflict_history ORDER BY id`)
}

// column returns the one column sql selects on n.
func column[T any](t *testing.T, ctx context.Context, n *localmesh.Node, sql string, args ...any) []T {
	t.Helper()
	c, err := n.PG.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, sql, args...)
	if err != nil {
		t.Fatal(err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[T])
	if err != nil {
		t.Fatalf("on %s: %s: %v", n.Name, sql, err)
	}
	return out
}

// waitConflicts waits until n has recorded exactly want (in any order).
func waitConflicts(t *testing.T, ctx context.Context, n *localmesh.Node, want ...string) {
	t.Helper()
	eventually(t, 30*time.Second, n.Name+" records the expected conflicts", func() error {
		got := conflicts(t, ctx, n)
		if !sameSet(got, want) {
			return fmt.Errorf("got %q, want %q", got, want)
		}
		return nil
	})
}

func sameSet(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	seen := map[string]int{}
	for _, x := range a {
		seen[x]++
	}
	for _, x := range b {
		seen[x]--
	}
	for _, v := range seen {
		if v != 0 {
			return false
		}
	}
	return true
}

func clip(s string) string {
	if len(s) > 1500 {
		return s[:1500] + "..."
	}
	return s
}

func count(t *testing.T, ctx context.Context, n *localmesh.Node, sql string, args ...any) int64 {
	t.Helper()
	c, err := n.PG.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close(ctx)
	var v int64
	if err := c.QueryRow(ctx, sql, args...).Scan(&v); err != nil {
		t.Fatalf("on %s: %s: %v", n.Name, sql, err)
	}
	return v
}

// readToken reads the join token a member keeps in its data_dir.
func readToken(n *localmesh.Node) (string, error) {
	b, err := os.ReadFile(filepath.Join(n.DataDir, "join-token"))
	return strings.TrimSpace(string(b)), err
}

// streamFrom returns n's stream from peer, as its status reports it.
func streamFrom(t *testing.T, ctx context.Context, n *localmesh.Node, peer string) replicator.Status {
	t.Helper()
	rep, err := n.Status(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range rep.Peers {
		if p.Peer == peer {
			return p
		}
	}
	t.Fatalf("%s has no stream from %s", n.Name, peer)
	return replicator.Status{}
}
