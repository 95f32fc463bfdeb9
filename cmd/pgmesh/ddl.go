package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

func cmdDDL(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh ddl", flag.ContinueOnError)
	target := apiFlag(fs)
	timeout := fs.Duration("timeout", 30*time.Second, "how long to wait for the DDL lock and for peers to catch up")
	proceed := fs.Bool("proceed", false, "run even if a peer has not caught up; it applies the DDL in order when it returns")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New(`ddl takes one argument, the statement: pgmesh ddl "ALTER TABLE orders ADD COLUMN note text"`)
	}
	req := api.DDLRequest{SQL: pos[0], Timeout: timeout.String(), Proceed: *proceed}
	if _, err := withClient(target, func(c *api.Client) (struct{}, error) { return struct{}{}, c.DDL(ctx, req) }); err != nil {
		return err
	}
	fmt.Println("ran here and sent to every node, in order with the data around it")
	return nil
}
