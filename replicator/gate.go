package replicator

import (
	"context"
	"sync"
	"time"
)

// Gate holds every stream of a node between transactions on request. A
// joining node takes its snapshot of this node while the gate is closed, so
// that each origin's progress, read meanwhile, is exactly what the snapshot
// holds of that origin's changes.
//
// Streams are inside the gate while they may apply; Close waits until none
// is, and keeps them out until it is opened (or its lease runs out). Every
// wait takes a context: a stream told to stop while the gate is closed stops
// at once.
type Gate struct {
	mu      sync.Mutex
	inside  int           // streams that may apply
	closers int           // Close calls waiting for, or holding, the gate
	changed chan struct{} // closed and replaced whenever the counts change
}

// signal wakes every waiter; g.mu must be held.
func (g *Gate) signal() {
	if g.changed != nil {
		close(g.changed)
	}
	g.changed = make(chan struct{})
}

// await waits, with g.mu held on entry and on return, until the counts
// change or ctx ends.
func (g *Gate) await(ctx context.Context) error {
	if g.changed == nil {
		g.changed = make(chan struct{})
	}
	ch := g.changed
	g.mu.Unlock()
	defer g.mu.Lock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// enter is called by a stream before it applies anything; it waits while
// the gate is closed.
func (g *Gate) enter(ctx context.Context) error {
	if g == nil {
		return nil
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.closers > 0 {
		if err := g.await(ctx); err != nil {
			return err
		}
	}
	g.inside++
	g.signal()
	return nil
}

// leave is called by a stream that stops, once for each successful enter.
func (g *Gate) leave() {
	if g == nil {
		return
	}
	g.mu.Lock()
	g.inside--
	g.signal()
	g.mu.Unlock()
}

// closing reports whether a Close waits for this stream to step aside.
func (g *Gate) closing() bool {
	if g == nil {
		return false
	}
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.closers > 0
}

// yield lets a waiting Close in and returns once the gate is open again.
// The stream must be between transactions, with nothing unconfirmed. If
// ctx ends first, it returns ctx's error and the stream is outside: it must
// not call leave.
func (g *Gate) yield(ctx context.Context) error {
	g.leave()
	return g.enter(ctx)
}

// Close waits until every stream is between transactions and keeps them
// there until open is called, or until lease has passed, whichever is first.
// open reports whether the gate was still closed when it was called.
func (g *Gate) Close(ctx context.Context, lease time.Duration) (open func() bool, err error) {
	g.mu.Lock()
	g.closers++
	g.signal()
	for g.inside > 0 {
		if err := g.await(ctx); err != nil {
			g.closers--
			g.signal()
			g.mu.Unlock()
			return nil, err
		}
	}
	g.mu.Unlock()
	var once sync.Once
	expired := false
	release := func() bool {
		first := false
		once.Do(func() {
			first = true
			g.mu.Lock()
			g.closers--
			g.signal()
			g.mu.Unlock()
		})
		return first
	}
	timer := time.AfterFunc(lease, func() {
		g.mu.Lock()
		expired = true
		g.mu.Unlock()
		release()
	})
	return func() bool {
		timer.Stop()
		g.mu.Lock()
		held := !expired
		g.mu.Unlock()
		release()
		return held
	}, nil
}
