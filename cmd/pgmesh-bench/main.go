// Command pgmesh-bench measures pgmesh against native PostgreSQL logical
// replication (publication + subscription, one way) and pglogical 2 (two
// nodes, bidirectional, last-update-wins) on the same machine, in one run,
// with the same workloads. Run it with `make bench`; sizes are flags.
//
// Catch-up workloads build a backlog on the sender while the receiver is
// held (pgmesh: the receiving daemon stopped; native and pglogical: the
// subscription disabled), then release it and time how long the backlog takes to become
// visible on the receiver, from the moment the receiver's stream is running.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

var (
	singleTxns  = flag.Int("single", 100000, "workload 1 and 7: single-row INSERT transactions")
	batchTxns   = flag.Int("batches", 5000, "workload 2: 100-row INSERT transactions")
	updateTxns  = flag.Int("updates", 20000, "workload 3: pgbench tpcb-like transactions (3 updates + 1 insert)")
	rate        = flag.Int("rate", 2000, "workload 4: transactions per second")
	latencyDur  = flag.Duration("latency-for", 10*time.Second, "workload 4: how long")
	bigRows     = flag.Int("big", 1000000, "workload 5: rows in one transaction")
	nextvals    = flag.Int("nextvals", 200000, "workload 6: values drawn per sequence kind")
	repeat      = flag.Int("repeat", 3, "workloads 1, 2, 3 and 4: runs per system (the median is reported)")
	compareRows = flag.Int("compare-rows", 1000000, "workload 8: rows of the table compared on three nodes")
	idleWindow  = flag.Duration("idle-for", 10*time.Second, "workload 9: how long each idle group is measured")
	luw         = flag.String("luw-resolution", "", "luw_resolution of the pgmesh pair (default: pgmesh's default)")
	raftTiming  = flag.String("raft-timing", "", "workload 9: raft_timing of the idle groups (default: pgmesh's default, wan)")
	only        = flag.String("only", "", "comma-separated workloads to run, by name or number (see -h); default all")
	against     = flag.String("against", "", "other pgmesh binaries, comma-separated, each run as a system of its own beside this build's in workloads 1-5 (an A/B of builds in one run; left out of the ratio)")
)

const schema = `CREATE TABLE single (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE batch (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE lat (id bigint PRIMARY KEY, sent timestamptz NOT NULL, arrived timestamptz);
CREATE TABLE sentinel (id int PRIMARY KEY)`

// Each node stamps arrival (ENABLE ALWAYS: it fires for applied rows too).
const stampArrival = `CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN NEW.arrived := clock_timestamp(); RETURN NEW; END $$;
CREATE TRIGGER stamp BEFORE INSERT ON lat FOR EACH ROW EXECUTE FUNCTION stamp();
ALTER TABLE lat ENABLE ALWAYS TRIGGER stamp`

