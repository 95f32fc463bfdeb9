package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/bytesize"
	"github.com/pgmesh/pgmesh/internal/dsn"
)

func cmdStatus(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh status", flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	rep, err := withClient(target, func(c *api.Client) (api.StatusReport, error) { return c.Status(ctx) })
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, rep)
	}
	printStatus(os.Stdout, rep)
	return nil
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

func printStatus(out io.Writer, rep api.StatusReport) {
	group := rep.Group
	if group == "" {
		group = "(none)"
	}
	fmt.Fprintf(out, "node %s: %s, group %s, raft %s (leader %s)\n\n", rep.Node, rep.State, group, rep.RaftState, orDash(rep.RaftLeader))
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "NODE\tID\tSTATE\tAPI\tPOSTGRES")
	for _, n := range rep.Nodes {
		fmt.Fprintf(w, "%s\t%d\t%s\t%s\t%s\n", n.Name, n.ID, n.State, n.API, dsn.Describe(n.DSN))
	}
	w.Flush()
	if len(rep.Peers) > 0 {
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "PEER\tCONNECTED\tLAST APPLIED COMMIT\tLAG BYTES\tLAG SECONDS\tTXNS\tROWS\tCONFLICTS\tCLOCK SKEW\tLAST ERROR")
		for _, p := range rep.Peers {
			last := "-"
			if p.LastCommitTS != nil {
				last = p.LastCommitTS.Local().Format(time.DateTime + ".000")
			}
			skew := "-"
			if p.ClockSkew != nil {
				skew = (time.Duration(*p.ClockSkew * float64(time.Second))).Round(time.Millisecond).String()
			}
			fmt.Fprintf(w, "%s\t%v\t%s\t%d\t%.1f\t%d\t%d\t%d\t%s\t%s\n", p.Peer, p.Connected, last, p.LagBytes,
				p.LagSeconds, p.AppliedTxns, p.AppliedRows, p.Conflicts, skew, orDash(p.LastError))
		}
		w.Flush()
		for _, p := range rep.Peers {
			if p.ClockWarning != "" {
				fmt.Fprintf(out, "clock: %s\n", p.ClockWarning)
			}
			if p.HeldForStandbys != "" {
				fmt.Fprintf(out, "confirmations to %s held: %s\n", p.Peer, p.HeldForStandbys)
			}
		}
		for _, p := range rep.Peers {
			if len(p.ConflictsByType) == 0 {
				continue
			}
			var parts []string
			for t, n := range p.ConflictsByType {
				parts = append(parts, fmt.Sprintf("%s %d", t, n))
			}
			sort.Strings(parts)
			fmt.Fprintf(out, "conflicts from %s: %s\n", p.Peer, strings.Join(parts, ", "))
		}
	}
	if len(rep.Slots) > 0 {
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "SLOT FOR\tACTIVE\tRETAINED WAL\tLAGGING")
		for _, s := range rep.Slots {
			fmt.Fprintf(w, "%s\t%v\t%s\t%v\n", s.Peer, s.Active, bytesize.Format(s.RetainedBytes), s.Lagging)
		}
		w.Flush()
	}
	if len(rep.Standbys) > 0 {
		fmt.Fprintln(out)
		w = tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
		fmt.Fprintln(w, "STANDBY\tFAILOVER")
		for _, s := range rep.Standbys {
			state := "ready"
			if s.Note != "" {
				state += " (" + s.Note + ")"
			}
			if !s.Ready {
				state = "not ready: " + s.Reason
			}
			fmt.Fprintf(w, "%s\t%s\n", s.Server, state)
		}
		w.Flush()
	}
	if p := rep.Promotion; p != nil {
		fmt.Fprintf(out, "\npromoted (timeline %d, %s): made the slots of %s again; ", p.Timeline,
			p.DetectedAt.Local().Format(time.DateTime), strings.Join(p.Peers, ", "))
		switch {
		case p.RepairedAt != nil && p.RepairedRows != nil:
			fmt.Fprintf(out, "repaired %d rows (%s)\n", *p.RepairedRows, p.RepairedAt.Local().Format(time.DateTime))
		case p.LastError != "":
			fmt.Fprintf(out, "repair failed, tried again: %s\n", p.LastError)
		default:
			fmt.Fprintln(out, "repair pending")
		}
	}
	if len(rep.Parked) > 0 {
		fmt.Fprintln(out)
		printParked(out, rep.Parked)
	}
	if len(rep.LocalTables) > 0 {
		fmt.Fprintf(out, "\nlocal tables (in no replication set; their changes stay here): %s\n", strings.Join(rep.LocalTables, ", "))
	}
	if rep.Join != nil && !rep.Join.Done {
		fmt.Fprintf(out, "\njoin: %s\n", progressLine(rep.Join))
	}
	if len(rep.Problems) > 0 {
		fmt.Fprintln(out, "\nproblems:")
		for _, p := range rep.Problems {
			fmt.Fprintln(out, "  -", p)
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
