// Package conflict settles changes that do not fit the local row by
// last-update-wins on (origin commit timestamp, node id), and describes each
// such event as a pgmesh.conflict_history row.
package conflict

import "time"

// Type names a conflict (PostgreSQL 18's names).
type Type string

const (
	InsertExists            Type = "insert_exists"
	UpdateOriginDiffers     Type = "update_origin_differs"
	UpdateExists            Type = "update_exists"
	UpdateMissing           Type = "update_missing"
	UpdateDeleted           Type = "update_deleted"
	DeleteOriginDiffers     Type = "delete_origin_differs"
	DeleteMissing           Type = "delete_missing"
	MultipleUniqueConflicts Type = "multiple_unique_conflicts"
)

// Resolution names what was done about a conflict.
type Resolution string

const (
	ApplyRemote   Resolution = "apply_remote"
	KeepLocal     Resolution = "keep_local"
	ApplyAsInsert Resolution = "apply_as_insert"
	Skip          Resolution = "skip"
	Merge         Resolution = "merge"
)

// Version identifies who wrote a row version and when. A zero CommitTS means
// the time is unknown (the row predates commit timestamps or was frozen); such
// a version counts as the oldest.
type Version struct {
	CommitTS time.Time
	NodeID   int
	Node     string
}

// Known reports whether the version's commit time is known.
func (v Version) Known() bool { return !v.CommitTS.IsZero() }

// Newer reports whether a wins over b under last-update-wins: the later commit
// time wins; equal times (to the microsecond, PostgreSQL's precision) go to
// the higher node id. Every node evaluates the same pair the same way, which is
// what makes the group converge.
func Newer(a, b Version) bool {
	au, bu := a.CommitTS.UnixMicro(), b.CommitTS.UnixMicro()
	switch {
	case !b.Known():
		return a.Known() || a.NodeID > b.NodeID
	case !a.Known():
		return false
	case au != bu:
		return au > bu
	default:
		return a.NodeID > b.NodeID
	}
}

// Change is the kind of remote change being applied.
type Change int

const (
	Insert Change = iota
	Update
	Delete
)

// Decision is the outcome for one remote change.
type Decision struct {
	// Conflict is false when the change applies plainly.
	Conflict   bool
	Type       Type
	Resolution Resolution
	// Apply is true when the remote change is to be written.
	Apply bool
	// Reason explains the resolution in a few words, for conflict_history.
	Reason string
}

// Decide settles a remote change against the local row version. local is nil
// when no row with the change's key exists here. ownTxn is true when the local
// row was written earlier in the transaction being applied (so it is the same
// origin's doing, not a conflict).
func Decide(change Change, local *Version, ownTxn bool, remote Version) Decision {
	if local == nil {
		switch change {
		case Insert:
			return Decision{Apply: true}
		case Update:
			// Without tombstones we cannot tell a row deleted here later
			// from one not yet inserted here; skipping loses nothing that a
			// newer local delete did not already mean to remove.
			return Decision{Conflict: true, Type: UpdateMissing, Resolution: Skip,
				Reason: "no local row with this key"}
		default:
			return Decision{Conflict: true, Type: DeleteMissing, Resolution: Skip,
				Reason: "no local row with this key"}
		}
	}
	if ownTxn {
		return Decision{Apply: true}
	}
	if change != Insert && local.Known() && local.Node == remote.Node {
		// The row was last written by the same origin: an ordinary
		// sequential change, applied in that origin's commit order.
		return Decision{Apply: true}
	}
	typ := map[Change]Type{Insert: InsertExists, Update: UpdateOriginDiffers, Delete: DeleteOriginDiffers}[change]
	if Newer(remote, *local) {
		return Decision{Conflict: true, Type: typ, Resolution: ApplyRemote, Apply: true,
			Reason: "remote change is newer (last update wins)"}
	}
	return Decision{Conflict: true, Type: typ, Resolution: KeepLocal,
		Reason: "local row is newer (last update wins)"}
}
