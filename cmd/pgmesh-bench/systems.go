package main

import (
	"bytes"
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// meshPair is a two-node pgmesh group; b receives. label names a second
// build run beside this one (-against).
type meshPair struct {
	a, b  *localmesh.Node
	label string
}

func (p *meshPair) daemonPid() int { return p.b.Pid() }

// applied reads b's counters for the stream from a.
func (p *meshPair) applied(ctx context.Context) (applyCounts, error) {
	rep, err := p.b.Status(ctx)
	if err != nil {
		return applyCounts{}, err
	}
	for _, s := range rep.Peers {
		if s.Peer == p.a.Name {
			return applyCounts{s.AppliedTxns, s.LocalCommits, s.Statements}, nil
		}
	}
	return applyCounts{}, fmt.Errorf("b has no stream from a")
}

func newMesh(ctx context.Context, bin string) (*meshPair, error) {
	p := &meshPair{}
	var err error
	if p.a, err = localmesh.NewNode(ctx, bin, "a", pgtest.Options{}); err != nil {
		return nil, err
	}
	if p.b, err = localmesh.NewNode(ctx, bin, "b", pgtest.Options{}); err != nil {
		p.a.Remove()
		return nil, err
	}
	if err := p.a.PG.Exec(ctx, schema); err != nil {
		p.close()
		return nil, err
	}
	if err := pgbench(ctx, p.a.PG, "-i", "-q", "-s", "1"); err != nil {
		p.close()
		return nil, err
	}
	// b gets the tables, empty: join then checks them and copies the
	// rows, with no pg_dump needed (the servers fetched for 16+ lack it).
	if err := p.b.PG.Exec(ctx, schema); err != nil {
		p.close()
		return nil, err
	}
	if err := pgbench(ctx, p.b.PG, "-i", "-q", "-s", "1", "-I", "dtp"); err != nil {
		p.close()
		return nil, err
	}
	for _, n := range []*localmesh.Node{p.a, p.b} {
		if *luw != "" {
			n.ExtraArgs = []string{"--luw-resolution", *luw}
		}
		if err := n.Start(ctx); err != nil {
			p.close()
			return nil, err
		}
	}
	// b joins: a's rows are copied.
	if _, err := localmesh.Form(ctx, "bench", p.a, p.b); err != nil {
		p.close()
		return nil, err
	}
	for _, n := range []*localmesh.Node{p.a, p.b} {
		if err := n.PG.Exec(ctx, stampArrival); err != nil {
			p.close()
			return nil, err
		}
	}
	return p, localmesh.WaitConnected(ctx, 30*time.Second, p.a, p.b)
}

func (p *meshPair) name() string {
	if p.label != "" {
		return p.label
	}
	return "pgmesh"
}
func (p *meshPair) sender() *pgtest.Cluster   { return p.a.PG }
func (p *meshPair) receiver() *pgtest.Cluster { return p.b.PG }
func (p *meshPair) back() (sender, receiver *pgtest.Cluster) {
	return p.b.PG, p.a.PG
}
func (p *meshPair) hold(context.Context) error {
	return p.b.Stop()
}

func (p *meshPair) release(ctx context.Context) error {
	if err := p.b.Start(ctx); err != nil {
		return err
	}
	return localmesh.WaitConnected(ctx, 30*time.Second, p.a, p.b)
}

// settle waits for both streams: on PostgreSQL 15 the sender's daemon also
// reads back every transaction the receiver applied (and drops it).
func (p *meshPair) settle(ctx context.Context) error {
	return localmesh.CaughtUp(ctx, 5*time.Minute, p.a, p.b)
}

func (p *meshPair) close() {
	// A clean stop, so that a daemon's CPU profile (PGMESH_CPUPROFILE) is written.
	_ = p.a.Stop()
	if p.b != nil {
		_ = p.b.Stop()
	}
	p.a.Remove()
	if p.b != nil {
		p.b.Remove()
	}
}

// nativePair is a publication on a and a subscription on b.
type nativePair struct{ a, b *pgtest.Cluster }

func newNative(ctx context.Context) (*nativePair, error) {
	p := &nativePair{}
	var err error
	if p.a, err = pgtest.Start(ctx, pgtest.Options{}); err != nil {
		return nil, err
	}
	if p.b, err = pgtest.Start(ctx, pgtest.Options{}); err != nil {
		p.a.Remove()
		return nil, err
	}
	steps := []func() error{
		func() error { return p.a.Exec(ctx, schema) },
		func() error { return p.b.Exec(ctx, schema) },
		func() error { return pgbench(ctx, p.a, "-i", "-q", "-s", "1") },
		func() error { return pgbench(ctx, p.b, "-i", "-q", "-s", "1", "-I", "dtp") }, // tables and keys only
		func() error { return p.b.Exec(ctx, stampArrival) },
		func() error { return p.a.Exec(ctx, `CREATE PUBLICATION bench FOR ALL TABLES`) },
		func() error {
			return p.b.Exec(ctx, fmt.Sprintf(`CREATE SUBSCRIPTION bench CONNECTION 'host=127.0.0.1 port=%d user=postgres dbname=postgres' PUBLICATION bench`, p.a.Port))
		},
		func() error {
			return waitFor(ctx, p.b, `SELECT count(*) = 100000 FROM pgbench_accounts`)
		},
	}
	for _, s := range steps {
		if err := s(); err != nil {
			p.close()
			return nil, err
		}
	}
	return p, nil
}

func (p *nativePair) name() string              { return "native" }
func (p *nativePair) sender() *pgtest.Cluster   { return p.a }
func (p *nativePair) receiver() *pgtest.Cluster { return p.b }

func (p *nativePair) hold(ctx context.Context) error {
	if err := p.b.Exec(ctx, `ALTER SUBSCRIPTION bench DISABLE`); err != nil {
		return err
	}
	// Wait until the apply worker has exited.
	return waitFor(ctx, p.b, `SELECT NOT EXISTS (SELECT FROM pg_stat_subscription WHERE pid IS NOT NULL)`)
}

func (p *nativePair) release(ctx context.Context) error {
	if err := p.b.Exec(ctx, `ALTER SUBSCRIPTION bench ENABLE`); err != nil {
		return err
	}
	return waitFor(ctx, p.b, `SELECT count(*) = 1 FROM pg_stat_subscription WHERE pid IS NOT NULL`)
}

func (p *nativePair) settle(context.Context) error { return nil }

func (p *nativePair) close() {
	if p.a != nil {
		p.a.Remove()
	}
	if p.b != nil {
		p.b.Remove()
	}
}

// pglogicalPair is pglogical 2 bidirectional on two clusters, as its users
// run it for multi-master: each node subscribes to the other with
// forward_origins '{}' (no loops) and last-update-wins conflict resolution.
type pglogicalPair struct{ a, b *pgtest.Cluster }

// pglogicalMissing says why pglogical cannot run here, or "".
func pglogicalMissing() string {
	bin, err := pgtest.FindBinDir()
	if err != nil {
		return err.Error()
	}
	lib := filepath.Join(filepath.Dir(bin), "lib", "pglogical.so")
	if _, err := os.Stat(lib); err != nil {
		return "pglogical is not installed for this server (no " + lib + "); Debian packages it for its PostgreSQL 15 (apt-get install postgresql-15-pglogical)"
	}
	return ""
}

func newPglogical(ctx context.Context) (*pglogicalPair, error) {
	p := &pglogicalPair{}
	settings := map[string]string{
		"shared_preload_libraries":        "'pglogical'",
		"pglogical.conflict_resolution":   "'last_update_wins'",
		"pglogical.conflict_log_level":    "'debug1'",
		"max_logical_replication_workers": "8",
	}
	var err error
	for _, c := range []**pgtest.Cluster{&p.a, &p.b} {
		if *c, err = pgtest.Start(ctx, pgtest.Options{Settings: settings}); err != nil {
			p.close()
			return nil, err
		}
		// From minor releases 15.19/16.15/17.11/18.6 on, only listed output
		// plugins load: pglogical's must be allowed.
		if err := (*c).Exec(ctx, `DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_settings WHERE name = 'output_plugin_libraries') THEN
			EXECUTE 'ALTER SYSTEM SET output_plugin_libraries = ''pgoutput, test_decoding, pglogical_output'''; END IF; END $$`); err != nil {
			p.close()
			return nil, err
		}
		if err := (*c).Restart(ctx); err != nil {
			p.close()
			return nil, err
		}
	}
	dsn := func(c *pgtest.Cluster) string {
		return fmt.Sprintf("host=127.0.0.1 port=%d dbname=postgres user=postgres", c.Port)
	}
	node := func(c *pgtest.Cluster, name string) error {
		return c.Exec(ctx, fmt.Sprintf(`CREATE EXTENSION pglogical;
			SELECT pglogical.create_node(node_name := '%s', dsn := '%s');
			SELECT pglogical.replication_set_add_table('default', c.oid::regclass, synchronize_data := false)
			  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
			  WHERE n.nspname = 'public' AND c.relkind = 'r' AND c.relname <> 'pgbench_history';
			SELECT pglogical.replication_set_add_table('default_insert_only', 'pgbench_history', synchronize_data := false)`, name, dsn(c)))
	}
	subscribe := func(c, provider *pgtest.Cluster, name string) error {
		return c.Exec(ctx, fmt.Sprintf(`SELECT pglogical.create_subscription(subscription_name := '%s', provider_dsn := '%s',
			replication_sets := ARRAY['default', 'default_insert_only'], synchronize_structure := false,
			synchronize_data := false, forward_origins := '{}')`, name, dsn(provider)))
	}
	steps := []func() error{
		func() error { return p.a.Exec(ctx, schema) },
		func() error { return p.b.Exec(ctx, schema) },
		func() error { return pgbench(ctx, p.a, "-i", "-q", "-s", "1") },
		func() error { return pgbench(ctx, p.b, "-i", "-q", "-s", "1") }, // same rows on both
		func() error { return p.a.Exec(ctx, stampArrival) },
		func() error { return p.b.Exec(ctx, stampArrival) },
		func() error { return node(p.a, "a") },
		func() error { return node(p.b, "b") },
		func() error { return subscribe(p.b, p.a, "b_from_a") },
		func() error { return subscribe(p.a, p.b, "a_from_b") },
		func() error { return p.waitReplicating(ctx) },
	}
	for _, s := range steps {
		if err := s(); err != nil {
			p.close()
			return nil, fmt.Errorf("pglogical setup: %w", err)
		}
	}
	return p, nil
}

func (p *pglogicalPair) waitReplicating(ctx context.Context) error {
	for _, c := range []*pgtest.Cluster{p.a, p.b} {
		if err := waitFor(ctx, c, `SELECT count(*) = 1 FROM pglogical.show_subscription_status() WHERE status = 'replicating'`); err != nil {
			return err
		}
	}
	return nil
}

func (p *pglogicalPair) name() string              { return "pglogical" }
func (p *pglogicalPair) sender() *pgtest.Cluster   { return p.a }
func (p *pglogicalPair) receiver() *pgtest.Cluster { return p.b }
func (p *pglogicalPair) back() (sender, receiver *pgtest.Cluster) {
	return p.b, p.a
}

func (p *pglogicalPair) hold(ctx context.Context) error {
	return p.b.Exec(ctx, `SELECT pglogical.alter_subscription_disable('b_from_a', immediate := true)`)
}

func (p *pglogicalPair) release(ctx context.Context) error {
	if err := p.b.Exec(ctx, `SELECT pglogical.alter_subscription_enable('b_from_a', immediate := true)`); err != nil {
		return err
	}
	return p.waitReplicating(ctx)
}

// settle waits until each node's slot for the other has confirmed
// everything written: the backward stream reads (and drops) what b applied.
func (p *pglogicalPair) settle(ctx context.Context) error {
	for _, c := range []*pgtest.Cluster{p.a, p.b} {
		if err := waitFor(ctx, c, `SELECT bool_and(confirmed_flush_lsn >= pg_current_wal_lsn() - 64 * 1024) FROM pg_replication_slots`); err != nil {
			return err
		}
	}
	return nil
}

func (p *pglogicalPair) roots() []int { return []int{postmasterPID(p.a), postmasterPID(p.b)} }

func (p *pglogicalPair) close() {
	if p.a != nil {
		p.a.Remove()
	}
	if p.b != nil {
		p.b.Remove()
	}
}

func (p *meshPair) roots() []int {
	return []int{postmasterPID(p.a.PG), postmasterPID(p.b.PG), p.a.Pid(), p.b.Pid()}
}

func (p *nativePair) roots() []int { return []int{postmasterPID(p.a), postmasterPID(p.b)} }

// postmasterPID reads a running cluster's postmaster pid (0 if unknown).
func postmasterPID(c *pgtest.Cluster) int {
	b, err := os.ReadFile(filepath.Join(c.Data, "postmaster.pid"))
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	pid, _ := strconv.Atoi(strings.TrimSpace(line))
	return pid
}

// cpuTime is the CPU time used so far by the processes rooted at roots and
// all their descendants, plus what their exited children used.
func cpuTime(roots []int) time.Duration { return cpuUse(roots).total }

// cpuSplit is CPU time used so far: in all, and by walsenders alone (the
// sender's decoding, and on PostgreSQL 15 the echo of every applied change
// back to the peer it came from).
type cpuSplit struct{ total, walsenders time.Duration }

func (c cpuSplit) minus(d cpuSplit) cpuSplit {
	return cpuSplit{total: c.total - d.total, walsenders: c.walsenders - d.walsenders}
}

// cpuUse is cpuTime with the walsenders' share.
func cpuUse(roots []int) cpuSplit {
	type proc struct{ ppid, ticks, childTicks int64 }
	procs := map[int]proc{}
	dirs, _ := os.ReadDir("/proc")
	for _, d := range dirs {
		pid, err := strconv.Atoi(d.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + d.Name() + "/stat")
		if err != nil {
			continue
		}
		// Fields after the command name, which is in parentheses.
		i := strings.LastIndexByte(string(b), ')')
		f := strings.Fields(string(b[i+1:]))
		if len(f) < 15 {
			continue
		}
		num := func(k int) int64 { v, _ := strconv.ParseInt(f[k], 10, 64); return v }
		// f[1] ppid, f[11] utime, f[12] stime, f[13] cutime, f[14] cstime
		procs[pid] = proc{ppid: num(1), ticks: num(11) + num(12), childTicks: num(13) + num(14)}
	}
	in := map[int]bool{}
	for _, r := range roots {
		in[r] = r != 0
	}
	for changed := true; changed; {
		changed = false
		for pid, p := range procs {
			if !in[pid] && in[int(p.ppid)] {
				in[pid], changed = true, true
			}
		}
	}
	var ticks, senderTicks int64
	for pid := range in {
		p, ok := procs[pid]
		if !ok || !in[pid] {
			continue
		}
		ticks += p.ticks
		if slices.Contains(roots, pid) {
			ticks += p.childTicks
		} else if isWalsender(pid) {
			senderTicks += p.ticks
		}
	}
	const hz = 100 // USER_HZ
	return cpuSplit{total: time.Duration(ticks) * time.Second / hz, walsenders: time.Duration(senderTicks) * time.Second / hz}
}

// isWalsender reports whether a postmaster's child is a walsender, from the
// title PostgreSQL gives it ("postgres: walsender ...").
func isWalsender(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	return err == nil && bytes.HasPrefix(b, []byte("postgres: walsender "))
}

// busyTicks is the machine's CPU time so far from /proc/stat, in clock
// ticks: busy (everything but idle and iowait) and in all.
type busyTicks struct{ busy, total int64 }

func machineBusy() busyTicks {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return busyTicks{}
	}
	line, _, _ := strings.Cut(string(b), "\n")
	var t busyTicks
	for i, f := range strings.Fields(line)[1:] { // after "cpu"
		v, _ := strconv.ParseInt(f, 10, 64)
		if i >= 8 { // guest time is counted in user already
			break
		}
		t.total += v
		if i != 3 && i != 4 { // idle, iowait
			t.busy += v
		}
	}
	return t
}

// minus is the share of the time since since that the machine was busy, in
// percent.
func (t busyTicks) minus(since busyTicks) float64 {
	total := t.total - since.total
	if total <= 0 {
		return math.NaN()
	}
	return 100 * float64(t.busy-since.busy) / float64(total)
}
