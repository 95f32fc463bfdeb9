//go:build integration

package origin_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/origin"
)

// A part drops the parted peer's origin right after stopping its stream,
// whose backend may still hold the origin for a moment (CI saw "could not
// drop replication origin ... in use by PID"): Drop waits for it.
func TestDropWaitsForTheStreamThatHeldTheOrigin(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Remove)
	holder, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	dropper, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer dropper.Close(ctx)
	if err := origin.Ensure(ctx, holder, "paris"); err != nil {
		t.Fatal(err)
	}
	if _, err := holder.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, origin.Name("paris")); err != nil {
		t.Fatal(err)
	}
	released := time.AfterFunc(500*time.Millisecond, func() { holder.Close(context.Background()) })
	defer released.Stop()

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
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Remove)
	holder, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	resetter, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer resetter.Close(ctx)
	if err := origin.Ensure(ctx, holder, "paris"); err != nil {
		t.Fatal(err)
	}
	if _, err := holder.Exec(ctx, `SELECT pg_replication_origin_advance($1, '0/5000')`, origin.Name("paris")); err != nil {
		t.Fatal(err)
	}
	if _, err := holder.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, origin.Name("paris")); err != nil {
		t.Fatal(err)
	}
	released := time.AfterFunc(500*time.Millisecond, func() { holder.Close(context.Background()) })
	defer released.Stop()

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
