// Package privilege owns what pgmesh's database role needs when it is not a
// superuser: the list of privileges, how each is checked on a server, and
// the statement an administrator runs to grant it. The daemon's preflight
// and `pgmesh grants` both read it, so the two cannot disagree
// (docs/managed-postgres.md explains each one).
package privilege

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// OriginFunctions are the replication origin functions pgmesh calls: apply
// binds each peer's stream to an origin and commits its progress with the
// data; join and part create, advance and drop origins. PostgreSQL lets only
// superusers run them until they are granted. The last one is what the view
// pg_replication_origin_status calls, with the reader's privileges.
var OriginFunctions = []string{
	"pg_replication_origin_create",
	"pg_replication_origin_drop",
	"pg_replication_origin_session_setup",
	"pg_replication_origin_session_reset",
	"pg_replication_origin_session_progress",
	"pg_replication_origin_xact_setup",
	"pg_replication_origin_advance",
	"pg_replication_origin_progress",
	"pg_show_replication_origin_status",
}

// Missing is one privilege the role lacks, with the statement that grants it.
type Missing struct {
	Role  string // the role that lacks it
	What  string // the privilege, e.g. "the REPLICATION attribute"
	Why   string // what pgmesh does with it
	Grant string // the SQL an administrator runs, or the fix in words
}

func (m Missing) Error() string {
	return fmt.Sprintf("role %s is not a superuser and lacks %s (%s): %s", m.Role, m.What, m.Why, m.Grant)
}

// Superuser reports whether conn's role is a superuser, which needs none of
// what this package checks.
func Superuser(ctx context.Context, conn *pgx.Conn) (bool, error) {
	var super bool
	err := conn.QueryRow(ctx, `SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user`).Scan(&super)
	if err != nil {
		return false, fmt.Errorf("read the role's attributes: %w", err)
	}
	return super, nil
}

// CheckRole returns what conn's role lacks of the privileges held by the
// role itself: those needed before the pgmesh schema can be installed. A
// superuser lacks nothing.
func CheckRole(ctx context.Context, conn *pgx.Conn) ([]Missing, error) {
	var (
		user, db                      string
		super, repl, create, setParam bool
	)
	err := conn.QueryRow(ctx, `SELECT current_user, current_database(), r.rolsuper, r.rolreplication,
		has_database_privilege(current_database(), 'CREATE'),
		has_parameter_privilege('session_replication_role', 'SET')
		FROM pg_catalog.pg_roles r WHERE r.rolname = current_user`).Scan(&user, &db, &super, &repl, &create, &setParam)
	if err != nil {
		return nil, fmt.Errorf("read the role's privileges: %w", err)
	}
	if super {
		return nil, nil
	}
	role := pgquote.Ident(user)
	var out []Missing
	if !repl {
		out = append(out, Missing{What: "the REPLICATION attribute", Why: "replication slots and streams to peers",
			Grant: "ALTER ROLE " + role + " REPLICATION;"})
	}
	if !create {
		out = append(out, Missing{What: "CREATE on database " + pgquote.Ident(db), Why: "the pgmesh schema and the publications",
			Grant: "GRANT CREATE ON DATABASE " + pgquote.Ident(db) + " TO " + role + ";"})
	}
	if !setParam {
		out = append(out, Missing{What: "SET on session_replication_role", Why: "applied changes must not fire the tables' own triggers",
			Grant: "GRANT SET ON PARAMETER session_replication_role TO " + role + ";"})
	}
	rows, err := conn.Query(ctx, `SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
		WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname = ANY ($1)
		  AND NOT has_function_privilege(p.oid, 'EXECUTE') ORDER BY 1`, OriginFunctions)
	if err != nil {
		return nil, fmt.Errorf("read the role's privileges on replication origins: %w", err)
	}
	funcs, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return nil, fmt.Errorf("read the role's privileges on replication origins: %w", err)
	}
	for _, f := range funcs {
		out = append(out, Missing{What: "EXECUTE on " + f, Why: "replication origins track what is applied from each peer",
			Grant: "GRANT EXECUTE ON FUNCTION pg_catalog." + f + " TO " + role + ";"})
	}
	var status bool
	if err := conn.QueryRow(ctx, `SELECT has_table_privilege('pg_catalog.pg_replication_origin_status', 'SELECT')`).Scan(&status); err != nil {
		return nil, fmt.Errorf("read the role's privileges on replication origins: %w", err)
	}
	if !status {
		out = append(out, Missing{What: "SELECT on pg_replication_origin_status", Why: "the progress applied from each peer",
			Grant: "GRANT SELECT ON pg_catalog.pg_replication_origin_status TO " + role + ";"})
	}
	for i := range out {
		out[i].Role = role
	}
	return out, nil
}

