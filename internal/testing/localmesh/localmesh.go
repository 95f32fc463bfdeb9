// Package localmesh runs pgmesh nodes on one machine: a throwaway Postgres
// cluster and a pgmesh daemon process per node. The system tests, the
// benchmarks and `make demo` use it.
package localmesh

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// Build compiles the pgmesh binary into dir and returns its path.
func Build(ctx context.Context, dir string) (string, error) {
	bin := filepath.Join(dir, "pgmesh")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "github.com/pgmesh/pgmesh/cmd/pgmesh")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build: %w\n%s", err, out)
	}
	return bin, nil
}

// Node is one Postgres cluster with its pgmesh daemon.
type Node struct {
	Name    string
	PG      *pgtest.Cluster
	API     string
	Raft    string
	DataDir string
	LogPath string
	Bin     string
	// RaftTiming is the daemon's raft_timing: lan for nodes on one
	// machine (what NewNode sets), wan or "" (the default) for tests of
	// links with a continent's latency.
	RaftTiming string
	// ExtraArgs are added to `pgmesh run`.
	ExtraArgs []string
	// DSN is what the daemon connects with; empty means the cluster's
	// superuser DSN (PG.DSN()).
	DSN string
	// Transport reaches the daemon's API (nil: plain HTTP).
	Transport *api.Transport

	cmd  *exec.Cmd
	done chan struct{}
}

// NewNode starts a Postgres cluster for a node named name; the daemon is
// started by Start.
func NewNode(ctx context.Context, bin, name string, pgOpts pgtest.Options) (*Node, error) {
	pg, err := pgtest.Start(ctx, pgOpts)
	if err != nil {
		return nil, err
	}
	apiPort, err1 := pgtest.FreePort()
	raftPort, err2 := pgtest.FreePort()
	if err := errors.Join(err1, err2); err != nil {
		pg.Remove()
		return nil, err
	}
	n := &Node{Name: name, PG: pg, Bin: bin, RaftTiming: "lan",
		API:     "127.0.0.1:" + strconv.Itoa(apiPort),
		Raft:    "127.0.0.1:" + strconv.Itoa(raftPort),
		DataDir: filepath.Join(pg.Dir, "pgmesh-data"),
		LogPath: filepath.Join(pg.Dir, "pgmesh.log"),
	}
	return n, nil
}

// Args is the daemon's command line.
func (n *Node) Args() []string {
	dsn := n.DSN
	if dsn == "" {
		dsn = n.PG.DSN()
	}
	args := []string{"run", "--node-name", n.Name, "--dsn", dsn,
		"--listen-api", n.API, "--listen-raft", n.Raft, "--data-dir", n.DataDir}
	if n.RaftTiming != "" {
		args = append(args, "--raft-timing", n.RaftTiming)
	}
	return append(args, n.ExtraArgs...)
}

// Start launches the daemon and waits until its API answers.
func (n *Node) Start(ctx context.Context) error {
	if n.cmd != nil {
		return fmt.Errorf("daemon %s already running", n.Name)
	}
	logf, err := os.OpenFile(n.LogPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(n.Bin, n.Args()...)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		logf.Close()
		return fmt.Errorf("start daemon %s: %w", n.Name, err)
	}
	n.cmd, n.done = cmd, make(chan struct{})
	go func() {
		_ = cmd.Wait()
		logf.Close()
		close(n.done)
	}()
	return poll.Until(ctx, 50*time.Millisecond, 30*time.Second, func() error {
		_, err := n.Status(ctx)
		if err == nil {
			return nil
		}
		select {
		case <-n.done:
			n.cmd = nil
			return poll.Stop(fmt.Errorf("daemon %s exited at start:\n%s", n.Name, n.LogTail(4000)))
		default:
		}
		return fmt.Errorf("daemon %s API did not answer within 30s: %v\n%s", n.Name, err, n.LogTail(4000))
	})
}

// Stop sends SIGTERM and waits for a clean exit.
func (n *Node) Stop() error {
	return n.signal(syscall.SIGTERM)
}

// Kill sends SIGKILL: the daemon dies mid-work, as in a crash.
func (n *Node) Kill() error {
	return n.signal(syscall.SIGKILL)
}

func (n *Node) signal(sig syscall.Signal) error {
	if n.cmd == nil {
		return nil
	}
	_ = n.cmd.Process.Signal(sig)
	select {
	case <-n.done:
	case <-time.After(30 * time.Second):
		_ = n.cmd.Process.Kill()
		<-n.done
		n.cmd = nil
		return fmt.Errorf("daemon %s did not exit within 30s of %v", n.Name, sig)
	}
	code := n.cmd.ProcessState.ExitCode()
	n.cmd = nil
	if sig == syscall.SIGTERM && code != 0 {
		return fmt.Errorf("daemon %s exited with code %d after SIGTERM", n.Name, code)
	}
	return nil
}

