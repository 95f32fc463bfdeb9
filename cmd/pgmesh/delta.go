package main

import (
	"context"
	"flag"
	"fmt"
	"strings"

	"github.com/pgmesh/pgmesh/api"
)

func cmdDeltaColumn(ctx context.Context, args []string) error {
	return setOnEveryNode(ctx, "delta", args,
		"a delta column (remote updates add their increment; REPLICA IDENTITY FULL set)", "an ordinary column again")
}

func cmdHomeColumn(ctx context.Context, args []string) error {
	return setOnEveryNode(ctx, "home", args,
		"the home column: only the node it names may write a row (others fail with SQLSTATE PM001)", "no longer a home column")
}

// setOnEveryNode runs `pgmesh KIND-column [--unset] TABLE COLUMN`.
func setOnEveryNode(ctx context.Context, kind string, args []string, set, unsetMsg string) error {
	fs := flag.NewFlagSet("pgmesh "+kind+"-column", flag.ContinueOnError)
	target := apiFlag(fs)
	unset := fs.Bool("unset", false, "undo the setting")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return fmt.Errorf("%s-column takes a table and a column: pgmesh %s-column TABLE COLUMN", kind, kind)
	}
	col := &api.ColumnSetting{Table: pos[0], Column: pos[1], Enabled: !*unset}
	req := api.Setting{DeltaColumn: col}
	if kind == "home" {
		req = api.Setting{HomeColumn: col}
	}
	resp, err := withClient(target, func(c *api.Client) (api.SettingResponse, error) { return c.Setting(ctx, req) })
	if err != nil {
		return err
	}
	what := set
	if *unset {
		what = unsetMsg
	}
	fmt.Printf("%s.%s is now %s, on: %s\n", pos[0], pos[1], what, strings.Join(resp.Nodes, ", "))
	return nil
}
