//go:build integration

package systemtest

import (
	"os/exec"
	"strings"
	"testing"

	"gopkg.in/yaml.v3"
)

// docker-compose.yml is valid (no Docker engine runs here, but
// `docker-compose config` parses and resolves it) and keeps what pgmesh
// needs: Postgres with logical WAL and commit timestamps, and a sidecar per
// node with its own name, DSN without password, and advertised addresses.
func TestComposeFile(t *testing.T) {
	t.Parallel()
	path, err := exec.LookPath("docker-compose")
	if err != nil {
		t.Fatal("docker-compose is not installed (apt-get install docker-compose); .ci/run installs it")
	}
	out, err := exec.Command(path, "-f", "../docker-compose.yml", "config").CombinedOutput()
	if err != nil {
		t.Fatalf("docker-compose config: %v\n%s", err, out)
	}
	var cfg struct {
		Services map[string]struct {
			Command     []string          `yaml:"command"`
			Environment map[string]string `yaml:"environment"`
		} `yaml:"services"`
	}
	if err := yaml.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	for _, r := range []string{"tokyo", "sydney", "dallas"} {
		pg, ok := cfg.Services["pg-"+r]
		if !ok {
			t.Fatalf("no service pg-%s", r)
		}
		cmd := strings.Join(pg.Command, " ")
		for _, want := range []string{"wal_level=logical", "track_commit_timestamp=on"} {
			if !strings.Contains(cmd, want) {
				t.Errorf("pg-%s command lacks %s: %s", r, want, cmd)
			}
		}
		side, ok := cfg.Services["pgmesh-"+r]
		if !ok {
			t.Fatalf("no service pgmesh-%s", r)
		}
		env := side.Environment
		if env["PGMESH_NODE_NAME"] != r || !strings.Contains(env["PGMESH_DSN"], "@pg-"+r+":5432") ||
			env["PGMESH_ADVERTISE_API"] != "pgmesh-"+r+":7400" || env["PGMESH_ADVERTISE_RAFT"] != "pgmesh-"+r+":7401" {
			t.Errorf("pgmesh-%s environment is inconsistent: %v", r, env)
		}
		if strings.Contains(env["PGMESH_DSN"], ":pgmesh-demo@") {
			t.Errorf("pgmesh-%s puts the password in the DSN; it belongs in PGPASSWORD", r)
		}
	}
	if _, ok := cfg.Services["form-group"]; !ok {
		t.Error("no form-group service")
	}
}
