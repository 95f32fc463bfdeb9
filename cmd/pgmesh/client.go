package main

import (
	"flag"
	"os"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/daemon"
)

// daemonFlags are a CLI command's --api and --tls-ca-file.
type daemonFlags struct {
	addr, caFile *string
}

// apiFlag adds --api (and --tls-ca-file) to a CLI command's flags.
func apiFlag(fs *flag.FlagSet) *daemonFlags {
	def := os.Getenv("PGMESH_API")
	if def == "" {
		def = daemon.DefaultListenAPI
	}
	return &daemonFlags{
		addr: fs.String("api", def, "address of the local pgmesh daemon's API (env PGMESH_API)"),
		caFile: fs.String("tls-ca-file", os.Getenv("PGMESH_TLS_CA_FILE"),
			"the group's CA certificate, for a daemon whose API serves HTTPS (env PGMESH_TLS_CA_FILE)"),
	}
}

// client returns a client of the local daemon. From another host the daemon
// wants the group's token, which the command takes from PGMESH_TOKEN.
func (f *daemonFlags) client() (*api.Client, error) {
	t := api.NewTransport(nil)
	if *f.caFile != "" {
		var err error
		if t, err = api.CATransport(*f.caFile); err != nil {
			return nil, err
		}
	}
	return t.Client(*f.addr, os.Getenv("PGMESH_TOKEN")), nil
}

// withClient runs fn with a client of the local daemon.
func withClient[T any](f *daemonFlags, fn func(*api.Client) (T, error)) (T, error) {
	c, err := f.client()
	if err != nil {
		var zero T
		return zero, err
	}
	return fn(c)
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
