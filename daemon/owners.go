package daemon

import (
	"context"
	"encoding/json"
	"log/slog"
	"slices"
	"sort"
	"sync"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

// The small pieces of state the daemon's parts keep for status, each with
// its own owner and lock, so that no part waits on another's.

// problemLog keeps the problems each check last found, for status and
// health, and logs a problem once, when it first appears.
type problemLog struct {
	log   *slog.Logger
	mu    sync.Mutex
	found map[string][]string // by the check that found them
}

// set replaces what check found.
func (p *problemLog) set(check string, found []string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, s := range found {
		if !slices.Contains(p.found[check], s) {
			p.log.Error("problem", "err", s)
		}
	}
	if p.found == nil {
		p.found = map[string][]string{}
	}
	p.found[check] = found
}

// all returns every check's problems, ordered by check name.
func (p *problemLog) all() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	checks := make([]string, 0, len(p.found))
	for c := range p.found {
		checks = append(checks, c)
	}
	sort.Strings(checks)
	var out []string
	for _, c := range checks {
		out = append(out, p.found[c]...)
	}
	return out
}

// publications keeps this node's publications in step with the group's
// replication sets (repset.Sync), and remembers what they last took.
type publications struct {
	mu sync.Mutex
	// current is false while the group state here is older than the one
	// the publications follow (after a restart, until Raft catches up).
	current bool
	// local are the tables in no replication set, and hash the hash of the
	// sets the publications last took (repset.Sets.Hash).
	local []string
	hash  string
}

// sync brings the publications to g's sets for receivers, and reports
// whether g is current (not older than what they follow).
func (p *publications) sync(ctx context.Context, conn *pgx.Conn, g *membership.Group, receivers []string) (bool, error) {
	sets := g.Sets()
	done, err := repset.Sync(ctx, conn, sets, receivers, g.Index)
	if err != nil {
		return false, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.current = done.Current
	if done.Current {
		p.local, p.hash = done.Local, sets.Hash()
	}
	return done.Current, nil
}

func (p *publications) isCurrent() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.current
}

// taken returns the local tables and the hash of the sets last published.
func (p *publications) taken() ([]string, string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.local), p.hash
}

// nodeTable mirrors the group into pgmesh.node, for SQL users and for
// timeshard sequences, which read the local node's id there. The reconcile
// and a join both write it: the lock keeps their transactions apart.
type nodeTable struct {
	mu   sync.Mutex
	last string // the group state last written
}

func (t *nodeTable) sync(ctx context.Context, db *pgxpool.Pool, g *membership.Group, self string) error {
	b, _ := json.Marshal(g)
	t.mu.Lock()
	defer t.mu.Unlock()
	if string(b) == t.last {
		return nil
	}
	err := pgx.BeginFunc(ctx, db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM pgmesh.node`); err != nil {
			return err
		}
		for _, n := range g.Nodes {
			if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.node (node_name, node_id, state, is_local, api_addr)
				VALUES ($1, $2, $3, $4, $5)`, n.Name, n.ID, string(n.State), n.Name == self, n.API); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		t.last = string(b)
	}
	return err
}

// latest is the last list a part found (the slots peers consume here, the
// standbys), for status to read.
type latest[T any] struct {
	mu   sync.Mutex
	list []T
}

func (l *latest[T]) set(list []T) {
	l.mu.Lock()
	l.list = list
	l.mu.Unlock()
}

// get returns a copy, never nil.
func (l *latest[T]) get() []T {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]T{}, l.list...)
}
