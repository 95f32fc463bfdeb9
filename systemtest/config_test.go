//go:build integration

package systemtest

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// runDaemon runs `pgmesh run` expecting it to refuse to start, and returns
// its stderr.
func runDaemon(t *testing.T, ctx context.Context, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, append([]string{"run", "--data-dir", t.TempDir()}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err == nil || ctx.Err() != nil {
		t.Fatalf("pgmesh run %v: want a refusal, got err=%v ctx=%v\n%s", args, err, ctx.Err(), stderr.String())
	}
	return stderr.String()
}

// The daemon refuses a Postgres that cannot do logical replication or
// last-update-wins, naming every problem and its fix in one line each.
func TestDaemonRefusesMisconfiguredPostgres(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	pg, err := pgtest.Start(ctx, pgtest.Options{Settings: map[string]string{
		"wal_level": "replica", "track_commit_timestamp": "off"}})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Remove()
	api, _ := pgtest.FreePort()
	raft, _ := pgtest.FreePort()
	out := runDaemon(t, ctx, "--node-name", "a", "--dsn", pg.DSN(),
		"--listen-api", "127.0.0.1:"+itoa(api), "--listen-raft", "127.0.0.1:"+itoa(raft))
	for _, want := range []string{
		"pgmesh: local Postgres has wal_level=replica: set wal_level = logical in postgresql.conf and restart Postgres",
		"pgmesh: local Postgres has track_commit_timestamp=off",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("stderr lacks %q:\n%s", want, out)
		}
	}
}

// A role that is not a superuser and lacks privileges is refused at start,
// one line per missing privilege with the statement that grants it (package
// privilege tests each one); so is half a TLS setup.
func TestDaemonRefusesRoleAndHalfTLS(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	pg, err := pgtest.Start(ctx, pgtest.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer pg.Remove()
	if err := pg.Exec(ctx, `CREATE ROLE app LOGIN REPLICATION`); err != nil {
		t.Fatal(err)
	}
	api, _ := pgtest.FreePort()
	raft, _ := pgtest.FreePort()
	out := runDaemon(t, ctx, "--node-name", "a", "--dsn", strings.Replace(pg.DSN(), "postgres@", "app@", 1),
		"--listen-api", "127.0.0.1:"+itoa(api), "--listen-raft", "127.0.0.1:"+itoa(raft))
	for _, want := range []string{`role "app" is not a superuser and lacks SET on session_replication_role`,
		`GRANT SET ON PARAMETER session_replication_role TO "app";`,
		`GRANT EXECUTE ON FUNCTION pg_catalog.pg_replication_origin_session_setup(`} {
		if !strings.Contains(out, want) {
			t.Errorf("stderr lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "REPLICATION;") {
		t.Errorf("stderr asks for the REPLICATION the role has:\n%s", out)
	}
	out = runDaemon(t, ctx, "--node-name", "a", "--dsn", pg.DSN(), "--tls-cert-file", "node.crt")
	if want := "only one of tls_cert_file and tls_key_file is set"; !strings.Contains(out, want) {
		t.Errorf("stderr lacks %q:\n%s", want, out)
	}
	out = runDaemon(t, ctx, "--node-name", "a", "--dsn", pg.DSN(), "--tls-cert-file", "node.crt", "--tls-key-file", "node.key")
	if want := "tls_ca_file is not set"; !strings.Contains(out, want) {
		t.Errorf("stderr lacks %q:\n%s", want, out)
	}
}

func TestDaemonConfigErrors(t *testing.T) {
	t.Parallel()
	ctx := ctxFor(t)
	port, _ := pgtest.FreePort()
	// Nothing listens on port: the error names the server, not the password.
	out := runDaemon(t, ctx, "--node-name", "a", "--dsn", "postgres://app:hunter2@127.0.0.1:"+itoa(port)+"/app?connect_timeout=2")
	if !strings.Contains(out, "cannot connect to local Postgres app@127.0.0.1:"+itoa(port)+"/app") || !strings.Contains(out, "check dsn and that Postgres is running") {
		t.Errorf("unreachable Postgres: unclear error:\n%s", out)
	}
	if strings.Contains(out, "hunter2") {
		t.Errorf("the password leaked into the error:\n%s", out)
	}

	cfg := filepath.Join(t.TempDir(), "pgmesh.yaml")
	if err := os.WriteFile(cfg, []byte("node_name: a\ndsn: [oops\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if out := runDaemon(t, ctx, "--config", cfg); !strings.Contains(out, "is not valid YAML") {
		t.Errorf("malformed config: unclear error:\n%s", out)
	}
	if out := runDaemon(t, ctx); !strings.Contains(out, "node_name is not set") || !strings.Contains(out, "dsn is not set") {
		t.Errorf("missing settings: unclear error:\n%s", out)
	}
}

func itoa(i int) string { return strconv.Itoa(i) }
