package daemon

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net/http"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

func (d *Daemon) self() membership.Node {
	return membership.Node{Name: d.cfg.NodeName, DSN: d.cfg.PublicDSN, API: d.cfg.AdvertiseAPI, Raft: d.cfg.AdvertiseRaft,
		LUWResolution: d.resolution.get().String()}
}

// differingResolution returns a member of g, other than skip, whose
// recorded luw_resolution differs from res, or nil. Members must agree: a
// node rounding commit times differently would settle the same conflict
// differently, and the group would diverge.
func differingResolution(g *membership.Group, res, skip string) *membership.Node {
	for _, n := range g.Sorted() {
		if n.Name != skip && n.State != membership.Parted && n.LUWResolution != "" && n.LUWResolution != res {
			return n
		}
	}
	return nil
}

func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", err
	}
	return "pgmesh_" + base64.RawURLEncoding.EncodeToString(b), nil
}

// createGroup makes a node group with this node as its first member, and
// its join token. Errors are *api.Error: a bad name (400), a node already
// in a group (409).
func (d *Daemon) createGroup(ctx context.Context, req api.CreateRequest) (api.CreateResponse, error) {
	if !ValidNodeName(req.Name) {
		return api.CreateResponse{}, &api.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("group name %q is not valid: use 1 to 40 lowercase letters, digits or underscores, starting with a letter", req.Name)}
	}
	if g, _ := d.store.Group(); g != nil {
		return api.CreateResponse{}, &api.Error{Status: http.StatusConflict, Message: fmt.Sprintf("node %q already belongs to node group %q", d.cfg.NodeName, g.Name)}
	}
	token, err := newToken()
	if err == nil {
		err = d.cluster.saveToken(token)
	}
	if err != nil {
		return api.CreateResponse{}, fmt.Errorf("make join token: %w", err)
	}
	if err := forgetGroupState(ctx, d.db); err != nil {
		return api.CreateResponse{}, err
	}
	sets := repset.New(true, nil)
	if d.cfg.NewTablesLocal {
		// The default set holds the tables there are now; later ones
		// start local.
		err = withConn(ctx, d.db, func(conn *pgx.Conn) error {
			tables, err := repset.UserTables(ctx, conn)
			sets = repset.New(false, tables)
			return err
		})
		if err != nil {
			return api.CreateResponse{}, err
		}
	}
	n, err := d.store.Create(ctx, req.Name, membership.HashToken(token), d.self(), sets)
	if err != nil {
		return api.CreateResponse{}, err
	}
	d.log.Info("created node group", "group", req.Name, "node_id", n.ID)
	return api.CreateResponse{Group: req.Name, Node: api.NodeOf(n), Token: token}, nil
}

// waitForSelf waits until Raft has replicated this node's registration here.
func (d *Daemon) waitForSelf(ctx context.Context) (*membership.Group, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		g, changed := d.store.Group()
		if g != nil && g.Nodes[d.cfg.NodeName] != nil {
			return g, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("registered, but the group's Raft state did not reach this node within 60s: check that the members can reach listen_raft %s (advertised as %s)", d.cfg.ListenRaft, d.cfg.AdvertiseRaft)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-changed:
		case <-time.After(time.Second):
		}
	}
}

// checkEmpty refuses a join while replicated tables here hold rows: a
// joining node takes its data from the group, and rows only it has would
// be overwritten by the copy.
func (d *Daemon) checkEmpty(ctx context.Context) error {
	rows, err := d.db.Query(ctx, `SELECT relation FROM pgmesh.user_tables ORDER BY 1`)
	if err != nil {
		return fmt.Errorf("list replicated tables: %w", err)
	}
	tables, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("list replicated tables: %w", err)
	}
	for _, t := range tables {
		var any bool
		if err := d.db.QueryRow(ctx, "SELECT EXISTS (SELECT 1 FROM "+t+")").Scan(&any); err != nil {
			return fmt.Errorf("check table %s: %w", t, err)
		}
		if any {
			return fmt.Errorf("table %s on this node already holds rows, which the join would replace with the group's: empty %s (or join with an empty database)", t, t)
		}
	}
	return nil
}

// part parts a member: an active one once its changes have reached every
// other member (drainParting), unless req.Force; the leader then records
// it as parted (cluster.part).
func (d *Daemon) part(ctx context.Context, req api.PartRequest) (api.JoinResponse, error) {
	g, err := d.cluster.group(ctx)
	if err != nil {
		return api.JoinResponse{}, err
	}
	if g == nil {
		return api.JoinResponse{}, withStatus(http.StatusConflict, fmt.Errorf("node %q is not in a node group", d.cfg.NodeName))
	}
	n := g.Nodes[req.Name]
	if n == nil || n.State == membership.Parted {
		return api.JoinResponse{}, withStatus(http.StatusNotFound, fmt.Errorf("node %q is not a member of group %q: 'pgmesh status' lists the members", req.Name, g.Name))
	}
	token, err := d.cluster.loadToken()
	if err != nil {
		return api.JoinResponse{}, withStatus(http.StatusConflict, err)
	}
	if !req.Force && n.State == membership.Active {
		if err := d.drainParting(ctx, g, n); err != nil {
			return api.JoinResponse{}, withStatus(http.StatusConflict, err)
		}
	}
	return d.cluster.client(d.cfg.AdvertiseAPI, token).ClusterPart(ctx, req)
}

// partDrainTimeout bounds how long a part waits for the remaining members
// to apply the parting node's changes.
const partDrainTimeout = 2 * time.Minute

// drainParting waits until every remaining active member has applied all
// that the parting node had written when the part began, so nothing it
// committed is lost with it.
func (d *Daemon) drainParting(ctx context.Context, g *membership.Group, parting *membership.Node) error {
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	var target pglogrepl.LSN
	conn, err := pgsession.Connect(cctx, d.cluster.peerDSN(parting), "pgmesh part")
	if err == nil {
		// The insert position, not pg_current_wal_lsn() (the write
		// position), which lags commits under synchronous_commit = off.
		err = conn.QueryRow(cctx, `SELECT pg_current_wal_insert_lsn()`).Scan(&target)
		conn.Close(context.Background())
	}
	cancel()
	if err != nil {
		return fmt.Errorf("node %q cannot be reached (%v), so pgmesh cannot make sure the others have all its changes: if it is gone for good, part it with --force (changes it committed that some members had not received are then lost)", parting.Name, err)
	}
	deadline := time.Now().Add(partDrainTimeout)
	for _, m := range g.Sorted() {
		if m.Name == parting.Name || m.State != membership.Active {
			continue
		}
		behind := fmt.Errorf("member %q has not applied %q's changes up to %s within %s: check its stream in 'pgmesh status', or part with --force", m.Name, parting.Name, target, partDrainTimeout)
		var err error
		if m.Name == d.cfg.NodeName {
			err = poll.Until(ctx, 200*time.Millisecond, time.Until(deadline), func() error {
				if lsn, ok := d.appliedFrom(parting.Name); ok && lsn >= target {
					return nil
				}
				return behind
			})
		} else if err = waitApplied(ctx, d.cluster.client(d.cluster.peerAPI(m), ""), parting.Name, target, time.Until(deadline)); err != nil {
			err = behind
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// appliedFrom reports how far this node has applied peer's changes.
func (d *Daemon) appliedFrom(peer string) (pglogrepl.LSN, bool) {
	for _, s := range d.reconciler.streams.statuses() {
		if s.Peer == peer {
			lsn, err := pglogrepl.ParseLSN(s.AppliedLSN)
			return lsn, err == nil
		}
	}
	return 0, false
}
