package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"

	"github.com/pgmesh/pgmesh/membership"
)

// SettingRequest changes a per-table setting that must be the same on
// every node: a delta column (Kind "delta") or a home column ("home").
type SettingRequest struct {
	Kind    string `json:"kind"`
	Table   string `json:"table"`
	Column  string `json:"column"`
	Enabled bool   `json:"enabled"`
	// Size and MinStart configure galloc conversion.
	Size     int64 `json:"size,omitempty"`
	MinStart int64 `json:"min_start,omitempty"`
}

// SettingResponse lists the nodes where the change was made.
type SettingResponse struct {
	Nodes []string `json:"nodes"`
}

func (d *Daemon) applySetting(ctx context.Context, req SettingRequest) error {
	var err error
	switch req.Kind {
	case "delta":
		_, err = d.db.Exec(ctx, `SELECT pgmesh.set_delta_column($1::regclass, $2, $3)`, req.Table, req.Column, req.Enabled)
	case "home":
		var col *string
		if req.Enabled {
			col = &req.Column
		}
		_, err = d.db.Exec(ctx, `SELECT pgmesh.set_home_column($1::regclass, $2)`, req.Table, col)
	case "timeshard":
		_, err = d.db.Exec(ctx, `SELECT pgmesh.convert_timeshard($1::regclass)`, req.Table)
	case "galloc":
		err = d.convertGalloc(ctx, req.Table, req.Size, req.MinStart)
	case "bigint":
		err = d.applyAudit(ctx)
	default:
		err = fmt.Errorf("unknown setting %q", req.Kind)
	}
	if err != nil {
		return fmt.Errorf("on node %q: %w", d.cfg.NodeName, err)
	}
	return nil
}

// handleSetting applies a per-table setting on every active member: a delta
// column is only safe once every node sends old values and applies
// increments, and a home column only guards writes on nodes that check it.
func (d *Daemon) handleSetting(w http.ResponseWriter, r *http.Request) {
	var req SettingRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	done, err := d.everywhere(r.Context(), req)
	if err != nil {
		writeErr(w, http.StatusBadGateway, err)
		return
	}
	writeJSON(w, http.StatusOK, SettingResponse{Nodes: done})
}

// everywhere applies a setting on every active member (here directly, on
// the others through their daemons) and returns where it was applied.
func (d *Daemon) everywhere(ctx context.Context, req SettingRequest) ([]string, error) {
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
			err = Call(ctx, n.API, http.MethodPost, "/v1/cluster/setting", token, req, nil)
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
	var req SettingRequest
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
	writeJSON(w, http.StatusOK, SettingResponse{Nodes: []string{d.cfg.NodeName}})
}
