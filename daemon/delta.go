package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"

	"github.com/pgmesh/pgmesh/membership"
)

// DeltaRequest marks (or unmarks) a delta column.
type DeltaRequest struct {
	Table   string `json:"table"`
	Column  string `json:"column"`
	Enabled bool   `json:"enabled"`
}

// DeltaResponse lists the nodes where the change was made.
type DeltaResponse struct {
	Nodes []string `json:"nodes"`
}

func (d *Daemon) setDeltaLocal(ctx context.Context, req DeltaRequest) error {
	_, err := d.db.Exec(ctx, `SELECT pgmesh.set_delta_column($1::regclass, $2, $3)`, req.Table, req.Column, req.Enabled)
	if err != nil {
		return fmt.Errorf("on node %q: %w", d.cfg.NodeName, err)
	}
	return nil
}

// handleDelta applies a delta-column change on every active member: a
// column is only safe as a delta column once every node sends old values
// and applies increments.
func (d *Daemon) handleDelta(w http.ResponseWriter, r *http.Request) {
	var req DeltaRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	nodes := []*membership.Node{{Name: d.cfg.NodeName}}
	var token string
	if g, _ := d.store.Group(); g != nil {
		nodes = nil
		for _, n := range g.Sorted() {
			if n.State == membership.Active {
				nodes = append(nodes, n)
			}
		}
		var err error
		if token, err = d.loadToken(); err != nil {
			writeErr(w, http.StatusConflict, err)
			return
		}
	}
	var done []string
	var errs []error
	for _, n := range nodes {
		var err error
		if n.Name == d.cfg.NodeName {
			err = d.setDeltaLocal(r.Context(), req)
		} else {
			err = Call(r.Context(), n.API, http.MethodPost, "/v1/cluster/delta-column", token, req, nil)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("node %q: %w (run SELECT pgmesh.set_delta_column('%s', '%s') there once it is reachable)", n.Name, err, req.Table, req.Column))
			continue
		}
		done = append(done, n.Name)
	}
	sort.Strings(done)
	if err := errors.Join(errs...); err != nil {
		writeErr(w, http.StatusBadGateway, fmt.Errorf("changed on %v, but: %w", done, err))
		return
	}
	writeJSON(w, http.StatusOK, DeltaResponse{Nodes: done})
}

func (d *Daemon) handleClusterDelta(w http.ResponseWriter, r *http.Request) {
	var req DeltaRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	if _, err := d.authorized(r); err != nil {
		writeErr(w, 0, err)
		return
	}
	if err := d.setDeltaLocal(r.Context(), req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	writeJSON(w, http.StatusOK, DeltaResponse{Nodes: []string{d.cfg.NodeName}})
}
