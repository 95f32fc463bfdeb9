package main

import (
	"context"
	"fmt"
	"iter"
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// A workload is one measurement of the table: selected by name (or its old
// number) with -only, it runs against the run's systems and adds rows.
// Adding one is adding an entry here and its method.
type workload struct {
	name, number string
	run          func(*bench) error
}

var workloads = []workload{
	{"insert1", "1", (*bench).singleInserts},
	{"insert100", "2", (*bench).batchInserts},
	{"pgbench", "3", (*bench).pgbenchOneClient},
	{"pgbench4", "3c", (*bench).pgbenchFourClients},
	{"latency", "4", (*bench).latency},
	{"big", "5", (*bench).bigTransaction},
	{"sequences", "6", (*bench).sequences},
	{"floor", "7", (*bench).floor},
	{"compare", "8", (*bench).compare},
	{"idle", "9", (*bench).idle},
}

// selectWorkloads returns the workloads -only names, in the table's order;
// all when it is empty. Workload 3 by number is both pgbench forms.
func selectWorkloads(only string) ([]workload, error) {
	if only == "" {
		return workloads, nil
	}
	want := map[string]bool{}
	for _, n := range strings.Split(only, ",") {
		n = strings.TrimSpace(n)
		known := false
		for _, w := range workloads {
			if n == w.name || n == w.number || (n == "3" && w.number == "3c") {
				want[w.name], known = true, true
			}
		}
		if !known {
			var names []string
			for _, w := range workloads {
				names = append(names, w.name)
			}
			return nil, fmt.Errorf("-only names workload %q, which does not exist: use one of %s (or their numbers 1-9)", n, strings.Join(names, ", "))
		}
	}
	var out []workload
	for _, w := range workloads {
		if want[w.name] {
			out = append(out, w)
		}
	}
	return out, nil
}

// bench is one run: the systems under test and the table being filled.
type bench struct {
	ctx      context.Context
	bin      string // the pgmesh binary
	pm       *meshPair
	nat      *nativePair
	systems  []system
	results  []result
	sentinel int
}

// add records a row with a figure per system; higherIsBetter says which
// way pgmesh's ratio to the best other goes.
func (b *bench) add(what string, vals []float64, unit string, higherIsBetter bool, format string) {
	r := result{what: what}
	best := 0.0
	for i, v := range vals {
		if math.IsNaN(v) { // not measured for this system
			r.vals = append(r.vals, "-")
			continue
		}
		r.vals = append(r.vals, fmt.Sprintf(format, v)+unit)
		if i > 0 && !b.isMesh(i) && v > 0 && (best == 0 || (higherIsBetter && v > best) || (!higherIsBetter && v < best)) {
			best = v
		}
	}
	if vals[0] > 0 && best > 0 {
		ratio := vals[0] / best
		if !higherIsBetter {
			ratio = best / vals[0]
		}
		r.ratio = fmt.Sprintf("%.2f", ratio)
	}
	b.results = append(b.results, r)
	fmt.Printf("  %s: %s\n", what, strings.Join(r.vals, " | "))
}

// addPgmesh records a row with a figure for pgmesh alone.
func (b *bench) addPgmesh(what, val string) {
	b.results = append(b.results, one(what, val, len(b.systems)))
	fmt.Printf("  %s: %s\n", what, val)
}

// isMesh says whether system i is a pgmesh build (this one or -against's).
func (b *bench) isMesh(i int) bool {
	_, ok := b.systems[i].(*meshPair)
	return ok
}

// catchUp builds a backlog on s's sender while its receiver is held, then
// times the receiver's catch-up from its release.
func (b *bench) catchUp(s system, build func(*pgtest.Cluster) error) (catchUpRun, error) {
	ctx := b.ctx
	b.sentinel++
	if err := s.settle(ctx); err != nil {
		return catchUpRun{}, err
	}
	if err := s.hold(ctx); err != nil {
		return catchUpRun{}, err
	}
	if err := build(s.sender()); err != nil {
		return catchUpRun{}, err
	}
	if err := s.sender().Exec(ctx, `INSERT INTO sentinel VALUES ($1)`, b.sentinel); err != nil {
		return catchUpRun{}, err
	}
	if err := quiesce(ctx, s.sender(), s.receiver()); err != nil {
		return catchUpRun{}, err
	}
	stopPerf := perfRecord(s.name(), b.sentinel)
	defer stopPerf()
	if err := s.release(ctx); err != nil {
		return catchUpRun{}, err
	}
	counter, counts := s.(appliedCounter)
	var before applyCounts
	var daemonCPU time.Duration
	if counts {
		var err error
		if before, err = counter.applied(ctx); err != nil {
			return catchUpRun{}, err
		}
		daemonCPU = cpuTime([]int{counter.daemonPid()})
	}
	start, cpu := time.Now(), cpuUse(s.roots())
	if err := waitFor(ctx, s.receiver(), `SELECT EXISTS (SELECT FROM sentinel WHERE id = $1)`, b.sentinel); err != nil {
		return catchUpRun{}, fmt.Errorf("%s: %w", s.name(), err)
	}
	r := catchUpRun{took: time.Since(start), cpu: cpuUse(s.roots()).minus(cpu)}
	stopPerf()
	if counts {
		after, err := counter.applied(ctx)
		if err != nil {
			return catchUpRun{}, err
		}
		r.daemonCPU = cpuTime([]int{counter.daemonPid()}) - daemonCPU
		r.applied = after.minus(before)
	}
	return r, nil
}

// turns yields the systems, with their index, in the order they run in a
// round: each round starts one system later, so that none is always first
// (in earlier runs, the first of a round fared worst).
func (b *bench) turns(round int) iter.Seq2[int, system] {
	return func(yield func(int, system) bool) {
		n := len(b.systems)
		for k := range n {
			i := (round + k) % n
			if !yield(i, b.systems[i]) {
				return
			}
		}
	}
}

// catchUps runs a catch-up repeat times, the systems taking turns, and
// reports the medians (a shared 2-core machine is noisy): the rate, CPU
// seconds per 100k units (every process of the pair: daemons, backends,
// walsenders), and for pgmesh its daemon's share and how many source
// transactions shared a local commit.
func (b *bench) catchUps(what, unit string, units, repeat int, build func(*pgtest.Cluster) error) error {
	n := len(b.systems)
	rates, cpus, senders := make([][]float64, n), make([][]float64, n), make([][]float64, n)
	// For each pgmesh build: its daemon's CPU, source transactions per
	// local commit, statements per source transaction.
	daemonCPUs, perCommit, stmtsPerTxn := make([][]float64, n), make([][]float64, n), make([][]float64, n)
	for round := range max(repeat, 1) {
		for i, s := range b.turns(round) {
			r, err := b.catchUp(s, build)
			if err != nil {
				return err
			}
			rates[i] = append(rates[i], float64(units)/r.took.Seconds())
			cpus[i] = append(cpus[i], r.cpu.total.Seconds()*100000/float64(units))
			senders[i] = append(senders[i], r.cpu.walsenders.Seconds()*100000/float64(units))
			if _, ok := s.(appliedCounter); ok {
				daemonCPUs[i] = append(daemonCPUs[i], r.daemonCPU.Seconds()*100000/float64(units))
				perCommit[i] = append(perCommit[i], float64(r.applied.txns)/float64(max(r.applied.localCommits, 1)))
				stmtsPerTxn[i] = append(stmtsPerTxn[i], float64(r.applied.statements)/float64(max(r.applied.txns, 1)))
			}
		}
	}
	if repeat > 1 {
		for i, s := range b.systems {
			fmt.Printf("  runs, %s: %.0f %s\n", s.name(), rates[i], unit)
			if len(daemonCPUs[i]) > 0 {
				fmt.Printf("  runs, %s daemon CPU s per 100k: %.2f, source txns per local commit: %.1f\n", s.name(), daemonCPUs[i], perCommit[i])
			}
		}
	}
	b.add(what, medians(rates), " "+unit, true, "%.0f")
	b.add(what+", CPU s per 100k "+strings.TrimSuffix(unit, "/s"), medians(cpus), " s", false, "%.2f")
	b.add(what+", of which walsenders", medians(senders), " s", false, "%.2f")
	// Figures of the pgmesh builds alone: NaN for the others, so no ratio.
	b.add(what+", of which pgmesh daemon", medians(daemonCPUs), " s", false, "%.2f")
	b.add(what+", source txns per local commit", medians(perCommit), "", true, "%.1f")
	b.add(what+", statements per source txn", medians(stmtsPerTxn), "", false, "%.2f")
	return nil
}

func (b *bench) singleInserts() error {
	fmt.Printf("1. catch-up of %d single-row INSERT transactions\n", *singleTxns)
	return b.catchUps("1. single-row inserts", "rows/s", *singleTxns, *repeat, func(c *pgtest.Cluster) error {
		return c.Exec(b.ctx, fmt.Sprintf(`DO $$ DECLARE base bigint := (SELECT coalesce(max(id), 0) FROM single);
			BEGIN FOR i IN 1..%d LOOP
			INSERT INTO single VALUES (base + i, 'payload ' || i); COMMIT; END LOOP; END $$`, *singleTxns))
	})
}

func (b *bench) batchInserts() error {
	fmt.Printf("2. catch-up of %d INSERT transactions of 100 rows\n", *batchTxns)
	return b.catchUps("2. 100-row inserts", "rows/s", *batchTxns*100, *repeat, func(c *pgtest.Cluster) error {
		return c.Exec(b.ctx, fmt.Sprintf(`DO $$ DECLARE base bigint := (SELECT coalesce(max(id), 0) FROM batch);
			BEGIN FOR i IN 0..%d LOOP
			INSERT INTO batch SELECT base + i * 100 + g, 'payload ' || g FROM generate_series(1, 100) g; COMMIT; END LOOP; END $$`, *batchTxns-1))
	})
}

// pgbenchOneClient counts transactions; each changes four rows (3
// updates, 1 insert).
func (b *bench) pgbenchOneClient() error {
	fmt.Printf("3. catch-up of %d pgbench tpcb-like transactions (scale 1)\n", *updateTxns)
	return b.catchUps("3. pgbench tpcb-like", "txn/s", *updateTxns, *repeat, func(c *pgtest.Cluster) error {
		return pgbench(b.ctx, c, "-n", "-b", "tpcb-like", "-t", strconv.Itoa(*updateTxns))
	})
}

// pgbenchFourClients: real sources are concurrent, their transactions
// interleave in the WAL and commit close together.
func (b *bench) pgbenchFourClients() error {
	n := *updateTxns / 4 * 4
	fmt.Printf("3c. catch-up of %d pgbench tpcb-like transactions from 4 clients (scale 1)\n", n)
	return b.catchUps("3c. pgbench tpcb-like, 4 clients", "txn/s", n, *repeat, func(c *pgtest.Cluster) error {
		return pgbench(b.ctx, c, "-n", "-b", "tpcb-like", "-c", "4", "-j", "2", "-t", strconv.Itoa(n/4))
	})
}

func (b *bench) latency() error {
	fmt.Printf("4. commit-to-visible latency at %d transactions/s for %s, %d runs (medians)\n", *rate, *latencyDur, max(*repeat, 1))
	n := len(b.systems)
	// Per system, each run's p50 and p99 one way, then the other (b to a;
	// NaN for a system that replicates one way only), and for the run from
	// a to b: the pair's CPU per 100k transactions, pgmesh's receiving
	// daemon's share, and how busy the whole machine was (the load
	// generator included). On a machine this small, the tail follows how
	// busy it is.
	var runs [7][][]float64
	for i := range runs {
		runs[i] = make([][]float64, n)
	}
	for round := range max(*repeat, 1) {
		for i, s := range b.turns(round) {
			if err := s.settle(b.ctx); err != nil {
				return err
			}
			counter, counts := s.(appliedCounter)
			var daemonCPU time.Duration
			if counts {
				daemonCPU = cpuTime([]int{counter.daemonPid()})
			}
			cpu, busy := cpuUse(s.roots()), machineBusy()
			p50, p99, txns, err := latency(b.ctx, s.sender(), s.receiver())
			if err != nil {
				return err
			}
			per100k := func(d time.Duration) float64 { return d.Seconds() * 100000 / float64(max(txns, 1)) }
			pairCPU, busyShare := per100k(cpuUse(s.roots()).minus(cpu).total), machineBusy().minus(busy)
			daemonShare := math.NaN()
			if counts {
				daemonShare = per100k(cpuTime([]int{counter.daemonPid()}) - daemonCPU)
			}
			back50, back99 := math.NaN(), math.NaN()
			if tw, ok := s.(twoWay); ok {
				if err := s.settle(b.ctx); err != nil {
					return err
				}
				sender, receiver := tw.back()
				if back50, back99, _, err = latency(b.ctx, sender, receiver); err != nil {
					return err
				}
			}
			fmt.Printf("  %s: p50 / p99 %.2f / %.2f ms, b to a %.2f / %.2f ms; a to b: CPU %.2f s per 100k txn, machine %.0f%% busy\n",
				s.name(), p50, p99, back50, back99, pairCPU, busyShare)
			for k, v := range []float64{p50, p99, back50, back99, pairCPU, daemonShare, busyShare} {
				runs[k][i] = append(runs[k][i], v)
			}
		}
	}
	// pgmesh's receiver b has the higher node id: there a peer's change
	// waits only for skew; a, the lower, waits for its interval's end.
	b.add("4. latency p50", medians(runs[0]), " ms", false, "%.2f")
	b.add("4. latency p99", medians(runs[1]), " ms", false, "%.2f")
	b.add("4. latency p50, b to a", medians(runs[2]), " ms", false, "%.2f")
	b.add("4. latency p99, b to a", medians(runs[3]), " ms", false, "%.2f")
	b.add("4. latency, CPU s per 100k txn, a to b", medians(runs[4]), " s", false, "%.2f")
	b.add("4. latency, of which pgmesh daemon", medians(runs[5]), " s", false, "%.2f")
	b.add("4. latency, machine busy, a to b", medians(runs[6]), "%", false, "%.0f")
	return nil
}

func (b *bench) bigTransaction() error {
	fmt.Printf("5. one transaction of %d rows: catch-up and the pgmesh daemon's peak RSS\n", *bigRows)
	if err := b.catchUps("5. one big transaction", "rows/s", *bigRows, 1, func(c *pgtest.Cluster) error {
		return c.Exec(b.ctx, fmt.Sprintf(`INSERT INTO big SELECT g, 'payload ' || g FROM generate_series(1, %d) g`, *bigRows))
	}); err != nil {
		return err
	}
	rss, err := peakRSS(b.pm.b.Pid())
	if err != nil {
		return err
	}
	b.addPgmesh("5. pgmesh daemon peak RSS (whole run)", fmt.Sprintf("%.0f MB", float64(rss)/(1<<20)))
	return nil
}

func (b *bench) sequences() error {
	fmt.Printf("6. nextval rate, %d values per kind, on one pgmesh node\n", *nextvals)
	for _, r := range sequenceRates(b.ctx, b.pm) {
		b.addPgmesh(r.what, r.vals[0])
	}
	return nil
}

func (b *bench) floor() error {
	fmt.Printf("7. floor: %d single-row INSERT transactions pipelined into one backend, no replication\n", *singleTxns)
	v, err := pipelinedFloor(b.ctx, b.nat.b, *singleTxns)
	if err != nil {
		return err
	}
	b.addPgmesh("7. SQL-protocol floor, 1-row txns", fmt.Sprintf("%.0f rows/s", v))
	return nil
}

func (b *bench) compare() error {
	fmt.Printf("8. pgmesh compare of a %d-row table on three nodes\n", *compareRows)
	rs, err := compareTimes(b.ctx, b.bin, *compareRows)
	if err != nil {
		return err
	}
	for _, r := range rs {
		b.addPgmesh(r.what, r.vals[0])
	}
	return nil
}

func (b *bench) idle() error {
	timing := *raftTiming
	if timing == "" {
		timing = "the default"
	}
	fmt.Printf("9. idle groups of 3 and 6 nodes at raft_timing %s: each daemon's CPU over %s\n", timing, *idleWindow)
	rs, err := idleResults(b.ctx, b.bin, *idleWindow, len(b.systems))
	if err != nil {
		return err
	}
	for _, r := range rs {
		b.addPgmesh(r.what, r.vals[0])
	}
	return nil
}
