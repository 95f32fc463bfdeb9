package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/membership"
)

var errNoQuorum = errors.New("the node group has no Raft leader (is a majority of members down?), and the global DDL lock needs a majority: run SELECT pgmesh.replicate_ddl(...) in SQL to go without it")

// ddlLock is the group-wide lock that lets one replicated DDL run at a time.
const ddlLock = "ddl"

// lock takes (or, with release, gives up) a group-wide lock through the
// Raft leader.
func (d *Daemon) lock(ctx context.Context, name string, release bool, ttl time.Duration) error {
	if d.store.IsLeader() {
		var err error
		if release {
			err = d.store.ReleaseLock(name, d.cfg.NodeName)
		} else {
			err = d.store.AcquireLock(name, d.cfg.NodeName, ttl)
		}
		if errors.Is(err, membership.ErrNotLeader) {
			return errNoQuorum
		}
		return err
	}
	leader, err := d.cluster.leader(ctx, errNoQuorum)
	if err != nil {
		return err
	}
	return leader.Lock(ctx, api.LockRequest{Lock: name, Node: d.cfg.NodeName, Release: release, TTLms: ttl.Milliseconds()})
}

// runDDL runs pgmesh.replicate_ddl under the global DDL lock, waiting for
// the lock up to the request's timeout. Errors are *api.Error: a bad
// timeout or statement (400), the lock not taken (409).
func (d *Daemon) runDDL(ctx context.Context, req api.DDLRequest) error {
	timeout := 30 * time.Second
	if req.Timeout != "" {
		t, err := time.ParseDuration(req.Timeout)
		if err != nil || t <= 0 {
			return &api.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("timeout %q is not a positive duration", req.Timeout)}
		}
		timeout = t
	}
	ctx, cancel := context.WithTimeout(ctx, timeout+10*time.Second)
	defer cancel()
	deadline := time.Now().Add(timeout)
	// The lock outlives the wait and the statement by a margin, and expires
	// by itself should this daemon die holding it.
	ttl := 2*timeout + time.Minute
	err := poll.Until(ctx, 50*time.Millisecond, timeout, func() error {
		err := d.lock(ctx, ddlLock, false, ttl)
		var ae *api.Error
		var held *membership.LockHeld
		if err != nil && !errors.As(err, &held) && !(errors.As(err, &ae) && ae.Status == http.StatusLocked) {
			return poll.Stop(err) // not a lock another node holds: no point waiting
		}
		return err
	})
	if err != nil {
		return withStatus(http.StatusConflict, fmt.Errorf("take the global DDL lock: %w", err))
	}
	defer func() {
		if err := d.lock(context.Background(), ddlLock, true, 0); err != nil {
			d.log.Warn("release the global DDL lock (it expires by itself)", "err", err)
		}
	}()
	left := max(time.Until(deadline), time.Second)
	if _, err := d.db.Exec(ctx, `SELECT pgmesh.replicate_ddl($1, make_interval(secs => $2), $3)`, req.SQL, left.Seconds(), req.Proceed); err != nil {
		return withStatus(http.StatusBadRequest, err)
	}
	return nil
}
