package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/pgmesh/pgmesh/api"
)

// repsetForms is the usage line errors point to.
const repsetForms = "pgmesh repset create|add|remove|drop NAME ..., or pgmesh repset list (pgmesh help shows each form)"

func cmdRepset(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("name a repset command: %s", repsetForms)
	}
	action := args[0]
	fs := flag.NewFlagSet("pgmesh repset "+action, flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	var nodes, where, columns *string
	var sync *bool
	switch action {
	case "create":
		nodes = fs.String("nodes", "", "comma-separated members that receive the set (default: every node, including later ones)")
	case "add":
		where = fs.String("where", "", "row filter: send only rows for which this SQL expression is true (key columns only)")
		columns = fs.String("columns", "", "comma-separated columns to send (must include the key)")
		sync = fs.Bool("sync", false, "copy the table's existing rows to members that did not receive them (compare and repair)")
	case "remove", "drop", "list":
	default:
		return fmt.Errorf("unknown repset command %q: %s", action, repsetForms)
	}
	pos, err := parseInterleaved(fs, args[1:])
	if err != nil {
		return err
	}
	if action == "list" {
		if len(pos) > 0 {
			return fmt.Errorf("pgmesh repset list takes no arguments")
		}
		out, err := withClient(target, func(c *api.Client) (api.RepsetsResponse, error) { return c.Repsets(ctx) })
		if err != nil {
			return err
		}
		if *asJSON {
			return printJSON(os.Stdout, out)
		}
		printRepsets(os.Stdout, out)
		return nil
	}
	if len(pos) == 0 {
		return fmt.Errorf("name the replication set: %s", repsetForms)
	}
	req := api.RepsetRequest{Action: action, Set: pos[0], Tables: pos[1:]}
	switch action {
	case "create", "drop":
		if len(pos) > 1 {
			return fmt.Errorf("pgmesh repset %s takes one set name, not %q", action, strings.Join(pos[1:], " "))
		}
		if nodes != nil {
			req.Nodes = splitList(*nodes)
		}
	case "add", "remove":
		if len(req.Tables) == 0 {
			return fmt.Errorf("name the tables to %s (pgmesh repset %s %s TABLE ...)", action, action, req.Set)
		}
		if where != nil {
			req.Where, req.Columns, req.Sync = *where, splitList(*columns), *sync
		}
	}
	out, err := withClient(target, func(c *api.Client) (api.RepsetsResponse, error) { return c.EditRepset(ctx, req) })
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, out)
	}
	printRepsets(os.Stdout, out)
	if len(out.Pending) > 0 {
		fmt.Printf("recorded in the group; nodes %s have not published it yet (each does once it is reachable)\n", strings.Join(out.Pending, ", "))
	} else {
		fmt.Println("in effect on every node")
	}
	if out.Synced != nil {
		fmt.Printf("synced: %d rows written again so that every member holds them\n", len(out.Synced.Actions))
	}
	return nil
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func printRepsets(w io.Writer, out api.RepsetsResponse) {
	for _, s := range out.Sets {
		members := "every node"
		if !s.AllNodes {
			members = "nodes " + strings.Join(s.Nodes, ", ")
			if len(s.Nodes) == 0 {
				members = "no node"
			}
		}
		extra := ""
		if s.NewTables {
			extra = "; new tables join it"
		}
		fmt.Fprintf(w, "%s: received by %s%s\n", s.Name, members, extra)
		for _, t := range s.Tables {
			line := "  " + t.Table
			if len(t.Columns) > 0 {
				line += " (" + strings.Join(t.Columns, ", ") + ")"
			}
			if t.Where != "" {
				line += " where " + t.Where
			}
			fmt.Fprintln(w, line)
		}
		if len(s.Tables) == 0 {
			fmt.Fprintln(w, "  (no tables)")
		}
	}
	if len(out.LocalTables) > 0 {
		fmt.Fprintf(w, "local (in no set, never sent): %s\n", strings.Join(out.LocalTables, ", "))
	}
}
