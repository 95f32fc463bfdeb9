package replicator

import (
	"context"
	"sync/atomic"
	"testing"
	"time"
)

// A stream inside a transaction holds Close off; once it steps aside it
// stays held until the gate opens.
func TestGateWaitsForStreamsAndHoldsThem(t *testing.T) {
	var g Gate
	g.enter()
	var applied atomic.Int32
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() { // a stream: one "transaction" per loop, stepping aside between them
		defer close(done)
		defer g.leave()
		for {
			select {
			case <-stop:
				return
			default:
			}
			applied.Add(1)
			if g.closing() {
				g.yield()
			}
			time.Sleep(time.Millisecond)
		}
	}()
	open, err := g.Close(context.Background(), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	held := applied.Load()
	time.Sleep(50 * time.Millisecond)
	if n := applied.Load(); n != held {
		t.Fatalf("the stream applied %d transactions while the gate was closed", n-held)
	}
	if !open() {
		t.Fatal("open reported the lease expired")
	}
	deadline := time.Now().Add(5 * time.Second)
	for applied.Load() == held {
		if time.Now().After(deadline) {
			t.Fatal("the stream did not resume after open")
		}
		time.Sleep(time.Millisecond)
	}
	close(stop)
	<-done
}

// A lease that runs out reopens the gate, and open says so.
func TestGateLeaseExpires(t *testing.T) {
	var g Gate
	open, err := g.Close(context.Background(), 10*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		if g.mu.TryRLock() {
			g.mu.RUnlock()
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the gate stayed closed past its lease")
		}
		time.Sleep(time.Millisecond)
	}
	if open() {
		t.Fatal("open reported the gate held after its lease ran out")
	}
}

// Close gives up with its context when a stream never steps aside.
func TestGateCloseGivesUp(t *testing.T) {
	var g Gate
	g.enter()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := g.Close(ctx, time.Minute); err == nil {
		t.Fatal("Close succeeded while a stream held the gate")
	}
	g.leave() // the abandoned Close takes and releases the lock
	deadline := time.Now().Add(5 * time.Second)
	for !g.mu.TryLock() {
		if time.Now().After(deadline) {
			t.Fatal("the abandoned Close never released the gate")
		}
		time.Sleep(time.Millisecond)
	}
	g.mu.Unlock()
}
