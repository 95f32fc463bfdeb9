// Command pgmesh-bench measures pgmesh against native PostgreSQL logical
// replication (publication + subscription) on the same machine, in one run,
// with the same workloads. Run it with `make bench`; sizes are flags.
//
// Catch-up workloads build a backlog on the sender while the receiver is
// held (pgmesh: the receiving daemon stopped; native: the subscription
// disabled), then release it and time how long the backlog takes to become
// visible on the receiver, from the moment the receiver's stream is running.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/localmesh"
	"github.com/pgmesh/pgmesh/internal/pgtest"
)

var (
	singleTxns = flag.Int("single", 100000, "workload 1 and 7: single-row INSERT transactions")
	batchTxns  = flag.Int("batches", 5000, "workload 2: 100-row INSERT transactions")
	updateTxns = flag.Int("updates", 20000, "workload 3: pgbench tpcb-like transactions (3 updates + 1 insert)")
	rate       = flag.Int("rate", 2000, "workload 4: transactions per second")
	latencyDur = flag.Duration("latency-for", 10*time.Second, "workload 4: how long")
	bigRows    = flag.Int("big", 1000000, "workload 5: rows in one transaction")
	nextvals   = flag.Int("nextvals", 200000, "workload 6: values drawn per sequence kind")
	repeat     = flag.Int("repeat", 3, "workloads 1 and 2: runs per system (the median is reported)")
	only       = flag.String("only", "", "comma-separated workloads to run (1-7); default all")
)

const schema = `CREATE TABLE single (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE batch (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
CREATE TABLE lat (id bigint PRIMARY KEY, sent timestamptz NOT NULL, arrived timestamptz);
CREATE TABLE sentinel (id int PRIMARY KEY)`

// The receiver stamps arrival (ENABLE ALWAYS: it fires for applied rows too).
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

func want(n int) bool {
	return *only == "" || strings.Contains(","+*only+",", ","+strconv.Itoa(n)+",")
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
}

type result struct {
	what           string
	pgmesh, native string
	ratio          string
}

