//go:build integration

package systemtest

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// A peer's change applied on a is confirmed to the peer (which then frees
// its WAL) only once a's standby has it: were a's primary to fail over to
// that standby, the peer could still send what the standby lacks. a's
// daemon finds its primary through a DSN that names the standby first,
// and refuses to run on the standby alone.
func TestConfirmationsWaitForTheStandby(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, kvSchema, "a", "b")
	a, b := nodes[0], nodes[1]
	standby, err := a.PG.Standby(ctx, "a_standby", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Remove()

	out := runDaemon(t, ctx, "--node-name", "a2", "--dsn", standby.DSN())
	if !strings.Contains(out, "local Postgres is a standby (in recovery)") || !strings.Contains(out, "target_session_attrs=read-write") {
		t.Fatalf("a daemon on a standby: unclear refusal:\n%s", out)
	}

	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	a.DSN = fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write",
		standby.Port, a.PG.Port)
	a.ExtraArgs = []string{"--standby-slots", "a_standby"}
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	// b reaches a's Postgres the same way, to follow it to the standby.
	if err := b.Stop(); err != nil {
		t.Fatal(err)
	}
	b.ExtraArgs = []string{"--peer-dsns", "a=" + a.DSN}
	if err := b.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}

	// confirmed is how far b's slot for a is confirmed, and walLSN b's
	// current WAL position.
	confirmed := func() (pglogrepl.LSN, pglogrepl.LSN) {
		t.Helper()
		var c, w pglogrepl.LSN
		conn, err := b.PG.Connect(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(context.Background())
		if err := conn.QueryRow(ctx, `SELECT coalesce(confirmed_flush_lsn, '0/0'), pg_current_wal_lsn()
			FROM pg_replication_slots WHERE slot_name = 'pgmesh_a'`).Scan(&c, &w); err != nil {
			t.Fatal(err)
		}
		return c, w
	}
	confirmedPast := func(lsn pglogrepl.LSN) {
		t.Helper()
		eventually(t, 30*time.Second, "b's slot for a confirmed past "+lsn.String(), func() error {
			if c, _ := confirmed(); c < lsn {
				return fmt.Errorf("confirmed up to %s", c)
			}
			return nil
		})
	}

	// a watches the standby its dsn names. On 17+ it is not ready for a
	// failover: it lacks the settings that keep copies of the peers' slots.
	// Below 17 no standby keeps them, and a failover is made good by
	// repair: it is ready, with that note.
	server := fmt.Sprintf("127.0.0.1:%d", standby.Port)
	if count(t, ctx, b, `SELECT current_setting('server_version_num')::int`) < 170000 {
		eventually(t, 30*time.Second, "a reports its standby ready with a note, in status and /metrics", func() error {
			rep, err := a.Status(ctx)
			if err != nil {
				return err
			}
			if len(rep.Standbys) != 1 || rep.Standbys[0].Server != server || !rep.Standbys[0].Ready || !strings.Contains(rep.Standbys[0].Note, "repairs every replicated table") {
				return fmt.Errorf("standbys %+v", rep.Standbys)
			}
			return standbyReadyMetric(ctx, a, server, 1)
		})
	} else {
		standbyUnready(t, ctx, a, server)
	}

	mustExec(t, ctx, b, `INSERT INTO kv SELECT g, 'first', NULL FROM generate_series(1, 100) g`)
	_, first := confirmed()
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	confirmedPast(first)

	// The standby stops: a still applies b's changes, but no longer
	// confirms them, and says why.
	if err := standby.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, b, `INSERT INTO kv SELECT g, 'second', NULL FROM generate_series(101, 200) g`)
	_, second := confirmed()
	converged(t, ctx, 30*time.Second, "kv", nodes...)
	eventually(t, 30*time.Second, "a says it holds b's confirmations for its standby", func() error {
		rep, err := a.Status(ctx)
		if err != nil {
			return err
		}
		for _, p := range rep.Peers {
			if p.Peer == "b" && strings.Contains(p.HeldForStandbys, "standby_slots") {
				return nil
			}
		}
		return fmt.Errorf("peers %+v", rep.Peers)
	})
	// The end of b's second insert, as a applied it (its origin's progress).
	var end pglogrepl.LSN
	conn, err := a.PG.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	err = conn.QueryRow(ctx, `SELECT remote_lsn FROM pg_replication_origin_status WHERE external_id = 'pgmesh_b'`).Scan(&end)
	conn.Close(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	// b's WAL up to the insert's commit may be confirmed (a keepalive can
	// say so while it is written); the insert itself may not.
	if c, _ := confirmed(); c >= end {
		t.Fatalf("b's slot for a is confirmed up to %s, past the insert a applied (ending at %s) after its standby stopped", c, end)
	}

	// Back, the standby catches up and the confirmations follow.
	if err := standby.Start(ctx); err != nil {
		t.Fatal(err)
	}
	confirmedPast(second)
	eventually(t, 30*time.Second, "a no longer holds confirmations", func() error {
		rep, err := a.Status(ctx)
		if err != nil {
			return err
		}
		for _, p := range rep.Peers {
			if p.HeldForStandbys != "" {
				return fmt.Errorf("%s: %s", p.Peer, p.HeldForStandbys)
			}
		}
		return nil
	})

	// Promoted, the standby lacks the peers' slots (on 17+ it was never
	// ready). a makes b's slot again, b starts over from where it starts,
	// and a repairs what no stream carried: a's writes before the slot
	// existed, here.
	// a's daemon is stopped meanwhile, so that those writes come first.
	if err := a.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := a.PG.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	defer a.PG.Remove()
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if err := standby.Exec(ctx, `INSERT INTO kv SELECT g, 'promoted', NULL FROM generate_series(201, 210) g`); err != nil {
		t.Fatal(err)
	}
	a.PG = standby
	if err := a.Start(ctx); err != nil {
		t.Fatal(err)
	}
	var rep api.StatusReport
	eventually(t, 90*time.Second, "a made b's slot again and repaired", func() error {
		rep, err = a.Status(ctx)
		if err != nil {
			return err
		}
		if p := rep.Promotion; p == nil || p.Timeline != 2 || !slices.Equal(p.Peers, []string{"b"}) || p.RepairedRows == nil {
			return fmt.Errorf("promotion %+v, problems %q", rep.Promotion, rep.Problems)
		}
		return nil
	})
	if got := *rep.Promotion.RepairedRows; got < 10 {
		t.Fatalf("the repair wrote %d rows again, not the 10 a wrote before b's slot was made again", got)
	}
	mustExec(t, ctx, b, `INSERT INTO kv SELECT g, 'after', NULL FROM generate_series(211, 220) g`)
	if err := standby.Exec(ctx, `INSERT INTO kv SELECT g, 'after', NULL FROM generate_series(221, 230) g`); err != nil {
		t.Fatal(err)
	}
	converged(t, ctx, time.Minute, "kv", nodes...)
	if n := count(t, ctx, b, `SELECT count(*) FROM kv`); n != 230 {
		t.Fatalf("b has %d rows, want 230", n)
	}
}

