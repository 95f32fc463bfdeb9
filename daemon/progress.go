package daemon

import (
	"context"
	"time"
)

// publishProgress keeps pgmesh.peer_progress current, for
// pgmesh.wait_for_origin(), until ctx ends. A position reached by applying
// a transaction is published at once; one reached only because the peer
// reported more WAL with nothing for us in it, at most every
// idleProgressEvery: each publication writes WAL here, which moves the
// peers' positions in turn, and idle nodes would otherwise keep each other
// writing.
func (d *Daemon) publishProgress(ctx context.Context) {
	type published struct {
		lsn    string
		commit time.Time
		at     time.Time
	}
	last := map[string]published{}
	every(ctx, 50*time.Millisecond, func() {
		now := time.Now()
		var names, lsns []string
		var commits []time.Time
		for _, s := range d.streamStatuses() {
			p := last[s.Peer]
			if s.AppliedLSN == "" || s.AppliedLSN == "0/0" || p.lsn == s.AppliedLSN {
				continue
			}
			var commit time.Time
			if s.LastCommitTS != nil {
				commit = *s.LastCommitTS
			}
			if commit.Equal(p.commit) && now.Sub(p.at) < idleProgressEvery {
				continue
			}
			names, lsns, commits = append(names, s.Peer), append(lsns, s.AppliedLSN), append(commits, commit)
		}
		if len(names) == 0 {
			return
		}
		_, err := d.db.Exec(ctx, `INSERT INTO pgmesh.peer_progress AS p (node_name, applied_lsn)
			SELECT n, l::pg_lsn FROM unnest($1::text[], $2::text[]) AS x(n, l)
			ON CONFLICT (node_name) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now()
			WHERE p.applied_lsn < EXCLUDED.applied_lsn`, names, lsns)
		if err != nil {
			if ctx.Err() == nil {
				d.log.Warn("publish peer progress", "err", err)
			}
			return
		}
		for i, n := range names {
			last[n] = published{lsn: lsns[i], commit: commits[i], at: now}
		}
	})
}

// idleProgressEvery bounds how often progress that no applied transaction
// made is published (see publishProgress).
const idleProgressEvery = time.Second