func run(ctx context.Context) error {
	dir, err := os.MkdirTemp("", "pgmesh-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fmt.Println("building pgmesh and starting four throwaway clusters (fsync=off, synchronous_commit=off)")
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
	systems := []system{pm, nat}

	var results []result
	add := func(what string, vals [2]float64, unit string, higherIsBetter bool, format string) {
		r := result{what: what, pgmesh: fmt.Sprintf(format, vals[0]) + unit, native: fmt.Sprintf(format, vals[1]) + unit}
		if vals[0] > 0 && vals[1] > 0 {
			ratio := vals[0] / vals[1]
			if !higherIsBetter {
				ratio = vals[1] / vals[0]
			}
			r.ratio = fmt.Sprintf("%.2f", ratio)
		}
		results = append(results, r)
		fmt.Printf("  %s: pgmesh %s, native %s\n", what, r.pgmesh, r.native)
	}
	sentinel := 0
	catchUp := func(s system, build func(*pgtest.Cluster) error) (time.Duration, error) {
		sentinel++
		if err := s.settle(ctx); err != nil {
			return 0, err
		}
		if err := s.hold(ctx); err != nil {
			return 0, err
		}
		if err := build(s.sender()); err != nil {
			return 0, err
		}
		if err := s.sender().Exec(ctx, `INSERT INTO sentinel VALUES ($1)`, sentinel); err != nil {
			return 0, err
		}
		if err := s.release(ctx); err != nil {
			return 0, err
		}
		start := time.Now()
		if err := waitFor(ctx, s.receiver(), `SELECT count(*) FROM sentinel WHERE id = $1`, sentinel); err != nil {
			return 0, fmt.Errorf("%s: %w", s.name(), err)
		}
		return time.Since(start), nil
	}
	// Catch-up of inserts is run -repeat times, the systems taking turns,
	// and the median reported: a shared 2-core machine is noisy.
	rowsPerSec := func(what string, rows int, build func(*pgtest.Cluster) error) error {
		runs := [2][]float64{}
		for range max(*repeat, 1) {
			for i, s := range systems {
				d, err := catchUp(s, build)
				if err != nil {
					return err
				}
				runs[i] = append(runs[i], float64(rows)/d.Seconds())
			}
		}
		var v [2]float64
		for i := range runs {
			sort.Float64s(runs[i])
			v[i] = runs[i][len(runs[i])/2]
		}
		if *repeat > 1 {
			fmt.Printf("  runs: pgmesh %.0f, native %.0f rows/s\n", runs[0], runs[1])
		}
		add(what, v, " rows/s", true, "%.0f")
		return nil
	}
	if want(1) {
		fmt.Printf("1. catch-up of %d single-row INSERT transactions\n", *singleTxns)
		if err := rowsPerSec("1. single-row inserts", *singleTxns, func(c *pgtest.Cluster) error {
			return c.Exec(ctx, fmt.Sprintf(`DO $$ DECLARE base bigint := (SELECT coalesce(max(id), 0) FROM single);
				BEGIN FOR i IN 1..%d LOOP
				INSERT INTO single VALUES (base + i, 'payload ' || i); COMMIT; END LOOP; END $$`, *singleTxns))
		}); err != nil {
			return err
		}
	}
	if want(2) {
		fmt.Printf("2. catch-up of %d INSERT transactions of 100 rows\n", *batchTxns)
		if err := rowsPerSec("2. 100-row inserts", *batchTxns*100, func(c *pgtest.Cluster) error {
			return c.Exec(ctx, fmt.Sprintf(`DO $$ DECLARE base bigint := (SELECT coalesce(max(id), 0) FROM batch);
				BEGIN FOR i IN 0..%d LOOP
				INSERT INTO batch SELECT base + i * 100 + g, 'payload ' || g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`, *batchTxns-1))
		}); err != nil {
			return err
		}
	}
	if want(3) {
		fmt.Printf("3. catch-up of %d pgbench tpcb-like transactions (scale 1)\n", *updateTxns)
		var v [2]float64
		for i, s := range systems {
			d, err := catchUp(s, func(c *pgtest.Cluster) error {
				return pgbench(ctx, c, "-n", "-b", "tpcb-like", "-t", strconv.Itoa(*updateTxns))
			})
			if err != nil {
				return err
			}
			v[i] = float64(*updateTxns) / d.Seconds()
		}
		add("3. pgbench tpcb-like", v, " txn/s", true, "%.0f")
	}
	if want(4) {
		fmt.Printf("4. commit-to-visible latency at %d transactions/s for %s\n", *rate, *latencyDur)
		var p50, p99 [2]float64
		for i, s := range systems {
			if err := s.settle(ctx); err != nil {
				return err
			}
			a, b, err := latency(ctx, s)
			if err != nil {
				return err
			}
			p50[i], p99[i] = a, b
		}
		add("4. latency p50", p50, " ms", false, "%.2f")
		add("4. latency p99", p99, " ms", false, "%.2f")
	}
	if want(5) {
		fmt.Printf("5. one transaction of %d rows: catch-up and the pgmesh daemon's peak RSS\n", *bigRows)
		var v [2]float64
		for i, s := range systems {
			d, err := catchUp(s, func(c *pgtest.Cluster) error {
				return c.Exec(ctx, fmt.Sprintf(`INSERT INTO big SELECT g, 'payload ' || g FROM generate_series(1, %d) g`, *bigRows))
			})
			if err != nil {
				return err
			}
			v[i] = float64(*bigRows) / d.Seconds()
		}
		add("5. one big transaction", v, " rows/s", true, "%.0f")
		rss, err := peakRSS(pm.b.Pid())
		if err != nil {
			return err
		}
		results = append(results, result{what: "5. pgmesh daemon peak RSS", pgmesh: fmt.Sprintf("%.0f MB", float64(rss)/(1<<20)), native: "-"})
	}

	if want(6) {
		fmt.Printf("6. nextval rate, %d values per kind, on one pgmesh node\n", *nextvals)
		for _, r := range sequenceRates(ctx, pm) {
			results = append(results, r)
			fmt.Printf("  %s: %s\n", r.what, r.pgmesh)
		}
	}

	if want(7) {
		fmt.Printf("7. floor: %d single-row INSERT transactions pipelined into one backend, no replication\n", *singleTxns)
		v, err := pipelinedFloor(ctx, nat.b, *singleTxns)
		if err != nil {
			return err
		}
		r := result{what: "7. SQL-protocol floor, 1-row txns", pgmesh: fmt.Sprintf("%.0f rows/s", v), native: "-"}
		results = append(results, r)
		fmt.Printf("  %s: %s\n", r.what, r.pgmesh)
	}

	fmt.Printf("\nmachine: %d cores, %s, %s, %s\n", runtime.NumCPU(), memTotal(), pgVersion(ctx, nat.b), runtime.Version())
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "workload\tpgmesh\tnative\tpgmesh/native\t")
	for _, r := range results {
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t\n", r.what, r.pgmesh, r.native, r.ratio)
	}
	w.Flush()
	return nil
}

