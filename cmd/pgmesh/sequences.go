package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"strings"
	"text/tabwriter"

	"github.com/pgmesh/pgmesh/api"
)

func cmdSequences(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("sequences takes audit, convert or show: pgmesh sequences audit")
	}
	switch args[0] {
	case "audit":
		return cmdSequencesAudit(ctx, args[1:])
	case "convert":
		return cmdSequencesConvert(ctx, args[1:])
	case "show":
		return cmdSequencesShow(ctx, args[1:])
	}
	return fmt.Errorf("unknown sequences command %q: use audit, convert or show", args[0])
}

// cmdSequencesAudit lists what cannot hold global values yet and exits
// non-zero while anything remains, so it can gate a deployment.
func cmdSequencesAudit(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh sequences audit", flag.ContinueOnError)
	target := apiFlag(fs)
	apply := fs.Bool("apply", false, "run the statements on every node (rewrites the tables)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	c, err := target.client()
	if err != nil {
		return err
	}
	rows, err := c.Audit(ctx)
	if err != nil {
		return err
	}
	if len(rows) > 0 && *apply {
		fmt.Fprintln(os.Stderr, "applying on every node; ALTER ... TYPE bigint rewrites each table and locks it meanwhile")
		resp, err := c.Setting(ctx, api.Setting{BigintAudit: true})
		if err != nil {
			return err
		}
		fmt.Printf("applied on: %s\n", strings.Join(resp.Nodes, ", "))
		if rows, err = c.Audit(ctx); err != nil {
			return err
		}
	}
	if len(rows) == 0 {
		fmt.Println("every sequence column and sequence is bigint")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "OBJECT\tCOLUMN\tTYPE\tWHAT")
	for _, r := range rows {
		col := "-"
		if r.Column != nil {
			col = *r.Column
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\n", r.Table, col, r.Type, r.What)
	}
	w.Flush()
	fmt.Println("\nstatements (pgmesh sequences audit --apply runs them on every node):")
	for _, r := range rows {
		fmt.Println("  " + r.Statement + ";")
	}
	return fmt.Errorf("%d columns or sequences are not bigint yet", len(rows))
}

func cmdSequencesConvert(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh sequences convert", flag.ContinueOnError)
	target := apiFlag(fs)
	kind := fs.String("kind", "timeshard", "timeshard (time/node/counter packed bigint) or galloc (chunks of a plain range)")
	chunk := fs.Int64("chunk-size", 10000, "galloc: values per chunk")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	resp, err := withClient(target, func(c *api.Client) (api.SettingResponse, error) {
		return c.Convert(ctx, api.ConvertRequest{Kind: *kind, Sequences: pos, ChunkSize: *chunk})
	})
	if err != nil {
		return err
	}
	if len(resp.Nodes) == 0 {
		fmt.Println("no sequences to convert")
		return nil
	}
	fmt.Printf("converted to %s on every node: %s\n", *kind, strings.Join(resp.Nodes, ", "))
	return nil
}

func cmdSequencesShow(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh sequences show", flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	seqs, err := withClient(target, func(c *api.Client) ([]api.SequenceInfo, error) { return c.Sequences(ctx) })
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, seqs)
	}
	if len(seqs) == 0 {
		fmt.Println("no global sequences (pgmesh sequences convert makes them)")
		return nil
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "SEQUENCE\tKIND\tCHUNKS")
	for _, s := range seqs {
		var chunks []string
		for _, c := range s.Chunks {
			chunks = append(chunks, fmt.Sprintf("%s:%d-%d", c.Node, c.Start, c.End-1))
		}
		fmt.Fprintf(w, "%s\t%s\t%s\n", s.Sequence, s.Kind, orDash(strings.Join(chunks, " ")))
	}
	w.Flush()
	return nil
}
