package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"net/http"

	"github.com/pgmesh/pgmesh/daemon"
)

func cmdGroupCreate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh group create", flag.ContinueOnError)
	api := apiFlag(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("group create takes one argument, the group name: pgmesh group create NAME")
	}
	var resp daemon.CreateResponse
	if err := call(ctx, *api, http.MethodPost, "/v1/group/create", daemon.CreateRequest{Name: pos[0]}, &resp); err != nil {
		return err
	}
	fmt.Printf("created node group %q with node %q (id %d)\n", resp.Group, resp.Node.Name, resp.Node.ID)
	fmt.Println("join other nodes with: pgmesh group join --via", resp.Node.API, "--token <token below>")
	fmt.Println(resp.Token)
	return nil
}

func cmdGroupJoin(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh group join", flag.ContinueOnError)
	api := apiFlag(fs)
	via := fs.String("via", "", "API address (host:port) of any member of the group")
	token := fs.String("token", "", "the group's join token (printed by 'pgmesh group create')")
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("unexpected argument %q: pgmesh group join --via HOST:PORT --token T", pos[0])
	}
	if *via == "" || *token == "" {
		return errors.New("group join needs --via HOST:PORT (a member's API address) and --token T (printed by 'pgmesh group create')")
	}
	var resp daemon.JoinResponse
	if err := call(ctx, *api, http.MethodPost, "/v1/group/join", daemon.JoinRequest{Via: *via, Token: *token}, &resp); err != nil {
		return err
	}
	fmt.Printf("node %q joined node group %q as id %d and is %s\n", resp.Node.Name, resp.Group, resp.Node.ID, resp.Node.State)
	return nil
}
