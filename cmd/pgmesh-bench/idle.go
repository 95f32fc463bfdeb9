package main

import (
	"context"
	"fmt"
	"strconv"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// idleCost forms a group of n nodes at the default Raft timing, lets it
// settle, and measures each daemon's CPU time over window while nothing is
// written: what a group costs when it has nothing to do. It returns the
// busiest daemon's and the mean share of one core, in percent.
func idleCost(ctx context.Context, bin string, n int, window time.Duration) (busiest, mean float64, err error) {
	var nodes []*localmesh.Node
	defer func() {
		for _, node := range nodes {
			_ = node.Stop()
			node.Remove()
		}
	}()
	for i := range n {
		node, err := localmesh.NewNode(ctx, bin, "idle"+strconv.Itoa(i), pgtest.Options{})
		if err != nil {
			return 0, 0, err
		}
		nodes = append(nodes, node)
		node.RaftTiming = *raftTiming // "": what a user gets
		if err := node.PG.Exec(ctx, `CREATE TABLE t (k int PRIMARY KEY)`); err != nil {
			return 0, 0, err
		}
		if err := node.Start(ctx); err != nil {
			return 0, 0, err
		}
	}
	if _, err := localmesh.Form(ctx, "idle", nodes...); err != nil {
		return 0, 0, err
	}
	if err := localmesh.WaitConnected(ctx, time.Minute, nodes...); err != nil {
		return 0, 0, err
	}
	time.Sleep(5 * time.Second) // joins' after-effects settle
	before := make([]time.Duration, n)
	for i, node := range nodes {
		before[i] = cpuTime([]int{node.Pid()})
	}
	time.Sleep(window)
	for i, node := range nodes {
		share := 100 * float64(cpuTime([]int{node.Pid()})-before[i]) / float64(window)
		busiest = max(busiest, share)
		mean += share / float64(n)
	}
	return busiest, mean, nil
}

// idleResults is workload 9 for groups of 3 and 6 nodes.
func idleResults(ctx context.Context, bin string, window time.Duration, systems int) ([]result, error) {
	var out []result
	for _, n := range []int{3, 6} {
		busiest, mean, err := idleCost(ctx, bin, n, window)
		if err != nil {
			return nil, err
		}
		out = append(out, one(fmt.Sprintf("9. idle daemon CPU, %d nodes (busiest / mean)", n),
			fmt.Sprintf("%.2f%% / %.2f%% of a core", busiest, mean), systems))
	}
	return out, nil
}
