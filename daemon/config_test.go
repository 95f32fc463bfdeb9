package daemon

import (
	"strings"
	"testing"

	"github.com/pgmesh/pgmesh/membership"
)

// A minimal config gets every default, and public_dsn without the password.
func TestNormalizeFillsDefaults(t *testing.T) {
	c := Config{NodeName: "paris", DSN: "host=127.0.0.1 user=pgmesh password=secret dbname=app"}
	if err := c.Normalize(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(c.PublicDSN, "secret") || !strings.Contains(c.PublicDSN, "dbname=app") {
		t.Errorf("public_dsn %q", c.PublicDSN)
	}
	if c.ListenAPI != DefaultListenAPI || c.AdvertiseAPI != DefaultListenAPI || c.ListenRaft != DefaultListenRaft || c.AdvertiseRaft != DefaultListenRaft {
		t.Errorf("addresses %s %s %s %s", c.ListenAPI, c.AdvertiseAPI, c.ListenRaft, c.AdvertiseRaft)
	}
	if c.DataDir != DefaultDataDir || c.RaftTiming != membership.WAN || c.ConflictRetention != DefaultConflictRetention ||
		c.HousekeepingInterval != DefaultHousekeepingInterval || c.HealthMaxLag != DefaultHealthMaxLag ||
		c.WALRetentionWarn != DefaultWALRetentionWarn || c.MaxClockSkew != DefaultMaxClockSkew {
		t.Errorf("defaults not filled: %+v", c)
	}
}

// Every mistake is named, one sentence each, in the order of the config.
func TestNormalizeNamesEveryMistake(t *testing.T) {
	c := Config{NodeName: "Paris!", DSN: "host=a", PublicDSN: "host=a password=x", ListenAPI: "nowhere", ListenRaft: "nowhere",
		StandbySlots: []string{"Bad-Slot"}, PeerDSNs: map[string]string{"B": "host=b"}, PeerAPIAddrs: map[string]string{"b": "b"},
		WALRetentionWarn: 2 << 30, WALRetentionMax: 1 << 30, LUWResolution: -1, HousekeepingInterval: -1}
	err := c.Normalize()
	if err == nil {
		t.Fatal("no error")
	}
	want := []string{"node_name \"Paris!\" is not valid", "public_dsn contains a password", "listen_api \"nowhere\" is not a host:port",
		"listen_api and listen_raft are both nowhere", "standby_slots names \"Bad-Slot\"", "peer_dsns names \"B\"",
		"peer_api_addrs entry for \"b\"", "wal_retention_max", "luw_resolution -1ns is out of range", "must be positive durations"}
	got := err.Error()
	at := 0
	for _, w := range want {
		i := strings.Index(got[at:], w)
		if i < 0 {
			t.Fatalf("missing or out of order: %q in\n%s", w, got)
		}
		at += i + len(w)
	}
}
