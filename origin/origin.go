// Package origin names replication origins and slots, reads and sets up
// origin progress, and filters transactions that did not originate on the
// peer that streams them (loop prevention; ARCHITECTURE.md, "Data flows one way").
package origin

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/poll"
)

// Prefix starts every origin and slot name pgmesh owns.
const Prefix = "pgmesh_"

// Name is the local replication origin that tracks how far this node has
// applied the changes of peer.
func Name(peer string) string { return Prefix + peer }

// SlotName is the logical replication slot on a peer's database that the
// subscriber node consumes.
func SlotName(subscriber string) string { return Prefix + subscriber }

// PublicationName is the publication on every node that holds what the
// receiver node gets of that node's changes (see package repset).
func PublicationName(receiver string) string { return Prefix + receiver }

// NodeOf returns the node name in an origin or slot name, and whether the
// name is one of pgmesh's.
func NodeOf(name string) (string, bool) {
	n, ok := strings.CutPrefix(name, Prefix)
	return n, ok && n != ""
}

// Ensure creates the origin if it does not exist yet.
func Ensure(ctx context.Context, conn *pgx.Conn, peer string) error {
	_, err := conn.Exec(ctx, `SELECT pg_replication_origin_create($1)
		WHERE NOT EXISTS (SELECT 1 FROM pg_replication_origin WHERE roname = $1)`, Name(peer))
	if err != nil {
		return fmt.Errorf("create replication origin %s: %w", Name(peer), err)
	}
	return nil
}

// Drop removes the origin if it exists.
func Drop(ctx context.Context, conn *pgx.Conn, peer string) error {
	err := whileInUse(ctx, func() error {
		_, err := conn.Exec(ctx, `SELECT pg_replication_origin_drop(roname)
			FROM pg_replication_origin WHERE roname = $1`, Name(peer))
		return err
	})
	if err != nil {
		return fmt.Errorf("drop replication origin %s: %w", Name(peer), err)
	}
	return nil
}

// Reset moves peer's origin to lsn, backwards if need be, and returns where
// it was. Only a connection with no origin session may: it is how a stream
// starts over on a slot its peer made again (after a promotion).
func Reset(ctx context.Context, conn *pgx.Conn, peer string, lsn pglogrepl.LSN) (from pglogrepl.LSN, err error) {
	var s *string
	if err := conn.QueryRow(ctx, `SELECT pg_replication_origin_progress($1, true)::text`, Name(peer)).Scan(&s); err != nil {
		return 0, fmt.Errorf("read progress of replication origin %s: %w", Name(peer), err)
	}
	if s != nil {
		if from, err = pglogrepl.ParseLSN(*s); err != nil {
			return 0, err
		}
	}
	err = whileInUse(ctx, func() error {
		_, err := conn.Exec(ctx, `SELECT pg_replication_origin_advance($1, $2::text::pg_lsn)`, Name(peer), lsn.String())
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("move replication origin %s to %s: %w", Name(peer), lsn, err)
	}
	return from, nil
}

// whileInUse runs f, again for a few seconds while it fails because the
// origin is in use: a stream stopped a moment ago may still hold it, as its
// backend ends only after noticing the closed connection.
func whileInUse(ctx context.Context, f func() error) error {
	return poll.Until(ctx, 100*time.Millisecond, 5*time.Second, func() error {
		err := f()
		if pe, ok := errors.AsType[*pgconn.PgError](err); ok && pe.Code == "55006" { // object_in_use
			return err
		}
		if err != nil {
			return poll.Stop(err)
		}
		return nil
	})
}

// SessionSetup binds the connection to peer's origin, so every transaction it
// commits is stamped with that origin (which peers use to drop it), and
// returns the origin's durable progress: the end LSN of the last peer
// transaction applied here, from which streaming must resume.
func SessionSetup(ctx context.Context, conn *pgx.Conn, peer string) (pglogrepl.LSN, error) {
	if _, err := conn.Exec(ctx, `SELECT pg_replication_origin_session_setup($1)`, Name(peer)); err != nil {
		return 0, fmt.Errorf("set up replication origin %s on the apply connection: %w", Name(peer), err)
	}
	var s *string
	if err := conn.QueryRow(ctx, `SELECT pg_replication_origin_session_progress(true)::text`).Scan(&s); err != nil {
		return 0, fmt.Errorf("read progress of replication origin %s: %w", Name(peer), err)
	}
	if s == nil {
		return 0, nil
	}
	return pglogrepl.ParseLSN(*s)
}

// Filter decides, per transaction, whether a change from the stream is to be
// applied. PG15's pgoutput cannot filter by origin, so it sends transactions
// this peer itself replicated from elsewhere, announced by an Origin message
// right after Begin; those are dropped (on PG16+ the sender also drops them,
// via the pgoutput option origin 'none').
type Filter struct {
	inTxn bool
	skip  bool
}

// Begin starts a new transaction.
func (f *Filter) Begin() { f.inTxn, f.skip = true, false }

// Origin marks the current transaction as forwarded from another node.
func (f *Filter) Origin() error {
	if !f.inTxn {
		return errors.New("origin message outside a transaction")
	}
	f.skip = true
	return nil
}

// Skip reports whether the current transaction's changes must be dropped.
func (f *Filter) Skip() bool { return f.skip }

// End closes the transaction.
func (f *Filter) End() { f.inTxn, f.skip = false, false }

// InTxn reports whether a transaction is open.
func (f *Filter) InTxn() bool { return f.inTxn }
