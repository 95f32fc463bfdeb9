package replicator

import (
	"maps"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pglogrepl"
)

// Status is one stream's progress as shown by `pgmesh status`.
type Status struct {
	Peer      string `json:"peer"`
	Connected bool   `json:"connected"`
	// PeerVersion is the peer's PostgreSQL major version, and ProtoVersion
	// the pgoutput protocol version streamed in, once connected.
	PeerVersion  int `json:"peer_version,omitempty"`
	ProtoVersion int `json:"proto_version,omitempty"`
	// ReceivedBytes counts the change data received from the peer (on
	// PostgreSQL 15 it includes the transactions the peer applied from
	// others, which are dropped here; 16+ filters them at the sender).
	ReceivedBytes int64 `json:"received_bytes"`
	// AppliedLSN is the peer's WAL position up to which everything is
	// applied here (or was not for this node).
	AppliedLSN string `json:"applied_lsn"`
	// LastCommitTS is the origin commit time of the last applied transaction.
	LastCommitTS *time.Time `json:"last_applied_commit_ts,omitempty"`
	PeerWALLSN   string     `json:"peer_wal_lsn,omitempty"`
	LagBytes     int64      `json:"lag_bytes"`
	// LagSeconds is how long the oldest change not yet applied here has
	// been committed on the peer (to within a second); 0 when caught up.
	LagSeconds  float64 `json:"lag_seconds"`
	AppliedTxns int64   `json:"applied_txns"`
	AppliedRows int64   `json:"applied_rows"`
	// LocalCommits counts the local transactions that applied them:
	// consecutive peer transactions of the same rounded commit time share
	// one (grouped commits), so during a catch-up it grows more slowly
	// than AppliedTxns.
	LocalCommits int64 `json:"local_commits"`
	// Statements counts the statements that applied those local commits
	// on the fast and bulk paths (besides each one's commit), and
	// CollapsedCommits the local commits applied set-based: each table
	// with a few statements over arrays, however many changes the group
	// held (see replicator/collapse.go).
	Statements       int64 `json:"statements"`
	CollapsedCommits int64 `json:"collapsed_commits"`
	DroppedTxns      int64 `json:"forwarded_txns_dropped"`
	// RetriedTxns counts transactions that left the pipelined fast path
	// (a conflict, or an earlier one in the same batch did) and were
	// applied again on the careful path.
	RetriedTxns int64 `json:"retried_txns"`
	Conflicts   int64 `json:"conflicts"`
	// ConflictsByType counts conflicts by conflict_history type.
	ConflictsByType map[string]int64 `json:"conflicts_by_type,omitempty"`
	// AppliedThrough is the peer commit time up to which every peer
	// transaction has been applied here (from the last applied commit, or
	// the peer's clock when it reported nothing pending).
	AppliedThrough *time.Time `json:"applied_through,omitempty"`
	// Errors counts the times the stream stopped on an error.
	Errors int64 `json:"errors"`
	// DisconnectedSince is when the stream last lost its connection.
	DisconnectedSince *time.Time `json:"disconnected_since,omitempty"`
	// ConflictsByResolution counts conflicts by "type/resolution".
	ConflictsByResolution map[string]int64 `json:"conflicts_by_resolution,omitempty"`
	LastError             string           `json:"last_error,omitempty"`
	LastErrorAt           *time.Time       `json:"last_error_at,omitempty"`
	// ClockSkew is how far the peer's Postgres clock is ahead of this
	// node's (negative: behind), in seconds, sampled every second; nil
	// until measured.
	ClockSkew *float64 `json:"clock_skew_seconds,omitempty"`
	// ClockWarning is set while the peer's clock is ahead by more than
	// max_clock_skew: one sentence naming the peer, the amount and the fix.
	ClockWarning string `json:"clock_warning,omitempty"`
	// ClockWaits counts local commits that had to wait for this node's
	// clock to pass the peer's commit time (the causality guard).
	ClockWaits int64 `json:"clock_waits"`
	// HeldForStandbys says why changes applied here are not all confirmed
	// to the peer yet (standby_slots); empty when none are held.
	HeldForStandbys string `json:"held_for_standbys,omitempty"`
}

// sample is the peer's WAL position at a moment, by our clock (for lag)
// and by the peer's (for AppliedThrough).
type sample struct {
	at, peerAt time.Time
	lsn        pglogrepl.LSN
}

type stats struct {
	mu         sync.Mutex
	st         Status
	appliedLSN pglogrepl.LSN
	// lastCommitTS is Status.LastCommitTS, kept as a value.
	lastCommitTS time.Time
	samples      []sample // peer WAL positions not yet applied here, oldest first
	// localOffset is the local Postgres clock minus the daemon's.
	localOffset   time.Duration
	receivedBytes atomic.Int64
}

func newStats(peer string) *stats { return &stats{st: Status{Peer: peer}} }

// setVersions records the peer's major version and the protocol streamed.
func (s *stats) setVersions(major, proto int) {
	s.mu.Lock()
	s.st.PeerVersion, s.st.ProtoVersion = major, proto
	s.mu.Unlock()
}

func (s *stats) setConnected(c bool) {
	s.mu.Lock()
	if c {
		s.st.LastError, s.st.LastErrorAt, s.st.DisconnectedSince = "", nil, nil
	} else if s.st.Connected || s.st.DisconnectedSince == nil {
		now := time.Now()
		s.st.DisconnectedSince = &now
	}
	s.st.Connected = c
	s.mu.Unlock()
}

