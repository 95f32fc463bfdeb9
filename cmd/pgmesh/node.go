package main

import (
	"context"
	"errors"
	"flag"
	"fmt"

	"github.com/pgmesh/pgmesh/api"
)

func cmdNodePart(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh node part", flag.ContinueOnError)
	target := apiFlag(fs)
	force := fs.Bool("force", false, "part a node that is gone for good")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("node part takes one argument, the node name: pgmesh node part NAME")
	}
	resp, err := withClient(target, func(c *api.Client) (api.JoinResponse, error) {
		return c.Part(ctx, api.PartRequest{Name: pos[0], Force: *force})
	})
	if err != nil {
		return err
	}
	fmt.Printf("node %q parted from node group %q\n", pos[0], resp.Group)
	return nil
}
