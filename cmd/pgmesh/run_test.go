package main

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func writeFile(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "pgmesh.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigPrecedence(t *testing.T) {
	path := writeFile(t, "node_name: fromfile\ndsn: postgres://file/db\nlisten_api: 127.0.0.1:1\ndata_dir: /file\n")
	env := map[string]string{"PGMESH_DSN": "postgres://env/db", "PGMESH_LISTEN_API": "127.0.0.1:2"}
	cfg, _, err := loadConfig([]string{"--config", path, "--listen-api", "127.0.0.1:3"}, func(k string) string { return env[k] })
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeName != "fromfile" || cfg.DataDir != "/file" {
		t.Errorf("file values lost: %+v", cfg)
	}
	if cfg.DSN != "postgres://env/db" {
		t.Errorf("env should beat file: dsn = %q", cfg.DSN)
	}
	if cfg.ListenAPI != "127.0.0.1:3" {
		t.Errorf("flag should beat env: listen_api = %q", cfg.ListenAPI)
	}
}

func TestConfigFileErrors(t *testing.T) {
	cases := map[string]string{
		"node_nam: x\n":          `unknown key "node_nam"`,
		"node_name: [a, b]\n":    `must be a single value`,
		"node_name: x\n  dsn:\n": `not valid YAML`,
	}
	for body, want := range cases {
		_, _, err := loadConfig([]string{"--config", writeFile(t, body)}, func(string) string { return "" })
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("config %q: err = %v, want it to mention %q", body, err, want)
		}
	}
}

func TestConfigValidation(t *testing.T) {
	cfg, _, err := loadConfig([]string{"--node-name", "Bad-Name", "--listen-api", "nonsense",
		"--public-dsn", "postgres://u:secret@h/db"}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	err = cfg.Normalize()
	if err == nil {
		t.Fatal("want errors")
	}
	for _, want := range []string{`node_name "Bad-Name" is not valid`, "dsn is not set", `listen_api "nonsense" is not a host:port`, "public_dsn contains a password"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("errors lack %q:\n%v", want, err)
		}
	}
	if strings.Contains(err.Error(), "secret") {
		t.Errorf("an error repeats the password:\n%v", err)
	}
}

func TestClockKeys(t *testing.T) {
	none := func(string) string { return "" }
	cfg, _, err := loadConfig(nil, none)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.LUWResolutionSet {
		t.Errorf("luw_resolution is set (%s) without a value in the config; want it unset, so the group's is used", cfg.LUWResolution)
	}
	cfg, _, err = loadConfig([]string{"--luw-resolution", "0", "--max-clock-skew", "2s"}, none)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.LUWResolution != 0 || !cfg.LUWResolutionSet || cfg.MaxClockSkew != 2*time.Second {
		t.Errorf("luw_resolution %s, max_clock_skew %s; want 0 (exact) and 2s", cfg.LUWResolution, cfg.MaxClockSkew)
	}
	if _, _, err := loadConfig([]string{"--luw-resolution", "soon"}, none); err == nil || !strings.Contains(err.Error(), "luw_resolution") {
		t.Errorf("a bad luw_resolution: err = %v", err)
	}
	cfg, _, _ = loadConfig([]string{"--node-name", "a", "--dsn", "postgres://x/db", "--luw-resolution", "1s"}, none)
	if err := cfg.Normalize(); err == nil || !strings.Contains(err.Error(), "luw_resolution 1s is out of range") {
		t.Errorf("luw_resolution 1s: err = %v, want it refused", err)
	}
}

func TestStandbySlotsKey(t *testing.T) {
	env := func(k string) string {
		if k == "PGMESH_STANDBY_SLOTS" {
			return " pg_a2, pg_a3 ,"
		}
		return ""
	}
	cfg, _, err := loadConfig([]string{"--node-name", "a", "--dsn", "postgres://x/db"}, env)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.StandbySlots, []string{"pg_a2", "pg_a3"}) {
		t.Fatalf("standby_slots %q, want [pg_a2 pg_a3]", cfg.StandbySlots)
	}
	if err := cfg.Normalize(); err != nil {
		t.Fatal(err)
	}
	cfg, _, _ = loadConfig([]string{"--node-name", "a", "--dsn", "postgres://x/db", "--standby-slots", "Standby-1"}, func(string) string { return "" })
	if err := cfg.Normalize(); err == nil || !strings.Contains(err.Error(), `standby_slots names "Standby-1"`) {
		t.Fatalf("a bad slot name: err = %v", err)
	}
}
