package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

// `pgmesh parked`, `replay`, `discard` and `on-apply-error`: the parked
// queue of docs/apply-errors.md.

func cmdParked(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh parked", flag.ContinueOnError)
	target := apiFlag(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	list, err := withClient(target, func(c *api.Client) ([]api.ParkedTable, error) { return c.Parked(ctx) })
	if err != nil {
		return err
	}
	if *asJSON {
		return printJSON(os.Stdout, list)
	}
	printParked(os.Stdout, list)
	return nil
}

func printParked(out io.Writer, list []api.ParkedTable) {
	if len(list) == 0 {
		fmt.Fprintln(out, "no changes are parked on this node")
		return
	}
	w := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(w, "TABLE\tFROM\tCHANGES\tSINCE\tERROR")
	for _, p := range list {
		fmt.Fprintf(w, "%s\t%s\t%d\t%s\t%s\n", p.Table, p.Peer, p.Changes, p.Since.Local().Format(time.DateTime), p.Error)
	}
	w.Flush()
	fmt.Fprintln(out, "fix each cause on this node, then: pgmesh replay TABLE [--peer PEER] (or pgmesh discard TABLE --yes)")
}

func cmdReplay(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh replay", flag.ContinueOnError)
	target := apiFlag(fs)
	peer := fs.String("peer", "", "only the changes from this peer (default: from every peer)")
	dry := fs.Bool("dry-run", false, "apply and roll back: say what a replay would do")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("replay takes one table: pgmesh replay TABLE [--peer PEER] [--dry-run]")
	}
	resp, err := withClient(target, func(c *api.Client) (api.QueueResponse, error) {
		return c.Replay(ctx, api.QueueRequest{Table: pos[0], Peer: *peer, DryRun: *dry})
	})
	if err != nil {
		return err
	}
	var failed []error
	for _, r := range resp.Results {
		verb := "replayed"
		if r.DryRun {
			verb = "would replay"
		}
		fmt.Printf("%s %d changes of %s from %s in %d transactions, %d conflicts logged; %d left parked\n",
			verb, r.Changes, r.Table, r.Peer, r.Transactions, r.Conflicts, r.Left)
		if r.Error != "" {
			failed = append(failed, errors.New(r.Error))
		}
	}
	return errors.Join(failed...)
}

func cmdDiscard(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh discard", flag.ContinueOnError)
	target := apiFlag(fs)
	peer := fs.String("peer", "", "only the changes from this peer (default: from every peer)")
	yes := fs.Bool("yes", false, "confirm: the changes are dropped unapplied (each is logged in conflict_history)")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return fmt.Errorf("discard takes one table: pgmesh discard TABLE [--peer PEER] --yes")
	}
	if !*yes {
		return fmt.Errorf("discard drops %s's parked changes without applying them: add --yes to confirm (pgmesh replay applies them instead)", pos[0])
	}
	resp, err := withClient(target, func(c *api.Client) (api.QueueResponse, error) {
		return c.Discard(ctx, api.QueueRequest{Table: pos[0], Peer: *peer})
	})
	if err != nil {
		return err
	}
	for _, r := range resp.Results {
		fmt.Printf("discarded %d parked changes of %s from %s, each logged in pgmesh.conflict_history (parked_discarded, skip)\n", r.Changes, r.Table, r.Peer)
	}
	return nil
}

func cmdOnApplyError(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh on-apply-error", flag.ContinueOnError)
	target := apiFlag(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return fmt.Errorf("on-apply-error takes a table and a policy: pgmesh on-apply-error TABLE park|stop|default")
	}
	policy := strings.ToLower(pos[1])
	switch policy {
	case "park", "stop":
	case "default":
		policy = ""
	default:
		return fmt.Errorf("on-apply-error policy %q is not park, stop or default", pos[1])
	}
	req := api.Setting{ApplyError: &api.ApplyErrorSetting{Table: pos[0], Policy: policy}}
	resp, err := withClient(target, func(c *api.Client) (api.SettingResponse, error) { return c.Setting(ctx, req) })
	if err != nil {
		return err
	}
	what := "the daemon's on_apply_error"
	if policy != "" {
		what = policy
	}
	fmt.Printf("changes of %s that fail to apply now follow %s, on: %s\n", pos[0], what, strings.Join(resp.Nodes, ", "))
	return nil
}
