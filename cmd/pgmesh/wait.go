package main

import (
	"context"
	"flag"
	"fmt"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

func cmdWait(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh wait", flag.ContinueOnError)
	target := apiFlag(fs)
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	peers := fs.String("peers", "", "comma-separated peers to wait for (default: every active peer)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req := api.WaitRequest{Timeout: timeout.String()}
	if *peers != "" {
		req.Peers = strings.Split(*peers, ",")
	}
	resp, err := withClient(target, func(c *api.Client) (api.WaitResponse, error) { return c.Wait(ctx, req) })
	if err != nil {
		return err
	}
	if !resp.Applied {
		return fmt.Errorf("not every peer applied this node's changes within %s: 'pgmesh status' shows which peer lags", *timeout)
	}
	fmt.Printf("every peer has applied this node's changes (%s)\n", time.Duration(resp.WaitedMS)*time.Millisecond)
	return nil
}
