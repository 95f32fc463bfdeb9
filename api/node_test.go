package api

import (
	"encoding/json"
	"reflect"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/membership"
)

// The API's Node shows every field of the Raft state's, under the same JSON
// names, and converting there and back loses nothing: a field added to
// membership.Node fails here until the API carries it (or says why not).
func TestNodeCarriesEveryMemberField(t *testing.T) {
	m := &membership.Node{Name: "tokyo", ID: 3, DSN: "postgres://tokyo/db", API: "tokyo:7400", Raft: "tokyo:7401",
		State: membership.Active, JoinedAt: time.Date(2026, 12, 1, 4, 0, 0, 0, time.UTC), LUWResolution: "10ms"}
	if n := reflect.TypeOf(*m).NumField(); n != reflect.TypeOf(Node{}).NumField() {
		t.Fatalf("membership.Node has %d fields, api.Node %d", n, reflect.TypeOf(Node{}).NumField())
	}
	want, _ := json.Marshal(m)
	got, _ := json.Marshal(NodeOf(m))
	if string(got) != string(want) {
		t.Fatalf("api.Node JSON\n%s\nmembership.Node JSON\n%s", got, want)
	}
	if back := NodeOf(m).Member(); !reflect.DeepEqual(back, m) {
		t.Fatalf("round trip gave %+v, want %+v", back, m)
	}
	if NodeOf(nil) != nil {
		t.Fatal("NodeOf(nil) is not nil")
	}
}
