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

// Confirmations wait for this node's standbys (Config.StandbySlots). A
// peer frees the WAL of whatever this node confirms; if this node's
// primary then failed over to a standby that lacked some of it, those
// changes would be gone from the promoted node and from the peer's slot
// alike. So a change applied here is confirmed only once every standby
// that may be promoted has flushed its local commit (which a promotion
// replays), read from the standbys' physical slots, as PostgreSQL 17's
// synchronized_standby_slots does for the other direction.

// originSample is the origin's progress at a moment: the peer's position
// of the last transaction applied here, and that local commit's position.
type originSample struct {
	remote, local pglogrepl.LSN
}

// holdBack decides how far a stream may confirm from samples of its
// origin's progress and the standbys' flush position. Samples come from
// one apply connection, which commits in the peer's order, so a standby
// that has one sample's local commit has every earlier one.
type holdBack struct {
	safe    pglogrepl.LSN  // everything up to here is on the standbys
	pending []originSample // samples the standbys lack, oldest first
}

// maxPending bounds the samples kept: dropping the oldest only makes the
// hold coarser (safe moves in bigger steps), never unsafe.
const maxPending = 4096

// confirmable returns how much of flushed (read before the sample at was
// taken) may be confirmed, given that the standbys have flushed up to
// standby.
func (h *holdBack) confirmable(flushed pglogrepl.LSN, at originSample, standby pglogrepl.LSN) pglogrepl.LSN {
	if at.local <= standby {
		// The standbys have the latest commit here, and so every one that
		// flushed covers; what flushed covers beyond them applied nothing.
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

// standbyWatch samples, on a local connection of its own, the stream's
// origin progress and the flush position of the standbys' slots.
type standbyWatch struct {
	dsn, origin string
	slots       []string
	conn        *pgx.Conn
	hold        holdBack
	heldSince   time.Time // since when the standbys have lacked a change applied here
}

// heldLong is how long the standbys may lag before status says so: they
// are always a little behind while changes arrive.
const heldLong = 5 * time.Second

func newStandbyWatch(cfg Config) *standbyWatch {
	if len(cfg.StandbySlots) == 0 {
		return nil
	}
	return &standbyWatch{dsn: cfg.LocalDSN, origin: origin.Name(cfg.Peer.Name), slots: cfg.StandbySlots}
}

// limit returns how much of flushed (read before the call) may be
// confirmed, and why the rest is held ("" when nothing is).
func (w *standbyWatch) limit(ctx context.Context, flushed pglogrepl.LSN) (pglogrepl.LSN, string) {
	at, standby, missing, err := w.sample(ctx)
	if err != nil {
		if w.conn != nil {
			w.conn.Close(context.Background())
			w.conn = nil
		}
		return min(w.hold.safe, flushed), "cannot read the standbys' positions, so nothing more is confirmed: " + err.Error()
	}
	ok := w.hold.confirmable(flushed, at, standby)
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

func (w *standbyWatch) sample(ctx context.Context) (at originSample, standby pglogrepl.LSN, missing []string, err error) {
	if w.conn == nil {
		if w.conn, err = pgsession.Connect(ctx, w.dsn, "pgmesh standby watch"); err != nil {
			return at, 0, nil, err
		}
	}
	err = w.conn.QueryRow(ctx, `SELECT coalesce(o.remote_lsn, '0/0'), coalesce(o.local_lsn, '0/0'),
			coalesce((SELECT min(restart_lsn) FROM pg_catalog.pg_replication_slots
			          WHERE slot_name = ANY($2) AND slot_type = 'physical'), '0/0'),
			ARRAY(SELECT n FROM unnest($2::text[]) n WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_replication_slots s
			      WHERE s.slot_name = n AND s.slot_type = 'physical' AND s.restart_lsn IS NOT NULL))
		FROM (SELECT 1) x LEFT JOIN pg_catalog.pg_replication_origin_status o ON o.external_id = $1`,
		w.origin, w.slots).Scan(&at.remote, &at.local, &standby, &missing)
	if len(missing) > 0 {
		standby = 0 // a standby with no position has nothing
	}
	return at, standby, missing, err
}

func (w *standbyWatch) close() {
	if w != nil && w.conn != nil {
		w.conn.Close(context.Background())
		w.conn = nil
	}
}