// latency writes at a fixed rate on the sender and reads the arrival times
// the receiver stamped.
func latency(ctx context.Context, s system) (p50, p99 float64, err error) {
	workers := 4
	per := time.Second * time.Duration(workers) / time.Duration(*rate)
	var wg sync.WaitGroup
	errs := make([]error, workers)
	end := time.Now().Add(*latencyDur)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := pgx.Connect(ctx, s.sender().DSN())
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
			return 0, 0, e
		}
	}
	var n int64
	if err := queryRow(ctx, s.sender(), `SELECT count(*) FROM lat`, &n); err != nil {
		return 0, 0, err
	}
	if err := waitFor(ctx, s.receiver(), `SELECT CASE WHEN count(*) = $1 THEN 1 ELSE 0 END FROM lat`, n); err != nil {
		return 0, 0, err
	}
	err = queryRow(ctx, s.receiver(), `SELECT
		percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM arrived - sent) * 1000),
		percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM arrived - sent) * 1000) FROM lat`, &p50, &p99)
	if err == nil {
		err = s.sender().Exec(ctx, `TRUNCATE lat`)
	}
	return p50, p99, err
}

func queryRow(ctx context.Context, c *pgtest.Cluster, sql string, dst ...any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	return conn.QueryRow(ctx, sql).Scan(dst...)
}

// waitFor polls sql (which takes one argument and returns a count) until it
// returns 1.
func waitFor(ctx context.Context, c *pgtest.Cluster, sql string, arg any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	deadline := time.Now().Add(30 * time.Minute)
	for time.Now().Before(deadline) {
		var n int64
		if err := conn.QueryRow(ctx, sql, arg).Scan(&n); err != nil {
			return err
		}
		if n == 1 {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return fmt.Errorf("receiver did not catch up within 30 minutes")
}

func pgbench(ctx context.Context, c *pgtest.Cluster, args ...string) error {
	bin, err := pgtest.FindBinDir()
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "pgbench"), append(args, "-h", "127.0.0.1", "-p", strconv.Itoa(c.Port), "-U", "postgres", "postgres")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("pgbench %v: %w\n%s", args, err, out)
	}
	return nil
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
			return []result{{what: "6. nextval", pgmesh: "setup failed: " + err.Error()}}
		}
	}
	for _, conv := range [][]string{{"--kind", "timeshard", "bench_ts"}, {"--kind", "galloc", "--chunk-size", "100000", "bench_ga"}} {
		if _, stderr, err := pm.a.CLI(ctx, append([]string{"sequences", "convert"}, conv...)...); err != nil {
			return []result{{what: "6. nextval", pgmesh: "convert failed: " + stderr}}
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
		r := result{what: "6. nextval, " + k.name, native: "-"}
		if err != nil {
			r.pgmesh = "failed: " + err.Error()
		} else {
			r.pgmesh = fmt.Sprintf("%.0f values/s", float64(*nextvals)/time.Since(start).Seconds())
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
