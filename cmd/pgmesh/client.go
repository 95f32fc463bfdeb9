package main

import (
	"context"
	"flag"
	"os"

	"github.com/pgmesh/pgmesh/daemon"
)

// caFile is --tls-ca-file of the command being run.
var caFile *string

// apiFlag adds --api (and --tls-ca-file) to a CLI command's flags.
func apiFlag(fs *flag.FlagSet) *string {
	def := os.Getenv("PGMESH_API")
	if def == "" {
		def = daemon.DefaultListenAPI
	}
	caFile = fs.String("tls-ca-file", os.Getenv("PGMESH_TLS_CA_FILE"),
		"the group's CA certificate, for a daemon whose API serves HTTPS (env PGMESH_TLS_CA_FILE)")
	return fs.String("api", def, "address of the local pgmesh daemon's API (env PGMESH_API)")
}

// call talks to the local daemon.
func call(ctx context.Context, api, method, path string, in, out any) error {
	if caFile != nil && *caFile != "" {
		if err := daemon.UseCA(*caFile); err != nil {
			return err
		}
	}
	// From another host the daemon wants the group's token.
	return daemon.Call(ctx, api, method, path, os.Getenv("PGMESH_TOKEN"), in, out)
}

// parseInterleaved parses flags that may come before or after positional
// arguments ("group create NAME --api X" and "group create --api X NAME").
func parseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		if fs.NArg() == 0 {
			return pos, nil
		}
		pos = append(pos, fs.Arg(0))
		args = fs.Args()[1:]
	}
}
