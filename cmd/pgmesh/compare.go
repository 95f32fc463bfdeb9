package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/compare"
)

// errDrift ends pgmesh compare with exit code 1 when nodes differ.
var errDrift = errors.New("nodes hold different rows")

func cmdCompare(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh compare", flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	chunk := fs.Int("chunk-rows", 10000, "rows per hashed chunk: smaller chunks read fewer rows where nodes differ")
	tables, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if *chunk < 1 {
		return fmt.Errorf("--chunk-rows %d: give a positive number", *chunk)
	}
	rep, err := compareTables(ctx, target, tables, api.CompareRequest{ChunkRows: *chunk})
	if err != nil {
		return err
	}
	if *asJSON {
		if err := printJSON(os.Stdout, rep); err != nil {
			return err
		}
	} else {
		printCompare(os.Stdout, rep)
	}
	if n := countDiffs(rep); n > 0 {
		return fmt.Errorf("%w for %d keys: pgmesh repair TABLE... writes each winner again (--dry-run shows how)", errDrift, n)
	}
	return nil
}

func cmdRepair(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh repair", flag.ContinueOnError)
	target := apiFlag(fs)
	dry := fs.Bool("dry-run", false, "print what would be written, write nothing")
	asJSON := fs.Bool("json", false, "print JSON")
	tables, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(tables) == 0 {
		return errors.New("name the tables to repair (pgmesh repair TABLE...): run pgmesh compare first to see which differ")
	}
	rep, err := compareTables(ctx, target, tables, api.CompareRequest{Repair: true, DryRun: *dry})
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, rep)
	}
	printCompare(os.Stdout, rep)
	verb := "wrote"
	if *dry {
		verb = "would write"
	}
	for _, a := range rep.Actions {
		fmt.Printf("%s on %s: %s %s key %s\n", verb, a.Node, a.Do, a.Table, keyText(a.Key))
		if *dry {
			fmt.Printf("  %s  -- $1 = %s\n", a.SQL, keyText(a.Key))
		}
	}
	if len(rep.Actions) == 0 {
		fmt.Println("nothing to repair: every node holds the same rows")
	} else if !*dry {
		fmt.Println("the writes replicate to every node; pgmesh compare shows when they have")
	}
	return nil
}

// compareTables compares the tables one request at a time, with a progress
// line on a terminal.
func compareTables(ctx context.Context, target *daemonFlags, tables []string, req api.CompareRequest) (api.CompareResponse, error) {
	c, err := target.client()
	if err != nil {
		return api.CompareResponse{}, err
	}
	list, err := c.Compare(ctx, api.CompareRequest{Tables: tables, ListOnly: true})
	if err != nil {
		return list, err
	}
	tty := isTerminal(os.Stderr)
	var out api.CompareResponse
	for i, t := range list.Names {
		if tty {
			fmt.Fprintf(os.Stderr, "\rcomparing %s (%d of %d)...\033[K", t, i+1, len(list.Names))
		}
		r := req
		r.Tables = []string{t}
		one, err := c.Compare(ctx, r)
		if err != nil {
			if tty {
				fmt.Fprintln(os.Stderr)
			}
			return out, err
		}
		out.Nodes = one.Nodes
		out.Tables = append(out.Tables, one.Tables...)
		out.Actions = append(out.Actions, one.Actions...)
	}
	if tty {
		fmt.Fprint(os.Stderr, "\r\033[K")
	}
	return out, nil
}

func countDiffs(rep api.CompareResponse) int {
	n := 0
	for _, t := range rep.Tables {
		n += len(t.Diffs)
	}
	return n
}

func printCompare(w io.Writer, rep api.CompareResponse) {
	fmt.Fprintf(w, "nodes: %s\n", strings.Join(rep.Nodes, ", "))
	for _, t := range rep.Tables {
		name, where := t.Table, "every node"
		if len(t.Nodes) > 0 {
			// A replication set's share: only these nodes hold these rows.
			where = "nodes " + strings.Join(t.Nodes, ", ")
			if t.Where != "" {
				name += " where " + t.Where
			}
		}
		switch {
		case t.NotComparable != "":
			fmt.Fprintf(w, "%s: not comparable: %s\n", name, t.NotComparable)
			continue
		case len(t.Diffs) == 0:
			fmt.Fprintf(w, "%s: %d rows, identical on %s (%.1fs)\n", name, t.Rows, where, t.Seconds)
		default:
			fmt.Fprintf(w, "%s: %d rows, %d keys differ between %s (%.1fs)\n", name, t.Rows, len(t.Diffs), where, t.Seconds)
		}
		if t.InFlight > 0 {
			fmt.Fprintf(w, "  %d keys were being written during the comparison and are not counted\n", t.InFlight)
		}
		for _, d := range t.Diffs {
			win := "the row on " + d.Winner
			if d.WinnerIsDelete {
				win = "the delete on " + d.Winner
			}
			fmt.Fprintf(w, "  key %s: last update wins: %s\n", keyText(d.Key), win)
			for _, v := range d.Versions {
				fmt.Fprintf(w, "    %-12s %s\n", v.Node, describeVersion(v))
			}
		}
	}
}

// keyText is a key's JSON on one line.
func keyText(k json.RawMessage) string {
	var b bytes.Buffer
	if json.Compact(&b, k) != nil {
		return string(k)
	}
	return b.String()
}

func describeVersion(v compare.Version) string {
	when := "time unknown"
	if v.CommitTS != nil {
		when = v.CommitTS.Local().Format(time.DateTime + ".000000")
	}
	switch {
	case v.Present:
		h := v.Hash
		if len(h) > 12 {
			h = h[:12]
		}
		return fmt.Sprintf("row (hash %s), written %s by %s", h, when, v.Origin)
	case v.CommitTS != nil:
		return fmt.Sprintf("absent: deleted %s by %s", when, v.Origin)
	default:
		return "absent: never received"
	}
}
