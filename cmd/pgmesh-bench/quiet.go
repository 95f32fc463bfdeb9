package main

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// quiesce makes a timed run start from a machine at rest: the pair's
// backlog checkpointed, and no process of any system still busy with an
// earlier run (autovacuum, a checkpoint, a daemon reading back). Without
// it a run paid for the aftermath of the one before, and the first system
// of each round fared worst.
func quiesce(ctx context.Context, clusters ...*pgtest.Cluster) error {
	for _, c := range clusters {
		if err := c.Exec(ctx, "CHECKPOINT"); err != nil {
			return fmt.Errorf("checkpoint before a timed run: %w", err)
		}
	}
	return waitIdle(ctx, 0.9, 300*time.Millisecond, 20*time.Second)
}

// waitIdle returns once the machine's CPUs were idle for at least the
// fraction want over one window, or after limit (saying so: the run is
// then timed on a busy machine, and the reader should know).
func waitIdle(ctx context.Context, want float64, window, limit time.Duration) error {
	deadline := time.Now().Add(limit)
	idle := 0.0
	for time.Now().Before(deadline) {
		busy0, all0 := cpuTicks()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(window):
		}
		busy1, all1 := cpuTicks()
		if all1 <= all0 {
			return nil // no /proc/stat: nothing to wait for
		}
		if idle = 1 - float64(busy1-busy0)/float64(all1-all0); idle >= want {
			return nil
		}
	}
	fmt.Printf("  (the machine stayed %.0f%% busy for %s before this run)\n", 100*(1-idle), limit)
	return nil
}

// cpuTicks reads the machine's CPU time from /proc/stat: the ticks spent
// busy and in all.
func cpuTicks() (busy, all int64) {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0, 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	// cpu user nice system idle iowait irq softirq steal (guest time,
	// after these, is counted in user already)
	f := strings.Fields(line)
	for k, s := range f[1:min(len(f), 9)] {
		v, _ := strconv.ParseInt(s, 10, 64)
		all += v
		if k != 3 && k != 4 { // idle, iowait
			busy += v
		}
	}
	return busy, all
}