// Pid is the daemon's process id (0 when it is not running).
func (n *Node) Pid() int {
	if n.cmd == nil {
		return 0
	}
	return n.cmd.Process.Pid
}

// Running reports whether the daemon process is alive.
func (n *Node) Running() bool { return n.cmd != nil }

// Remove stops the daemon and the cluster and deletes their files.
func (n *Node) Remove() {
	_ = n.Kill()
	n.PG.Remove()
}

// CLI runs a pgmesh CLI command against this node's daemon.
func (n *Node) CLI(ctx context.Context, args ...string) (stdout, stderr string, err error) {
	cmd := exec.CommandContext(ctx, n.Bin, args...)
	cmd.Env = append(os.Environ(), "PGMESH_API="+n.API)
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	return o.String(), e.String(), err
}

// plain reaches the daemons, which serve plain HTTP here.
var plain = api.NewTransport(nil)

// Status reads the daemon's status.
func (n *Node) Status(ctx context.Context) (api.StatusReport, error) {
	return n.Client("").Status(ctx)
}

// Client is a client of the daemon's API, with token when set.
func (n *Node) Client(token string) *api.Client {
	if n.Transport == nil {
		return plain.Client(n.API, token)
	}
	return n.Transport.Client(n.API, token)
}

// LogTail returns the end of the daemon's log.
func (n *Node) LogTail(max int) string {
	b, _ := os.ReadFile(n.LogPath)
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// Form creates a group on the first node and joins the others through it.
// It returns the join token.
func Form(ctx context.Context, group string, nodes ...*Node) (string, error) {
	out, stderr, err := nodes[0].CLI(ctx, "group", "create", group)
	if err != nil {
		return "", fmt.Errorf("group create: %v: %s", err, stderr)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	token := lines[len(lines)-1]
	for _, n := range nodes[1:] {
		if _, stderr, err := n.CLI(ctx, "group", "join", "--via", nodes[0].API, "--token", token); err != nil {
			return "", fmt.Errorf("group join of %s: %v: %s", n.Name, err, stderr)
		}
	}
	return token, nil
}

// WaitConnected waits until every node streams from every other node.
func WaitConnected(ctx context.Context, timeout time.Duration, nodes ...*Node) error {
	return poll.Until(ctx, 100*time.Millisecond, timeout, func() error {
		var missing []string
		for _, n := range nodes {
			rep, err := n.Status(ctx)
			if err != nil {
				missing = append(missing, n.Name+": "+err.Error())
				continue
			}
			connected := map[string]bool{}
			for _, p := range rep.Peers {
				connected[p.Peer] = p.Connected
			}
			for _, m := range nodes {
				if m != n && !connected[m.Name] {
					missing = append(missing, n.Name+"<-"+m.Name)
				}
			}
		}
		if len(missing) == 0 {
			return nil
		}
		return fmt.Errorf("streams not connected after %s: %s", timeout, strings.Join(missing, ", "))
	})
}

// CaughtUp waits until every peer has applied what each node had committed
// when it was called, and every stream is connected with no lag.
func CaughtUp(ctx context.Context, timeout time.Duration, nodes ...*Node) error {
	deadline := time.Now().Add(timeout)
	// Status alone is not enough: a peer's WAL position in it is up to a
	// second old, so a write made just before could pass for applied.
	for _, n := range nodes {
		conn, err := n.PG.Connect(ctx)
		if err != nil {
			return err
		}
		var ok bool
		err = conn.QueryRow(ctx, `SELECT pgmesh.wait_for_peers(make_interval(secs => $1))`, time.Until(deadline).Seconds()).Scan(&ok)
		conn.Close(ctx)
		if err != nil {
			return fmt.Errorf("wait for %s's peers: %w", n.Name, err)
		}
		if !ok {
			return fmt.Errorf("not caught up after %s: a peer of %s has not applied its changes", timeout, n.Name)
		}
	}
	return poll.Until(ctx, 200*time.Millisecond, time.Until(deadline), func() error {
		var behind []string
		for _, n := range nodes {
			rep, err := n.Status(ctx)
			if err != nil {
				behind = append(behind, n.Name+": "+err.Error())
				continue
			}
			for _, p := range rep.Peers {
				if !p.Connected || p.LagBytes > 0 || p.PeerWALLSN == "" {
					behind = append(behind, fmt.Sprintf("%s<-%s (connected %v, lag %d bytes)", n.Name, p.Peer, p.Connected, p.LagBytes))
				}
			}
		}
		if len(behind) == 0 {
			return nil
		}
		return fmt.Errorf("not caught up after %s: %s", timeout, strings.Join(behind, ", "))
	})
}
