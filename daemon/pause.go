package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/replicator"
)

// A joining node copies a member's data under a snapshot and must know, for
// every other member, how far that snapshot has got with its changes. The
// member holds its streams between transactions while the snapshot is taken
// (a pause, with a lease in case the joining node dies), so each origin's
// progress read meanwhile is exactly what the snapshot holds.

// pauseLease bounds a pause: streams wait no longer than this, well inside
// the peers' wal_sender_timeout.
const pauseLease = 20 * time.Second

// pauses are the pauses other members hold on this node's streams, by id.
type pauses struct {
	self string
	gate *replicator.Gate
	log  *slog.Logger
	mu   sync.Mutex
	open map[string]func() bool
}

// pause holds the streams at their next transaction boundary for a joining
// node's snapshot (POST /v1/cluster/pause).
func (p *pauses) pause(ctx context.Context, _ *membership.Group, _ struct{}) (api.PauseResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, pauseLease)
	defer cancel()
	open, err := p.gate.Close(ctx, pauseLease)
	if err != nil {
		return api.PauseResponse{}, fmt.Errorf("streams on %q did not reach a transaction boundary within %s: %w", p.self, pauseLease, err)
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	p.mu.Lock()
	if p.open == nil {
		p.open = map[string]func() bool{}
	}
	p.open[id] = open
	p.mu.Unlock()
	p.log.Info("streams paused for a joining node's snapshot", "lease", pauseLease)
	return api.PauseResponse{ID: id}, nil
}

// resume ends a pause and reports whether it held throughout (POST
// /v1/cluster/resume).
func (p *pauses) resume(_ context.Context, _ *membership.Group, req api.ResumeRequest) (api.ResumeResponse, error) {
	p.mu.Lock()
	open := p.open[req.ID]
	delete(p.open, req.ID)
	p.mu.Unlock()
	held := open != nil && open()
	p.log.Info("streams resumed", "held_throughout", held)
	return api.ResumeResponse{Held: held}, nil
}

// pausable is another member's daemon, as pauseApply asks it (*api.Client
// over HTTP).
type pausable interface {
	Pause(ctx context.Context) (api.PauseResponse, error)
	Resume(ctx context.Context, req api.ResumeRequest) (api.ResumeResponse, error)
}

// pauseApply pauses the streams of the member m calls; resume lets them go
// and reports whether they were held throughout.
func pauseApply(ctx context.Context, m pausable) (resume func(context.Context) (bool, error), err error) {
	p, err := m.Pause(ctx)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) (bool, error) {
		r, err := m.Resume(ctx, api.ResumeRequest(p))
		return r.Held, err
	}, nil
}
