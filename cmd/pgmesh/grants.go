package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"strings"

	"github.com/pgmesh/pgmesh/privilege"
)

// cmdGrants prints the SQL that gives a role that is not a superuser what
// pgmesh needs (docs/managed-postgres.md). It talks to nothing: an
// administrator reads it and runs it on every node.
func cmdGrants(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh grants", flag.ContinueOnError)
	role := fs.String("role", "", "the role pgmesh connects as (required)")
	var owners []string
	fs.Func("owner", "a role that owns replicated tables and the database; repeat or separate with commas", func(v string) error {
		for o := range strings.SplitSeq(v, ",") {
			owners = append(owners, strings.TrimSpace(o))
		}
		return nil
	})
	create := fs.Bool("create-role", false, "create the role (LOGIN REPLICATION) instead of altering it")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return errors.New("grants takes only flags: pgmesh grants --role pgmesh --owner app_owner")
	}
	script, err := privilege.Script(*role, owners, *create)
	if err != nil {
		return err
	}
	fmt.Print(script)
	return nil
}
