package replicator

import (
	"context"
	"testing"
	"time"
)

// The daemon's own cost per source transaction in the grouped mode, the
// database's work left out (a fake session): one-row insert transactions,
// as pgbench-like streams of small transactions send them.
func BenchmarkGroupedSingleRowInserts(b *testing.B) { benchmarkGroupedInserts(b, 1) }

// BenchmarkGroupedHundredRowInserts is workload 2 of make bench: source
// transactions of 100 inserts each.
func BenchmarkGroupedHundredRowInserts(b *testing.B) { benchmarkGroupedInserts(b, 100) }

// benchmarkGroupedInserts feeds the grouped mode source transactions of
// rows inserts each, all of one rounded commit time, 1000 at a time; an op
// is one source transaction.
func benchmarkGroupedInserts(b *testing.B, rows int) {
	a, _ := testApplier(b, 0)
	at := time.Now().Add(-time.Second).Truncate(10 * time.Millisecond)
	const n = 1000
	var msgs [][]byte
	for i := 1; i <= n; i++ {
		txn, _ := txn(i, at, insertMsgs(i*rows, rows)...)
		msgs = append(msgs, txn...)
	}
	ctx := context.Background()
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N / n {
		a.progress = 0
		for _, m := range msgs {
			if _, err := a.handle(ctx, m); err != nil {
				b.Fatal(err)
			}
		}
		if err := a.drain(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
