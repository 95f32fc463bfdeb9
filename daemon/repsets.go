package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

// repsets changes the group's replication sets through Raft and shows them
// (pgmesh repset); the publications follow them in the reconcile.
type repsets struct {
	self, dsn string
	db        *pgxpool.Pool
	store     *membership.Store
	cluster   *cluster
	comparer  *comparer
	// status is this node's status, where the sets it publishes show.
	status func() api.StatusReport
	log    *slog.Logger
}

// list is the group's replication sets as this node sees them.
func (rs *repsets) list(ctx context.Context) (api.RepsetsResponse, error) {
	g, err := rs.cluster.group(ctx)
	if err != nil {
		return api.RepsetsResponse{}, err
	}
	if g == nil {
		return api.RepsetsResponse{}, withStatus(http.StatusConflict, errors.New("this node is not in a node group: pgmesh group create or pgmesh group join first"))
	}
	return rs.view(ctx, g.Sets())
}

// view spells the sets out against this node's tables.
func (rs *repsets) view(ctx context.Context, sets repset.Sets) (api.RepsetsResponse, error) {
	var tables []string
	err := withConn(ctx, rs.db, func(conn *pgx.Conn) error {
		var err error
		tables, err = repset.UserTables(ctx, conn)
		return err
	})
	out := api.RepsetsResponse{Sets: []api.RepsetView{}, LocalTables: sets.Local(tables)}
	if out.LocalTables == nil {
		out.LocalTables = []string{}
	}
	for _, s := range sets.Sorted() {
		v := api.RepsetView{Name: s.Name, Nodes: s.Nodes, AllNodes: s.Nodes == nil, NewTables: s.AllTables, Tables: []api.RepsetTableView{}}
		if v.Nodes == nil {
			v.Nodes = []string{}
		}
		names := slices.Clone(tables)
		for t := range s.Tables {
			if !slices.Contains(names, t) {
				names = append(names, t) // recorded, though not here (yet)
			}
		}
		slices.Sort(names)
		for _, t := range names {
			if spec, ok := s.Holds(t); ok {
				v.Tables = append(v.Tables, api.RepsetTableView{Table: t, Where: spec.Where, Columns: spec.Columns})
			}
		}
		out.Sets = append(out.Sets, v)
	}
	return out, err
}

// change makes the change of replication sets req asks for through
// Raft, waits for the nodes to publish it, and with req.Sync repairs the
// existing rows of the tables it added. A mistake in req is an *api.Error
// with status 400 (409 outside a group).
func (rs *repsets) change(ctx context.Context, req api.RepsetRequest) (api.RepsetsResponse, error) {
	var out api.RepsetsResponse
	g, err := rs.cluster.group(ctx)
	if err != nil {
		return out, err
	}
	if g == nil {
		return out, &api.Error{Status: http.StatusConflict, Message: "this node is not in a node group: pgmesh group create or pgmesh group join first"}
	}
	edit := membership.RepsetEdit{Action: req.Action, Set: req.Set, Nodes: req.Nodes,
		Spec: repset.Table{Where: strings.TrimSpace(req.Where), Columns: req.Columns}}
	switch req.Action {
	case "create", "drop":
	case "add", "remove":
		if len(req.Tables) == 0 {
			err = fmt.Errorf("name the tables to %s (pgmesh repset %s SET TABLE ...)", req.Action, req.Action)
			break
		}
		edit.Tables, err = rs.resolveTables(ctx, req.Tables, req.Action == "add", edit.Spec)
	default:
		err = fmt.Errorf("unknown replication set action %q: use create, add, remove or drop", req.Action)
	}
	if err == nil && req.Action == "add" {
		err = rs.refuseUnsyncedRows(ctx, g, edit, req.Sync)
	}
	if err != nil {
		return out, withStatus(http.StatusBadRequest, err)
	}
	sets, err := rs.edit(ctx, edit)
	if err != nil {
		return out, withStatus(http.StatusBadRequest, err)
	}
	rs.log.Info("changed replication sets", "action", req.Action, "set", req.Set, "tables", edit.Tables)
	pending := rs.waitPublished(ctx, sets.Hash(), 30*time.Second)
	out, err = rs.view(ctx, sets)
	out.Pending = pending
	if err != nil || !req.Sync || len(edit.Tables) == 0 {
		return out, err
	}
	if len(pending) > 0 {
		return out, fmt.Errorf("the change is made, but nodes %s have not published it yet, so the existing rows could not be synced: run pgmesh repair %s once they have (pgmesh status shows them)",
			strings.Join(pending, ", "), strings.Join(edit.Tables, " "))
	}
	nodes, err := rs.comparer.nodes()
	if err != nil {
		return out, err
	}
	res, err := rs.comparer.shares(ctx, nodes, api.CompareRequest{Tables: edit.Tables, Repair: true})
	out.Synced = &res
	return out, err
}

