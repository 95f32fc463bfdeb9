//go:build integration

package systemtest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/prometheus/common/expfmt"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/flyreplay"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

func getHealth(ctx context.Context, n *localmesh.Node) (int, api.HealthReport, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.API+"/health", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, api.HealthReport{}, err
	}
	defer resp.Body.Close()
	var rep api.HealthReport
	err = json.NewDecoder(resp.Body).Decode(&rep)
	return resp.StatusCode, rep, err
}

// /health answers 503 once a peer's stream has been cut off past
// health_max_lag and 200 again when it heals; /metrics exposes the
// documented series with sane values.
func TestHealthAndMetrics(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := meshWith(t, ctx, kvSchema, []string{"--health-max-lag", "2s"}, "a", "b")
	a, b := nodes[0], nodes[1]
	healthIs := func(code int, reason string) {
		t.Helper()
		eventually(t, 30*time.Second, fmt.Sprintf("/health answers %d", code), func() error {
			got, rep, err := getHealth(ctx, a)
			if err != nil {
				return err
			}
			if got != code || !strings.Contains(strings.Join(rep.Reasons, "; "), reason) {
				return fmt.Errorf("got %d %+v", got, rep)
			}
			return nil
		})
	}
	healthIs(200, "")

	// A conflict and load (after the daemons' restart, which resets the
	// counters), so the counters have something to count.
	mustExec(t, ctx, b, `INSERT INTO kv VALUES (1, 'b', NULL)`)
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	partitioned(t, ctx, nodes, func() {
		mustExec(t, ctx, a, `UPDATE kv SET v = 'a' WHERE k = 1`)
		mustExec(t, ctx, b, `UPDATE kv SET v = 'b2' WHERE k = 1`)
	})
	for i := 2; i < 202; i++ {
		mustExec(t, ctx, b, `INSERT INTO kv VALUES ($1, 'b', NULL)`, i)
	}
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	eventually(t, 30*time.Second, "metrics", func() error {
		m, err := scrape(ctx, a)
		if err != nil {
			return err
		}
		checks := map[string]func(float64) bool{
			`pgmesh_peer_connected{peer="b"}`:             func(v float64) bool { return v == 1 },
			`pgmesh_applied_transactions_total{peer="b"}`: func(v float64) bool { return v >= 200 },
			`pgmesh_applied_rows_total{peer="b"}`:         func(v float64) bool { return v >= 200 },
			`pgmesh_peer_lag_bytes{peer="b"}`:             func(v float64) bool { return v >= 0 },
			`pgmesh_peer_lag_seconds{peer="b"}`:           func(v float64) bool { return v >= 0 && v < 60 },
			`pgmesh_apply_errors_total{peer="b"}`:         func(v float64) bool { return v == 0 },
			// The conflicting update left the fast path.
			`pgmesh_apply_retried_transactions_total{peer="b"}`:                                       func(v float64) bool { return v >= 1 },
			`pgmesh_conflicts_total{peer="b",resolution="apply_remote",type="update_origin_differs"}`: func(v float64) bool { return v == 1 },
			`pgmesh_slot_retained_wal_bytes{peer="b"}`:                                                func(v float64) bool { return v >= 0 },
			`pgmesh_nodes{state="active"}`:                                                            func(v float64) bool { return v == 2 },
			`pgmesh_healthy`:                                                                          func(v float64) bool { return v == 1 },
		}
		for series, ok := range checks {
			v, found := m[series]
			if !found {
				return fmt.Errorf("no series %s", series)
			}
			if !ok(v) {
				return fmt.Errorf("%s = %v", series, v)
			}
		}
		mb, err := scrape(ctx, b)
		if err != nil {
			return err
		}
		if leaders := m["pgmesh_raft_leader"] + mb["pgmesh_raft_leader"]; leaders != 1 {
			return fmt.Errorf("%v nodes report themselves Raft leader", leaders)
		}
		return nil
	})

	// Cut b off: a's stream from b loses its connection.
	if err := b.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	healthIs(503, "stream from b has been disconnected")
	if err := b.PG.Start(ctx); err != nil {
		t.Fatal(err)
	}
	healthIs(200, "")
}

