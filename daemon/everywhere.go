package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
)

func (d *Daemon) applySetting(ctx context.Context, s api.Setting) error {
	err := s.Check()
	switch {
	case err != nil:
	case s.DeltaColumn != nil:
		c := s.DeltaColumn
		_, err = d.db.Exec(ctx, `SELECT pgmesh.set_delta_column($1::regclass, $2, $3)`, c.Table, c.Column, c.Enabled)
	case s.HomeColumn != nil:
		var col *string
		if s.HomeColumn.Enabled {
			col = &s.HomeColumn.Column
		}
		_, err = d.db.Exec(ctx, `SELECT pgmesh.set_home_column($1::regclass, $2)`, s.HomeColumn.Table, col)
	case s.Timeshard != nil:
		_, err = d.db.Exec(ctx, `SELECT pgmesh.convert_timeshard($1::regclass)`, s.Timeshard.Sequence)
	case s.Galloc != nil:
		err = d.sequences.convertGalloc(ctx, s.Galloc.Sequence, s.Galloc.ChunkSize, s.Galloc.MinStart)
	case s.BigintAudit:
		err = d.sequences.applyAudit(ctx)
	case s.ApplyError != nil:
		var policy *string
		if s.ApplyError.Policy != "" {
			policy = &s.ApplyError.Policy
		}
		_, err = d.db.Exec(ctx, `SELECT pgmesh.set_on_apply_error($1::regclass, $2)`, s.ApplyError.Table, policy)
	}
	if err != nil {
		return fmt.Errorf("on node %q: %w", d.cfg.NodeName, err)
	}
	return nil
}

// setting makes req on every active node (everywhere), after checking it.
func (d *Daemon) setting(ctx context.Context, req api.Setting) (api.SettingResponse, error) {
	if err := req.Check(); err != nil {
		return api.SettingResponse{}, withStatus(http.StatusBadRequest, err)
	}
	done, err := d.everywhere(ctx, req)
	return api.SettingResponse{Nodes: done}, err
}

// everywhere applies a setting on every active member (here directly, on
// the others through their daemons) and returns where it was applied.
func (d *Daemon) everywhere(ctx context.Context, req api.Setting) ([]string, error) {
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
			return nil, err
		}
	}
	var done []string
	var errs []error
	for _, n := range nodes {
		var err error
		if n.Name == d.cfg.NodeName {
			err = d.applySetting(ctx, req)
		} else {
			err = d.members.Client(d.peerAPI(n), token).ApplySetting(ctx, req)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("node %q: %w (run the same command again once it is reachable)", n.Name, err))
			continue
		}
		done = append(done, n.Name)
	}
	sort.Strings(done)
	if err := errors.Join(errs...); err != nil {
		return done, fmt.Errorf("changed on %v, but: %w", done, err)
	}
	return done, nil
}

func (d *Daemon) handleClusterSetting(w http.ResponseWriter, r *http.Request) {
	var req api.Setting
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	if _, err := d.authorized(r); err != nil {
		writeErr(w, 0, err)
		return
	}
	if err := d.applySetting(r.Context(), req); err != nil {
		writeErr(w, http.StatusBadRequest, err)
		return
	}
	writeJSON(w, http.StatusOK, api.SettingResponse{Nodes: []string{d.cfg.NodeName}})
}
