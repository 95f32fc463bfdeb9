package replicator

import (
	"context"
	"sync"
	"sync/atomic"
	"time"
)

// Gate holds every stream of a node between transactions on request. A
// joining node takes its snapshot of this node while the gate is closed, so
// that each origin's progress, read meanwhile, is exactly what the snapshot
// holds of that origin's changes.
type Gate struct {
	mu      sync.RWMutex // streams hold it shared while they may apply
	pending atomic.Int32 // Close calls waiting for the streams
}

// enter is called by a stream before it applies anything.
func (g *Gate) enter() {
	if g != nil {
		g.mu.RLock()
	}
}

// leave is called by a stream that stops.
func (g *Gate) leave() {
	if g != nil {
		g.mu.RUnlock()
	}
}

// closing reports whether a Close waits for this stream to step aside.
func (g *Gate) closing() bool { return g != nil && g.pending.Load() > 0 }

// yield lets a waiting Close in and returns once the gate is open again. The
// stream must be between transactions, with nothing unconfirmed.
func (g *Gate) yield() {
	g.mu.RUnlock()
	g.mu.RLock()
}

// Close waits until every stream is between transactions and keeps them
// there until open is called, or until lease has passed, whichever is first.
// open reports whether the gate was still closed when it was called.
func (g *Gate) Close(ctx context.Context, lease time.Duration) (open func() bool, err error) {
	g.pending.Add(1)
	locked := make(chan struct{})
	go func() {
		g.mu.Lock()
		close(locked)
	}()
	var once sync.Once
	var expired atomic.Bool
	release := func() {
		once.Do(func() {
			g.pending.Add(-1)
			g.mu.Unlock()
		})
	}
	select {
	case <-locked:
	case <-ctx.Done():
		go func() { <-locked; release() }()
		return nil, ctx.Err()
	}
	timer := time.AfterFunc(lease, func() { expired.Store(true); release() })
	return func() bool {
		timer.Stop()
		held := !expired.Load()
		release()
		return held
	}, nil
}
