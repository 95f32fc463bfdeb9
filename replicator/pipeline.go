package replicator

import (
	"context"
	"fmt"
	"slices"
)

// pipeline owns sending closed groups to the local database and reading
// their results, in order, without waiting for the server between them: a
// batch of groups is sent, and read back when the next batch is due. Each
// group is one implicit local transaction (its statements, then a Sync),
// carried by the session. What to do with a failed group is the grouped
// mode's decision, not the pipeline's.
type pipeline struct {
	s           session
	queued      []*fastGroup // closed, not yet sent
	queuedBytes int
	sent        []*fastGroup // in the open batch
	open        bool         // a batch was sent and not read back
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
	p.sent, p.open = queued, true
	var applying []*fastGroup
	for _, g := range queued {
		if g.applies() {
			applying = append(applying, g)
		}
	}
	return nil, p.s.sendBatch(ctx, applying)
}

// collect reads back the batch in flight: the groups committed (in order,
// up to the first failure), and that group and all after it, which did not
// commit (each later one checks that its predecessor did), with the first
// failure's cause. err is set when the connection failed.
func (p *pipeline) collect() (committed, failed []*fastGroup, cause error, err error) {
	if !p.open {
		return nil, nil, nil, nil
	}
	sent := p.sent
	p.sent, p.open = nil, false
	first := -1
	for i, g := range sent {
		if !g.applies() {
			continue
		}
		failure, err := p.s.readGroup()
		if err != nil {
			return nil, nil, nil, fmt.Errorf("read apply results from the local database: %w", err)
		}
		if failure != nil && first < 0 {
			first, cause = i, failure
		}
	}
	if err := p.s.endBatch(first >= 0); err != nil {
		return nil, nil, nil, err
	}
	if first < 0 {
		return sent, nil, nil, nil
	}
	return sent[:first], sent[first:], cause, nil
}

// abandon drops the batch in flight after an error; the connection is
// closed next.
func (p *pipeline) abandon() {
	p.queued, p.sent, p.queuedBytes, p.open = nil, nil, 0, false
}
