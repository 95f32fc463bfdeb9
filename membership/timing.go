package membership

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/hashicorp/raft"
)

// Timing scales Raft's timeouts to the round trips between members, as
// Consul's raft_multiplier does: 1 (lan) suits members within a data centre
// or a continent, 5 (wan, the default) round trips of up to 750 ms, such as
// Sydney to Dubai (445 ms). A larger value only makes the group slower to
// notice a lost leader; replication never waits for Raft.
//
// A leader steps down when it has not heard from a quorum within its lease,
// so the lease must outlast the slowest exchange on a healthy link: a
// heartbeat on a new connection (TCP, TLS and the request: three round
// trips), or two heartbeats back to back on a pooled one (two round trips
// and the pause between them, a tenth to a fifth of the heartbeat timeout).
// hashicorp/raft wants lease <= heartbeat timeout <= election timeout; all
// three are one value here, which gives the lease the most room.
type Timing int

const (
	// LAN is for members with round trips below about 100 ms.
	LAN Timing = 1
	// WAN is the default: round trips up to about a second.
	WAN Timing = 5
	// maxTiming bounds the multiplier: beyond it a lost leader would go
	// unnoticed for over a minute.
	maxTiming = 10
)

// unit is each timeout at a multiplier of 1, and unitRoundTrip the longest
// round trip that multiplier is made for: three of them, and two plus a
// fifth of the unit, both fit in the unit.
const (
	unit          = 500 * time.Millisecond
	unitRoundTrip = 150 * time.Millisecond
)

// ParseTiming reads raft_timing: lan, wan or a multiplier from 1 to 10;
// empty is the default (wan).
func ParseTiming(v string) (Timing, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "":
		return WAN, nil
	case "lan":
		return LAN, nil
	case "wan":
		return WAN, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 || n > maxTiming {
		return 0, fmt.Errorf("raft_timing %q is not lan, wan or a whole number from 1 to %d: use lan within a continent, wan (the default) across continents", v, maxTiming)
	}
	return Timing(n), nil
}

func (t Timing) String() string {
	switch t {
	case LAN:
		return "lan"
	case WAN:
		return "wan"
	}
	return strconv.Itoa(int(t))
}

// Timeout is Raft's heartbeat timeout, election timeout and leader lease:
// how long a follower goes without hearing from the leader before it
// starts an election (Raft waits one to two times this), how long an
// election round lasts, and how long a leader goes without hearing from a
// quorum before it steps down.
func (t Timing) Timeout() time.Duration { return time.Duration(t) * unit }

// MaxRoundTrip is the longest round trip between two members this setting
// is made for.
func (t Timing) MaxRoundTrip() time.Duration { return time.Duration(t) * unitRoundTrip }

// Failover is about the longest Raft goes without a leader after the
// leader's region vanishes. A follower checks for the leader's heartbeat
// at random intervals of one to two timeouts, so the last survivor notices
// within three; until it does, it refuses to vote, and a candidate refused
// (or tied with another) waits one to two more timeouts before it tries
// again; the vote itself takes a pre-vote and a vote round trip. Measured
// at the guide's latencies (TestLeaderLossAcrossContinents, four members,
// 150 losses): half within 2.6 timeouts, 99% within 4.7, all within 5.4.
// A process starved of CPU adds its wait: in CI, with the system tests
// keeping both cores busy, one loss took 6.2 timeouts at wan (15.6 s), so
// the bound leaves room for that. Joins, parts, DDL locks and sequence
// chunks wait that long; replication does not wait at all.
func (t Timing) Failover() time.Duration { return 8 * t.Timeout() }

// snapshotThreshold is how many entries since the last snapshot make the
// next one (checked every SnapshotInterval, two minutes by default).
const snapshotThreshold = 64

// raftConfig is Raft's configuration at this timing.
func (t Timing) raftConfig() *raft.Config {
	rc := raft.DefaultConfig()
	rc.HeartbeatTimeout = t.Timeout()
	rc.ElectionTimeout = t.Timeout()
	rc.LeaderLeaseTimeout = t.Timeout()
	rc.CommitTimeout = idleCommitTimeout
	// A restarted member has the state of its last snapshot at once, and
	// the rest only once a leader commits its log, which needs a majority:
	// its streams run from that state meanwhile. The state is a few
	// kilobytes, so it is snapshotted after every few dozen entries (each
	// write's barrier is one), not Raft's default 8,192.
	rc.SnapshotThreshold = snapshotThreshold
	return rc
}
