package replicator

import (
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
)

// Status is one stream's progress as shown by `pgmesh status`.
type Status struct {
	Peer      string `json:"peer"`
	Connected bool   `json:"connected"`
	// AppliedLSN is the peer's WAL position up to which everything is
	// applied here (or was not for this node).
	AppliedLSN string `json:"applied_lsn"`
	// LastCommitTS is the origin commit time of the last applied transaction.
	LastCommitTS *time.Time `json:"last_applied_commit_ts,omitempty"`
	PeerWALLSN   string     `json:"peer_wal_lsn,omitempty"`
	LagBytes     int64      `json:"lag_bytes"`
	// LagSeconds is how long the oldest change not yet applied here has
	// been committed on the peer (to within a second); 0 when caught up.
	LagSeconds  float64    `json:"lag_seconds"`
	AppliedTxns int64      `json:"applied_txns"`
	AppliedRows int64      `json:"applied_rows"`
	DroppedTxns int64      `json:"forwarded_txns_dropped"`
	Conflicts   int64      `json:"conflicts"`
	LastError   string     `json:"last_error,omitempty"`
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

type sample struct {
	at  time.Time
	lsn pglogrepl.LSN
}

type stats struct {
	mu         sync.Mutex
	st         Status
	appliedLSN pglogrepl.LSN
	samples    []sample // peer WAL positions not yet applied here, oldest first
}

func newStats(peer string) *stats { return &stats{st: Status{Peer: peer}} }

func (s *stats) setConnected(c bool) {
	s.mu.Lock()
	s.st.Connected = c
	if c {
		s.st.LastError, s.st.LastErrorAt = "", nil
	}
	s.mu.Unlock()
}

func (s *stats) setError(err error) {
	s.mu.Lock()
	now := time.Now()
	s.st.LastError, s.st.LastErrorAt = err.Error(), &now
	s.mu.Unlock()
}

func (s *stats) setApplied(lsn pglogrepl.LSN) {
	s.mu.Lock()
	if lsn > s.appliedLSN {
		s.appliedLSN = lsn
	}
	s.mu.Unlock()
}

func (s *stats) applied(end pglogrepl.LSN, commitTS time.Time, rows, conflicts int64) {
	s.mu.Lock()
	s.st.AppliedTxns++
	s.st.AppliedRows += rows
	s.st.Conflicts += conflicts
	ts := commitTS
	s.st.LastCommitTS = &ts
	if end > s.appliedLSN {
		s.appliedLSN = end
	}
	s.mu.Unlock()
}

func (s *stats) skipped(forwarded bool) {
	if !forwarded {
		return
	}
	s.mu.Lock()
	s.st.DroppedTxns++
	s.mu.Unlock()
}

func (s *stats) sample(at time.Time, peerWAL pglogrepl.LSN) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.st.PeerWALLSN = peerWAL.String()
	if n := len(s.samples); n == 0 || s.samples[n-1].lsn < peerWAL {
		if n >= 3600 {
			s.samples = append(s.samples[:0], s.samples[n/2:]...)
		}
		s.samples = append(s.samples, sample{at, peerWAL})
	}
}

func (s *stats) snapshot() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Samples at or below the applied position are history.
	i := 0
	for i < len(s.samples) && s.samples[i].lsn <= s.appliedLSN {
		i++
	}
	s.samples = s.samples[i:]
	st := s.st
	st.AppliedLSN = s.appliedLSN.String()
	st.LagBytes, st.LagSeconds = 0, 0
	if len(s.samples) > 0 {
		last := s.samples[len(s.samples)-1]
		st.LagBytes = int64(last.lsn - s.appliedLSN)
		st.LagSeconds = time.Since(s.samples[0].at).Seconds()
	}
	return st
}
