//go:build integration

package pgtest

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/poll"
)

// A standby made online, while the primary writes, is in recovery and
// receives what the primary commits after the copy.
func TestStandbyStreamsFromPrimary(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	primary, err := Start(ctx, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer primary.Remove()
	if err := primary.Exec(ctx, `CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 1000)`); err != nil {
		t.Fatal(err)
	}
	standby, err := primary.Standby(ctx, "replica1", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer standby.Remove()
	if err := primary.Exec(ctx, `INSERT INTO t SELECT generate_series(1001, 2000)`); err != nil {
		t.Fatal(err)
	}
	conn, err := standby.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	var recovering bool
	if err := conn.QueryRow(ctx, `SELECT pg_is_in_recovery()`).Scan(&recovering); err != nil || !recovering {
		t.Fatalf("the standby is not in recovery: %v", err)
	}
	err = poll.Until(ctx, 50*time.Millisecond, 30*time.Second, func() error {
		var n int
		if err := conn.QueryRow(ctx, `SELECT count(*) FROM t`).Scan(&n); err != nil {
			return err
		}
		if n != 2000 {
			return fmt.Errorf("standby has %d of 2000 rows", n)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
