package daemon

import (
	"context"
	"errors"
	"net/http"

	"github.com/pgmesh/pgmesh/compare"
	"github.com/pgmesh/pgmesh/membership"
)

// CompareRequest asks for a comparison (and, with Repair, a repair) of
// tables on every active member.
type CompareRequest struct {
	Tables    []string `json:"tables,omitempty"`
	ChunkRows int      `json:"chunk_rows,omitempty"`
	Repair    bool     `json:"repair,omitempty"`
	DryRun    bool     `json:"dry_run,omitempty"`
	// ListOnly returns the tables that would be compared, in Names.
	ListOnly bool `json:"list_only,omitempty"`
}

// CompareResponse carries the results, and the repair's actions.
type CompareResponse struct {
	Nodes   []string              `json:"nodes"`
	Tables  []compare.TableResult `json:"tables"`
	Actions []compare.Action      `json:"actions,omitempty"`
	Names   []string              `json:"names,omitempty"`
}

// compareNodes lists this node first, then the other active members, each
// with the connection string this node reaches it by.
func (d *Daemon) compareNodes() ([]compare.Node, error) {
	g, _ := d.store.Group()
	var me *membership.Node
	if g != nil {
		me = g.Nodes[d.cfg.NodeName]
	}
	if me == nil || me.State != membership.Active {
		return nil, errors.New("this node is not an active member of a node group, so there is nothing to compare it with: run pgmesh compare on an active member")
	}
	nodes := []compare.Node{{Name: me.Name, ID: me.ID, DSN: d.cfg.DSN}}
	for _, n := range g.Sorted() {
		if n.Name != me.Name && n.State == membership.Active {
			nodes = append(nodes, compare.Node{Name: n.Name, ID: n.ID, DSN: d.peerDSN(n)})
		}
	}
	return nodes, nil
}

func (d *Daemon) handleCompare(w http.ResponseWriter, r *http.Request) {
	var req CompareRequest
	if err := readJSON(r, &req); err != nil {
		writeErr(w, 0, err)
		return
	}
	nodes, err := d.compareNodes()
	if err != nil {
		writeErr(w, http.StatusConflict, err)
		return
	}
	ctx := r.Context()
	if req.ListOnly {
		names, err := compare.Tables(ctx, nodes[0], req.Tables)
		if err != nil {
			writeErr(w, http.StatusBadRequest, err)
			return
		}
		writeJSON(w, http.StatusOK, CompareResponse{Names: names})
		return
	}
	res, err := compare.Compare(ctx, nodes, compare.Options{Tables: req.Tables, ChunkRows: req.ChunkRows,
		Rule: d.rule()})
	if err != nil {
		writeErr(w, http.StatusInternalServerError, err)
		return
	}
	out := CompareResponse{Tables: res}
	for _, n := range nodes {
		out.Nodes = append(out.Nodes, n.Name)
	}
	if req.Repair {
		out.Actions, err = compare.Repair(context.WithoutCancel(ctx), nodes, res, req.DryRun)
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err)
			return
		}
		if !req.DryRun {
			d.log.Info("repaired differing rows", "writes", len(out.Actions))
		}
	}
	writeJSON(w, http.StatusOK, out)
}
