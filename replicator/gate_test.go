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
	if err := g.enter(context.Background()); err != nil {
		t.Fatal(err)
	}
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
				if err := g.yield(context.Background()); err != nil {
					t.Error(err)
					return
				}
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
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := g.enter(ctx); err != nil {
		t.Fatal("the gate stayed closed past its lease")
	}
	g.leave()
	if open() {
		t.Fatal("open reported the gate held after its lease ran out")
	}
}

// Close gives up with its context when a stream never steps aside, and
// leaves the gate open.
func TestGateCloseGivesUp(t *testing.T) {
	var g Gate
	if err := g.enter(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := g.Close(ctx, time.Minute); err == nil {
		t.Fatal("Close succeeded while a stream held the gate")
	}
	if g.closing() {
		t.Fatal("an abandoned Close still closes the gate")
	}
	g.leave()
}

// A stream waiting at a closed gate stops with its context, at once.
func TestGateWaitEndsWithContext(t *testing.T) {
	var g Gate
	if err := g.enter(context.Background()); err != nil {
		t.Fatal(err)
	}
	closed := make(chan func() bool)
	go func() {
		open, err := g.Close(context.Background(), time.Minute)
		if err != nil {
			t.Error(err)
		}
		closed <- open
	}()
	for !g.closing() {
		time.Sleep(time.Millisecond)
	}
	ctx, cancel := context.WithCancel(context.Background())
	yielded := make(chan error)
	go func() { yielded <- g.yield(ctx) }()
	open := <-closed // the stream stepped aside
	cancel()
	select {
	case err := <-yielded:
		if err == nil {
			t.Fatal("yield entered a closed gate")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a stream waiting at the closed gate ignored its context")
	}
	if !open() {
		t.Fatal("the gate was not held until opened")
	}
}
