package daemon

import (
	"strconv"
	"strings"
	"testing"
)

// Each server a multi-host dsn names is looked at on its own, once, and
// without the check that would refuse a standby.
func TestOtherServers(t *testing.T) {
	one, err := otherServers("postgres://pgmesh@db1:5432/app")
	if err != nil || len(one) != 0 {
		t.Fatalf("a single server: %d configs, %v", len(one), err)
	}
	// sslmode=prefer makes pgconn try each host with and without TLS.
	servers, err := otherServers("host=db1,db2 port=5432,5433 dbname=app user=pgmesh sslmode=prefer target_session_attrs=read-write")
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range servers {
		if s.ValidateConnect != nil {
			t.Errorf("%s:%d keeps the read-write check", s.Host, s.Port)
		}
		if len(s.Fallbacks) != 1 {
			t.Errorf("%s:%d has %d fallbacks, want its variant without TLS", s.Host, s.Port, len(s.Fallbacks))
		}
		for _, f := range s.Fallbacks {
			if f.Host != s.Host || f.Port != s.Port {
				t.Errorf("%s:%d falls back to another server, %s:%d", s.Host, s.Port, f.Host, f.Port)
			}
		}
		if s.RuntimeParams["application_name"] != "pgmesh standby check" {
			t.Errorf("%s:%d: application_name %q", s.Host, s.Port, s.RuntimeParams["application_name"])
		}
		got = append(got, s.Host+":"+strconv.Itoa(int(s.Port)))
	}
	if len(got) != 2 || got[0] != "db1:5432" || got[1] != "db2:5433" {
		t.Fatalf("servers %v, want [db1:5432 db2:5433]", got)
	}
}

// The primary's settings for a failover are checked on 17+ only, where
// peers' slots can follow a promotion; each problem names its fix.
func TestCheckStandbySettings(t *testing.T) {
	d := &standbyWatch{slots: []string{"pg_a2", "pg_a3"}}
	if got := d.checkStandbySettings(primaryView{version: 160004, notFailover: []string{"pgmesh_b"}}); got != nil {
		t.Fatalf("on 16: %q", got)
	}
	got := d.checkStandbySettings(primaryView{version: 170002, synchronized: []string{"pg_a2"}, notFailover: []string{"pgmesh_b"}})
	if len(got) != 2 || !strings.Contains(got[0], "standby slots pg_a3 are not in synchronized_standby_slots") ||
		!strings.Contains(got[0], "synchronized_standby_slots = 'pg_a2,pg_a3'") || !strings.Contains(got[1], "slots pgmesh_b are not failover slots") {
		t.Fatalf("problems %q", got)
	}
	if got := d.checkStandbySettings(primaryView{version: 170002, synchronized: []string{"pg_a3", "pg_a2"}}); got != nil {
		t.Fatalf("all set: %q", got)
	}
}
