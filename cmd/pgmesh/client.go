package main

import (
	"context"
	"flag"
	"os"

	"github.com/pgmesh/pgmesh/daemon"
)

// apiFlag adds --api to a CLI command's flags.
func apiFlag(fs *flag.FlagSet) *string {
	def := os.Getenv("PGMESH_API")
	if def == "" {
		def = daemon.DefaultListenAPI
	}
	return fs.String("api", def, "address of the local pgmesh daemon's API (env PGMESH_API)")
}

// call talks to the local daemon.
func call(ctx context.Context, api, method, path string, in, out any) error {
	return daemon.Call(ctx, api, method, path, "", in, out)
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
