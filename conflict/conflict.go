// Package conflict settles changes that do not fit the local row by
// last-update-wins on (origin commit timestamp rounded to the group's
// resolution, node id), and describes each such event as a
// pgmesh.conflict_history row.
package conflict

import "time"

// Type names a conflict (PostgreSQL 18's names).
type Type string

const (
	InsertExists Type = "insert_exists"
	// InsertDeleted is pgmesh's own: an insert arrives for a key that a
	// newer delete already removed here (the delete came first, from
	// another node); the insert is skipped.
	InsertDeleted           Type = "insert_deleted"
	UpdateOriginDiffers     Type = "update_origin_differs"
	UpdateExists            Type = "update_exists"
	UpdateMissing           Type = "update_missing"
	UpdateDeleted           Type = "update_deleted"
	DeleteOriginDiffers     Type = "delete_origin_differs"
	DeleteMissing           Type = "delete_missing"
	MultipleUniqueConflicts Type = "multiple_unique_conflicts"
	// ParkedDiscarded is pgmesh's own: a parked change that pgmesh discard
	// removed unapplied (resolution skip; docs/apply-errors.md).
	ParkedDiscarded Type = "parked_discarded"
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

// Rule is last-update-wins at a fixed resolution: commit times are rounded
// up to Resolution before they are compared, and versions in the same
// interval are ordered by node id. Every node must use the same Rule (the
// group checks that every member has the same luw_resolution); then every
// node decides every pair the same way, which is what makes the group
// converge. The zero Rule compares exact times (PostgreSQL's microseconds).
//
// Rounding is what lets consecutive transactions of one peer share a local
// commit: they carry the last one's commit time, which rounds to the same
// value as each of theirs (see ARCHITECTURE.md, "Last-update-wins at a fixed
// resolution").
type Rule struct {
	Resolution time.Duration
}

// Round returns t rounded up to the rule's resolution, in microseconds since
// the Unix epoch. Rounding up (not to nearest) keeps a rounded time at or
// after the real one, which the causality guard relies on: once the local
// clock has passed Round(t), it has passed t.
func (r Rule) Round(t time.Time) int64 {
	us := t.UnixMicro()
	res := r.Resolution.Microseconds()
	if res <= 1 {
		return us
	}
	q := us / res
	if us%res > 0 { // for negative times, Go's division already rounds up
		q++
	}
	return q * res
}

// VisibleAfter is the local clock reading a change committed at commit by
// node from must wait for before it commits on node here (the causality
// guard): once the local clock has passed it, every later local write to
// the change's rows wins over it, as a write that saw it must. A later
// write wins with a later rounded time, or with the same one when here has
// the higher node id: then the clock only has to enter the change's
// interval, not leave it, and a change from a lower id waits for nothing
// but skew. An unknown id (0) waits for the whole interval.
func (r Rule) VisibleAfter(commit time.Time, from, here int) time.Time {
	at := r.Round(commit)
	if from > 0 && here > from {
		// Every time after the interval's start rounds to at or later.
		at -= max(r.Resolution.Microseconds(), 1)
	}
	return time.UnixMicro(at).UTC()
}

// Newer reports whether a wins over b: the later rounded commit time wins;
// equal rounded times go to the higher node id. A version whose time is
// unknown is older than every known one.
func (r Rule) Newer(a, b Version) bool {
	switch {
	case !b.Known():
		return a.Known() || a.NodeID > b.NodeID
	case !a.Known():
		return false
	}
	if ar, br := r.Round(a.CommitTS), r.Round(b.CommitTS); ar != br {
		return ar > br
	}
	return a.NodeID > b.NodeID
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
	// MergeDelta: the remote update lost, but its increments to the
	// table's delta columns are added to the local row (Resolution Merge).
	MergeDelta bool
	// DeleteSelf: a remote update lost a unique-index collision, and the
	// row it updates is removed with it, as it is on the node that wrote
	// it once the winner arrives there.
	DeleteSelf bool
}

// Local is what the node holds for the key a remote change addresses.
type Local struct {
	// Row is the local row's version, nil when no row has the key.
	Row *Version
	// OwnTxn is true when the row was written earlier in the transaction
	// being applied (the same origin's doing, not a conflict).
	OwnTxn bool
	// Tombstone is the newest delete of the key, nil when none is known.
	Tombstone *Version
	// FullRow is true when the remote change carries every column, so an
	// update can be applied as an insert.
	FullRow bool
	// Delta is true when the table has delta columns and the remote update
	// carries the old values, so its increments can be told.
	Delta bool
}

// Sequential reports whether a remote update or delete of an existing row
// is an ordinary change in its origin's commit order rather than a
// conflict: the row was last written by the same origin, or earlier in the
// transaction being applied. It is the one case the fast path applies
// without asking (its SQL guards compile exactly this and defer every
// other case to Decide; replicator/guard_test.go checks the two agree).
func Sequential(l Local, remote Version) bool {
	return l.Row != nil && (l.OwnTxn || l.Row.Known() && l.Row.Node == remote.Node)
}

// Decide settles a remote change against what the node holds for its key.
func (r Rule) Decide(change Change, l Local, remote Version) Decision {
	if l.Row == nil {
		deletedLater := l.Tombstone != nil && r.Newer(*l.Tombstone, remote)
		switch {
		case change == Insert && deletedLater:
			return Decision{Conflict: true, Type: InsertDeleted, Resolution: Skip,
				Reason: "a newer delete of this key was applied here first"}
		case change == Insert:
			return Decision{Apply: true}
		case change == Update && deletedLater:
			return Decision{Conflict: true, Type: UpdateDeleted, Resolution: Skip,
				Reason: "the row was deleted later than this update"}
		case change == Update && l.FullRow:
			return Decision{Conflict: true, Type: UpdateMissing, Resolution: ApplyAsInsert, Apply: true,
				Reason: "no local row and no newer delete: the row is inserted"}
		case change == Update:
			return Decision{Conflict: true, Type: UpdateMissing, Resolution: Skip,
				Reason: "no local row, and the update lacks unchanged TOAST values needed to insert it"}
		default:
			return Decision{Conflict: true, Type: DeleteMissing, Resolution: Skip,
				Reason: "no local row with this key"}
		}
	}
	local := l.Row
	if l.OwnTxn || change != Insert && Sequential(l, remote) {
		return Decision{Apply: true}
	}
	typ := map[Change]Type{Insert: InsertExists, Update: UpdateOriginDiffers, Delete: DeleteOriginDiffers}[change]
	if r.Newer(remote, *local) {
		return Decision{Conflict: true, Type: typ, Resolution: ApplyRemote, Apply: true,
			Reason: "remote change is newer (last update wins)"}
	}
	if change == Update && l.Delta {
		// Increments are never lost.
		return Decision{Conflict: true, Type: typ, Resolution: Merge, MergeDelta: true,
			Reason: "local row is newer; the remote increments to delta columns are added"}
	}
	return Decision{Conflict: true, Type: typ, Resolution: KeepLocal,
		Reason: "local row is newer (last update wins)"}
}

// Unique settles a remote insert or update that collides on a unique index
// other than the key with local rows (blockers). The remote row wins only
// if it is newer than every blocker; each blocker older than the remote row
// loses and is removed either way. Every node meets the same rows and
// decides the same, so all keep the same winner.
func (r Rule) Unique(change Change, blockers []Version, remote Version) (d Decision, losers []int) {
	d = Decision{Conflict: true, Type: UpdateExists, Apply: true, Resolution: ApplyRemote,
		Reason: "remote row is newer than the row holding the same unique value, which is removed"}
	if change == Insert {
		d.Type = InsertExists
	}
	if len(blockers) > 1 {
		d.Type = MultipleUniqueConflicts
		d.Reason = "remote row is newer than every row holding its unique values, which are removed"
	}
	for i, b := range blockers {
		if r.Newer(remote, b) {
			losers = append(losers, i)
		} else {
			d.Apply = false
		}
	}
	if !d.Apply {
		d.Resolution = KeepLocal
		d.Reason = "a local row holding the same unique value is newer; the remote row loses"
		if change == Update {
			d.DeleteSelf = true
			d.Reason += " and the row it updates is removed"
		}
	}
	return d, losers
}
