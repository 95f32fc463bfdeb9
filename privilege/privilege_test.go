//go:build integration

package privilege_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
	"github.com/pgmesh/pgmesh/privilege"
	pgsql "github.com/pgmesh/pgmesh/sql"
)

// missing is what a fresh connection as role pgmesh lacks: of the role's
// own privileges, and once the schema is installed of the owners'.
func missing(t *testing.T, ctx context.Context, pg *pgtest.Cluster) []privilege.Missing {
	t.Helper()
	conn, err := pgx.Connect(ctx, pg.RoleDSN("pgmesh", "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	role, err := privilege.CheckRole(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	var installed bool
	if err := conn.QueryRow(ctx, `SELECT to_regclass('pgmesh.user_tables') IS NOT NULL`).Scan(&installed); err != nil || !installed {
		return role
	}
	owners, err := privilege.CheckOwners(ctx, conn)
	if err != nil {
		t.Fatal(err)
	}
	return append(role, owners...)
}

// What `pgmesh grants` prints is enough: with it, nothing is missing, the
// schema installs without a superuser and the application's role can
// write its tables. Taking any one privilege away makes the check name it,
// with a statement that gives it back.
func TestEachPrivilegeIsNamed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Remove()
	admin, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	exec := func(sql string) {
		t.Helper()
		if _, err := admin.Exec(ctx, sql); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}
	exec(`CREATE ROLE app_owner LOGIN; ALTER DATABASE postgres OWNER TO app_owner`)
	script, err := privilege.Script("pgmesh", []string{"app_owner"}, true)
	if err != nil {
		t.Fatal(err)
	}
	exec(script)
	if m := missing(t, ctx, pg); len(m) != 0 {
		t.Fatalf("with the grants script run, still missing: %v", m)
	}
	conn, err := pgx.Connect(ctx, pg.RoleDSN("pgmesh", "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := pgsql.Install(ctx, conn); err != nil {
		t.Fatalf("install the schema as pgmesh: %v", err)
	}
	conn.Close(ctx)
	exec(`SET ROLE app_owner; CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1); RESET ROLE`)
	if m := missing(t, ctx, pg); len(m) != 0 {
		t.Fatalf("with the schema installed, missing: %v", m)
	}
	var triggers int
	if err := admin.QueryRow(ctx, `SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'pgmesh%'`).Scan(&triggers); err != nil || triggers != 0 {
		t.Fatalf("a role that is not a superuser made %d event triggers (%v)", triggers, err)
	}

	type revocation struct {
		name, revoke, want string
	}
	cases := []revocation{
		{"replication", `ALTER ROLE pgmesh NOREPLICATION`, `ALTER ROLE "pgmesh" REPLICATION;`},
		// The database's owner may create in it too: both lose it.
		{"create", `REVOKE CREATE ON DATABASE postgres FROM pgmesh, app_owner`, `GRANT CREATE ON DATABASE "postgres" TO "pgmesh";`},
		{"session_replication_role", `REVOKE SET ON PARAMETER session_replication_role FROM pgmesh`, `GRANT SET ON PARAMETER session_replication_role TO "pgmesh";`},
		{"origin status", `REVOKE SELECT ON pg_replication_origin_status FROM pgmesh`, `GRANT SELECT ON pg_catalog.pg_replication_origin_status TO "pgmesh";`},
		{"owner", `REVOKE app_owner FROM pgmesh`, `GRANT "app_owner" TO "pgmesh";`},
	}
	for _, f := range privilege.OriginFunctions {
		cases = append(cases, revocation{f, fmt.Sprintf(`DO $$ DECLARE f regprocedure; BEGIN
			FOR f IN SELECT oid FROM pg_proc WHERE proname = '%s' LOOP
				EXECUTE format('REVOKE EXECUTE ON FUNCTION %%s FROM pgmesh', f);
			END LOOP; END $$`, f), "GRANT EXECUTE ON FUNCTION pg_catalog." + f + "("})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			exec(c.revoke)
			m := missing(t, ctx, pg)
			if len(m) != 1 || !strings.Contains(m[0].Error(), c.want) || !strings.HasPrefix(m[0].Error(), `role "pgmesh" is not a superuser and lacks `) {
				t.Fatalf("after %s, missing %q; want one line with %q", c.revoke, m, c.want)
			}
			// The statement named gives it back.
			exec(m[0].Grant)
			if m := missing(t, ctx, pg); len(m) != 0 {
				t.Fatalf("after running %q, still missing %v", m[0].Grant, m)
			}
			if c.name == "create" {
				exec(`GRANT CREATE ON DATABASE postgres TO app_owner`)
			}
		})
	}

	// Objects a superuser owns cannot be shared by membership: the fix is
	// to give them to the application's role.
	exec(`CREATE TABLE super_owned (id int PRIMARY KEY)`)
	m := missing(t, ctx, pg)
	if len(m) != 1 || !strings.Contains(m[0].Error(), `ownership of table public.super_owned`) || !strings.Contains(m[0].Error(), "OWNER TO") {
		t.Fatalf("a table owned by a superuser: missing %q", m)
	}
	exec(`ALTER TABLE super_owned OWNER TO app_owner`)
	if m := missing(t, ctx, pg); len(m) != 0 {
		t.Fatalf("after giving the table to app_owner, missing %v", m)
	}
}
