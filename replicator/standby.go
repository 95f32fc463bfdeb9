package replicator

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/origin"
)

// Confirmations wait for the disk here and for this node's standbys. A
// peer frees the WAL of whatever this node confirms, so what is confirmed
// must survive a crash here, and a failover to a standby.
//
// The apply session commits asynchronously (synchronous_commit off, as
// native subscriptions do): a flush per local commit woke this node's
// walsenders at every commit, and through them the peers' daemons, which
// cost a live stream an eighth of its CPU (README, Performance). So a change
// applied here is confirmed only once the local WAL is flushed past its
// local commit; when the stream is quiet, it flushes at once
// (pg_replication_origin_session_progress(true)), else the WAL writer
// does, within a few wal_writer_delay.
//
// With Config.StandbySlots, it is confirmed only once every standby that
// may be promoted has flushed its local commit too (which a promotion
// replays), read from the standbys' physical slots, as PostgreSQL 17's
// synchronized_standby_slots does for the other direction.

// originSample is the origin's progress at a moment: the peer's position
// of the last transaction applied here, and that local commit's position.
type originSample struct {
	remote, local pglogrepl.LSN
}

// holdBack decides how far a stream may confirm from samples of its
// origin's progress and the position flushed here and on the standbys.
// Samples come from one apply connection, which commits in the peer's
// order, so a flush that has one sample's local commit has every earlier
// one.
type holdBack struct {
	safe    pglogrepl.LSN  // everything up to here is flushed
	pending []originSample // samples not flushed yet, oldest first
}

// maxPending bounds the samples kept: dropping the oldest only makes the
// hold coarser (safe moves in bigger steps), never unsafe.
const maxPending = 4096

// confirmable returns how much of flushed (read before the sample at was
// taken) may be confirmed, given that the WAL is flushed up to standby
// here and on the standbys.
func (h *holdBack) confirmable(flushed pglogrepl.LSN, at originSample, standby pglogrepl.LSN) pglogrepl.LSN {
	if at.local <= standby {
		// The latest commit here is flushed, and so every one that flushed
		// covers; what flushed covers beyond them applied nothing.
		h.pending = h.pending[:0]
		h.safe = max(h.safe, flushed)
		return h.safe
	}
	if n := len(h.pending); n == 0 || h.pending[n-1] != at {
		if n == maxPending {
			h.pending = append(h.pending[:0], h.pending[1:]...)
		}
		h.pending = append(h.pending, at)
	}
	for len(h.pending) > 0 && h.pending[0].local <= standby {
		h.safe = max(h.safe, h.pending[0].remote)
		h.pending = h.pending[1:]
	}
	return min(h.safe, flushed)
}

// flushWatch samples, on a local connection of its own, the stream's
// origin progress, the local WAL's flush position and the flush position
// of the standbys' slots.
type flushWatch struct {
	dsn, origin string
	slots       []string
	conn        *pgx.Conn
	hold        holdBack
	heldSince   time.Time // since when the standbys have lacked a change applied here
	// settled is set when the last sample found every local commit
	// flushed (without standbys to wait for): until the next commit
	// (committed), what the stream passes over needs no new sample, and
	// an idle stream reads nothing.
	settled bool
}

// heldLong is how long the standbys may lag before status says so: they
// are always a little behind while changes arrive.
const heldLong = 5 * time.Second

func newFlushWatch(cfg Config) *flushWatch {
	return &flushWatch{dsn: cfg.LocalDSN, origin: origin.Name(cfg.Peer.Name), slots: cfg.StandbySlots}
}

// committed notes a local commit since the last sample.
func (w *flushWatch) committed() { w.settled = false }

// flushedAll notes that the stream flushed every local commit it made
// (flushProgress), which without standbys leaves nothing to read.
func (w *flushWatch) flushedAll() { w.settled = len(w.slots) == 0 }

// limit returns how much of flushed (read before the call) may be
// confirmed, and why the rest is held ("" when nothing is, or only for
// the local flush, which comes soon).
func (w *flushWatch) limit(ctx context.Context, flushed pglogrepl.LSN) (pglogrepl.LSN, string) {
	if w.settled {
		w.hold.safe = max(w.hold.safe, flushed)
		return flushed, ""
	}
	at, local, standby, missing, err := w.sample(ctx)
	if err != nil {
		if w.conn != nil {
			w.conn.Close(context.Background())
			w.conn = nil
		}
		return min(w.hold.safe, flushed), "cannot read the local WAL's and the standbys' positions, so nothing more is confirmed: " + err.Error()
	}
	point := local
	if len(w.slots) > 0 {
		point = min(point, standby)
	}
	ok := w.hold.confirmable(flushed, at, point)
	w.settled = len(w.slots) == 0 && at.local <= local
	if len(w.slots) == 0 {
		return ok, ""
	}
	if ok >= flushed {
		w.heldSince = time.Time{}
	} else if w.heldSince.IsZero() {
		w.heldSince = time.Now()
	}
	switch {
	case len(missing) > 0:
		return ok, fmt.Sprintf("standby_slots names %s, which is not a physical slot in use here, so changes applied here are not confirmed to the peer (its WAL piles up): create the slot for the standby (pg_create_physical_replication_slot) and start it, or remove it from standby_slots", strings.Join(missing, ", "))
	case !w.heldSince.IsZero() && time.Since(w.heldSince) > heldLong:
		return ok, fmt.Sprintf("the standbys (standby_slots) have flushed only up to %s, so changes applied here since are not confirmed to the peer (its WAL piles up): is a standby stopped or far behind?", standby)
	}
	return ok, ""
}

// sample reads the origin's progress, the local WAL's flush position and
// the standbys' (0 when one has none). Read in either order, a commit is
// taken as flushed only by a position at or past it.
func (w *flushWatch) sample(ctx context.Context) (at originSample, local, standby pglogrepl.LSN, missing []string, err error) {
	if w.conn == nil {
		if w.conn, err = pgsession.Connect(ctx, w.dsn, "pgmesh flush watch"); err != nil {
			return at, 0, 0, nil, err
		}
	}
	err = w.conn.QueryRow(ctx, `SELECT coalesce(o.remote_lsn, '0/0'), coalesce(o.local_lsn, '0/0'),
			pg_catalog.pg_current_wal_flush_lsn(),
			coalesce((SELECT min(restart_lsn) FROM pg_catalog.pg_replication_slots
			          WHERE slot_name = ANY($2) AND slot_type = 'physical'), '0/0'),
			ARRAY(SELECT n FROM unnest($2::text[]) n WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
			      WHERE s.slot_name = n AND s.slot_type = 'physical' AND s.restart_lsn IS NOT NULL))
		FROM (SELECT 1) x LEFT JOIN pg_catalog.pg_replication_origin_status o ON o.external_id = $1`,
		w.origin, w.slots).Scan(&at.remote, &at.local, &local, &standby, &missing)
	if len(missing) > 0 {
		standby = 0 // a standby with no position has nothing
	}
	return at, local, standby, missing, err
}

func (w *flushWatch) close() {
	if w != nil && w.conn != nil {
		w.conn.Close(context.Background())
		w.conn = nil
	}
}