func main() {
	flag.Parse()
	ctx := context.Background()
	if err := run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// system is one sender/receiver pair under test.
type system interface {
	name() string
	sender() *pgtest.Cluster
	receiver() *pgtest.Cluster
	hold(ctx context.Context) error
	// release lets the receiver apply and returns once it is streaming.
	release(ctx context.Context) error
	// settle waits until the last workload's work is done everywhere, so
	// that none of it runs into the next.
	settle(ctx context.Context) error
	// roots are the processes (postmasters, daemons) whose trees' CPU
	// time is the system's cost.
	roots() []int
}

// result is one table row: a value per system (pgmesh first), and pgmesh's
// ratio to the best of the others.
type result struct {
	what  string
	vals  []string
	ratio string
}

// catchUpRun is one timed catch-up: how long it took and the CPU time the
// system's processes used meanwhile; for pgmesh also its daemon's CPU time
// and how the receiver applied the source's transactions.
type catchUpRun struct {
	took      time.Duration
	cpu       cpuSplit
	daemonCPU time.Duration
	applied   applyCounts
}

// applyCounts is how many source transactions a pgmesh receiver applied,
// in how many local commits, by how many statements.
type applyCounts struct{ txns, localCommits, statements int64 }

func (a applyCounts) minus(b applyCounts) applyCounts {
	return applyCounts{a.txns - b.txns, a.localCommits - b.localCommits, a.statements - b.statements}
}

// twoWay is a system that replicates both ways; latency is measured both
// ways, since pgmesh's causality guard waits longer towards the lower node
// id (conflict.Rule.VisibleAfter).
type twoWay interface {
	// back returns the sender and receiver of the other direction.
	back() (sender, receiver *pgtest.Cluster)
}

// appliedCounter is a system whose receiver counts how it applied: pgmesh.
type appliedCounter interface {
	daemonPid() int
	applied(ctx context.Context) (applyCounts, error)
}

func run(ctx context.Context) error {
	chosen, err := selectWorkloads(*only)
	if err != nil {
		return err
	}
	dir, err := os.MkdirTemp("", "pgmesh-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fmt.Println("building pgmesh and starting a pair of throwaway clusters per system (fsync=off, synchronous_commit=off)")
	bin, err := localmesh.Build(ctx, dir)
	if err != nil {
		return err
	}
	pm, err := newMesh(ctx, bin)
	if err != nil {
		return err
	}
	defer pm.close()
	nat, err := newNative(ctx)
	if err != nil {
		return err
	}
	defer nat.close()
	systems := []system{pm}
	for bin := range strings.SplitSeq(*against, ",") {
		if bin == "" {
			continue
		}
		other, err := newMesh(ctx, bin)
		if err != nil {
			return fmt.Errorf("pgmesh from %s: %w", bin, err)
		}
		defer other.close()
		other.label = "pgmesh@" + filepath.Base(bin)
		systems = append(systems, other)
	}
	systems = append(systems, nat)
	if why := pglogicalMissing(); why != "" {
		fmt.Println("pglogical left out:", why)
	} else {
		pgl, err := newPglogical(ctx)
		if err != nil {
			return err
		}
		defer pgl.close()
		systems = append(systems, pgl)
	}

	b := &bench{ctx: ctx, bin: bin, pm: pm, nat: nat, systems: systems}
	for _, w := range chosen {
		if err := w.run(b); err != nil {
			return fmt.Errorf("workload %s: %w", w.name, err)
		}
	}

	fmt.Printf("\nmachine: %d cores, %s, %s, %s\n", runtime.NumCPU(), memTotal(), pgVersion(ctx, nat.b), runtime.Version())
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	header := "workload"
	for _, s := range systems {
		header += "\t" + s.name()
	}
	fmt.Fprintln(w, header+"\tpgmesh/best other\t")
	for _, r := range b.results {
		fmt.Fprintf(w, "%s\t%s\t%s\t\n", r.what, strings.Join(r.vals, "\t"), r.ratio)
	}
	w.Flush()
	return nil
}

// one is a row with a figure for pgmesh alone.
func one(what, val string, systems int) result {
	r := result{what: what, vals: []string{val}}
	for range systems - 1 {
		r.vals = append(r.vals, "-")
	}
	return r
}

// medians returns the median of each system's runs (NaN for a system
// without any).
func medians(runs [][]float64) []float64 {
	out := make([]float64, len(runs))
	for i, r := range runs {
		if len(r) == 0 {
			out[i] = math.NaN()
			continue
		}
		r = slices.Clone(r)
		slices.Sort(r)
		out[i] = r[len(r)/2]
	}
	return out
}

// latency writes at a fixed rate on the sender and reads the arrival times
// the receiver stamped; n is how many transactions it wrote.
func latency(ctx context.Context, sender, receiver *pgtest.Cluster) (p50, p99 float64, n int64, err error) {
	workers := 4
	per := time.Second * time.Duration(workers) / time.Duration(*rate)
	var wg sync.WaitGroup
	errs := make([]error, workers)
	end := time.Now().Add(*latencyDur)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// Each commit flushed at once: with the clusters'
			// synchronous_commit=off, walsenders would see it only at the
			// WAL writer's next round (200 ms), and every system's latency
			// would be mostly that wait.
			cfg, err := pgx.ParseConfig(sender.DSN())
			if err != nil {
				errs[w] = err
				return
			}
			cfg.RuntimeParams["synchronous_commit"] = "on"
			conn, err := pgx.ConnectConfig(ctx, cfg)
			if err != nil {
				errs[w] = err
				return
			}
			defer conn.Close(ctx)
			t := time.NewTicker(per)
			defer t.Stop()
			for i := int64(w); time.Now().Before(end); i += int64(workers) {
				<-t.C
				if _, err := conn.Exec(ctx, `INSERT INTO lat (id, sent) VALUES ($1, clock_timestamp())`, i); err != nil {
					errs[w] = err
					return
				}
			}
		}()
	}
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return 0, 0, 0, e
		}
	}
	if err := queryRow(ctx, sender, `SELECT count(*) FROM lat`, &n); err != nil {
		return 0, 0, 0, err
	}
	if err := waitFor(ctx, receiver, `SELECT count(*) = $1 FROM lat`, n); err != nil {
		return 0, 0, 0, err
	}
	err = queryRow(ctx, receiver, `SELECT
		percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM arrived - sent) * 1000),
		percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM arrived - sent) * 1000) FROM lat`, &p50, &p99)
	if err == nil {
		err = sender.Exec(ctx, `TRUNCATE lat`)
	}
	return p50, p99, n, err
}

