// Package pgtest starts throwaway PostgreSQL clusters for tests, benchmarks
// and the demo: initdb into a temporary directory, configured for logical
// replication, listening on a free port on 127.0.0.1.
//
// When the caller runs as root, the server runs as the unprivileged user
// "postgres" (or "nobody"), because PostgreSQL refuses to run as root.
package pgtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	pgsql "github.com/pgmesh/pgmesh/sql"
)

// Options tune a cluster. The zero value gives the defaults the tests use.
type Options struct {
	// BinDir holds initdb, pg_ctl and postgres; empty means FindBinDir().
	BinDir string
	// Settings are extra postgresql.conf lines (key -> value).
	Settings map[string]string
	// Port to listen on; 0 picks a free one.
	Port int
	// ServerCert and ServerKey (PEM), when set, turn on SSL with them.
	ServerCert, ServerKey []byte
	// Env is added to the environment of the server's programs (e.g.
	// LD_PRELOAD of libfaketime, see FakeClock).
	Env []string
}

// FakeClock returns the environment that runs a server with its clock
// offset by the given number of seconds (libfaketime; the monotonic clock
// stays real, so timeouts behave). It fails when libfaketime is missing.
func FakeClock(offsetSeconds int) ([]string, error) {
	libs, _ := filepath.Glob("/usr/lib/*/faketime/libfaketime.so.1")
	if len(libs) == 0 {
		return nil, errors.New("libfaketime is not installed, so a server cannot be given a skewed clock: apt-get install libfaketime")
	}
	return []string{"LD_PRELOAD=" + libs[0], fmt.Sprintf("FAKETIME=%+d", offsetSeconds), "FAKETIME_DONT_FAKE_MONOTONIC=1"}, nil
}

// Cluster is one running (or stopped) throwaway PostgreSQL cluster.
type Cluster struct {
	Dir    string // parent temp dir (removed by Remove)
	Data   string // PGDATA
	Port   int
	binDir string
	cred   *syscall.Credential
	env    []string
}

// FindBinDir returns the directory holding the PostgreSQL server binaries:
// $PGMESH_PG_BIN if set, else the newest /usr/lib/postgresql/*/bin (15 or later).
func FindBinDir() (string, error) {
	if d := os.Getenv("PGMESH_PG_BIN"); d != "" {
		if _, err := os.Stat(filepath.Join(d, "postgres")); err != nil {
			return "", fmt.Errorf("PGMESH_PG_BIN=%s has no postgres binary: point it at a PostgreSQL bin directory", d)
		}
		return d, nil
	}
	best, bestVer := "", 0
	dirs, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	for _, d := range dirs {
		v, err := strconv.Atoi(filepath.Base(filepath.Dir(d)))
		if err != nil || v < 15 {
			continue
		}
		if _, err := os.Stat(filepath.Join(d, "postgres")); err == nil && v > bestVer {
			best, bestVer = d, v
		}
	}
	if best == "" {
		return "", errors.New("no PostgreSQL 15+ server found under /usr/lib/postgresql: install it (apt-get install postgresql-15) or set PGMESH_PG_BIN")
	}
	return best, nil
}

// FreePort returns a TCP port on 127.0.0.1 that is free now and stays out
// of the kernel's way (see below).
func FreePort() (int, error) {
	// Below the kernel's ephemeral range, so that no port picked here is
	// handed out meanwhile to an outgoing connection or a listener on
	// port 0 (test proxies), and never twice in one process.
	low, _ := ephemeralLow()
	freeMu.Lock()
	defer freeMu.Unlock()
	for range 1000 {
		p := 10000 + rand.IntN(max(low-10000, 1000))
		if handedOut[p] {
			continue
		}
		l, err := net.Listen("tcp", "127.0.0.1:"+strconv.Itoa(p))
		if err != nil {
			continue
		}
		l.Close()
		handedOut[p] = true
		return p, nil
	}
	return 0, errors.New("no free port found below the ephemeral range")
}

var (
	freeMu    sync.Mutex
	handedOut = map[int]bool{}
)

// ephemeralLow is the start of the kernel's ephemeral port range.
func ephemeralLow() (int, error) {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768, err
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768, nil
	}
	low, err := strconv.Atoi(f[0])
	if err != nil || low <= 11000 {
		return 32768, err
	}
	return low, nil
}

