// Command pgmesh-demo runs a local three-node pgmesh group on throwaway
// Postgres clusters: it forms the group, writes on every node, updates one
// row on two nodes at once, and shows what every node holds, the status and
// the conflict log. Everything is removed at the end. Run it with `make demo`.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

const schema = `CREATE TABLE accounts (
	id         int PRIMARY KEY,
	owner      text NOT NULL,
	balance    numeric(12,2) NOT NULL,
	updated_in text NOT NULL
)`

func main() {
	binPath := flag.String("bin", "", "pgmesh binary to use (default: build one)")
	keep := flag.Bool("keep", false, "leave the clusters and daemons running until Ctrl-C")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *binPath, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo failed:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) {
	fmt.Printf("\n\033[1m==> "+format+"\033[0m\n", args...)
}

func run(ctx context.Context, bin string, keep bool) error {
	if bin == "" {
		dir, err := os.MkdirTemp("", "pgmesh-demo-bin-")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		step("building pgmesh")
		if bin, err = localmesh.Build(ctx, dir); err != nil {
			return err
		}
	}
	regions := []string{"tokyo", "sydney", "dallas"}
	var nodes []*localmesh.Node
	defer func() {
		step("stopping daemons and removing the throwaway clusters")
		for _, n := range nodes {
			n.Remove()
		}
	}()
	step("starting three throwaway PostgreSQL clusters (wal_level=logical, track_commit_timestamp=on)")
	for _, r := range regions {
		n, err := localmesh.NewNode(ctx, bin, r, pgtest.Options{})
		if err != nil {
			return err
		}
		nodes = append(nodes, n)
		if err := n.PG.Exec(ctx, schema); err != nil {
			return fmt.Errorf("create schema on %s: %w", r, err)
		}
		fmt.Printf("  %-7s postgres on 127.0.0.1:%d, pgmesh API on %s\n", r, n.PG.Port, n.API)
	}
	step("starting a pgmesh daemon beside each")
	for _, n := range nodes {
		fmt.Printf("  $ pgmesh %s\n", strings.Join(n.Args(), " "))
		if err := n.Start(ctx); err != nil {
			return err
		}
	}
	step("forming the node group")
	fmt.Println("  [tokyo]  $ pgmesh group create demo")
	out, stderr, err := nodes[0].CLI(ctx, "group", "create", "demo")
	if err != nil {
		return fmt.Errorf("group create: %v: %s", err, stderr)
	}
	indent(out)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	token := lines[len(lines)-1]
	for _, n := range nodes[1:] {
		fmt.Printf("  [%s] $ pgmesh group join --via %s --token %s…\n", n.Name, nodes[0].API, token[:12])
		out, stderr, err := n.CLI(ctx, "group", "join", "--via", nodes[0].API, "--token", token)
		if err != nil {
			return fmt.Errorf("group join: %v: %s", err, stderr)
		}
		indent(out)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		return err
	}

	step("writing on every node")
	for i, n := range nodes {
		sql := fmt.Sprintf("INSERT INTO accounts VALUES (%d, 'customer of %s', 100, '%s')", i+1, n.Name, n.Name)
		fmt.Printf("  [%s] %s\n", n.Name, sql)
		if err := n.PG.Exec(ctx, sql); err != nil {
			return err
		}
	}
	if err := waitSame(ctx, nodes, "SELECT count(*) FROM accounts", "3"); err != nil {
		return err
	}

	step("updating account 1 in tokyo and in sydney at the same moment")
	fmt.Println("  [tokyo]  UPDATE accounts SET balance = 150, updated_in = 'tokyo'  WHERE id = 1")
	fmt.Println("  [sydney] UPDATE accounts SET balance = 175, updated_in = 'sydney' WHERE id = 1")
	if err := concurrentUpdates(ctx, nodes[0], nodes[1]); err != nil {
		return err
	}
	if err := waitSame(ctx, nodes, "SELECT balance::text || ' ' || updated_in FROM accounts WHERE id = 1", ""); err != nil {
		return err
	}

	step("what every node holds now (the later update won everywhere)")
	for _, n := range nodes {
		rows, err := query(ctx, n, "SELECT id, owner, balance, updated_in FROM accounts ORDER BY id")
		if err != nil {
			return err
		}
		fmt.Printf("  [%s]\n", n.Name)
		for _, r := range rows {
			fmt.Println("    ", r)
		}
	}

	step("[tokyo] $ pgmesh status")
	out, stderr, err = nodes[0].CLI(ctx, "status")
	if err != nil {
		return fmt.Errorf("status: %v: %s", err, stderr)
	}
	indent(out)

	for _, n := range nodes[:2] {
		step("[%s] $ pgmesh conflicts", n.Name)
		out, stderr, err = n.CLI(ctx, "conflicts")
		if err != nil {
			return fmt.Errorf("conflicts: %v: %s", err, stderr)
		}
		indent(out)
	}
	if keep {
		step("clusters and daemons keep running; press Ctrl-C to stop and clean up")
		<-ctx.Done()
	}
	return nil
}

func indent(s string) {
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		fmt.Println("    " + l)
	}
}

// concurrentUpdates commits one update on each node while neither has seen
// the other's, so the nodes must settle the conflict.
func concurrentUpdates(ctx context.Context, a, b *localmesh.Node) error {
	ca, err := a.PG.Connect(ctx)
	if err != nil {
		return err
	}
	defer ca.Close(ctx)
	cb, err := b.PG.Connect(ctx)
	if err != nil {
		return err
	}
	defer cb.Close(ctx)
	ta, err := ca.Begin(ctx)
	if err != nil {
		return err
	}
	tb, err := cb.Begin(ctx)
	if err != nil {
		return err
	}
	if _, err := ta.Exec(ctx, "UPDATE accounts SET balance = 150, updated_in = 'tokyo' WHERE id = 1"); err != nil {
		return err
	}
	if _, err := tb.Exec(ctx, "UPDATE accounts SET balance = 175, updated_in = 'sydney' WHERE id = 1"); err != nil {
		return err
	}
	var wg sync.WaitGroup
	var errA, errB error
	wg.Add(2)
	go func() { defer wg.Done(); errA = ta.Commit(ctx) }()
	go func() { defer wg.Done(); errB = tb.Commit(ctx) }()
	wg.Wait()
	return errors.Join(errA, errB)
}

func query(ctx context.Context, n *localmesh.Node, sql string) ([]string, error) {
	c, err := n.PG.Connect(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close(ctx)
	rows, err := c.Query(ctx, "SELECT r::text FROM ("+sql+") r")
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, pgx.RowTo[string])
}

// waitSame waits until sql returns the same rows on every node (and, if
// want is set, that value).
func waitSame(ctx context.Context, nodes []*localmesh.Node, sql, want string) error {
	return poll.Until(ctx, 100*time.Millisecond, 30*time.Second, func() error {
		var vals []string
		for _, n := range nodes {
			rows, err := query(ctx, n, sql)
			if err != nil {
				return poll.Stop(err)
			}
			vals = append(vals, strings.Join(rows, ";"))
		}
		same := true
		for _, v := range vals[1:] {
			same = same && v == vals[0]
		}
		if same && (want == "" || strings.Trim(vals[0], "()") == want) {
			return nil
		}
		return fmt.Errorf("nodes did not converge on %q within 30s: %v", sql, vals)
	})
}
