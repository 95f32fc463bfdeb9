package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

func cmdGroupCreate(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh group create", flag.ContinueOnError)
	target := apiFlag(fs)
	pos, err := parseInterleaved(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 1 {
		return errors.New("group create takes one argument, the group name: pgmesh group create NAME")
	}
	resp, err := withClient(target, func(c *api.Client) (api.CreateResponse, error) {
		return c.CreateGroup(ctx, api.CreateRequest{Name: pos[0]})
	})
	if err != nil {
		return err
	}
	fmt.Printf("created node group %q with node %q (id %d)\n", resp.Group, resp.Node.Name, resp.Node.ID)
	fmt.Println("join other nodes with: pgmesh group join --via", resp.Node.API, "--token <token below>")
	fmt.Println(resp.Token)
	return nil
}

func cmdGroupJoin(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("pgmesh group join", flag.ContinueOnError)
	target := apiFlag(fs)
	via := fs.String("via", "", "API address (host:port) of any member of the group")
	token := fs.String("token", "", "the group's join token (printed by 'pgmesh group create')")
	noWait := fs.Bool("no-wait", false, "return once the join has started; follow it with 'pgmesh status'")
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
	resp, err := withClient(target, func(c *api.Client) (api.JoinResponse, error) {
		return c.JoinGroup(ctx, api.JoinRequest{Via: *via, Token: *token})
	})
	if err != nil {
		return err
	}
	fmt.Printf("node %q registered in node group %q as id %d; copying schema and data from %s\n", resp.Node.Name, resp.Group, resp.Node.ID, *via)
	if *noWait {
		fmt.Println("the join goes on in the background: follow it with 'pgmesh status' or SELECT * FROM pgmesh.join_progress")
		return nil
	}
	c, err := target.client()
	if err != nil {
		return err
	}
	return followJoin(ctx, c, os.Stdout)
}

// followJoin prints the join's progress until the node is active or the
// join fails.
func followJoin(ctx context.Context, c *api.Client, out io.Writer) error {
	tty := isTerminal(out)
	last := ""
	for {
		rep, err := c.Status(ctx)
		if err != nil {
			return err
		}
		j := rep.Join
		if j != nil {
			line := progressLine(j)
			switch {
			case tty:
				fmt.Fprintf(out, "\r\033[K%s", line)
			case line != last:
				fmt.Fprintln(out, line)
			}
			last = line
			if j.Error != "" {
				if tty {
					fmt.Fprintln(out)
				}
				return fmt.Errorf("join failed: %s (run the same command again to retry)", j.Error)
			}
		}
		if rep.State == "active" && (j == nil || j.Done) {
			if tty {
				fmt.Fprintln(out)
			}
			fmt.Fprintf(out, "node %q is active in node group %q\n", rep.Node, rep.Group)
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(500 * time.Millisecond):
		}
	}
}

func progressLine(j *api.JoinStatus) string {
	if j.Phase != "copying data" || j.BytesTotal == 0 {
		return j.Phase
	}
	frac := min(float64(j.Bytes)/float64(j.BytesTotal), 1)
	const width = 30
	bar := strings.Repeat("#", int(frac*width)) + strings.Repeat(".", width-int(frac*width))
	eta := "?"
	if elapsed := time.Since(j.StartedAt); frac > 0.01 {
		eta = (time.Duration(float64(elapsed)/frac) - elapsed).Round(time.Second).String()
	}
	return fmt.Sprintf("copying data [%s] %3.0f%%  tables %d/%d  rows %d  %.1f/%.1f MB  eta %s",
		bar, frac*100, j.TablesDone, j.TablesTotal, j.Rows, float64(j.Bytes)/1e6, float64(j.BytesTotal)/1e6, eta)
}

func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0
}
