package conflict

import (
	"fmt"
	"strconv"
	"time"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// Record is one pgmesh.conflict_history row: a decision, the versions it was
// between and where the remote change came from. The tuples are SQL
// expressions yielding jsonb, because they are read in the transaction that
// applies the change, before it (local_tuple is the row as it was).
type Record struct {
	LocalNode, OriginNode, Relation string
	Decision                        Decision
	KeyTuple, LocalTuple            string
	// RemoteTuple is empty when the remote change carries no row (a delete).
	RemoteTuple string
	// Local is the local version decided against; nil when none.
	Local          *Version
	RemoteCommitTS time.Time
	// RemoteLSN and RemoteXID are empty and 0 when unknown.
	RemoteLSN string
	RemoteXID uint32
}

// AppliedTuple is what the key holds after the decision: the remote row
// when it was written, the local row when it was kept, nothing otherwise.
func (r Record) AppliedTuple() string {
	switch {
	case r.Decision.Apply && r.RemoteTuple != "":
		return r.RemoteTuple
	case r.Decision.Resolution == KeepLocal:
		return r.LocalTuple
	}
	return "NULL::jsonb"
}

// InsertSQL is the statement writing the row; bind adds a parameter value
// and returns its placeholder.
func (r Record) InsertSQL(bind func([]byte) string) string {
	remote := r.RemoteTuple
	if remote == "" {
		remote = "NULL::jsonb"
	}
	var localTS, localOrigin []byte
	if r.Local != nil {
		if r.Local.Known() {
			localTS = []byte(pgquote.Timestamp(r.Local.CommitTS))
		}
		localOrigin = []byte(r.Local.Node)
	}
	// A decision taken after the fact (see replicator.RemoveOvertaken)
	// knows the remote change's time and origin, not its LSN and xid.
	var lsn, xid []byte
	if r.RemoteLSN != "" {
		lsn = []byte(r.RemoteLSN)
	}
	if r.RemoteXID != 0 {
		xid = []byte(strconv.FormatUint(uint64(r.RemoteXID), 10))
	}
	return fmt.Sprintf(`INSERT INTO pgmesh.conflict_history (local_node, origin_node, relation,
	conflict_type, resolution, key_tuple, local_tuple, remote_tuple, applied_tuple,
	local_commit_ts, local_origin, remote_commit_ts, remote_commit_lsn, remote_xid, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s::timestamptz, %s, %s::timestamptz, %s::pg_lsn, %s::bigint, %s)`,
		bind([]byte(r.LocalNode)), bind([]byte(r.OriginNode)), bind([]byte(r.Relation)),
		bind([]byte(r.Decision.Type)), bind([]byte(r.Decision.Resolution)), r.KeyTuple, r.LocalTuple, remote, r.AppliedTuple(),
		bind(localTS), bind(localOrigin), bind([]byte(pgquote.Timestamp(r.RemoteCommitTS))), bind(lsn),
		bind(xid), bind([]byte(r.Decision.Reason)))
}
