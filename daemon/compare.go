package daemon

import (
	"context"
	"errors"
	"log/slog"
	"net/http"
	"slices"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/compare"
	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

// comparer compares (and repairs) tables across the active members, each
// table among the members that receive the same share of it.
type comparer struct {
	self, dsn string
	store     *membership.Store
	cluster   *cluster
	rule      func() conflict.Rule
	log       *slog.Logger
}

// nodes lists this node first, then the other active members, each
// with the connection string this node reaches it by.
func (c *comparer) nodes() ([]compare.Node, error) {
	g, _ := c.store.Group()
	var me *membership.Node
	if g != nil {
		me = g.Nodes[c.self]
	}
	if me == nil || me.State != membership.Active {
		return nil, errors.New("this node is not an active member of a node group, so there is nothing to compare it with: run pgmesh compare on an active member")
	}
	nodes := []compare.Node{{Name: me.Name, ID: me.ID, DSN: c.dsn}}
	for _, n := range g.Sorted() {
		if n.Name != me.Name && n.State == membership.Active {
			nodes = append(nodes, compare.Node{Name: n.Name, ID: n.ID, DSN: c.cluster.peerDSN(n)})
		}
	}
	return nodes, nil
}

// compare compares (and with req.Repair, repairs) the tables req names on
// every active node, or with req.ListOnly lists the tables it would.
func (c *comparer) compare(ctx context.Context, req api.CompareRequest) (api.CompareResponse, error) {
	nodes, err := c.nodes()
	if err != nil {
		return api.CompareResponse{}, withStatus(http.StatusConflict, err)
	}
	if req.ListOnly {
		names, err := compare.Tables(ctx, nodes[0], req.Tables)
		if err != nil {
			return api.CompareResponse{}, withStatus(http.StatusBadRequest, err)
		}
		return api.CompareResponse{Names: names}, nil
	}
	return c.shares(ctx, nodes, req)
}

// shares compares (and with req.Repair repairs) each table among the
// nodes that receive the same share of it.
func (c *comparer) shares(ctx context.Context, nodes []compare.Node, req api.CompareRequest) (api.CompareResponse, error) {
	out := api.CompareResponse{Tables: []compare.TableResult{}}
	names, err := compare.Tables(ctx, nodes[0], req.Tables)
	if err != nil {
		return out, err
	}
	for _, n := range nodes {
		out.Nodes = append(out.Nodes, n.Name)
	}
	g, _ := c.store.Group()
	sets := g.Sets()
	for _, t := range names {
		groups := shareGroups(sets, nodes, t)
		if len(groups) == 0 {
			out.Tables = append(out.Tables, compare.TableResult{Table: t, Diffs: []compare.Diff{},
				NotComparable: "no two active nodes receive the same share of it (see pgmesh repset list)"})
		}
		for _, sh := range groups {
			opts := compare.Options{Tables: []string{t}, ChunkRows: req.ChunkRows, Rule: c.rule(),
				Where: sh.share.Where, Columns: sh.share.Columns}
			res, err := compare.Compare(ctx, sh.nodes, opts)
			if err != nil {
				return out, err
			}
			if len(sh.nodes) < len(nodes) || sh.share.Where != "" {
				for i := range res {
					res[i].Where = sh.share.Where
					for _, n := range sh.nodes {
						res[i].Nodes = append(res[i].Nodes, n.Name)
					}
				}
			}
			if req.Repair {
				acts, err := compare.Repair(context.WithoutCancel(ctx), sh.nodes, res, req.DryRun)
				out.Actions = append(out.Actions, acts...)
				if err != nil {
					return out, err
				}
			}
			out.Tables = append(out.Tables, res...)
		}
	}
	if req.Repair && !req.DryRun {
		c.log.Info("repaired differing rows", "writes", len(out.Actions))
	}
	return out, nil
}

// repairAll compares and repairs every replicated table among the active
// members, and returns how many rows it wrote again.
func (c *comparer) repairAll(ctx context.Context) (int, error) {
	nodes, err := c.nodes()
	if err != nil {
		return 0, err
	}
	res, err := c.shares(ctx, nodes, api.CompareRequest{Repair: true})
	return len(res.Actions), err
}

// shareGroup is nodes that receive the same share of a table.
type shareGroup struct {
	share repset.Share
	nodes []compare.Node
}

// shareGroups splits nodes by the share of table each receives; only groups
// of two or more can be compared. Nodes that receive the table with the
// same filter and columns must hold the same rows of it.
func shareGroups(sets repset.Sets, nodes []compare.Node, table string) []shareGroup {
	var groups []shareGroup
	for _, n := range nodes {
		sh, ok := sets.Shares(n.Name, []string{table})[table]
		if !ok {
			continue
		}
		i := slices.IndexFunc(groups, func(g shareGroup) bool {
			return g.share.Where == sh.Where && slices.Equal(g.share.Columns, sh.Columns)
		})
		if i < 0 {
			groups = append(groups, shareGroup{share: sh})
			i = len(groups) - 1
		}
		groups[i].nodes = append(groups[i].nodes, n)
	}
	return slices.DeleteFunc(groups, func(g shareGroup) bool { return len(g.nodes) < 2 })
}