// Start runs initdb and starts the server. The caller must Remove the cluster.
func Start(ctx context.Context, opts Options) (*Cluster, error) {
	bin := opts.BinDir
	if bin == "" {
		var err error
		if bin, err = FindBinDir(); err != nil {
			return nil, err
		}
	}
	port := opts.Port
	if port == 0 {
		var err error
		if port, err = FreePort(); err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
	}
	dir, err := os.MkdirTemp("", "pgmesh-pg-")
	if err != nil {
		return nil, fmt.Errorf("create temp dir: %w", err)
	}
	c := &Cluster{Dir: dir, Data: filepath.Join(dir, "data"), Port: port, binDir: bin, env: opts.Env}
	if os.Geteuid() == 0 {
		if c.cred, err = unprivilegedUser(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		if err := os.Chown(dir, int(c.cred.Uid), int(c.cred.Gid)); err != nil {
			os.RemoveAll(dir)
			return nil, fmt.Errorf("chown %s: %w", dir, err)
		}
	}
	if err := c.run(ctx, "initdb", "-D", c.Data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	conf := map[string]string{
		"listen_addresses":        "'127.0.0.1'",
		"port":                    strconv.Itoa(port),
		"unix_socket_directories": "'" + dir + "'",
		"wal_level":               "logical",
		"track_commit_timestamp":  "on",
		"max_replication_slots":   "32",
		"max_wal_senders":         "32",
		"max_worker_processes":    "16",
		"fsync":                   "off",
		"synchronous_commit":      "off",
		"full_page_writes":        "off",
		"shared_buffers":          "64MB",
		"log_min_messages":        "warning",
		"logging_collector":       "off",
		"wal_sender_timeout":      "60s",
		"max_connections":         "100",
		"log_line_prefix":         "'%m [%p] '",
	}
	if opts.ServerCert != nil {
		for name, pem := range map[string][]byte{"server.crt": opts.ServerCert, "server.key": opts.ServerKey} {
			if err := c.writeFile(filepath.Join(c.Data, name), pem); err != nil {
				os.RemoveAll(dir)
				return nil, err
			}
		}
		conf["ssl"] = "on"
	}
	for k, v := range opts.Settings {
		conf[k] = v
	}
	var b strings.Builder
	b.WriteString("\n# pgtest\n")
	for k, v := range conf {
		fmt.Fprintf(&b, "%s = %s\n", k, v)
	}
	f, err := os.OpenFile(filepath.Join(c.Data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(b.String())
		f.Close()
	}
	if err != nil {
		os.RemoveAll(dir)
		return nil, fmt.Errorf("write postgresql.conf: %w", err)
	}
	if err := c.Start(ctx); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	return c, nil
}

// writeFile writes a file only the server's user may read (Postgres
// refuses a key file others can read).
func (c *Cluster) writeFile(path string, data []byte) error {
	if err := os.WriteFile(path, data, 0o600); err != nil {
		return err
	}
	if c.cred != nil {
		return os.Chown(path, int(c.cred.Uid), int(c.cred.Gid))
	}
	return nil
}

func unprivilegedUser() (*syscall.Credential, error) {
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}, nil
	}
	return nil, errors.New("running as root but no 'postgres' or 'nobody' user exists to run PostgreSQL: create one (useradd postgres)")
}

func (c *Cluster) run(ctx context.Context, prog string, args ...string) error {
	cmd := exec.CommandContext(ctx, filepath.Join(c.binDir, prog), args...)
	if c.cred != nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: c.cred}
	}
	cmd.Dir = c.Dir
	cmd.Env = append(append(os.Environ(), "LC_ALL=C.UTF-8"), c.env...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s %s: %w\n%s", prog, strings.Join(args, " "), err, out)
	}
	return nil
}

// Start starts a stopped cluster and waits until it accepts connections.
func (c *Cluster) Start(ctx context.Context) error {
	return c.run(ctx, "pg_ctl", "-D", c.Data, "-l", filepath.Join(c.Dir, "server.log"), "-w", "-t", "60", "start")
}

// Stop shuts the server down cleanly (fast mode).
func (c *Cluster) Stop(ctx context.Context) error {
	return c.run(ctx, "pg_ctl", "-D", c.Data, "-m", "fast", "-w", "-t", "60", "stop")
}

// Crash stops the server without a shutdown checkpoint (immediate mode),
// as a power cut would; the next start runs crash recovery.
func (c *Cluster) Crash(ctx context.Context) error {
	return c.run(ctx, "pg_ctl", "-D", c.Data, "-m", "immediate", "-w", "-t", "60", "stop")
}

// Restart stops and starts the server.
func (c *Cluster) Restart(ctx context.Context) error {
	if err := c.Stop(ctx); err != nil {
		return err
	}
	return c.Start(ctx)
}

// Remove stops the server if it runs and deletes its files.
func (c *Cluster) Remove() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := os.Stat(filepath.Join(c.Data, "postmaster.pid")); err == nil {
		_ = c.run(ctx, "pg_ctl", "-D", c.Data, "-m", "immediate", "-w", "stop")
	}
	os.RemoveAll(c.Dir)
}

// DSN is a connection string for the "postgres" database as superuser.
func (c *Cluster) DSN() string {
	return c.DBDSN("postgres")
}

// DBDSN is a connection string for the named database, as superuser.
func (c *Cluster) DBDSN(db string) string {
	return c.RoleDSN("postgres", db)
}

// RoleDSN is a connection string for the named database as role (every
// role may log in without a password: the cluster trusts local connections).
func (c *Cluster) RoleDSN(role, db string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", role, c.Port, db)
}

// Connect opens a pgx connection to the "postgres" database.
func (c *Cluster) Connect(ctx context.Context) (*pgx.Conn, error) {
	return pgx.Connect(ctx, c.DSN())
}

// Exec runs SQL statements on the cluster through a fresh connection.
func (c *Cluster) Exec(ctx context.Context, sql string, args ...any) error {
	conn, err := c.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(ctx)
	_, err = conn.Exec(ctx, sql, args...)
	return err
}

// LogTail returns the last n bytes of the server log, for failure messages.
func (c *Cluster) LogTail(n int) string {
	b, _ := os.ReadFile(filepath.Join(c.Dir, "server.log"))
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// WithSchema starts a throwaway cluster with the pgmesh schema installed,
// for tests of pgmesh's SQL, and returns a connection to it; both go away
// when the test ends. A cluster that cannot start fails the test.
func WithSchema(t testing.TB, ctx context.Context) *pgx.Conn {
	t.Helper()
	return WithSchemaOn(t, ctx, Options{})
}

// WithSchemaOn is WithSchema on a cluster started with opts.
func WithSchemaOn(t testing.TB, ctx context.Context, opts Options) *pgx.Conn {
	t.Helper()
	pg, err := Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pg.Remove)
	conn, err := pg.Connect(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	if _, _, err := pgsql.Install(ctx, conn); err != nil {
		t.Fatal(err)
	}
	return conn
}
