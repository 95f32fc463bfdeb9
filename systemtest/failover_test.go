//go:build integration

package systemtest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
)

// a's primary fails (immediate stop) while all three nodes write, and its
// standby is promoted. With failover slots (PostgreSQL 17+), the standby
// holds b's and c's slots, so their streams from a go on from the promoted
// server. On 15 and 16 it holds none: a makes the slots again, b and c
// start over from them, and a repairs what no stream carried. Either way
// a's confirmations waited for the standby, so b and c still have every
// change a had not got to it. Afterwards all nodes hold the same rows,
// among them every row b and c acknowledged and every row a acknowledged
// after the promotion. A
// switchover (the primary stopped cleanly, which sends its standby
// everything first) loses nothing at all, and a's daemon killed with its
// primary and started after the promotion changes nothing.
func TestFailoverToStandby(t *testing.T) {
	t.Parallel()
	t.Run("failover", func(t *testing.T) { failover(t, false, false) })
	t.Run("switchover", func(t *testing.T) { failover(t, true, false) })
	t.Run("daemon killed meanwhile", func(t *testing.T) { failover(t, false, true) })
}

// failover runs the scenario; planned stops the primary cleanly, and
// killDaemon kills a's daemon (kill -9) with its primary and starts it
// again once the standby is promoted.
func failover(t *testing.T, planned, killDaemon bool) {
	ctx := ctxFor(t)
	nodes := mesh(t, ctx, joinSchema, "a", "b", "c")
	a, b, c := nodes[0], nodes[1], nodes[2]
	failoverSlots := count(t, ctx, a, `SELECT current_setting('server_version_num')::int`) >= 170000
	oldPrimary := a.PG
	var settings map[string]string
	if failoverSlots {
		settings = map[string]string{"sync_replication_slots": "on", "hot_standby_feedback": "on"}
	}
	standby, err := oldPrimary.Standby(ctx, "a_standby", settings)
	if err != nil {
		t.Fatal(err)
	}
	defer oldPrimary.Remove() // a.PG is the promoted standby by the end
	either := fmt.Sprintf("host=127.0.0.1,127.0.0.1 port=%d,%d user=postgres dbname=postgres sslmode=disable target_session_attrs=read-write",
		oldPrimary.Port, standby.Port)
	for _, n := range nodes {
		if err := n.Stop(); err != nil {
			t.Fatal(err)
		}
	}
	a.DSN, a.ExtraArgs = either, []string{"--standby-slots", "a_standby"}
	b.ExtraArgs = []string{"--peer-dsns", "a=" + either}
	c.ExtraArgs = b.ExtraArgs
	for _, n := range nodes {
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, nodes...); err != nil {
		t.Fatal(err)
	}
	// Until the primary sends b only what the standby has, a says so.
	standbyProblem := func(want bool) {
		t.Helper()
		eventually(t, 30*time.Second, fmt.Sprintf("a reports synchronized_standby_slots missing: %t", want), func() error {
			rep, err := a.Status(ctx)
			if err != nil {
				return err
			}
			got := slices.ContainsFunc(rep.Problems, func(p string) bool { return strings.Contains(p, "not in synchronized_standby_slots") })
			if got != want {
				return fmt.Errorf("problems %q", rep.Problems)
			}
			return nil
		})
	}
	if failoverSlots {
		standbyProblem(true)
		for _, sql := range []string{`ALTER SYSTEM SET synchronized_standby_slots = 'a_standby'`, `SELECT pg_reload_conf()`} {
			if err := oldPrimary.Exec(ctx, sql); err != nil {
				t.Fatal(err)
			}
		}
		standbyProblem(false)
	}

	// Both nodes write; a's writer follows the primary as a's daemon does.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bWrote, cWrote int64
	var bErr, cErr error
	wg.Go(func() { bWrote, bErr = writeLoad(ctx, b, 2_000_000, 5*time.Millisecond, stop) })
	wg.Go(func() { cWrote, cErr = writeLoad(ctx, c, 3_000_000, 5*time.Millisecond, stop) })
	var aMu sync.Mutex
	var aAcked []int64 // ids a's primary acknowledged, in order
	promoted := -1     // index in aAcked of the first row acknowledged by the promoted standby
	wg.Go(func() {
		var conn *pgx.Conn
		defer func() {
			if conn != nil {
				conn.Close(context.Background())
			}
		}()
		for id := int64(1_000_000); ; {
			select {
			case <-stop:
				return
			default:
			}
			if conn == nil {
				var err error
				if conn, err = pgx.Connect(ctx, either); err != nil {
					conn = nil
					time.Sleep(50 * time.Millisecond)
					continue
				}
			}
			_, err := conn.Exec(ctx, `INSERT INTO ledger (id, node, n) VALUES ($1, 'a', 0)`, id)
			var pe *pgconn.PgError
			switch {
			case err == nil:
				aMu.Lock()
				if promoted < 0 && conn.PgConn().Conn().RemoteAddr().String() == fmt.Sprintf("127.0.0.1:%d", standby.Port) {
					promoted = len(aAcked)
				}
				aAcked = append(aAcked, id)
				aMu.Unlock()
				id++
			case errors.As(err, &pe) && pe.Code == "23505":
				id++ // committed before the connection broke, and kept
			default:
				conn.Close(context.Background())
				conn = nil
			}
			time.Sleep(5 * time.Millisecond)
		}
	})

	// a says when a failover is safe: on 17+, the standby holds a
	// persistent copy of b's slot, in step.
	server := fmt.Sprintf("127.0.0.1:%d", standby.Port)
	eventually(t, 60*time.Second, "a reports its standby ready for a failover", func() error {
		rep, err := a.Status(ctx)
		if err != nil {
			return err
		}
		if len(rep.Standbys) != 1 || rep.Standbys[0].Server != server || !rep.Standbys[0].Ready {
			return fmt.Errorf("standbys %+v", rep.Standbys)
		}
		return nil
	})
	eventually(t, 30*time.Second, "b has a's writes", func() error {
		if n := count(t, ctx, b, `SELECT count(*) FROM ledger WHERE node = 'a'`); n < 100 {
			return fmt.Errorf("%d rows", n)
		}
		return nil
	})

	// Below 17 the primary sends its peers what its standby lacks (there is
	// no synchronized_standby_slots), so that copies of the peers' slots on
	// the standby could not have sufficed. Made certain here: the standby
	// is stopped while a writes on, and the primary fails before it is back.
	lagStandby := !failoverSlots && !planned
	if lagStandby {
		if err := standby.Stop(ctx); err != nil {
			t.Fatal(err)
		}
		before := count(t, ctx, b, `SELECT count(*) FROM ledger WHERE node = 'a'`)
		eventually(t, 30*time.Second, "b has a's writes its standby lacks", func() error {
			if n := count(t, ctx, b, `SELECT count(*) FROM ledger WHERE node = 'a'`); n < before+20 {
				return fmt.Errorf("%d rows, %d before the standby stopped", n, before)
			}
			return nil
		})
	}
	stopPrimary := oldPrimary.Crash
	if planned {
		stopPrimary = oldPrimary.Stop
	}
	if killDaemon {
		if err := a.Kill(); err != nil {
			t.Fatal(err)
		}
	}
	if err := stopPrimary(ctx); err != nil {
		t.Fatal(err)
	}
	if lagStandby {
		if err := standby.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if err := standby.Promote(ctx); err != nil {
		t.Fatal(err)
	}
	if killDaemon {
		if err := a.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	a.PG = standby
	// a's rows b has and the promoted standby lacks: only the repair brings
	// them back to a. Read before a can repair (b's stream from a starts
	// again only once a has made its slot again).
	var ahead []int64
	if lagStandby {
		const ids = `SELECT id FROM ledger WHERE node = 'a'`
		onB := column[int64](t, ctx, b, ids)
		onStandby := map[int64]bool{}
		for _, id := range column[int64](t, ctx, a, ids) {
			onStandby[id] = true
		}
		for _, id := range onB {
			if !onStandby[id] {
				ahead = append(ahead, id)
			}
		}
		if len(ahead) == 0 {
			t.Fatal("b has none of a's rows that the promoted standby lacks: the scenario did not happen")
		}
	}
	eventually(t, 60*time.Second, "a writes on the promoted standby", func() error {
		aMu.Lock()
		defer aMu.Unlock()
		if promoted < 0 || len(aAcked)-promoted < 100 {
			return fmt.Errorf("%d rows acknowledged, from %d on by the promoted standby", len(aAcked), promoted)
		}
		return nil
	})
	close(stop)
	wg.Wait()
	if err := errors.Join(bErr, cErr); err != nil {
		t.Fatalf("b's and c's writes: %v", err)
	}

	if !failoverSlots {
		var p *api.PromotionStatus
		eventually(t, 120*time.Second, "a made b's and c's slots again and repaired", func() error {
			rep, err := a.Status(ctx)
			if err != nil {
				return err
			}
			if p = rep.Promotion; p == nil || !slices.Equal(p.Peers, []string{"b", "c"}) || p.RepairedAt == nil || p.RepairedRows == nil {
				return fmt.Errorf("promotion %+v, problems %q", p, rep.Problems)
			}
			return nil
		})
		t.Logf("a made b's and c's slots again on timeline %d and repaired %d rows", p.Timeline, *p.RepairedRows)
	}
	converged(t, ctx, 120*time.Second, "ledger", nodes...)
	converged(t, ctx, 30*time.Second, "counters", nodes...)
	for peer, wrote := range map[string]int64{"b": bWrote, "c": cWrote} {
		if got := count(t, ctx, a, `SELECT count(*) FROM ledger WHERE node = $1`, peer); got != wrote {
			t.Fatalf("a has %d of the %d rows %s acknowledged", got, wrote, peer)
		}
	}
	after := aAcked[promoted:]
	if got := count(t, ctx, b, `SELECT count(*) FROM ledger WHERE id = ANY($1)`, after); got != int64(len(after)) {
		t.Fatalf("b has %d of the %d rows a acknowledged after the promotion", got, len(after))
	}
	if got := count(t, ctx, a, `SELECT count(*) FROM ledger WHERE id = ANY($1)`, ahead); got != int64(len(ahead)) {
		t.Fatalf("a has %d of the %d rows of its old primary that b had and its standby lacked", got, len(ahead))
	}
	if lagStandby {
		t.Logf("the repair brought back to a the %d rows of its old primary that b had and its standby lacked", len(ahead))
	}
	survived := count(t, ctx, b, `SELECT count(*) FROM ledger WHERE id = ANY($1)`, aAcked)
	t.Logf("a acknowledged %d rows (%d after the promotion); %d of them survive; b acknowledged %d, c %d",
		len(aAcked), len(after), survived, bWrote, cWrote)
	if planned && survived != int64(len(aAcked)) {
		t.Fatalf("a switchover lost %d of the %d rows a acknowledged", int64(len(aAcked))-survived, len(aAcked))
	}
}