func queryRow(ctx context.Context, c *pgtest.Cluster, sql string, dst ...any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.QueryRow(ctx, sql).Scan(dst...)
}

// waitFor waits until query (a boolean) is true on c: every 5 ms, since
// it times catch-ups, for at most 30 minutes.
func waitFor(ctx context.Context, c *pgtest.Cluster, query string, args ...any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return poll.Until(ctx, 5*time.Millisecond, 30*time.Minute, func() error {
		var ok *bool
		if err := conn.QueryRow(ctx, query, args...).Scan(&ok); err != nil {
			return poll.Stop(err)
		}
		if ok == nil || !*ok {
			return fmt.Errorf("not true within 30 minutes: %s", query)
		}
		return nil
	})
}

func pgbench(ctx context.Context, c *pgtest.Cluster, args ...string) error {
	prog, err := pgbenchPath()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, prog, append(args, "-h", "127.0.0.1", "-p", strconv.Itoa(c.Port), "-U", "postgres", "postgres")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench %v: %w\n%s", args, err, out)
	}
	return nil
}

// pgbenchPath finds pgbench: beside the server, else any PostgreSQL
// client installed (the servers fetched for 16+ ship none; pgbench speaks
// to newer servers fine), else on PATH.
func pgbenchPath() (string, error) {
	if bin, err := pgtest.FindBinDir(); err == nil {
		if p := filepath.Join(bin, "pgbench"); fileExists(p) {
			return p, nil
		}
	}
	found, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pgbench")
	if len(found) > 0 {
		return found[len(found)-1], nil
	}
	if p, err := exec.LookPath("pgbench"); err == nil {
		return p, nil
	}
	return "", errors.New("pgbench not found: apt-get install postgresql-client (or postgresql-15)")
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// peakRSS reads VmHWM (the peak resident set) of a process.
func peakRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb * 1024, err
		}
	}
	return 0, fmt.Errorf("no VmHWM for pid %d", pid)
}

func memTotal() string {
	b, _ := os.ReadFile("/proc/meminfo")
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "MemTotal:" {
			kb, _ := strconv.ParseFloat(f[1], 64)
			return fmt.Sprintf("%.0f GiB RAM", kb/(1<<20))
		}
	}
	return "? RAM"
}

