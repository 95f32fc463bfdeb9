package daemon

import (
	"context"
	"sort"
	"sync"

	"github.com/pgmesh/pgmesh/replicator"
)

// supervisor owns the replication streams: one per active peer, each run
// in its own goroutine until the group no longer wants it. It has its own
// lock, so that status, health and metrics never wait for a reconcile.
type supervisor struct {
	mu      sync.Mutex
	streams map[string]*running
}

type running struct {
	stream *replicator.Stream
	dsn    string // the peer's DSN the stream was started with
	cancel context.CancelFunc
	done   chan struct{}
}

// match makes the running streams exactly the wanted ones, by peer name:
// it stops those no longer wanted or whose peer DSN changed, waits for
// them, then starts the missing ones under ctx.
func (s *supervisor) match(ctx context.Context, want map[string]replicator.Config) {
	// Streams are stopped outside s.mu: a stream may take a while to stop
	// (a joining node holds it), and statuses reads s.mu.
	s.mu.Lock()
	var stopping []*running
	for name, r := range s.streams {
		if c, ok := want[name]; !ok || c.Peer.DSN != r.dsn {
			stopping = append(stopping, s.detachLocked(name))
		}
	}
	s.mu.Unlock()
	waitStopped(stopping)

	s.mu.Lock()
	defer s.mu.Unlock()
	for name, c := range want {
		if _, ok := s.streams[name]; ok {
			continue
		}
		if s.streams == nil {
			s.streams = map[string]*running{}
		}
		sctx, cancel := context.WithCancel(ctx)
		r := &running{stream: replicator.New(c), dsn: c.Peer.DSN, cancel: cancel, done: make(chan struct{})}
		s.streams[name] = r
		go func() {
			defer close(r.done)
			r.stream.Run(sctx)
		}()
	}
}

// stopAll stops every stream and returns once all have stopped.
func (s *supervisor) stopAll() {
	s.mu.Lock()
	var stopping []*running
	for name := range s.streams {
		stopping = append(stopping, s.detachLocked(name))
	}
	s.mu.Unlock()
	waitStopped(stopping)
}

// detachLocked tells a stream to stop and forgets it; the caller waits for
// it (waitStopped) after releasing s.mu.
func (s *supervisor) detachLocked(name string) *running {
	r := s.streams[name]
	r.cancel()
	delete(s.streams, name)
	return r
}

func waitStopped(rs []*running) {
	for _, r := range rs {
		<-r.done
	}
}

// stream is the running stream from peer, or nil.
func (s *supervisor) stream(peer string) *replicator.Stream {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.streams[peer]; ok {
		return r.stream
	}
	return nil
}

// statuses returns every stream's status, ordered by peer name.
func (s *supervisor) statuses() []replicator.Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]replicator.Status, 0, len(s.streams))
	for _, r := range s.streams {
		out = append(out, r.stream.Status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Peer < out[j].Peer })
	return out
}
