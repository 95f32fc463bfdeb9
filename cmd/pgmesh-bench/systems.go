package main

import (
	"context"
	"fmt"
	"time"

	"github.com/pgmesh/pgmesh/internal/localmesh"
	"github.com/pgmesh/pgmesh/internal/pgtest"
)

// meshPair is a two-node pgmesh group; b receives.
type meshPair struct{ a, b *localmesh.Node }

func newMesh(ctx context.Context, bin string) (*meshPair, error) {
	p := &meshPair{}
	var err error
	if p.a, err = localmesh.NewNode(ctx, bin, "a", pgtest.Options{}); err != nil {
		return nil, err
	}
	if p.b, err = localmesh.NewNode(ctx, bin, "b", pgtest.Options{}); err != nil {
		p.a.Remove()
		return nil, err
	}
	if err := p.a.PG.Exec(ctx, schema); err != nil {
		p.close()
		return nil, err
	}
	if err := pgbench(ctx, p.a.PG, "-i", "-q", "-s", "1"); err != nil {
		p.close()
		return nil, err
	}
	for _, n := range []*localmesh.Node{p.a, p.b} {
		if err := n.Start(ctx); err != nil {
			p.close()
			return nil, err
		}
	}
	// b joins with an empty database: schema and data are copied.
	if _, err := localmesh.Form(ctx, "bench", p.a, p.b); err != nil {
		p.close()
		return nil, err
	}
	if err := p.b.PG.Exec(ctx, stampArrival); err != nil {
		p.close()
		return nil, err
	}
	return p, localmesh.WaitConnected(ctx, 30*time.Second, p.a, p.b)
}

func (p *meshPair) name() string              { return "pgmesh" }
func (p *meshPair) sender() *pgtest.Cluster   { return p.a.PG }
func (p *meshPair) receiver() *pgtest.Cluster { return p.b.PG }
func (p *meshPair) hold(context.Context) error {
	return p.b.Stop()
}

func (p *meshPair) release(ctx context.Context) error {
	if err := p.b.Start(ctx); err != nil {
		return err
	}
	return localmesh.WaitConnected(ctx, 30*time.Second, p.a, p.b)
}

// settle waits for both streams: on PostgreSQL 15 the sender's daemon also
// reads back every transaction the receiver applied (and drops it).
func (p *meshPair) settle(ctx context.Context) error {
	return localmesh.CaughtUp(ctx, 5*time.Minute, p.a, p.b)
}

func (p *meshPair) close() {
	// A clean stop, so that a daemon's CPU profile (-profile) is written.
	_ = p.a.Stop()
	if p.b != nil {
		_ = p.b.Stop()
	}
	p.a.Remove()
	if p.b != nil {
		p.b.Remove()
	}
}

// nativePair is a publication on a and a subscription on b.
type nativePair struct{ a, b *pgtest.Cluster }

func newNative(ctx context.Context) (*nativePair, error) {
	p := &nativePair{}
	var err error
	if p.a, err = pgtest.Start(ctx, pgtest.Options{}); err != nil {
		return nil, err
	}
	if p.b, err = pgtest.Start(ctx, pgtest.Options{}); err != nil {
		p.a.Remove()
		return nil, err
	}
	steps := []func() error{
		func() error { return p.a.Exec(ctx, schema) },
		func() error { return p.b.Exec(ctx, schema) },
		func() error { return pgbench(ctx, p.a, "-i", "-q", "-s", "1") },
		func() error { return pgbench(ctx, p.b, "-i", "-q", "-s", "1", "-I", "dtp") }, // tables and keys only
		func() error { return p.b.Exec(ctx, stampArrival) },
		func() error { return p.a.Exec(ctx, `CREATE PUBLICATION bench FOR ALL TABLES`) },
		func() error {
			return p.b.Exec(ctx, fmt.Sprintf(`CREATE SUBSCRIPTION bench CONNECTION 'host=127.0.0.1 port=%d user=postgres dbname=postgres' PUBLICATION bench`, p.a.Port))
		},
		func() error {
			return waitFor(ctx, p.b, `SELECT CASE WHEN count(*) = 100000 THEN 1 ELSE 0 END FROM pgbench_accounts WHERE $1::int = 1`, 1)
		},
	}
	for _, s := range steps {
		if err := s(); err != nil {
			p.close()
			return nil, err
		}
	}
	return p, nil
}

func (p *nativePair) name() string              { return "native" }
func (p *nativePair) sender() *pgtest.Cluster   { return p.a }
func (p *nativePair) receiver() *pgtest.Cluster { return p.b }

func (p *nativePair) hold(ctx context.Context) error {
	if err := p.b.Exec(ctx, `ALTER SUBSCRIPTION bench DISABLE`); err != nil {
		return err
	}
	// Wait until the apply worker has exited.
	return waitFor(ctx, p.b, `SELECT CASE WHEN count(*) = 0 THEN 1 ELSE 0 END FROM pg_stat_subscription WHERE pid IS NOT NULL AND $1::int = 1`, 1)
}

func (p *nativePair) release(ctx context.Context) error {
	if err := p.b.Exec(ctx, `ALTER SUBSCRIPTION bench ENABLE`); err != nil {
		return err
	}
	return waitFor(ctx, p.b, `SELECT count(*) FROM pg_stat_subscription WHERE pid IS NOT NULL AND $1::int = 1`, 1)
}

func (p *nativePair) settle(context.Context) error { return nil }

func (p *nativePair) close() {
	if p.a != nil {
		p.a.Remove()
	}
	if p.b != nil {
		p.b.Remove()
	}
}
