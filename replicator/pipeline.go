package replicator

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5/pgconn"
)

// pipeline owns sending closed groups to the local database and reading
// their results, in order, without waiting for the server between them: a
// batch of groups is sent, and read back when the next batch is due. Each
// group is one implicit local transaction (its statements, then a Sync).
// What to do with a failed group is the applier's decision, not the
// pipeline's.
type pipeline struct {
	pc          *pgconn.PgConn
	queued      []*fastGroup // closed, not yet sent
	queuedBytes int
	sent        []*fastGroup // in the open batch
	pl          *pgconn.Pipeline
}

// enqueue adds a closed group to the next batch and reports whether that
// batch is full enough to be sent.
func (p *pipeline) enqueue(g *fastGroup) (full bool) {
	p.queued = append(p.queued, g)
	p.queuedBytes += g.size
	return len(p.queued) >= fastMaxQueued || p.queuedBytes >= fastMaxQueueBytes
}

// busy reports whether groups wait to be sent or read back.
func (p *pipeline) busy() bool { return len(p.queued)+len(p.sent) > 0 }

// inFlight reports whether a batch was sent and not yet read back.
func (p *pipeline) inFlight() bool { return len(p.sent) > 0 }

// flush sends the queued groups as the next batch; the previous one must
// have been collected. Groups without statements need no round trip: when
// no queued group has any, they are returned at once as done.
func (p *pipeline) flush(ctx context.Context) (done []*fastGroup, err error) {
	queued := p.queued
	p.queued, p.queuedBytes = nil, 0
	if !slices.ContainsFunc(queued, (*fastGroup).applies) {
		return queued, nil
	}
	p.pl = p.pc.StartPipeline(ctx)
	for _, g := range queued {
		if !g.applies() {
			continue
		}
		for _, s := range g.stmts {
			p.pl.SendQueryPrepared(s.name, s.params, s.formats, nil)
		}
		p.pl.SendPipelineSync()
	}
	p.sent = queued
	if err := p.pl.Flush(); err != nil {
		return nil, fmt.Errorf("send transactions to the local database: %w", err)
	}
	return nil, nil
}

// collect reads back the batch in flight: the groups committed (in order,
// up to the first failure), and that group and all after it, which did not
// commit (each later one checks that its predecessor did), with the first
// failure's cause. err is set when the connection failed.
func (p *pipeline) collect() (committed, failed []*fastGroup, cause error, err error) {
	if p.pl == nil {
		return nil, nil, nil, nil
	}
	sent := p.sent
	p.sent = nil
	first := -1
	for i, g := range sent {
		if !g.applies() {
			continue
		}
		failure, err := p.readGroup()
		if err != nil {
			p.pl = nil
			return nil, nil, nil, fmt.Errorf("read apply results from the local database: %w", err)
		}
		if failure != nil && first < 0 {
			first, cause = i, failure
		}
	}
	err = p.pl.Close()
	p.pl = nil
	var pe *pgconn.PgError
	if err != nil && !errors.As(err, &pe) {
		return nil, nil, nil, fmt.Errorf("end apply pipeline: %w", err)
	}
	if first < 0 {
		return sent, nil, nil, nil
	}
	return sent[:first], sent[first:], cause, nil
}

// readGroup reads one group's results, through its Sync. It returns the
// server's error for the group (nil if it committed), or err when the
// connection failed.
func (p *pipeline) readGroup() (failure error, err error) {
	keep := func(err error) {
		if failure == nil {
			failure = err
		}
	}
	for {
		res, err := p.pl.GetResults()
		if err != nil {
			var pe *pgconn.PgError
			if !errors.As(err, &pe) {
				return nil, err
			}
			keep(err)
			continue
		}
		switch r := res.(type) {
		case *pgconn.ResultReader:
			if _, err := r.Close(); err != nil {
				var pe *pgconn.PgError
				if !errors.As(err, &pe) {
					return nil, err
				}
				keep(err)
			}
		case *pgconn.PipelineSync:
			return failure, nil
		case nil:
			return nil, errors.New("the pipeline ended before the transaction's sync")
		}
	}
}

// abandon drops the batch in flight after an error; the connection is
// closed next.
func (p *pipeline) abandon() {
	if p.pl != nil {
		_ = p.pl.Close()
		p.pl = nil
	}
	p.queued, p.sent, p.queuedBytes = nil, nil, 0
}
