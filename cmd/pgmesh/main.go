// Command pgmesh is the pgmesh daemon (pgmesh run) and its CLI.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

const usage = `pgmesh: multi-master replication for PostgreSQL

Usage:
  pgmesh run --config pgmesh.yaml            run the daemon beside the local Postgres
  pgmesh group create NAME                   start a node group with this node alone
  pgmesh group join --via HOST:PORT --token T
                                             join the group of the daemon at HOST:PORT
  pgmesh node part NAME                      remove a node from the group
  pgmesh status [--json]                     nodes, states and per-peer streams
  pgmesh conflicts [--json] [--limit N] [--table T] [--type TYPE]
                                             recent conflicts from pgmesh.conflict_history
  pgmesh delta-column [--unset] TABLE COLUMN apply remote updates of a numeric column as increments,
                                             on every node
  pgmesh home-column [--unset] TABLE COLUMN  rows belong to the node named in COLUMN; only it may
                                             write them (on every node)
  pgmesh wait [--timeout 30s] [--peers a,b]  block until peers have applied what this node committed
  pgmesh sequences audit [--apply]           columns and sequences that must become bigint
  pgmesh sequences convert [--kind timeshard|galloc] [--chunk-size N] [SEQUENCE...]
                                             make sequences unique across the group (every node)
  pgmesh sequences show                      global sequences, kinds and galloc chunks
  pgmesh ddl [--timeout 30s] [--proceed] "SQL"
                                             run DDL on every node, one at a time in the group
  pgmesh repset create NAME [--nodes a,b]     a replication set received by these nodes (default: all)
  pgmesh repset add NAME TABLE... [--where 'SQL'] [--columns c1,c2] [--sync]
                                             put tables (rows, columns) into a set
  pgmesh repset remove NAME TABLE...         take tables out; a table in no set stays local
  pgmesh repset drop NAME                    remove a set
  pgmesh repset list [--json]                sets, their members and tables, local tables
  pgmesh compare [TABLE...] [--json] [--chunk-rows N]
                                             find rows that differ between nodes (exit 1 if any)
  pgmesh repair TABLE... [--dry-run]         write each differing row's winner again
  pgmesh on-apply-error TABLE park|stop|default
                                             what a change of TABLE that cannot apply does (every node)
  pgmesh parked [--json]                     changes parked here, per table and peer, with their error
  pgmesh replay TABLE [--peer P] [--dry-run] apply a table's parked changes, once the cause is fixed
  pgmesh discard TABLE [--peer P] --yes      drop them unapplied, each logged in conflict_history
  pgmesh grants --role NAME [--owner ROLE] [--create-role]
                                             the SQL that lets a role that is not a superuser run pgmesh

CLI commands (but grants) talk to the local daemon at --api (env PGMESH_API, default 127.0.0.1:7400).
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := dispatch(ctx, os.Args[1:])
	stop()
	if err != nil {
		if !errors.Is(err, errUsage) && !errors.Is(err, flag.ErrHelp) {
			// One line per problem (errors.Join separates them by newlines).
			for _, line := range strings.Split(err.Error(), "\n") {
				fmt.Fprintln(os.Stderr, "pgmesh:", line)
			}
		}
		os.Exit(1)
	}
}

var errUsage = errors.New("usage")

func dispatch(ctx context.Context, args []string) error {
	if len(args) == 0 {
		fmt.Fprint(os.Stderr, usage)
		return errUsage
	}
	switch args[0] {
	case "run":
		return cmdRun(ctx, args[1:])
	case "group":
		if len(args) > 1 && args[1] == "create" {
			return cmdGroupCreate(ctx, args[2:])
		}
		if len(args) > 1 && args[1] == "join" {
			return cmdGroupJoin(ctx, args[2:])
		}
	case "node":
		if len(args) > 1 && args[1] == "part" {
			return cmdNodePart(ctx, args[2:])
		}
	case "status":
		return cmdStatus(ctx, args[1:])
	case "conflicts":
		return cmdConflicts(ctx, args[1:])
	case "delta-column":
		return cmdDeltaColumn(ctx, args[1:])
	case "home-column":
		return cmdHomeColumn(ctx, args[1:])
	case "wait":
		return cmdWait(ctx, args[1:])
	case "sequences":
		return cmdSequences(ctx, args[1:])
	case "ddl":
		return cmdDDL(ctx, args[1:])
	case "repset":
		return cmdRepset(ctx, args[1:])
	case "compare":
		return cmdCompare(ctx, args[1:])
	case "repair":
		return cmdRepair(ctx, args[1:])
	case "grants":
		return cmdGrants(ctx, args[1:])
	case "parked":
		return cmdParked(ctx, args[1:])
	case "replay":
		return cmdReplay(ctx, args[1:])
	case "discard":
		return cmdDiscard(ctx, args[1:])
	case "on-apply-error":
		return cmdOnApplyError(ctx, args[1:])
	case "help", "-h", "--help":
		fmt.Print(usage)
		return nil
	}
	return fmt.Errorf("unknown command %q: run 'pgmesh help' for the list", joinArgs(args))
}

func joinArgs(args []string) string {
	if len(args) > 2 {
		args = args[:2]
	}
	s := ""
	for i, a := range args {
		if i > 0 {
			s += " "
		}
		s += a
	}
	return s
}