// CheckOwners returns what conn's role lacks to act as the owner of the
// tables pgmesh replicates (publish, apply, copy, compare and repair them,
// run their DDL) and of the database (a joining node keeps applications
// read-only while it copies). Both come from membership in the owners'
// roles. It reads pgmesh.user_tables, so it runs once the schema is
// installed. A superuser lacks nothing.
func CheckOwners(ctx context.Context, conn *pgx.Conn) ([]Missing, error) {
	var user string
	var super bool
	if err := conn.QueryRow(ctx, `SELECT current_user, rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user`).Scan(&user, &super); err != nil {
		return nil, fmt.Errorf("read the role's attributes: %w", err)
	}
	if super {
		return nil, nil
	}
	// One row per owner this role cannot act as: the objects it owns, and
	// whether it is a superuser (whose privileges cannot be shared).
	rows, err := conn.Query(ctx, `SELECT o.rolname::text, o.rolsuper, array_agg(x.what ORDER BY x.what)
		FROM (SELECT c.relowner AS owner, 'table ' || u.relation AS what
		        FROM pgmesh.user_tables u JOIN pg_catalog.pg_class c ON c.oid = u.relid
		      UNION ALL
		      SELECT d.datdba, 'database ' || quote_ident(d.datname)
		        FROM pg_catalog.pg_database d WHERE d.datname = current_database()) x
		JOIN pg_catalog.pg_roles o ON o.oid = x.owner
		WHERE NOT pg_has_role(x.owner, 'USAGE')
		GROUP BY o.rolname, o.rolsuper ORDER BY 1`)
	if err != nil {
		return nil, fmt.Errorf("read the owners of the replicated tables: %w", err)
	}
	type owner struct {
		name  string
		super bool
		objs  []string
	}
	owners, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (owner, error) {
		var o owner
		err := row.Scan(&o.name, &o.super, &o.objs)
		return o, err
	})
	if err != nil {
		return nil, fmt.Errorf("read the owners of the replicated tables: %w", err)
	}
	role := pgquote.Ident(user)
	var out []Missing
	for _, o := range owners {
		objs := listed(o.objs)
		if o.super {
			out = append(out, Missing{What: "ownership of " + objs, Why: "it is owned by superuser " + pgquote.Ident(o.name) + ", whose privileges no other role should get",
				Grant: "give it to the role that owns the application's tables (ALTER TABLE ... OWNER TO / ALTER DATABASE ... OWNER TO) and grant that role to " + role})
			continue
		}
		out = append(out, Missing{What: "membership in role " + pgquote.Ident(o.name), Why: "it owns " + objs + ", which pgmesh publishes, writes and alters",
			Grant: "GRANT " + pgquote.Ident(o.name) + " TO " + role + ";"})
	}
	for i := range out {
		out[i].Role = role
	}
	return out, nil
}

// listed names up to three objects and counts the rest.
func listed(objs []string) string {
	if len(objs) <= 3 {
		return strings.Join(objs, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(objs[:3], ", "), len(objs)-3)
}

// Join turns missing privileges into one error, a line each.
func Join(missing []Missing) error {
	errs := make([]error, len(missing))
	for i, m := range missing {
		errs[i] = m
	}
	return errors.Join(errs...)
}

// Script is the SQL an administrator runs once on each node's database to
// give role what pgmesh needs (`pgmesh grants`): create it if asked, the
// privileges CheckRole checks, and membership in the roles that own the
// replicated tables, which CheckOwners checks. It runs on every supported
// version: what differs between them (the functions' signatures, the
// database's name) is looked up by the script itself.
func Script(role string, owners []string, create bool) (string, error) {
	if role == "" {
		return "", errors.New("name the role pgmesh connects as: --role NAME")
	}
	q := pgquote.Ident(role)
	var b strings.Builder
	b.WriteString("-- Run as a superuser (or your platform's administrator role) in the database\n")
	b.WriteString("-- pgmesh replicates, on every node.\n")
	if create {
		fmt.Fprintf(&b, "CREATE ROLE %s LOGIN REPLICATION;  -- then give it a password: \\password %s\n", q, q)
	} else {
		fmt.Fprintf(&b, "ALTER ROLE %s REPLICATION;  -- replication slots and streams to peers\n", q)
	}
	lit := pgquote.Literal(role)
	fmt.Fprintf(&b, "-- the pgmesh schema and the publications:\n")
	fmt.Fprintf(&b, "DO $pgmesh$ BEGIN EXECUTE format('GRANT CREATE ON DATABASE %%I TO %%I', current_database(), %s); END $pgmesh$;\n", lit)
	fmt.Fprintf(&b, "-- applied changes must not fire the tables' own triggers:\n")
	fmt.Fprintf(&b, "GRANT SET ON PARAMETER session_replication_role TO %s;\n", q)
	fmt.Fprintf(&b, "-- replication origins track what is applied from each peer:\n")
	fmt.Fprintf(&b, "GRANT SELECT ON pg_catalog.pg_replication_origin_status TO %s;\n", q)
	quoted := make([]string, len(OriginFunctions))
	for i, f := range OriginFunctions {
		quoted[i] = pgquote.Literal(f)
	}
	fmt.Fprintf(&b, `DO $pgmesh$
DECLARE f regprocedure;
BEGIN
    FOR f IN SELECT p.oid FROM pg_catalog.pg_proc p
             WHERE p.pronamespace = 'pg_catalog'::regnamespace AND p.proname IN (%s) LOOP
        EXECUTE format('GRANT EXECUTE ON FUNCTION %%s TO %%I', f, %s);
    END LOOP;
END $pgmesh$;
`, strings.Join(quoted, ", "), lit)
	if len(owners) == 0 {
		fmt.Fprintf(&b, "-- The replicated tables and the database must be owned by %s, or by a role granted\n", q)
		fmt.Fprintf(&b, "-- to it (pgmesh grants --owner ROLE); the daemon names any other owner at start.\n")
		return b.String(), nil
	}
	fmt.Fprintf(&b, "-- the owner of the replicated tables and of the database, whose tables pgmesh\n")
	fmt.Fprintf(&b, "-- publishes, writes and alters:\n")
	for _, o := range owners {
		if o == "" {
			return "", errors.New("--owner names a role: give the role that owns the replicated tables")
		}
		fmt.Fprintf(&b, "GRANT %s TO %s;\n", pgquote.Ident(o), q)
	}
	return b.String(), nil
}
