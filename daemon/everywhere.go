package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/membership"
)

// settings makes the settings that live in every member's database (delta
// and home columns, sequence kinds, apply-error policies), on every active
// member at once.
type settings struct {
	self      string
	db        *pgxpool.Pool
	store     *membership.Store
	cluster   *cluster
	sequences *sequences
}

// apply makes s in this node's database.
func (st *settings) apply(ctx context.Context, s api.Setting) error {
	err := s.Check()
	switch {
	case err != nil:
	case s.DeltaColumn != nil:
		c := s.DeltaColumn
		_, err = st.db.Exec(ctx, `SELECT pgmesh.set_delta_column($1::regclass, $2, $3)`, c.Table, c.Column, c.Enabled)
	case s.HomeColumn != nil:
		var col *string
		if s.HomeColumn.Enabled {
			col = &s.HomeColumn.Column
		}
		_, err = st.db.Exec(ctx, `SELECT pgmesh.set_home_column($1::regclass, $2)`, s.HomeColumn.Table, col)
	case s.Timeshard != nil:
		_, err = st.db.Exec(ctx, `SELECT pgmesh.convert_timeshard($1::regclass)`, s.Timeshard.Sequence)
	case s.Galloc != nil:
		err = st.sequences.convertGalloc(ctx, s.Galloc.Sequence, s.Galloc.ChunkSize, s.Galloc.MinStart)
	case s.BigintAudit:
		err = st.sequences.applyAudit(ctx)
	case s.ApplyError != nil:
		var policy *string
		if s.ApplyError.Policy != "" {
			policy = &s.ApplyError.Policy
		}
		_, err = st.db.Exec(ctx, `SELECT pgmesh.set_on_apply_error($1::regclass, $2)`, s.ApplyError.Table, policy)
	}
	if err != nil {
		return fmt.Errorf("on node %q: %w", st.self, err)
	}
	return nil
}

// set makes req on every active node (everywhere), after checking it.
func (st *settings) set(ctx context.Context, req api.Setting) (api.SettingResponse, error) {
	if err := req.Check(); err != nil {
		return api.SettingResponse{}, withStatus(http.StatusBadRequest, err)
	}
	done, err := st.everywhere(ctx, req)
	return api.SettingResponse{Nodes: done}, err
}

// everywhere applies a setting on every active member (here directly, on
// the others through their daemons) and returns where it was applied.
func (st *settings) everywhere(ctx context.Context, req api.Setting) ([]string, error) {
	nodes := []*membership.Node{{Name: st.self}}
	var token string
	if g, _ := st.store.Group(); g != nil {
		nodes = nil
		for _, n := range g.Sorted() {
			if n.State == membership.Active {
				nodes = append(nodes, n)
			}
		}
		var err error
		if token, err = st.cluster.loadToken(); err != nil {
			return nil, err
		}
	}
	var done []string
	var errs []error
	for _, n := range nodes {
		var err error
		if n.Name == st.self {
			err = st.apply(ctx, req)
		} else {
			err = st.cluster.client(st.cluster.peerAPI(n), token).ApplySetting(ctx, req)
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

// here makes a setting another member asks for in this node's database
// (POST /v1/cluster/setting).
func (st *settings) here(ctx context.Context, _ *membership.Group, req api.Setting) (api.SettingResponse, error) {
	if err := st.apply(ctx, req); err != nil {
		return api.SettingResponse{}, err
	}
	return api.SettingResponse{Nodes: []string{st.self}}, nil
}