// standbyUnready waits for a to report its standby at server not ready for
// a failover, in status, /health and /metrics.
func standbyUnready(t *testing.T, ctx context.Context, a *localmesh.Node, server string) {
	t.Helper()
	eventually(t, 30*time.Second, "a reports its standby not ready, in status, /health and /metrics", func() error {
		rep, err := a.Status(ctx)
		if err != nil {
			return err
		}
		if len(rep.Standbys) != 1 || rep.Standbys[0].Server != server || rep.Standbys[0].Ready || rep.Standbys[0].Reason == "" {
			return fmt.Errorf("standbys %+v", rep.Standbys)
		}
		_, health, err := getHealth(ctx, a)
		if err != nil {
			return err
		}
		if !slices.ContainsFunc(health.Warnings, func(w string) bool { return strings.Contains(w, "standby "+server+" is not ready for a failover") }) {
			return fmt.Errorf("health warnings %q", health.Warnings)
		}
		return standbyReadyMetric(ctx, a, server, 0)
	})
}

// standbyReadyMetric checks a's pgmesh_standby_ready for server.
func standbyReadyMetric(ctx context.Context, a *localmesh.Node, server string, want float64) error {
	m, err := scrape(ctx, a)
	if err != nil {
		return err
	}
	if v, ok := m[fmt.Sprintf(`pgmesh_standby_ready{server=%q}`, server)]; !ok || v != want {
		return fmt.Errorf("pgmesh_standby_ready %v %v, want %v", v, ok, want)
	}
	return nil
}