func (s *stats) setError(err error) {
	s.mu.Lock()
	now := time.Now()
	s.st.LastError, s.st.LastErrorAt = err.Error(), &now
	s.st.Errors++
	s.mu.Unlock()
}

func (s *stats) setHeld(why string) {
	s.mu.Lock()
	s.st.HeldForStandbys = why
	s.mu.Unlock()
}

func (s *stats) setApplied(lsn pglogrepl.LSN) {
	s.mu.Lock()
	if lsn > s.appliedLSN {
		s.appliedLSN = lsn
	}
	s.prune()
	s.mu.Unlock()
}

// prune drops samples the applied position has passed: everything the peer
// had written when it took them is applied here.
func (s *stats) prune() {
	i := 0
	for i < len(s.samples) && s.samples[i].lsn <= s.appliedLSN {
		s.through(s.samples[i].peerAt)
		i++
	}
	s.samples = s.samples[i:]
}

func (s *stats) applied(end pglogrepl.LSN, commitTS time.Time, rows int64, conflicts map[string]int64) {
	s.mu.Lock()
	s.st.AppliedTxns++
	s.st.AppliedRows += rows
	for kind, n := range conflicts {
		if s.st.ConflictsByType == nil {
			s.st.ConflictsByType, s.st.ConflictsByResolution = map[string]int64{}, map[string]int64{}
		}
		typ, _, _ := strings.Cut(kind, "/")
		s.st.ConflictsByType[typ] += n
		s.st.ConflictsByResolution[kind] += n
		s.st.Conflicts += n
	}
	s.lastCommitTS = commitTS // a pointer only in snapshots: this runs per transaction
	s.through(commitTS)
	if end > s.appliedLSN {
		s.appliedLSN = end
	}
	s.prune()
	s.mu.Unlock()
}

// received counts change data received from the peer (an atomic: it is
// called for every message).
func (s *stats) received(n int) { s.receivedBytes.Add(int64(n)) }

// committedGroup counts one local commit of peer transactions, applied by
// stmts statements, set-based when collapsed.
func (s *stats) committedGroup(stmts int, collapsed bool) {
	s.mu.Lock()
	s.st.LocalCommits++
	s.st.Statements += int64(stmts)
	if collapsed {
		s.st.CollapsedCommits++
	}
	s.mu.Unlock()
}

// clockAhead counts a commit whose guard time at (visibleAfter) is ahead of
// the local Postgres clock (as last measured), so the causality guard waits
// for it.
func (s *stats) clockAhead(at time.Time) {
	s.mu.Lock()
	if at.After(time.Now().Add(s.localOffset)) {
		s.st.ClockWaits++
	}
	s.mu.Unlock()
}

// setClocks records the measured offsets and the skew between the two
// Postgres clocks, and the warning for it (empty when within bounds). It
// reports whether the warning changed.
func (s *stats) setClocks(localOffset, skew time.Duration, warning string) (changed bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.localOffset = localOffset
	sec := skew.Seconds()
	s.st.ClockSkew = &sec
	changed = s.st.ClockWarning != warning
	s.st.ClockWarning = warning
	return changed
}

func (s *stats) fallback(n int) {
	s.mu.Lock()
	s.st.RetriedTxns += int64(n)
	s.mu.Unlock()
}

func (s *stats) skipped(forwarded bool, commitTS time.Time) {
	s.mu.Lock()
	if forwarded {
		s.st.DroppedTxns++
	}
	s.through(commitTS)
	s.mu.Unlock()
}

func (s *stats) through(t time.Time) {
	if s.st.AppliedThrough == nil || t.After(*s.st.AppliedThrough) {
		s.st.AppliedThrough = &t
	}
}

func (s *stats) sample(at, peerAt time.Time, peerWAL pglogrepl.LSN) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.PeerWALLSN = peerWAL.String()
	if n := len(s.samples); n == 0 || s.samples[n-1].lsn < peerWAL {
		if n >= 3600 {
			// Keep the oldest (it dates the lag) and the newest half.
			s.samples = append(s.samples[:1], s.samples[n/2:]...)
		}
		s.samples = append(s.samples, sample{at, peerAt, peerWAL})
	} else {
		// Nothing new on the peer since the last sample: date it anew so
		// AppliedThrough moves on while the peer is idle.
		s.samples[n-1].peerAt = peerAt
	}
	s.prune()
}

func (s *stats) snapshot() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.ConflictsByType = maps.Clone(s.st.ConflictsByType)
	st.ConflictsByResolution = maps.Clone(s.st.ConflictsByResolution)
	if s.st.ClockSkew != nil {
		sec := *s.st.ClockSkew
		st.ClockSkew = &sec
	}
	if !s.lastCommitTS.IsZero() {
		ts := s.lastCommitTS
		st.LastCommitTS = &ts
	}
	st.AppliedLSN = s.appliedLSN.String()
	st.ReceivedBytes = s.receivedBytes.Load()
	st.LagBytes, st.LagSeconds = 0, 0
	if len(s.samples) > 0 {
		last := s.samples[len(s.samples)-1]
		st.LagBytes = int64(last.lsn - s.appliedLSN)
		st.LagSeconds = time.Since(s.samples[0].at).Seconds()
	}
	return st
}
