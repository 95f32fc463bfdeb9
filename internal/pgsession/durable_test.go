//go:build integration

package pgsession_test

import (
	"context"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// An applier session commits durably where the server commits
// asynchronously (the test clusters run with synchronous_commit = off),
// and keeps any setting it is given (the apply session's off: it confirms
// only what the WAL has flushed); other sessions keep the server's.
func TestApplierCommitsDurably(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Remove)
	setting := func(sets ...pgsession.Settings) string {
		t.Helper()
		conn, err := pgsession.Connect(ctx, pg.DSN(), "test", sets...)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close(ctx)
		var v string
		if err := conn.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	if got := setting(pgsession.Writer); got != "off" {
		t.Fatalf("a writer session has synchronous_commit = %s, want the server's off", got)
	}
	if got := setting(pgsession.Applier); got != "local" {
		t.Fatalf("an applier session on a server with synchronous_commit = off has %s, want local", got)
	}
	if got := setting(pgsession.Applier, pgsession.Settings{"synchronous_commit": "remote_apply"}); got != "remote_apply" {
		t.Fatalf("an applier session asked for remote_apply has %s: a stronger setting must be kept", got)
	}
	if got := setting(pgsession.Applier, pgsession.Settings{"synchronous_commit": "off"}); got != "off" {
		t.Fatalf("an applier session asked for off has %s: a session that sets it itself decides", got)
	}
}
