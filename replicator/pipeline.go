package replicator

import (
	"context"
	"fmt"
	"slices"
)

// pipeline owns sending closed groups to the local database and reading
// their results, in order, without waiting for the server between them.
// Groups are sent in batches, or one by one behind those in flight; when
// they are read back is the grouped mode's decision (send, idle). Each
// group is one implicit local transaction (its statements, then a Sync),
// carried by the session. What to do with a failed group is the grouped
// mode's decision, not the pipeline's.
type pipeline struct {
	s           session
	queued      []*fastGroup // closed, not yet sent
	queuedBytes int
	sent        []*fastGroup // in flight: sent, not yet read back
	sentBytes   int
	open        bool // groups with statements are in flight
}

// enqueue adds a closed group to those to send next and reports whether
// they are enough to be sent.
func (p *pipeline) enqueue(g *fastGroup) (full bool) {
	p.queued = append(p.queued, g)
	p.queuedBytes += g.size
	return len(p.queued) >= fastMaxInFlight || p.queuedBytes >= fastMaxInFlightBytes
}

// busy reports whether groups wait to be sent or read back.
func (p *pipeline) busy() bool { return len(p.queued)+len(p.sent) > 0 }

// inFlight reports whether groups were sent and not yet read back.
func (p *pipeline) inFlight() bool { return len(p.sent) > 0 }

// full reports whether enough is in flight that it must be read back
// before more is sent: its groups hold their transactions until then.
func (p *pipeline) full() bool {
	return len(p.sent) >= fastMaxInFlight || p.sentBytes >= fastMaxInFlightBytes
}

// flush sends the queued groups after those in flight. Groups without
// statements need no round trip: when none is in flight and no queued
// group has any, they are returned at once as done; otherwise they are
// done in their turn, never before a group sent earlier.
func (p *pipeline) flush(ctx context.Context) (done []*fastGroup, err error) {
	queued, bytes := p.queued, p.queuedBytes
	p.queued, p.queuedBytes = nil, 0
	if !slices.ContainsFunc(queued, (*fastGroup).applies) {
		if !p.inFlight() {
			return queued, nil
		}
		p.sent = append(p.sent, queued...)
		return nil, nil
	}
	p.sent, p.sentBytes, p.open = append(p.sent, queued...), p.sentBytes+bytes, true
	var applying []*fastGroup
	for _, g := range queued {
		if g.applies() {
			applying = append(applying, g)
		}
	}
	return nil, p.s.sendBatch(ctx, applying)
}

// collect reads back every group in flight: the groups committed (in
// order, up to the first failure), and that group and all after it, which
// did not commit (each later one checks that its predecessor did), with
// the first failure's cause. err is set when the connection failed.
func (p *pipeline) collect() (committed, failed []*fastGroup, cause error, err error) {
	sent := p.sent
	p.sent, p.sentBytes = nil, 0
	if !p.open {
		return sent, nil, nil, nil // none has statements: nothing to read
	}
	p.open = false
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
	p.queued, p.sent, p.queuedBytes, p.sentBytes, p.open = nil, nil, 0, 0, false
}
