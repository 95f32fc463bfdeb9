package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/internal/dsn"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/origin"
	"github.com/pgmesh/pgmesh/replicator"
)

// reconcileEvery bounds how long a missed change or a repairable problem
// waits for the next reconcile pass.
const reconcileEvery = 5 * time.Second

// reconciler makes this node match the group: its streams (one per active
// peer), its publications (the replication sets), pgmesh.node, and the
// origins and slots of parted peers. It owns the streams and the gate that
// holds them while a joining node takes a snapshot here.
type reconciler struct {
	self, dsn  string
	db         *pgxpool.Pool
	store      *membership.Store
	cluster    *cluster
	resolution *resolution
	slots      *slotCheck
	problems   *problemLog
	log        *slog.Logger
	// base is how every stream runs; streamConfig adds the peer.
	base replicator.Config

	streams      supervisor
	publications publications
	nodeTable    nodeTable
	ids          atomic.Pointer[map[string]int]
	gate         replicator.Gate
}

// run reconciles on every membership change and periodically, until ctx
// ends; then it stops the streams.
func (rc *reconciler) run(ctx context.Context) {
	defer rc.streams.stopAll()
	t := time.NewTicker(reconcileEvery)
	defer t.Stop()
	for {
		g, changed := rc.store.Group()
		rc.reconcile(ctx, g)
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-t.C:
		}
	}
}

// reconcile makes the local streams, origins and slots match the group.
func (rc *reconciler) reconcile(ctx context.Context, g *membership.Group) {
	var problems []string
	if err := rc.checkTables(ctx, g, &problems); err != nil {
		problems = append(problems, err.Error())
	}
	if g == nil {
		rc.problems.set("reconcile", problems)
		return
	}
	if err := rc.syncNodeTable(ctx, g); err != nil {
		rc.log.Warn("update pgmesh.node", "err", err)
	}
	if err := rc.slots.check(ctx, g, &problems); err != nil {
		problems = append(problems, err.Error())
	}
	ids := make(map[string]int, len(g.Nodes))
	for _, n := range g.Nodes {
		ids[n.Name] = n.ID
	}
	rc.ids.Store(&ids)
	if err := rc.resolution.adopt(ctx, g.Nodes); err != nil {
		problems = append(problems, err.Error())
	}
	me := g.Nodes[rc.self]
	res := rc.resolution.get().String()
	agreed := true
	if other := differingResolution(g, res, ""); other != nil && me != nil {
		agreed = false
		problems = append(problems, fmt.Sprintf("this node has luw_resolution %s, but %s uses %s: every node must round commit times the same way, so nothing is applied here until luw_resolution is %s in this node's config and pgmesh is restarted",
			res, describeMember(other, rc.self), other.LUWResolution, other.LUWResolution))
	}
	// Streams run only once this node is active: a joining node's slots
	// are still being made.
	want := map[string]replicator.Config{}
	if me != nil && me.State == membership.Active && agreed {
		for _, n := range g.Nodes {
			if n.Name != me.Name && n.State == membership.Active {
				want[n.Name] = rc.streamConfig(n)
			}
		}
	}
	rc.streams.match(ctx, want)
	problems = append(problems, rc.forgetParted(ctx, g, me)...)
	rc.problems.set("reconcile", problems)
}

// forgetParted drops what this node kept for parted peers, or for the whole
// group once it is parted itself, and returns what failed.
func (rc *reconciler) forgetParted(ctx context.Context, g *membership.Group, me *membership.Node) []string {
	// A node parted in an older state may have joined again since.
	if !rc.publications.isCurrent() {
		return nil
	}
	var problems []string
	for _, n := range g.Nodes {
		if n.State == membership.Parted && n.Name != rc.self {
			if err := rc.forgetPeer(ctx, n.Name); err != nil {
				problems = append(problems, err.Error())
			}
		}
	}
	if me != nil && me.State == membership.Parted {
		if err := rc.forgetAll(ctx); err != nil {
			problems = append(problems, err.Error())
		}
	}
	return problems
}

// describeMember names a member in a sentence.
func describeMember(n *membership.Node, self string) string {
	if n.Name == self {
		return "this node's record in the group (from when it joined)"
	}
	return "member " + n.Name
}

// nodeID returns a node's id by name (0 if unknown), for tie-breaks.
func (rc *reconciler) nodeID(name string) int {
	if m := rc.ids.Load(); m != nil {
		return (*m)[name]
	}
	return 0
}

// streamConfig is how this node streams from peer n.
func (rc *reconciler) streamConfig(n *membership.Node) replicator.Config {
	c := rc.base
	c.Peer = replicator.Peer{Name: n.Name, ID: n.ID, DSN: rc.cluster.peerDSN(n)}
	c.NodeID = rc.nodeID
	c.Gate = &rc.gate
	c.Rule = rc.resolution.rule()
	return c
}

