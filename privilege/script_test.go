package privilege_test

import (
	"strings"
	"testing"

	"github.com/pgmesh/pgmesh/privilege"
)

// The script names the role and every owner, quoted, and refuses what
// cannot be granted.
func TestScript(t *testing.T) {
	s, err := privilege.Script(`Mesh "role"`, []string{"app owner", "b"}, false)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`ALTER ROLE "Mesh ""role""" REPLICATION;`, `GRANT "app owner" TO "Mesh ""role""";`, `GRANT "b" TO "Mesh ""role""";`,
		`current_database(), 'Mesh "role"')`, "pg_replication_origin_xact_setup"} {
		if !strings.Contains(s, want) {
			t.Errorf("script lacks %q:\n%s", want, s)
		}
	}
	if strings.Contains(s, "CREATE ROLE") {
		t.Errorf("script creates the role unasked:\n%s", s)
	}
	if _, err := privilege.Script("", nil, false); err == nil {
		t.Error("a script for no role")
	}
	if _, err := privilege.Script("x", []string{""}, false); err == nil {
		t.Error("a script granting an empty owner")
	}
}
