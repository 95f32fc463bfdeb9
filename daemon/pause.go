package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"net/http"
	"sync"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

// A joining node copies a member's data under a snapshot and must know, for
// every other member, how far that snapshot has got with its changes. The
// member holds its streams between transactions while the snapshot is taken
// (a pause, with a lease in case the joining node dies), so each origin's
// progress read meanwhile is exactly what the snapshot holds.

// pauseLease bounds a pause: streams wait no longer than this, well inside
// the peers' wal_sender_timeout.
const pauseLease = 20 * time.Second

type pauses struct {
	mu   sync.Mutex
	open map[string]func() bool
}

func (d *Daemon) handleClusterPause(w http.ResponseWriter, r *http.Request) {
	if _, err := d.authorized(r); err != nil {
		writeErr(w, http.StatusForbidden, err)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), pauseLease)
	defer cancel()
	open, err := d.gate.Close(ctx, pauseLease)
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, fmt.Errorf("streams on %q did not reach a transaction boundary within %s: %w", d.cfg.NodeName, pauseLease, err))
		return
	}
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	id := hex.EncodeToString(b)
	d.pauses.mu.Lock()
	if d.pauses.open == nil {
		d.pauses.open = map[string]func() bool{}
	}
	d.pauses.open[id] = open
	d.pauses.mu.Unlock()
	d.log.Info("streams paused for a joining node's snapshot", "lease", pauseLease)
	writeJSON(w, http.StatusOK, api.PauseResponse{ID: id})
}

func (d *Daemon) handleClusterResume(w http.ResponseWriter, r *http.Request) {
	if _, err := d.authorized(r); err != nil {
		writeErr(w, http.StatusForbidden, err)
		return
	}
	var req api.ResumeRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	d.pauses.mu.Lock()
	open := d.pauses.open[req.ID]
	delete(d.pauses.open, req.ID)
	d.pauses.mu.Unlock()
	held := open != nil && open()
	d.log.Info("streams resumed", "held_throughout", held)
	writeJSON(w, http.StatusOK, api.ResumeResponse{Held: held})
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