// forgetPeer drops what this node kept for a parted peer: its origin here and
// the slot it consumed here.
func (rc *reconciler) forgetPeer(ctx context.Context, peer string) error {
	return withConn(ctx, rc.db, func(conn *pgx.Conn) error {
		if err := origin.Drop(ctx, conn, peer); err != nil {
			return err
		}
		// A promotion's record of the peer must not apply to its next slot.
		if _, err := conn.Exec(ctx, `WITH s AS (DELETE FROM pgmesh.recreated_slot WHERE peer = $1)
			DELETE FROM pgmesh.origin_reset WHERE node = $1`, peer); err != nil {
			return fmt.Errorf("forget what a promotion recorded of %s: %w", peer, err)
		}
		return dropSlot(ctx, conn, origin.SlotName(peer))
	})
}

// forgetAll is forgetPeer for every pgmesh origin and slot, once this node
// itself has been parted.
func (rc *reconciler) forgetAll(ctx context.Context) error {
	rc.streams.stopAll()
	rows, err := rc.db.Query(ctx, `SELECT roname FROM pg_replication_origin WHERE roname LIKE 'pgmesh\_%'
		UNION SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE 'pgmesh\_%'`)
	if err != nil {
		return fmt.Errorf("list pgmesh origins and slots: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, n := range names {
		if peer, ok := origin.NodeOf(n); ok {
			if err := rc.forgetPeer(ctx, peer); err != nil {
				return err
			}
		}
	}
	return forgetGroupState(ctx, rc.db)
}

// forgetGroupState forgets which group state the publications followed: a
// group this node creates or joins next counts its Raft indexes anew.
func forgetGroupState(ctx context.Context, db *pgxpool.Pool) error {
	if _, err := db.Exec(ctx, `DELETE FROM pgmesh.setting WHERE name = 'publications_raft_index'`); err != nil {
		return fmt.Errorf("forget the group state the publications followed: %w", err)
	}
	return nil
}

func dropSlot(ctx context.Context, conn *pgx.Conn, slot string) error {
	// A walsender still serving the slot must go first.
	if _, err := conn.Exec(ctx, `SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots
		WHERE slot_name = $1 AND active_pid IS NOT NULL`, slot); err != nil {
		return fmt.Errorf("stop walsender of slot %s: %w", slot, err)
	}
	if _, err := conn.Exec(ctx, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots
		WHERE slot_name = $1 AND active_pid IS NULL`, slot); err != nil {
		return fmt.Errorf("drop replication slot %s: %w", slot, err)
	}
	return nil
}

// syncNodeTable mirrors the group into pgmesh.node.
func (rc *reconciler) syncNodeTable(ctx context.Context, g *membership.Group) error {
	return rc.nodeTable.sync(ctx, rc.db, g, rc.self)
}

// publishHere makes this node's publications for the group's members.
func (rc *reconciler) publishHere(ctx context.Context, g *membership.Group) error {
	return withConn(ctx, rc.db, func(conn *pgx.Conn) error {
		_, err := rc.publications.sync(ctx, conn, g, rc.receivers(g))
		return err
	})
}

// checkTables keeps the publications current with the replication sets and
// reports replicated tables whose updates and deletes cannot replicate for
// lack of a key.
func (rc *reconciler) checkTables(ctx context.Context, g *membership.Group, problems *[]string) error {
	conn, err := rc.db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres %s: %w", dsn.Describe(rc.dsn), err)
	}
	defer conn.Release()
	if g != nil {
		current, err := rc.publications.sync(ctx, conn.Conn(), g, rc.receivers(g))
		if err != nil {
			return err
		}
		if !current {
			return nil // an older state than the publications follow: wait
		}
	}
	if err := ensureTombstoneTriggers(ctx, conn.Conn()); err != nil {
		return err
	}
	rows, err := conn.Query(ctx, `SELECT format('%I.%I', n.nspname, c.relname)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		WHERE format('%I.%I', n.nspname, c.relname) IN (SELECT relation FROM pgmesh.replication_set_tables)
		  AND (c.relreplident = 'n' OR (c.relreplident = 'd'
		      AND NOT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
		ORDER BY 1`)
	if err != nil {
		return fmt.Errorf("check replica identities: %w", err)
	}
	names, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return fmt.Errorf("check replica identities: %w", err)
	}
	for _, t := range names {
		*problems = append(*problems, fmt.Sprintf("table %s has no primary key or replica identity, so its updates and deletes fail and cannot replicate: add a primary key (or ALTER TABLE %s REPLICA IDENTITY FULL)", t, t))
	}
	return nil
}

// receivers are the nodes this node publishes to: every other member not
// parted (a joining node included: its slots here are made during the join).
func (rc *reconciler) receivers(g *membership.Group) []string {
	return slices.DeleteFunc(g.Receivers(), func(n string) bool { return n == rc.self })
}

// withConn runs fn on a connection of db, for calls that take a *pgx.Conn
// (and may open a transaction on it).
func withConn(ctx context.Context, db *pgxpool.Pool, fn func(*pgx.Conn) error) error {
	conn, err := db.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("cannot connect to local Postgres: %w", err)
	}
	defer conn.Release()
	return fn(conn.Conn())
}
