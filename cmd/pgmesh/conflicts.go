package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/url"
	"os"
	"strconv"
	"text/tabwriter"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

func cmdConflicts(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh conflicts", flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	limit := fs.Int("limit", 20, "show at most this many, newest first")
	table := fs.String("table", "", "only this table (schema.table; public. may be left out)")
	typ := fs.String("type", "", "only this conflict type, e.g. update_origin_differs")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *limit < 1 {
		return fmt.Errorf("--limit %d: give a positive number", *limit)
	}
	q := url.Values{"limit": {strconv.Itoa(*limit)}, "table": {*table}, "type": {*typ}}
	rows, err := withClient(target, func(c *api.Client) ([]api.Conflict, error) { return c.Conflicts(ctx, q) })
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, rows)
	}
	printConflicts(os.Stdout, rows)
	return nil
}

func printConflicts(out io.Writer, rows []api.Conflict) {
	if len(rows) == 0 {
		fmt.Fprintln(out, "no conflicts recorded")
		return
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "ID\tWHEN\tTABLE\tTYPE\tRESOLUTION\tFROM\tKEY\tLOCAL\tREMOTE")
	for _, c := range rows {
		fmt.Fprintf(w, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", c.ID, c.OccurredAt.Local().Format(time.DateTime),
			c.Relation, c.Type, c.Resolution, c.OriginNode, raw(c.KeyTuple), raw(c.LocalTuple), raw(c.RemoteTuple))
	}
	w.Flush()
}

// raw prints a tuple on one line.
func raw(b []byte) string {
	var buf bytes.Buffer
	if len(b) == 0 || string(b) == "null" || json.Compact(&buf, b) != nil {
		return "-"
	}
	return buf.String()
}
