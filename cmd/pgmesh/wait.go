package main

import (
	"context"
	"flag"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/daemon"
)

func cmdWait(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh wait", flag.ContinueOnError)
	api := apiFlag(fs)
	timeout := fs.Duration("timeout", 30*time.Second, "give up after this long")
	peers := fs.String("peers", "", "comma-separated peers to wait for (default: every active peer)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	req := daemon.WaitRequest{Timeout: timeout.String()}
	if *peers != "" {
		req.Peers = strings.Split(*peers, ",")
	}
	var resp daemon.WaitResponse
	if err := call(ctx, *api, http.MethodPost, "/v1/wait", req, &resp); err != nil {
		return err
	}
	if !resp.Applied {
		return fmt.Errorf("not every peer applied this node's changes within %s: 'pgmesh status' shows which peer lags", *timeout)
	}
	fmt.Printf("every peer has applied this node's changes (%s)\n", time.Duration(resp.WaitedMS)*time.Millisecond)
	return nil
}
