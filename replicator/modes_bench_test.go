package replicator

import (
	"context"
	"fmt"
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
// rows inserts each.
func benchmarkGroupedInserts(b *testing.B, rows int) {
	benchmarkGrouped(b, func(i int) [][]byte { return insertMsgs(i*rows, rows) })
}

// BenchmarkGroupedPgbench is workload 3's shape: each source transaction
// updates three rows, two of which many others update too, and inserts one.
func BenchmarkGroupedPgbench(b *testing.B) {
	update := func(id int, v int) []byte {
		return message('U', testRel, []byte{'N'}, tupleBytes(fmt.Sprint(id), "name", fmt.Sprint(v)))
	}
	benchmarkGrouped(b, func(i int) [][]byte {
		return [][]byte{update(1_000_000+i%1000, i), update(2_000_000+i%10, i), update(3_000_000, i), insertMsg(testRel, i)}
	})
}

// benchmarkGrouped feeds the grouped mode 1000 source transactions, each
// of the changes of its number, over and over; an op is one source
// transaction. They commit 20 to a luw_resolution interval, as a pgbench
// backlog does on the bench's machine, so groups hold 20.
func benchmarkGrouped(b *testing.B, changes func(i int) [][]byte) {
	a, _ := testApplier(b, 0)
	start := time.Now().Add(-time.Minute).Truncate(10 * time.Millisecond)
	const n, perGroup = 1000, 20
	var msgs [][]byte
	for i := 1; i <= n; i++ {
		txn, _ := txn(i, start.Add(time.Duration(i/perGroup)*10*time.Millisecond), changes(i)...)
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
