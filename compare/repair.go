package compare

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/pgsession"
)

// Action is one write Repair makes (or, dry, would make).
type Action struct {
	Table string          `json:"table"`
	Key   json.RawMessage `json:"key"`
	Node  string          `json:"node"`
	// Do is "rewrite" (the winning row is written again where it is, so
	// it becomes the newest version and replaces every other) or "delete"
	// (the winner is a delete: the row is deleted where it remains).
	Do  string `json:"do"`
	SQL string `json:"sql"`
}

// Plan lists the writes that make every node hold the winner of each
// difference in results. They are ordinary writes on one node each: they
// replicate, are settled by last-update-wins, and are logged as any other.
func Plan(results []TableResult) []Action {
	var out []Action
	for _, r := range results {
		for _, d := range r.Diffs {
			a := Action{Table: r.Table, Key: d.Key, Node: d.Winner, Do: "rewrite"}
			if d.WinnerIsDelete {
				a.Do = "delete"
				for _, v := range d.Versions {
					if v.Present {
						a.Node = v.Node
						break
					}
				}
			}
			out = append(out, a)
		}
	}
	return out
}

// Repair carries out the plan for results on the nodes; with dryRun it only
// returns it, each action's statement filled in.
func Repair(ctx context.Context, nodes []Node, results []TableResult, dryRun bool) ([]Action, error) {
	actions := Plan(results)
	if len(actions) == 0 {
		return actions, nil
	}
	conns := map[string]*pgx.Conn{}
	defer func() {
		for _, c := range conns {
			c.Close(context.Background())
		}
	}()
	byName := map[string]Node{}
	for _, n := range nodes {
		byName[n.Name] = n
	}
	tables := map[string]*table{}
	for i := range actions {
		a := &actions[i]
		n, ok := byName[a.Node]
		if !ok {
			return actions, fmt.Errorf("node %s holds the winner of a key of %s but is not an active member: compare again", a.Node, a.Table)
		}
		c := conns[a.Node]
		if c == nil {
			var err error
			if c, err = pgsession.Connect(ctx, n.DSN, "pgmesh repair", pgsession.Writer); err != nil {
				return actions, fmt.Errorf("connect to node %s's Postgres: %w", a.Node, err)
			}
			conns[a.Node] = c
		}
		t := tables[a.Table]
		if t == nil {
			ts, err := listTables(ctx, c, []string{a.Table})
			if err != nil {
				return actions, err
			}
			t = ts[0]
			tables[a.Table] = t
		}
		a.SQL = t.repairSQL(a.Do)
		if dryRun {
			continue
		}
		tag, err := c.Exec(ctx, a.SQL, string(a.Key))
		if err != nil {
			return actions, fmt.Errorf("%s key %s of %s on node %s: %w", a.Do, a.Key, a.Table, a.Node, err)
		}
		if tag.RowsAffected() != 1 {
			return actions, fmt.Errorf("key %s of %s changed on node %s since it was compared (%s found %d rows): compare again",
				a.Key, a.Table, a.Node, a.Do, tag.RowsAffected())
		}
	}
	return actions, nil
}

// repairSQL writes a row again (its columns set to themselves: a new
// version, the newest, sent to every peer) or deletes it, by its key as JSON
// ($1). Key columns are left alone (they may be identity columns).
func (t *table) repairSQL(do string) string {
	if do == "delete" {
		return fmt.Sprintf("DELETE FROM %s t WHERE %s", t.qualified, t.keyFromJSON())
	}
	var sets []string
	for _, c := range t.cols {
		if !slices.Contains(t.key, c) {
			sets = append(sets, pgquote.Ident(c)+" = t."+pgquote.Ident(c))
		}
	}
	if len(sets) == 0 {
		sets = []string{pgquote.Ident(t.key[0]) + " = t." + pgquote.Ident(t.key[0])}
	}
	return fmt.Sprintf("UPDATE %s t SET %s WHERE %s", t.qualified, strings.Join(sets, ", "), t.keyFromJSON())
}

// keyFromJSON matches the row whose key is the JSON object $1, column by
// column, so that the primary key's index finds it.
func (t *table) keyFromJSON() string {
	conds := make([]string, len(t.key))
	for i, c := range t.key {
		conds[i] = fmt.Sprintf("t.%s = ($1::jsonb ->> %s)::%s", pgquote.Ident(c), pgquote.Literal(c), t.keyTypes[i])
	}
	return strings.Join(conds, " AND ")
}
