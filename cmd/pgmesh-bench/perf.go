package main

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
	"syscall"
)

// perfRecord starts a system-wide `perf record` for one catch-up when
// PGMESH_PERF names a file prefix, so that a developer can see where every
// process's CPU goes while the receiver applies, without the setup around
// it (PGMESH_PERF=/tmp/perf make bench BENCH_ARGS='-only pgbench -repeat 1'
// writes /tmp/perf.<system>.<run>). The returned function stops it; it may
// be called more than once.
func perfRecord(system string, run int) (stop func()) {
	prefix := os.Getenv("PGMESH_PERF")
	if prefix == "" {
		return func() {}
	}
	cmd := exec.Command("perf", "record", "-a", "-g", "-F", "1999", "-o", fmt.Sprintf("%s.%s.%d", prefix, system, run))
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		fmt.Fprintf(os.Stderr, "PGMESH_PERF is set, but perf did not start (%v): install perf, or unset PGMESH_PERF.\n", err)
		return func() {}
	}
	return sync.OnceFunc(func() {
		_ = cmd.Process.Signal(syscall.SIGINT)
		_ = cmd.Wait()
	})
}
