package replicator

import (
	"context"
	"testing"
	"time"
)

// The daemon's own cost per source transaction in the grouped mode, the
// database's work left out (a fake session): one-row insert transactions,
// as pgbench-like streams of small transactions send them.
func BenchmarkGroupedSingleRowInserts(b *testing.B) {
	a, _ := testApplier(b, 0)
	at := time.Now().Add(-time.Second).Truncate(10 * time.Millisecond)
	const n = 1000
	var msgs [][]byte
	for i := 1; i <= n; i++ {
		txn, _ := txn(i, at, insertMsg(testRel, i))
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
