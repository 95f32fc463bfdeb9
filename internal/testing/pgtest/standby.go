package pgtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
)

// Standby makes a physical standby of c that streams from it through the
// physical slot named slot (created on c), with extra postgresql.conf
// settings, and starts it. The copy is taken online, between
// pg_backup_start and pg_backup_stop, which every server has (the servers
// fetched for 16+ lack pg_basebackup).
func (c *Cluster) Standby(ctx context.Context, slot string, settings map[string]string) (*Cluster, error) {
	port, err := FreePort()
	if err != nil {
		return nil, fmt.Errorf("find a free port: %w", err)
	}
	dir, err := os.MkdirTemp("", "pgmesh-pg-")
	if err != nil {
		return nil, fmt.Errorf("create temp dir: %w", err)
	}
	s := &Cluster{Dir: dir, Data: filepath.Join(dir, "data"), Port: port, binDir: c.binDir, cred: c.cred, env: c.env}
	if err := s.make(ctx, c, slot, settings); err != nil {
		s.Remove()
		return nil, fmt.Errorf("make a standby of the cluster on port %d: %w", c.Port, err)
	}
	return s, nil
}

func (s *Cluster) make(ctx context.Context, primary *Cluster, slot string, settings map[string]string) error {
	if err := s.own(s.Dir); err != nil {
		return err
	}
	conn, err := primary.Connect(ctx)
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	// The slot keeps the WAL from before the backup's checkpoint, which the
	// standby streams: the copy takes no WAL.
	if _, err := conn.Exec(ctx, `SELECT pg_create_physical_replication_slot($1, true)`, slot); err != nil {
		return err
	}
	if _, err := conn.Exec(ctx, `SELECT pg_backup_start('pgtest standby', true)`); err != nil {
		return err
	}
	copyErr := s.copyData(primary.Data)
	var label string
	if err := conn.QueryRow(ctx, `SELECT labelfile FROM pg_backup_stop(false)`).Scan(&label); err != nil {
		return err
	}
	if copyErr != nil {
		return copyErr
	}
	// dbname lets a standby of 17+ synchronize failover slots.
	conf := fmt.Sprintf("\n# pgtest standby\nport = %d\nunix_socket_directories = '%s'\nhot_standby = on\n"+
		"primary_conninfo = 'host=127.0.0.1 port=%d user=postgres dbname=postgres application_name=%s'\nprimary_slot_name = '%s'\n",
		s.Port, s.Dir, primary.Port, slot, slot)
	for k, v := range settings {
		conf += fmt.Sprintf("%s = %s\n", k, v)
	}
	f, err := os.OpenFile(filepath.Join(s.Data, "postgresql.conf"), os.O_APPEND|os.O_WRONLY, 0)
	if err == nil {
		_, err = f.WriteString(conf)
		f.Close()
	}
	if err != nil {
		return err
	}
	for name, data := range map[string]string{"backup_label": label, "standby.signal": ""} {
		if err := s.writeFile(filepath.Join(s.Data, name), []byte(data)); err != nil {
			return err
		}
	}
	return s.Start(ctx)
}

// copyData copies a running server's data directory, without its WAL, its
// replication slots and the files of the running server; a file that
// vanishes while it is copied is one the server no longer needs.
func (s *Cluster) copyData(from string) error {
	skip := map[string]bool{"postmaster.pid": true, "postmaster.opts": true}
	empty := map[string]bool{"pg_wal": true, "pg_replslot": true, "pg_stat_tmp": true}
	return filepath.WalkDir(from, func(path string, e fs.DirEntry, err error) error {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(from, path)
		to := filepath.Join(s.Data, rel)
		if skip[rel] {
			return nil
		}
		if e.IsDir() {
			if err := os.MkdirAll(to, 0o700); err != nil {
				return err
			}
			if err := s.own(to); err != nil {
				return err
			}
			if !empty[rel] {
				return nil
			}
			if rel == "pg_wal" {
				status := filepath.Join(to, "archive_status")
				if err := os.Mkdir(status, 0o700); err != nil {
					return err
				}
				if err := s.own(status); err != nil {
					return err
				}
			}
			return filepath.SkipDir
		}
		err = copyFile(path, to)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return err
		}
		return s.own(to)
	})
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// own gives path to the server's user when the caller runs as root.
func (s *Cluster) own(path string) error {
	if s.cred == nil {
		return nil
	}
	if err := os.Chown(path, int(s.cred.Uid), int(s.cred.Gid)); err != nil {
		return fmt.Errorf("chown %s to uid %s: %w", path, strconv.Itoa(int(s.cred.Uid)), err)
	}
	return nil
}

// Promote makes a standby a primary and waits until it is one.
func (c *Cluster) Promote(ctx context.Context) error {
	return c.run(ctx, "pg_ctl", "-D", c.Data, "-w", "-t", "60", "promote")
}