// resolveTables turns the tables a user named into the names sets record.
// Tables being added are checked against the set's filter and columns here,
// on this node's schema (the same on every node).
func (rs *repsets) resolveTables(ctx context.Context, names []string, adding bool, spec repset.Table) ([]string, error) {
	var out []string
	err := withConn(ctx, rs.db, func(conn *pgx.Conn) error {
		for _, name := range names {
			if adding {
				t, err := repset.Check(ctx, conn, name, spec)
				if err != nil {
					return err
				}
				out = append(out, t)
				continue
			}
			// A table may be removed after it was dropped: take the name
			// as the set records it.
			var t *string
			if err := conn.QueryRow(ctx, `SELECT relation FROM pgmesh.user_tables WHERE relid = to_regclass($1)`, name).Scan(&t); err != nil && !errors.Is(err, pgx.ErrNoRows) {
				return fmt.Errorf("look up table %s: %w", name, err)
			}
			switch {
			case t != nil:
				out = append(out, *t)
			case strings.Contains(name, "."):
				out = append(out, name)
			default:
				out = append(out, "public."+name)
			}
		}
		return nil
	})
	return out, err
}

// refuseUnsyncedRows refuses an add that would give some member rows it
// does not hold (a table it did not receive, or rows its filter left out)
// while the table holds rows, unless sync asks for them to be copied.
func (rs *repsets) refuseUnsyncedRows(ctx context.Context, g *membership.Group, edit membership.RepsetEdit, sync bool) error {
	if sync {
		return nil
	}
	before := g.Sets()
	after := before.Clone()
	if err := after.Add(edit.Set, edit.Tables, edit.Spec); err != nil {
		return err
	}
	for _, t := range edit.Tables {
		var gain []string
		for _, n := range g.Sorted() {
			if n.State != membership.Active {
				continue
			}
			was, had := before.Shares(n.Name, []string{t})[t]
			now, has := after.Shares(n.Name, []string{t})[t]
			if has && (!had || was.Where != "" && now.Where != was.Where) {
				gain = append(gain, n.Name)
			}
		}
		if len(gain) == 0 {
			continue
		}
		rows, err := rs.rowsAnywhere(ctx, g, t)
		if err != nil {
			return err
		}
		if rows != "" {
			return fmt.Errorf("table %s holds rows on node %s that nodes %s would not receive (only later changes would reach them): add it with --sync, which then compares %s on the members and writes each missing row again",
				t, rows, strings.Join(gain, ", "), t)
		}
	}
	return nil
}

// rowsAnywhere names an active member whose table t holds rows ("" if none).
func (rs *repsets) rowsAnywhere(ctx context.Context, g *membership.Group, t string) (string, error) {
	for _, n := range g.Sorted() {
		if n.State != membership.Active {
			continue
		}
		target := rs.dsn
		if n.Name != rs.self {
			target = rs.cluster.peerDSN(n)
		}
		conn, err := pgsession.Connect(ctx, target, "pgmesh repset")
		if err != nil {
			return "", fmt.Errorf("connect to node %s's Postgres %s to see whether %s holds rows: %w", n.Name, dsn.Describe(target), t, err)
		}
		var any bool
		err = conn.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+t+")").Scan(&any)
		conn.Close(context.Background())
		if err != nil {
			return "", fmt.Errorf("see whether %s holds rows on node %s: %w", t, n.Name, err)
		}
		if any {
			return n.Name, nil
		}
	}
	return "", nil
}

// edit applies an edit through the Raft leader and returns the sets as
// changed.
func (rs *repsets) edit(ctx context.Context, edit membership.RepsetEdit) (repset.Sets, error) {
	if rs.store.IsLeader() {
		sets, err := rs.store.EditRepsets(edit)
		if !errors.Is(err, membership.ErrNotLeader) {
			return sets, err
		}
	}
	leader, err := rs.cluster.leader(ctx, errors.New("the node group has no Raft leader (is a majority of members down?), and replication sets change only with a majority: try again when it is back"))
	if err != nil {
		return nil, err
	}
	return leader.EditRepsets(ctx, edit)
}

// waitPublished waits until every active member's publications hold the
// sets with this hash, and returns those that did not in time.
func (rs *repsets) waitPublished(ctx context.Context, hash string, timeout time.Duration) []string {
	var pending []string
	_ = poll.Until(ctx, 100*time.Millisecond, timeout, func() error {
		g, _ := rs.store.Group()
		pending = nil
		for _, n := range g.Sorted() {
			if n.State != membership.Active {
				continue
			}
			var rep api.StatusReport
			var err error
			if n.Name == rs.self {
				rep = rs.status()
			} else {
				rep, err = rs.cluster.client(rs.cluster.peerAPI(n), "").Status(ctx)
			}
			if err != nil {
				pending = append(pending, n.Name)
				continue
			}
			if rep.RepsetsPublished != hash {
				pending = append(pending, n.Name)
			}
		}
		if len(pending) > 0 {
			return errors.New("not published everywhere yet")
		}
		return nil
	})
	return pending
}
