package daemon

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/join"
)

// joiner admits the one join a daemon may run at a time and keeps its
// status: in memory for pgmesh status, and in pgmesh.join_status for SQL
// users.
type joiner struct {
	db  *pgxpool.Pool
	log *slog.Logger

	mu      sync.Mutex
	running bool
	status  *api.JoinStatus
}

// start admits a join through via, unless one is running.
func (j *joiner) start(via string) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.running {
		return false
	}
	j.running = true
	j.status = &api.JoinStatus{Via: via, Phase: "starting", StartedAt: time.Now().UTC()}
	return true
}

// finish records how the join ended; a later one may start.
func (j *joiner) finish(err error) {
	j.mu.Lock()
	if err != nil {
		j.status.Error, j.status.Phase = err.Error(), "failed"
	} else {
		j.status.Done, j.status.Phase = true, "done"
	}
	j.running = false
	j.mu.Unlock()
	if err != nil {
		j.log.Error("join failed; run the same 'pgmesh group join' again to retry", "err", err)
	}
	j.save(context.Background()) // also when the daemon is stopping
}

func (j *joiner) snapshot() *api.JoinStatus {
	j.mu.Lock()
	defer j.mu.Unlock()
	if j.status == nil {
		return nil
	}
	s := *j.status
	return &s
}

func (j *joiner) update(f func(*api.JoinStatus)) {
	j.mu.Lock()
	f(j.status)
	j.mu.Unlock()
}

func (j *joiner) phase(ctx context.Context, p string) {
	j.update(func(s *api.JoinStatus) { s.Phase = p })
	j.log.Info("join", "phase", p)
	j.save(ctx)
}

// progress keeps the status as the copy reports its progress.
func (j *joiner) progress(ctx context.Context) func(join.Progress) {
	return func(p join.Progress) {
		if p.Phase != "" {
			j.phase(ctx, p.Phase)
			return
		}
		j.update(func(s *api.JoinStatus) {
			if p.TablesTotal > 0 {
				s.TablesTotal, s.BytesTotal = p.TablesTotal, p.BytesTotal
			}
			if p.TableDone {
				s.TablesDone++
			}
			s.Rows += p.Rows
			s.Bytes += p.Bytes
		})
		if p.TableDone {
			j.save(ctx)
		}
	}
}

// save mirrors the status into pgmesh.join_status (kept in memory only
// without a database, in unit tests).
func (j *joiner) save(ctx context.Context) {
	s := j.snapshot()
	if s == nil || j.db == nil {
		return
	}
	var errText *string
	if s.Error != "" {
		errText = &s.Error
	}
	_, err := j.db.Exec(ctx, `INSERT INTO pgmesh.join_status AS j (via, phase, tables_total, tables_done, rows_copied, bytes_copied, bytes_total, started_at, error)
		VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
		ON CONFLICT (one) DO UPDATE SET via = EXCLUDED.via, phase = EXCLUDED.phase, tables_total = EXCLUDED.tables_total,
			tables_done = EXCLUDED.tables_done, rows_copied = EXCLUDED.rows_copied, bytes_copied = EXCLUDED.bytes_copied,
			bytes_total = EXCLUDED.bytes_total, started_at = EXCLUDED.started_at, updated_at = now(), error = EXCLUDED.error`,
		s.Via, s.Phase, s.TablesTotal, s.TablesDone, s.Rows, s.Bytes, s.BytesTotal, s.StartedAt, errText)
	if err != nil {
		j.log.Warn("save join progress", "err", err)
	}
}
