package membership

import (
	"testing"

	"github.com/hashicorp/raft"
)

func TestParseTiming(t *testing.T) {
	for in, want := range map[string]Timing{"": WAN, "wan": WAN, "LAN": LAN, " lan ": LAN, "1": 1, "7": 7, "10": 10} {
		got, err := ParseTiming(in)
		if err != nil || got != want {
			t.Errorf("ParseTiming(%q) = %v, %v; want %v", in, got, err, want)
		}
	}
	for _, in := range []string{"0", "11", "-1", "fast", "2.5", "5s"} {
		if _, err := ParseTiming(in); err == nil {
			t.Errorf("ParseTiming(%q) accepted it", in)
		}
	}
}

// Every timing keeps hashicorp/raft's rules and the one the lease is sized
// by: a leader hears from a healthy member within the lease even over the
// longest round trip the timing is made for.
func TestTimingsFitTheirRoundTrips(t *testing.T) {
	for tm := Timing(1); tm <= maxTiming; tm++ {
		rc := tm.raftConfig()
		rc.LocalID = "n"
		if err := raft.ValidateConfig(rc); err != nil {
			t.Errorf("timing %v: raft refuses its configuration: %v", tm, err)
		}
		rtt, lease := tm.MaxRoundTrip(), rc.LeaderLeaseTimeout
		// A heartbeat on a new TLS connection: TCP, the handshake, the request.
		if 3*rtt > lease {
			t.Errorf("timing %v: three round trips of %s do not fit the %s lease", tm, rtt, lease)
		}
		// Two heartbeats back to back, with Raft's pause between them (up to
		// a fifth of the heartbeat timeout).
		if 2*rtt+rc.HeartbeatTimeout/5 > lease {
			t.Errorf("timing %v: two round trips of %s and a heartbeat pause do not fit the %s lease", tm, rtt, lease)
		}
		// The last follower notices within three heartbeat timeouts, a
		// refused or split round costs up to two election timeouts, and the
		// pre-vote and the vote one round trip each.
		if tm.Failover() < 3*rc.HeartbeatTimeout+2*rc.ElectionTimeout+2*rtt {
			t.Errorf("timing %v: documented failover %s is shorter than Raft can take", tm, tm.Failover())
		}
	}
	if WAN.MaxRoundTrip() < 500_000_000 {
		t.Errorf("the default timing is made for round trips up to %s; the BDR guide has 445 ms", WAN.MaxRoundTrip())
	}
}