func pgVersion(ctx context.Context, c *pgtest.Cluster) string {
	var v string
	if err := queryRow(ctx, c, `SELECT 'PostgreSQL ' || current_setting('server_version')`, &v); err != nil {
		return "PostgreSQL ?"
	}
	return v
}

// sequenceRates draws values from a plain sequence and from timeshard and
// galloc ones on the pgmesh sender, single session, in statements of 10,000.
func sequenceRates(ctx context.Context, pm *meshPair) []result {
	setup := `CREATE SEQUENCE bench_plain; CREATE SEQUENCE bench_ts; CREATE SEQUENCE bench_ga`
	// Plain DDL stays on its node: the sequences are made on both directly.
	for _, n := range []*localmesh.Node{pm.a, pm.b} {
		if err := n.PG.Exec(ctx, setup); err != nil {
			return []result{{what: "6. nextval", vals: []string{"setup failed: " + err.Error()}}}
		}
	}
	for _, conv := range [][]string{{"--kind", "timeshard", "bench_ts"}, {"--kind", "galloc", "--chunk-size", "100000", "bench_ga"}} {
		if _, stderr, err := pm.a.CLI(ctx, append([]string{"sequences", "convert"}, conv...)...); err != nil {
			return []result{{what: "6. nextval", vals: []string{"convert failed: " + stderr}}}
		}
	}
	var out []result
	for _, k := range []struct{ name, expr string }{
		{"plain sequence", "nextval('bench_plain')"},
		{"timeshard", "nextval('bench_ts')"},
		{"galloc", "pgmesh.galloc_nextval('bench_ga')"},
	} {
		conn, err := pm.a.PG.Connect(ctx)
		if err != nil {
			return out
		}
		start := time.Now()
		for done := 0; done < *nextvals; done += 10000 {
			if _, err = conn.Exec(ctx, fmt.Sprintf(`SELECT count(%s) FROM generate_series(1, 10000)`, k.expr)); err != nil {
				break
			}
		}
		conn.Close(ctx)
		r := result{what: "6. nextval, " + k.name}
		if err != nil {
			r.vals = []string{"failed: " + err.Error()}
		} else {
			r.vals = []string{fmt.Sprintf("%.0f values/s", float64(*nextvals)/time.Since(start).Seconds())}
		}
		out = append(out, r)
	}
	return out
}

// pipelinedFloor measures what any applier working through the SQL protocol
// can reach on this machine for single-row transactions: one backend, each
// transaction a prepared INSERT and a Sync, all pipelined, nothing else
// running. pgmesh's workload 1 cannot beat it; native replication applies
// inside the server and is not bound by it.
func pipelinedFloor(ctx context.Context, c *pgtest.Cluster, n int) (float64, error) {
	if err := c.Exec(ctx, `CREATE TABLE floor (id bigint PRIMARY KEY, payload text NOT NULL)`); err != nil {
		return 0, err
	}
	conn, err := pgconn.Connect(ctx, c.DSN())
	if err != nil {
		return 0, err
	}
	defer conn.Close(ctx)
	if _, err := conn.Prepare(ctx, "ins", `INSERT INTO floor VALUES ($1, $2)`, nil); err != nil {
		return 0, err
	}
	start := time.Now()
	for done := 0; done < n; {
		pl := conn.StartPipeline(ctx)
		for i := 0; i < 500 && done < n; i++ {
			done++
			pl.SendQueryPrepared("ins", [][]byte{[]byte(strconv.Itoa(done)), []byte("payload " + strconv.Itoa(done))}, nil, nil)
			pl.SendPipelineSync()
		}
		if err := pl.Flush(); err != nil {
			return 0, err
		}
		if err := pl.Close(); err != nil {
			return 0, err
		}
	}
	return float64(n) / time.Since(start).Seconds(), nil
}
