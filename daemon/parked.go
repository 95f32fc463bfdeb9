package daemon

import (
	"context"
	"fmt"
	"net/http"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/replicator"
)

// parked lists what waits in pgmesh.parked_changes, per peer and table
// (docs/apply-errors.md).
func (d *Daemon) parked(ctx context.Context) ([]api.ParkedTable, error) {
	rows, err := d.db.Query(ctx, `SELECT peer, schema_name || '.' || table_name, count(*), min(parked_at),
			coalesce((array_agg(error ORDER BY id) FILTER (WHERE error IS NOT NULL))[1], '')
		FROM pgmesh.parked_changes GROUP BY peer, schema_name, table_name ORDER BY 2, 1`)
	if err != nil {
		return nil, fmt.Errorf("read parked changes: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (api.ParkedTable, error) {
		var p api.ParkedTable
		err := r.Scan(&p.Peer, &p.Table, &p.Changes, &p.Since, &p.Error)
		return p, err
	})
}

// parkedNote is the sentence status and health give a parked table.
func parkedNote(p api.ParkedTable) string {
	s := fmt.Sprintf("%d changes of %s from %s are parked since %s", p.Changes, p.Table, p.Peer, p.Since.UTC().Format("2006-01-02 15:04:05Z"))
	if p.Error != "" {
		s += " (" + p.Error + ")"
	}
	return s + fmt.Sprintf("; fix the cause, then run pgmesh replay %s --peer %s", p.Table, p.Peer)
}

// parkedList is parked, as an empty list rather than none.
func (d *Daemon) parkedList(ctx context.Context) ([]api.ParkedTable, error) {
	list, err := d.parked(ctx)
	if list == nil {
		list = []api.ParkedTable{}
	}
	return list, err
}

func (d *Daemon) replayParked(ctx context.Context, req api.QueueRequest) (api.QueueResponse, error) {
	return d.takeParked(ctx, req, false)
}

func (d *Daemon) discardParked(ctx context.Context, req api.QueueRequest) (api.QueueResponse, error) {
	return d.takeParked(ctx, req, true)
}

// takeParked replays or discards a table's parked changes from one peer,
// or from each peer that has some, on that peer's stream. Errors are
// *api.Error with their status: nothing parked (404), no stream (409), a
// stream that could not take the request (503).
func (d *Daemon) takeParked(ctx context.Context, req api.QueueRequest, discard bool) (api.QueueResponse, error) {
	var resp api.QueueResponse
	list, err := d.parked(ctx)
	if err != nil {
		return resp, err
	}
	targets, err := queueTargets(list, req.Table, req.Peer)
	if err != nil {
		return resp, withStatus(http.StatusNotFound, err)
	}
	for _, t := range targets {
		s := d.reconciler.streams.stream(t.Peer)
		if s == nil {
			return resp, &api.Error{Status: http.StatusConflict, Message: fmt.Sprintf("there is no stream from peer %q on this node (parted, or not yet active), so its parked changes of %s cannot be replayed: pgmesh discard %s --peer %s drops them, each logged", t.Peer, t.Table, t.Table, t.Peer)}
		}
		schema, table, _ := strings.Cut(t.Table, ".")
		var res replicator.QueueResult
		if discard {
			res, err = s.Discard(ctx, schema, table)
		} else {
			res, err = s.Replay(ctx, schema, table, req.DryRun)
		}
		if err != nil {
			return resp, withStatus(http.StatusServiceUnavailable, err)
		}
		resp.Results = append(resp.Results, res)
		if res.Error != "" {
			break // the later peers' replays wait for the cause to be fixed
		}
	}
	return resp, nil
}

// queueTargets picks the parked tables a request names: table as
// schema.table or a bare name (any schema, if only one has it), from peer
// or from every peer.
func queueTargets(list []api.ParkedTable, table, peer string) ([]api.ParkedTable, error) {
	if table == "" {
		return nil, fmt.Errorf("name the table whose parked changes to take: pgmesh parked lists them")
	}
	var out []api.ParkedTable
	schemas := map[string]bool{}
	for _, p := range list {
		_, name, _ := strings.Cut(p.Table, ".")
		if (p.Table == table || (!strings.Contains(table, ".") && name == table)) && (peer == "" || p.Peer == peer) {
			out = append(out, p)
			schemas[p.Table] = true
		}
	}
	if len(schemas) > 1 {
		names := make([]string, 0, len(schemas))
		for s := range schemas {
			names = append(names, s)
		}
		slices.Sort(names)
		return nil, fmt.Errorf("%s is parked in more than one schema (%s): name it with its schema", table, strings.Join(names, ", "))
	}
	if len(out) == 0 {
		from := ""
		if peer != "" {
			from = " from peer " + peer
		}
		return nil, fmt.Errorf("no changes of %s%s are parked on this node: pgmesh parked lists what is", table, from)
	}
	return out, nil
}
