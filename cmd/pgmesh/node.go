package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"

	"github.com/pgmesh/pgmesh/daemon"
)

func cmdNodePart(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh node part", flag.ContinueOnError)
	api := apiFlag(fs)
	force := fs.Bool("force", false, "part a node that is gone for good")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("node part takes one argument, the node name: pgmesh node part NAME")
	}
	var resp daemon.JoinResponse
	if err := call(ctx, *api, http.MethodPost, "/v1/node/part", daemon.PartRequest{Name: pos[0], Force: *force}, &resp); err != nil {
		return err
	}
	fmt.Printf("node %q parted from node group %q\n", pos[0], resp.Group)
	return nil
}
