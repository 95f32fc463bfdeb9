//go:build integration

package systemtest

import (
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/api"
)

// While a joining node holds a member's streams for its snapshot, and a
// stream has to stop meanwhile (a peer parted), the member's API keeps
// answering: /health, /v1/status and /metrics never wait for the streams.
func TestHealthAnswersWhileStreamsAreHeld(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE kv (k int PRIMARY KEY, v text)`, "a", "b", "c")
	a, b := nodes[0], nodes[1]
	token := joinToken(t, ctx, a)
	member := a.Client(token)
	pause, err := member.Pause(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _, _ = member.Resume(ctx, api.ResumeRequest(pause)) }()
	// c leaves while a's streams are held: a must stop its stream from c.
	if out, stderr, err := b.CLI(ctx, "node", "part", "c", "--force"); err != nil {
		t.Fatalf("part: %v %s %s", err, out, stderr)
	}
	eventually(t, 10*time.Second, "a sees c parted", func() error {
		rep, err := a.Status(ctx)
		if err != nil {
			return err
		}
		for _, n := range rep.Nodes {
			if n.Name == "c" && n.State != "parted" {
				return fmt.Errorf("c is %s", n.State)
			}
		}
		return nil
	})
	time.Sleep(500 * time.Millisecond) // a's reconcile is now stopping the stream from c
	for _, path := range []string{"/health", "/v1/status", "/metrics"} {
		start := time.Now()
		resp, err := http.Get("http://" + a.API + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if took := time.Since(start); took > time.Second {
			t.Errorf("%s on a took %s while its streams were held", path, took.Round(time.Millisecond))
		}
	}
}