// scrape reads /metrics into "name{labels}" -> value.
func scrape(ctx context.Context, n *localmesh.Node) (map[string]float64, error) {
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+n.API+"/metrics", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var p expfmt.TextParser
	families, err := p.TextToMetricFamilies(strings.NewReader(string(body)))
	if err != nil {
		return nil, fmt.Errorf("parse metrics: %w", err)
	}
	out := map[string]float64{}
	for name, f := range families {
		for _, m := range f.GetMetric() {
			key := name
			if len(m.GetLabel()) > 0 {
				var ls []string
				for _, l := range m.GetLabel() {
					ls = append(ls, fmt.Sprintf("%s=%q", l.GetName(), l.GetValue()))
				}
				key += "{" + strings.Join(ls, ",") + "}"
			}
			switch {
			case m.GetGauge() != nil:
				out[key] = m.GetGauge().GetValue()
			case m.GetCounter() != nil:
				out[key] = m.GetCounter().GetValue()
			}
		}
	}
	return out, nil
}

// wait_for_peers returns once every peer has the write (visible there the
// moment it returns) and times out cleanly when a peer is cut off;
// wait_for_origin does the same from the reading side.
func TestReadYourWrites(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, kvSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	ca := connect(t, ctx, a)
	for i := 1; i <= 20; i++ {
		if _, err := ca.Exec(ctx, `INSERT INTO kv VALUES ($1, 'a', NULL)`, i); err != nil {
			t.Fatal(err)
		}
		var ok bool
		if err := ca.QueryRow(ctx, `SELECT pgmesh.wait_for_peers('10s')`).Scan(&ok); err != nil || !ok {
			t.Fatalf("wait_for_peers: %v %v", ok, err)
		}
		for _, n := range []*localmesh.Node{b, c} {
			if got := count(t, ctx, n, `SELECT count(*) FROM kv WHERE k = $1`, i); got != 1 {
				t.Fatalf("wait_for_peers returned but %s lacks row %d", n.Name, i)
			}
		}
	}
	// From the reading side: A hands its position to the reader on B.
	if _, err := ca.Exec(ctx, `INSERT INTO kv VALUES (100, 'a', NULL)`); err != nil {
		t.Fatal(err)
	}
	var lsn string
	if err := ca.QueryRow(ctx, `SELECT pgmesh.last_committed_lsn()::text`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	cb := connect(t, ctx, b)
	var ok bool
	if err := cb.QueryRow(ctx, `SELECT pgmesh.wait_for_origin('a', $1::pg_lsn, '10s')`, lsn).Scan(&ok); err != nil || !ok {
		t.Fatalf("wait_for_origin: %v %v", ok, err)
	}
	if got := count(t, ctx, b, `SELECT count(*) FROM kv WHERE k = 100`); got != 1 {
		t.Fatal("wait_for_origin returned but b lacks the row")
	}
	if out, stderr, err := a.CLI(ctx, "wait", "--timeout", "10s"); err != nil || !strings.Contains(out, "every peer has applied") {
		t.Fatalf("pgmesh wait: %v %s %s", err, out, stderr)
	}

	// c is cut off: waiting for every peer times out, for b alone it does not.
	if err := c.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := ca.Exec(ctx, `INSERT INTO kv VALUES (200, 'a', NULL)`); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := ca.QueryRow(ctx, `SELECT pgmesh.wait_for_peers('1s')`).Scan(&ok); err != nil || ok {
		t.Fatalf("wait_for_peers with c cut off: %v %v", ok, err)
	}
	if took := time.Since(start); took < time.Second || took > 5*time.Second {
		t.Fatalf("wait_for_peers('1s') took %s", took)
	}
	if err := ca.QueryRow(ctx, `SELECT pgmesh.wait_for_peers('10s', ARRAY['b'])`).Scan(&ok); err != nil || !ok {
		t.Fatalf("wait_for_peers for b: %v %v", ok, err)
	}
	_, stderr, err := a.CLI(ctx, "wait", "--timeout", "1s")
	if err == nil || !strings.Contains(stderr, "not every peer applied") {
		t.Fatalf("pgmesh wait with c cut off: %v %s", err, stderr)
	}
	if err := ca.QueryRow(ctx, `SELECT pgmesh.last_committed_lsn()::text`).Scan(&lsn); err != nil {
		t.Fatal(err)
	}
	cc := connect(t, ctx, c)
	if err := cc.QueryRow(ctx, `SELECT pgmesh.wait_for_origin('a', $1::pg_lsn, '1s')`, lsn).Scan(&ok); err != nil || ok {
		t.Fatalf("wait_for_origin on cut-off c: %v %v", ok, err)
	}
}

// Rows belong to the node named in the home column: another node's write
// fails with SQLSTATE PM001 naming the home node, and the middleware turns
// that into 409 + fly-replay to the home region.
func TestHomeRegionWrites(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, `CREATE TABLE orders (id int PRIMARY KEY, home text NOT NULL, status text NOT NULL)`, "tokyo", "sydney")
	tokyo, sydney := nodes[0], nodes[1]
	if out, stderr, err := tokyo.CLI(ctx, "home-column", "orders", "home"); err != nil || !strings.Contains(out, "sydney, tokyo") {
		t.Fatalf("home-column: %v %s %s", err, out, stderr)
	}
	mustExec(t, ctx, sydney, `INSERT INTO orders VALUES (1, 'sydney', 'new')`)
	mustExec(t, ctx, tokyo, `INSERT INTO orders VALUES (2, 'tokyo', 'new')`)
	converged(t, ctx, 30*time.Second, "orders", nodes...) // applied changes are not checked

	err := tokyo.PG.Exec(ctx, `UPDATE orders SET status = 'shipped' WHERE id = 1`)
	var pe *pgconn.PgError
	if !errors.As(err, &pe) || pe.Code != "PM001" || pe.Detail != "sydney" || !strings.Contains(pe.Message, `belongs to node "sydney"`) {
		t.Fatalf("write to sydney's row on tokyo: %v", err)
	}
	if err := sydney.PG.Exec(ctx, `INSERT INTO orders VALUES (3, 'tokyo', 'new')`); err == nil {
		t.Fatal("sydney inserted a row homed in tokyo")
	}

	// The middleware, in an app instance in Tokyo.
	db := connect(t, ctx, tokyo)
	app := flyreplay.Config{Region: "nrt", Regions: map[string]string{"sydney": "syd", "tokyo": "nrt"}}.Wrap(
		func(w http.ResponseWriter, r *http.Request) error {
			_, err := db.Exec(r.Context(), r.URL.Query().Get("sql"))
			return err
		})
	srv := httptest.NewServer(app)
	defer srv.Close()
	post := func(sql string) *http.Response {
		resp, err := http.Post(srv.URL+"/?sql="+strings.ReplaceAll(sql, " ", "+"), "text/plain", nil)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp
	}
	if resp := post("UPDATE orders SET status = 'shipped' WHERE id = 1"); resp.StatusCode != 409 || resp.Header.Get("fly-replay") != "region=syd" {
		t.Fatalf("sydney's order from tokyo: %d %q", resp.StatusCode, resp.Header.Get("fly-replay"))
	}
	if resp := post("UPDATE orders SET status = 'shipped' WHERE id = 2"); resp.StatusCode != 200 {
		t.Fatalf("tokyo's order from tokyo: %d", resp.StatusCode)
	}
	if resp := post("INSERT INTO orders VALUES (2, 'tokyo', 'dup')"); resp.StatusCode != 500 || resp.Header.Get("fly-replay") != "" {
		t.Fatalf("a unique violation should pass on: %d %q", resp.StatusCode, resp.Header.Get("fly-replay"))
	}
}
