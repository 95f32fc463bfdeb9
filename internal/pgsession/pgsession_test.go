package pgsession

import (
	"reflect"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// A read-only session on a connection string that asks for a read-write
// server checks for the primary instead: the read-write check would refuse
// every server, as the session's own setting makes it read-only.
func TestReadOnlySessionFindsThePrimary(t *testing.T) {
	const dsn = "host=a,b user=u dbname=d target_session_attrs=read-write"
	is := func(got, want pgconn.ValidateConnectFunc) bool {
		return reflect.ValueOf(got).Pointer() == reflect.ValueOf(want).Pointer()
	}
	ro, err := Config(dsn, "t", Settings{"default_transaction_read_only": "on"})
	if err != nil {
		t.Fatal(err)
	}
	if !is(ro.ValidateConnect, pgconn.ValidateConnectTargetSessionAttrsPrimary) {
		t.Fatal("a read-only session on target_session_attrs=read-write does not look for the primary")
	}
	rw, err := Config(dsn, "t", Writer)
	if err != nil {
		t.Fatal(err)
	}
	if !is(rw.ValidateConnect, pgconn.ValidateConnectTargetSessionAttrsReadWrite) {
		t.Fatal("a writing session lost target_session_attrs=read-write")
	}
	plain, err := Config("host=a user=u dbname=d", "t", Settings{"default_transaction_read_only": "on"})
	if err != nil {
		t.Fatal(err)
	}
	if plain.ValidateConnect != nil {
		t.Fatal("a connection string without target_session_attrs gained a check")
	}
}
