package conflict

import (
	"fmt"
	"time"
)

// A tombstone (a row of pgmesh.tombstone) remembers that a key's row was
// deleted, when and by which node, so that an older change arriving later
// cannot bring the row back. This file owns how pgmesh reads and writes
// one; the SQL copies are pgmesh.record_tombstone (a local delete, with
// deleted_at and deleted_by NULL) and raise_if_deleted/take_back_if_deleted
// (migrations 0002 and 0010).
//
// The key is the row's primary key as jsonb, column name to value, however
// it is built (the trigger, relation.rowKey, relation.keyJSON).

// TombstoneAt is the SQL expression (over the tombstone alias t, empty for
// none) of when its delete committed: deleted_at, or for a local delete,
// which the trigger recorded without one, the commit time of the tombstone
// row itself (housekeeping fills deleted_at in later).
func TombstoneAt(t string) string {
	if t != "" {
		t += "."
	}
	return fmt.Sprintf("coalesce(%[1]sdeleted_at, pg_catalog.pg_xact_commit_timestamp(%[1]sxmin))", t)
}

// TombstoneAtMicros is TombstoneAt in microseconds since the Unix epoch, for
// TombstoneVersion.
func TombstoneAtMicros(t string) string {
	return "(extract(epoch FROM " + TombstoneAt(t) + ") * 1000000)::bigint"
}

// TombstoneVersion is the delete a tombstone records, from
// TombstoneAtMicros (nil: unknown) and deleted_by, where NULL means this
// node deleted the row.
func TombstoneVersion(micros *int64, deletedBy *string, localNode string) Version {
	v := Version{Node: localNode}
	if micros != nil {
		v.CommitTS = time.UnixMicro(*micros).UTC()
	}
	if deletedBy != nil {
		v.Node = *deletedBy
	}
	return v
}

// TombstoneInsert starts a statement that records deletes: follow it with a
// SELECT or VALUES of (relation, key, deleted_at, deleted_by) and end it
// with TombstoneUpsert.
const TombstoneInsert = "INSERT INTO pgmesh.tombstone AS t (relation, key, deleted_at, deleted_by) "

// TombstoneUpsert ends a TombstoneInsert: of two deletes of one key it keeps
// the newer by Rule.Newer (its SQL copy, pgmesh.luw_newer).
var TombstoneUpsert = ` ON CONFLICT (relation, key) DO UPDATE SET deleted_at = EXCLUDED.deleted_at, deleted_by = EXCLUDED.deleted_by
WHERE pgmesh.luw_newer(EXCLUDED.deleted_at, EXCLUDED.deleted_by, ` + TombstoneAt("t") + `, t.deleted_by)`
