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
	last := map[string]published{}
	seen := map[string]string{}
	// Every 50 ms while positions move; an idle stretch backs off to
	// idleProgressEvery, since nothing is due sooner then (wait_for_origin
	// reads applied transactions from the origin's progress itself).
	wait := progressEvery
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
		if d.publishOnce(ctx, last, seen) {
			wait = progressEvery
		} else {
			wait = min(2*wait, idleProgressEvery)
		}
	}
}

type published struct {
	lsn    string
	commit time.Time
	at     time.Time
}

// publishOnce publishes what is due (last: what was published) and reports
// whether any stream's position moved since the previous look (seen).
func (d *Daemon) publishOnce(ctx context.Context, last map[string]published, seen map[string]string) (moved bool) {
	now := time.Now()
	var names, lsns []string
	var commits []time.Time
	for _, s := range d.reconciler.streams.statuses() {
		if seen[s.Peer] != s.AppliedLSN {
			seen[s.Peer], moved = s.AppliedLSN, true
		}
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
		return moved
	}
	_, err := d.db.Exec(ctx, `INSERT INTO pgmesh.peer_progress AS p (node_name, applied_lsn)
			SELECT n, l::pg_lsn FROM unnest($1::text[], $2::text[]) AS x(n, l)
			ON CONFLICT (node_name) DO UPDATE SET applied_lsn = EXCLUDED.applied_lsn, updated_at = now()
			WHERE p.applied_lsn < EXCLUDED.applied_lsn`, names, lsns)
	if err != nil {
		if ctx.Err() == nil {
			d.log.Warn("publish peer progress", "err", err)
		}
		return moved
	}
	for i, n := range names {
		last[n] = published{lsn: lsns[i], commit: commits[i], at: now}
	}
	return moved
}

// progressEvery is how often progress is looked at while it moves.
const progressEvery = 50 * time.Millisecond

// idleProgressEvery bounds how often progress that no applied transaction
// made is published (see publishProgress).
const idleProgressEvery = time.Second
