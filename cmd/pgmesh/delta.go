package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"strings"

	"github.com/pgmesh/pgmesh/daemon"
)

func cmdDeltaColumn(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh delta-column", flag.ContinueOnError)
	api := apiFlag(fs)
	unset := fs.Bool("unset", false, "make the column an ordinary column again")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 2 {
		return errors.New("delta-column takes a table and a column: pgmesh delta-column accounts balance")
	}
	var resp daemon.DeltaResponse
	req := daemon.DeltaRequest{Table: pos[0], Column: pos[1], Enabled: !*unset}
	if err := call(ctx, *api, http.MethodPost, "/v1/delta-column", req, &resp); err != nil {
		return err
	}
	what := "a delta column (remote updates add their increment; REPLICA IDENTITY FULL set)"
	if *unset {
		what = "an ordinary column again"
	}
	fmt.Printf("%s.%s is now %s on: %s\n", pos[0], pos[1], what, strings.Join(resp.Nodes, ", "))
	return nil
}
