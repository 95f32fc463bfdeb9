package replicator

import (
	"context"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// The slots pgmesh creates are failover slots on PostgreSQL 17+: a standby
// with sync_replication_slots keeps them in step, so that the peers stream
// on from it once it is promoted (docs/high-availability.md). Without such
// a standby the flag changes nothing.

// failoverSlots reports whether the server can make failover slots.
func failoverSlots(c *pgconn.PgConn) bool { return serverMajor(c) >= 17 }

// CreateSlot creates the pgoutput slot named slot and returns where it starts.
func CreateSlot(ctx context.Context, conn *pgx.Conn, slot string) (pglogrepl.LSN, error) {
	sql := `SELECT lsn FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')`
	if failoverSlots(conn.PgConn()) {
		sql = `SELECT lsn FROM pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)`
	}
	var lsn pglogrepl.LSN
	err := conn.QueryRow(ctx, sql, slot).Scan(&lsn)
	return lsn, err
}

// CreateSnapshotSlot creates the pgoutput slot named slot on a replication
// connection, exporting its snapshot, which lasts until the connection's
// next command.
func CreateSnapshotSlot(ctx context.Context, repl *pgconn.PgConn, slot string) (pglogrepl.CreateReplicationSlotResult, error) {
	action := "EXPORT_SNAPSHOT"
	if failoverSlots(repl) {
		action = "(SNAPSHOT 'export', FAILOVER)"
	}
	return pglogrepl.CreateReplicationSlot(ctx, repl, slot, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Mode: pglogrepl.LogicalReplication, SnapshotAction: action})
}
