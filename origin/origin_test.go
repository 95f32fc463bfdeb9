//go:build integration

package origin_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/origin"
)

// heldOrigin starts a Postgres where one session holds the origin of peer
// "paris" (bound to it, as a running stream's apply connection is) and
// lets go of it after half a second, the first moved to progress if given;
// it returns another session.
func heldOrigin(t *testing.T, ctx context.Context, progress string) *pgx.Conn {
	t.Helper()
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Remove)
	holder, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	other, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { other.Close(context.Background()) })
	if err := origin.Ensure(ctx, holder, "paris"); err != nil {
		t.Fatal(err)
	}
	if progress != "" {
		if _, err := holder.Exec(ctx, `SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)`, origin.Name("paris"), progress); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := holder.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, origin.Name("paris")); err != nil {
		t.Fatal(err)
	}
	released := time.AfterFunc(500*time.Millisecond, func() { holder.Close(context.Background()) })
	t.Cleanup(func() { released.Stop() })
	return other
}

// A part drops the parted peer's origin right after stopping its stream,
// whose backend may still hold the origin for a moment (CI saw "could not
// drop replication origin ... in use by PID"): Drop waits for it.
func TestDropWaitsForTheStreamThatHeldTheOrigin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	dropper := heldOrigin(t, ctx, "")

	if err := origin.Drop(ctx, dropper, "paris"); err != nil {
		t.Fatal(err)
	}
	var left int
	if err := dropper.QueryRow(ctx, `SELECT count(*) FROM pg_replication_origin WHERE roname = $1`, origin.Name("paris")).Scan(&left); err != nil {
		t.Fatal(err)
	}
	if left != 0 {
		t.Fatalf("origin %s is still there after Drop", origin.Name("paris"))
	}
	// Dropping what is gone is not an error.
	if err := origin.Drop(ctx, dropper, "paris"); err != nil {
		t.Fatal(err)
	}
}

// A stream that starts over on a slot its peer made again after a
// promotion moves its origin back to where the new slot starts; Reset
// waits for the previous stream's backend to let go of the origin.
func TestResetMovesTheOriginBack(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resetter := heldOrigin(t, ctx, "0/5000")

	from, err := origin.Reset(ctx, resetter, "paris", 0x3000)
	if err != nil {
		t.Fatal(err)
	}
	if from != 0x5000 {
		t.Fatalf("Reset says the origin was at %s, want 0/5000", from)
	}
	var now string
	if err := resetter.QueryRow(ctx, `SELECT pg_replication_origin_progress($1, true)::text`, origin.Name("paris")).Scan(&now); err != nil {
		t.Fatal(err)
	}
	if now != "0/3000" {
		t.Fatalf("origin at %s after Reset to 0/3000", now)
	}
}
