// Package replicator runs one stream per peer: a logical replication
// connection to the peer (pgoutput), decoding, and an apply connection to the
// local database, with feedback that never runs ahead of what is committed.
package replicator

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/origin"
)

// Peer is a node this node streams from.
type Peer struct {
	Name string
	ID   int
	DSN  string // how to reach the peer's Postgres (no password inside)
}

// Config describes one stream.
type Config struct {
	LocalNode string
	LocalDSN  string
	Peer      Peer
	// NodeID returns the id of a node by name (0 if unknown); it is used to
	// break last-update-wins ties and must be safe for concurrent use.
	NodeID func(name string) int
	Logger *slog.Logger
	// StatusInterval is how often feedback is sent and the peer asked for
	// its position (default 100ms); read-your-own-writes waits on it.
	StatusInterval time.Duration
	// Gate, when set, can hold the stream between transactions.
	Gate *Gate
	// Rule is the group's last-update-wins rule; every node must use the
	// same (see conflict.Rule).
	Rule conflict.Rule
	// MaxClockSkew is how far the peer's clock may be ahead of ours before
	// it is reported (0: never).
	MaxClockSkew time.Duration
	// DeletedMissing, when set, is called after a transaction that deleted
	// a key with no row here committed: an insert of the key in progress
	// meanwhile may have missed the delete, which RemoveOvertaken repairs.
	// It must not block.
	DeletedMissing func()
	// OnApplyError is what a change that fails with an error of its own
	// does to its table, unless the table has its own policy: OnErrorStop
	// (the default) or OnErrorPark (park.go).
	OnApplyError string
	// StandbySlots are the physical slots of this node's standbys that may
	// be promoted: a change applied here is confirmed to the peer only once
	// every one of them has flushed it, as the local WAL has (standby.go).
	StandbySlots []string
}

// Stream replicates one peer into the local database until its context ends.
type Stream struct {
	cfg   Config
	stats *stats
	log   *slog.Logger
	// retryLSN is a large transaction (FinalLSN) whose bulk apply failed:
	// streamed again, it takes the careful path.
	retryLSN pglogrepl.LSN
	// flush holds confirmations until the local WAL and the standbys have
	// flushed what they confirm.
	flush *flushWatch
	// parked are the tables whose changes from the peer are parked (park.go),
	// and requests the replays and discards waiting for the stream.
	parked   parkedTables
	requests chan queueRequest
}

// New returns a stream; call Run to start it.
func New(cfg Config) *Stream {
	if cfg.StatusInterval == 0 {
		cfg.StatusInterval = 100 * time.Millisecond
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	return &Stream{cfg: cfg, stats: newStats(cfg.Peer.Name),
		log: cfg.Logger.With("peer", cfg.Peer.Name), flush: newFlushWatch(cfg),
		parked: parkedTables{}, requests: make(chan queueRequest)}
}

// Status returns a snapshot of the stream's progress.
func (s *Stream) Status() Status { return s.stats.snapshot() }

// Run streams until ctx is done, reconnecting with backoff after errors. A
// change that fails to apply is retried from the same position after each
// reconnect: nothing is skipped.
func (s *Stream) Run(ctx context.Context) {
	defer s.flush.close()
	backoff := 500 * time.Millisecond
	for {
		start := time.Now()
		err := s.runOnce(ctx)
		s.stats.setConnected(false)
		if ctx.Err() != nil {
			return
		}
		if pt, ok := errors.AsType[*parkTable](err); ok {
			t := pt.failed.table
			s.parked[t] = pt.failed.Error()
			fix := "fix the cause on this node"
			if hint := fixHint(pt.failed.err); hint != "" {
				s.parked[t] += "; " + hint
				fix = hint
			}
			s.log.Warn("parking the changes of a table that failed to apply; the stream goes on for every other table",
				"table", t.String(), "err", pt.failed.err,
				"fix", fmt.Sprintf("%s, then run pgmesh replay %s --peer %s (pgmesh parked lists what waits)", fix, t, s.cfg.Peer.Name))
			continue
		}
		var retry *retryCarefully
		if errors.As(err, &retry) {
			s.log.Info("a large transaction did not apply in bulk; applying it carefully", "err", err)
			s.retryLSN = retry.lsn
			s.stats.fallback(1)
			continue
		}
		if transient(err) {
			// A deadlock, serialization failure or race against local
			// writers: the transaction is retried from the same change at
			// once.
			s.log.Info("apply transaction met a concurrent local write; retrying it", "err", err)
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		s.stats.setError(err)
		s.log.Error("stream to peer stopped; retrying", "err", err, "retry_in", backoff)
		if time.Since(start) > time.Minute {
			backoff = 500 * time.Millisecond
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 15*time.Second)
	}
}

// idleStatusInterval is how often a stream that received no change for
// that long reports and asks for the peer's position; a stream with data
// does so every Config.StatusInterval, and within confirmDelay of each
// commit.
const idleStatusInterval = time.Second

// confirmDelay is how long a position committed or passed here may wait
// before the peer is told. Told at once, every transaction cost a status,
// and a flush here when the stream is quiet (standby.go); wait_for_peers
// looks every 10 ms anyway.
const confirmDelay = 10 * time.Millisecond

// flushProgress flushes the local WAL up to the apply session's last
// commit (which committed asynchronously: standby.go).
const flushProgress = `SELECT pg_catalog.pg_replication_origin_session_progress(true)`

// sendStatus confirms flushed to the peer, or as much of it as the local
// WAL and this node's standbys have flushed, asking for the peer's position
// if ask.
func (s *Stream) sendStatus(ctx context.Context, repl *pgconn.PgConn, received, flushed pglogrepl.LSN, ask bool) error {
	var held string
	flushed, held = s.flush.limit(ctx, flushed)
	s.stats.setHeld(held)
	if err := pglogrepl.SendStandbyStatusUpdate(ctx, repl, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: received, WALFlushPosition: flushed, WALApplyPosition: flushed,
		ReplyRequested: ask,
	}); err != nil {
		return fmt.Errorf("send feedback to peer %q: %w", s.cfg.Peer.Name, err)
	}
	return nil
}

// transient reports errors that go away when the transaction is retried:
// lock conflicts with local writers, and races with them.
func transient(err error) bool {
	var pe *pgconn.PgError
	return errors.As(err, &pe) && (pe.Code == "40P01" || pe.Code == "40001") || errors.Is(err, errRowAppeared)
}

func (s *Stream) runOnce(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	applyConn, err := s.connectApply(ctx)
	if err != nil {
		return err
	}
	defer applyConn.Close(context.Background())

	repl, err := ConnectReplication(ctx, s.cfg.Peer.DSN, "pgmesh_"+s.cfg.LocalNode)
	if err != nil {
		return fmt.Errorf("connect to peer %q for replication: %w", s.cfg.Peer.Name, err)
	}
	defer repl.Close(context.Background())

	slot := origin.SlotName(s.cfg.LocalNode)
	remade, err := checkSlot(ctx, repl, slot, s.cfg.Peer.Name, s.cfg.LocalNode)
	if err != nil {
		return err
	}
	if remade != nil {
		// Before the origin is bound to this connection: only then may it move.
		if err := s.startOver(ctx, applyConn, *remade); err != nil {
			return err
		}
	}
	progress, err := origin.SessionSetup(ctx, applyConn, s.cfg.Peer.Name)
	if err != nil {
		return err
	}
	// messages: replicated DDL travels as logical decoding messages.
	major := serverMajor(repl)
	proto := protoVersion(major)
	args := []string{"proto_version '" + strconv.Itoa(proto) + "'", "publication_names '" + origin.PublicationName(s.cfg.LocalNode) + "'", "messages 'true'"}
	if major >= 16 {
		// Ask the sender to drop forwarded transactions itself.
		args = append(args, "origin 'none'")
	}
	if err := pglogrepl.StartReplication(ctx, repl, slot, progress,
		pglogrepl.StartReplicationOptions{PluginArgs: args}); err != nil {
		return fmt.Errorf("start replication from slot %s on peer %q: %w", slot, s.cfg.Peer.Name, err)
	}
	s.stats.setConnected(true)
	s.stats.setVersions(major, proto)
	s.stats.setApplied(progress)
	s.log.Info("streaming from peer", "from_lsn", progress)

	var probes sync.WaitGroup
	probes.Go(func() { s.pollPeer(ctx) })
	defer func() { cancel(); probes.Wait() }()

	// The fast path recognises rows last written by this peer by origin id.
	var roident uint32
	if err := applyConn.QueryRow(ctx, `SELECT roident FROM pg_catalog.pg_replication_origin WHERE roname = $1`,
		origin.Name(s.cfg.Peer.Name)).Scan(&roident); err != nil {
		return fmt.Errorf("read replication origin of peer %q: %w", s.cfg.Peer.Name, err)
	}
	if err := s.cfg.Gate.enter(ctx); err != nil {
		return err
	}
	inside := true // false once a yield ended with ctx
	defer func() {
		if inside {
			s.cfg.Gate.leave()
		}
	}()
	if err := s.parked.load(ctx, applyConn.PgConn(), s.cfg.Peer.Name); err != nil {
		return err
	}
	a := newApplier(newPgSession(applyConn.PgConn()), &s.cfg, progress, roident, s.stats, s.retryLSN, s.parked, s.log)
	defer a.rollback(context.Background())
	err = s.receive(ctx, repl, a, progress, &inside)
	if failed, ok := errors.AsType[*applyFailed](err); ok && ctx.Err() == nil {
		// Park the table if its policy says so: asked now, on the apply
		// connection, once the failed transaction is rolled back.
		a.rollback(ctx)
		p, perr := policy(ctx, applyConn.PgConn(), failed.table, s.cfg.OnApplyError)
		if perr != nil {
			return errors.Join(err, perr)
		}
		if p == OnErrorPark {
			return &parkTable{failed: failed}
		}
	}
	return err
}

// connectApply opens the local apply connection: replica role (user triggers
// and FK checks already ran on the origin), an empty search_path (names are
// always qualified, so nothing in a user schema can hijack them), and the
// peer's replication origin, which runOnce binds to it.
func (s *Stream) connectApply(ctx context.Context) (*pgx.Conn, error) {
	// A backend waiting for its clock (pgmesh.wait_for_clock) notices a
	// daemon that went away within a second, instead of when it next writes.
	// Apply's statements are prepared once per table and column set and
	// take arrays of any length (collapse.go); PostgreSQL would plan them
	// again at every execution, as an array's length is known only then,
	// which costs more than applying a small group (about 130 us a
	// statement). Their generic plans look each row up by primary key.
	// Commits are asynchronous: the stream confirms only what the WAL has
	// flushed (standby.go).
	conn, err := pgsession.Connect(ctx, s.cfg.LocalDSN, "pgmesh apply from "+s.cfg.Peer.Name, pgsession.Applier,
		pgsession.Settings{"search_path": "", "client_connection_check_interval": "1000", "plan_cache_mode": "force_generic_plan",
			"synchronous_commit": "off"})
	if err != nil {
		return nil, fmt.Errorf("connect to local Postgres: %w", err)
	}
	if err := origin.Ensure(ctx, conn, s.cfg.Peer.Name); err != nil {
		conn.Close(ctx)
		return nil, err
	}
	return conn, nil
}

// ConnectReplication opens a logical replication connection (replication=database).
func ConnectReplication(ctx context.Context, dsn, appName string) (*pgconn.PgConn, error) {
	cfg, err := pgconn.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("parse peer dsn: %w", err)
	}
	cfg.RuntimeParams["replication"] = "database"
	cfg.RuntimeParams["application_name"] = appName
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	return pgconn.ConnectConfig(cctx, cfg)
}

// protoVersion is the highest pgoutput protocol a server of that major
// version offers: 3 (two-phase) on 15, 4 (parallel streaming) on 16 and
// later. pgmesh turns on neither streaming nor two-phase, so the messages
// it reads are the same in all of them; the newest is asked for so that
// those options are there to switch on.
func protoVersion(major int) int {
	if major >= 16 {
		return 4
	}
	return 3
}

func serverMajor(c *pgconn.PgConn) int {
	v := c.ParameterStatus("server_version")
	major, _ := strconv.Atoi(strings.SplitN(v, ".", 2)[0])
	return major
}

// checkSlot makes sure this node's slot exists on the peer, and returns
// where it starts if the peer made it again after a promotion (else nil).
// A slot missing otherwise is never recreated silently: what the peer
// committed since it vanished would be lost.
func checkSlot(ctx context.Context, repl *pgconn.PgConn, slot, peer, local string) (*remadeSlot, error) {
	// The peer's own view: its slot, the slot's row in recreated_slot, and
	// whether it was promoted since every peer's slot was there (it then
	// makes the missing ones again within seconds: daemon/promotion.go).
	res, err := repl.Exec(ctx, `SELECT (SELECT plugin FROM pg_catalog.pg_replication_slots WHERE slot_name = `+pgquote.Literal(slot)+`),
		r.timeline, r.start_lsn,
		CASE WHEN pg_catalog.pg_is_in_recovery() OR w.timeline IS NULL THEN false
		     ELSE pgmesh.wal_timeline() > w.timeline END
		FROM (SELECT (SELECT value::bigint FROM pgmesh.setting WHERE name = 'slots_timeline') AS timeline) w
		LEFT JOIN pgmesh.recreated_slot r ON r.peer = `+pgquote.Literal(local)).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("look up slot %s on peer %q: %w", slot, peer, err)
	}
	if len(res) == 0 || len(res[0].Rows) == 0 {
		return nil, fmt.Errorf("look up slot %s on peer %q: no answer", slot, peer)
	}
	row := res[0].Rows[0]
	plugin, timeline, start, promoted := row[0], row[1], row[2], string(row[3]) == "t"
	switch {
	case plugin == nil && promoted:
		return nil, fmt.Errorf("replication slot %s is missing on peer %q, which was promoted from a standby since: it makes the slot again shortly (docs/high-availability.md)", slot, peer)
	case plugin == nil:
		return nil, fmt.Errorf("replication slot %s is missing on peer %q, so changes made there since it was dropped cannot be streamed: part this node and join it again (pgmesh node part, pgmesh group join)", slot, peer)
	case string(plugin) != "pgoutput":
		return nil, fmt.Errorf("slot %s on peer %q uses plugin %q, not pgoutput: drop it on the peer and rejoin this node", slot, peer, plugin)
	case timeline == nil:
		return nil, nil
	case start == nil:
		return nil, fmt.Errorf("peer %q is making slot %s again after a promotion: streaming starts once it has", peer, slot)
	}
	r := remadeSlot{}
	if r.Timeline, err = strconv.Atoi(string(timeline)); err != nil {
		return nil, fmt.Errorf("peer %q: timeline %q of slot %s: %w", peer, timeline, slot, err)
	}
	if r.Start, err = pglogrepl.ParseLSN(string(start)); err != nil {
		return nil, fmt.Errorf("peer %q: start %q of slot %s: %w", peer, start, slot, err)
	}
	return &r, nil
}

// remadeSlot is a slot a peer made again after its Postgres was promoted:
// on which timeline, and where it starts.
type remadeSlot struct {
	Timeline int
	Start    pglogrepl.LSN
}

// startOver moves this node's origin for the peer to where the peer's slot
// made again starts, once per such slot: the old position belongs to the
// timeline that ended with the old primary and may lie beyond it, which
// would skip what the promoted server commits up to there. What no stream
// carries (on the old timeline past what this node got, and on the new one
// before the slot) the peer settles with compare and repair.
func (s *Stream) startOver(ctx context.Context, conn *pgx.Conn, r remadeSlot) error {
	var done bool
	if err := conn.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pgmesh.origin_reset WHERE node = $1 AND timeline = $2 AND start_lsn = $3::text::pg_lsn)`,
		s.cfg.Peer.Name, r.Timeline, r.Start.String()).Scan(&done); err != nil {
		return fmt.Errorf("read whether the origin of peer %q was reset: %w", s.cfg.Peer.Name, err)
	}
	if done {
		return nil
	}
	from, err := origin.Reset(ctx, conn, s.cfg.Peer.Name, r.Start)
	if err != nil {
		return err
	}
	// Moved but not recorded (a crash here): the next start moves it to the
	// same place again, as nothing was applied from the peer in between.
	if _, err := conn.Exec(ctx, `INSERT INTO pgmesh.origin_reset (node, timeline, start_lsn, from_lsn) VALUES ($1, $2, $3::text::pg_lsn, $4::text::pg_lsn)
		ON CONFLICT (node) DO UPDATE SET timeline = EXCLUDED.timeline, start_lsn = EXCLUDED.start_lsn, from_lsn = EXCLUDED.from_lsn, reset_at = now()`,
		s.cfg.Peer.Name, r.Timeline, r.Start.String(), from.String()); err != nil {
		return fmt.Errorf("record the reset of the origin of peer %q: %w", s.cfg.Peer.Name, err)
	}
	s.log.Warn("the peer was promoted from a standby and made this node's slot again: streaming starts where the new slot does, and the peer repairs what no stream carried",
		"timeline", r.Timeline, "from_lsn", from, "to_lsn", r.Start)
	return nil
}

// receive reads the stream with bounded waits, applies changes as they
// arrive (a large transaction is streamed, not buffered), and reports
// progress. flushed is the position up to which everything the peer sent is
// committed here (or was not for us), the only position ever confirmed.
func (s *Stream) receive(ctx context.Context, repl *pgconn.PgConn, a *applier, flushed pglogrepl.LSN, inside *bool) error {
	// The origin's progress, where this starts, may hold commits the WAL
	// has not flushed yet (the last connection's).
	s.flush.committed()
	received := flushed
	lastHeard, lastData := time.Now(), time.Now()
	// heard and heardData are set when a message is done with: the next
	// turn's clock reading stands for when, one reading per message.
	heard, heardData := false, false
	var deadlineSet time.Time // the socket's read deadline, as last set here
	wake := newWakeThreshold(repl.Conn())
	silence := max(15*time.Second, 10*idleStatusInterval)
	nextStatus := time.Now()
	// confirmSoon has the next status go within confirmDelay: peers
	// waiting in wait_for_peers see the new position then.
	confirmSoon := func() {
		if soon := time.Now().Add(confirmDelay); soon.Before(nextStatus) {
			nextStatus = soon
		}
	}
	// committed records that everything up to end is committed here (not
	// yet flushed: sendStatus waits for that), and confirms it soon.
	committed := func(end pglogrepl.LSN) {
		if end == 0 {
			return
		}
		flushed, received = max(flushed, end), max(received, end)
		s.flush.committed()
		s.stats.setApplied(flushed)
		confirmSoon()
	}
	for {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if a.between() {
			select {
			case req := <-s.requests:
				// A replay or discard of parked changes, with nothing of
				// the stream's own in flight.
				if err := a.drain(ctx); err != nil {
					req.reply <- queueReply{err: err}
					return err
				}
				committed(a.takeConfirmed())
				req.reply <- a.careful.serve(ctx, req)
				lastHeard = time.Now() // replaying is not the peer's silence
			default:
			}
		}
		if s.cfg.Gate.closing() && a.between() {
			// A joining node takes its snapshot: step aside with nothing
			// unconfirmed, until it has.
			if err := a.drain(ctx); err != nil {
				return err
			}
			committed(a.takeConfirmed())
			if err := s.cfg.Gate.yield(ctx); err != nil {
				*inside = false
				return err
			}
		}
		now := time.Now()
		if heard {
			lastHeard, heard = now, false
		}
		if heardData {
			lastData, heardData = now, false
		}
		if !now.Before(nextStatus) {
			if now.Sub(lastHeard) > silence {
				return fmt.Errorf("peer %q sent nothing for %s: connection presumed dead", s.cfg.Peer.Name, silence.Round(time.Second))
			}
			if a.quiet() && !s.flush.settled {
				// Nothing in flight: flush the last local commit now rather
				// than when the WAL writer does, so that it is confirmed.
				if err := a.s.conn().Exec(ctx, flushProgress).Close(); err != nil {
					return fmt.Errorf("flush the local WAL: %w", err)
				}
				s.flush.flushedAll()
			}
			if err := s.sendStatus(ctx, repl, received, flushed, true); err != nil {
				return err
			}
			deadlineSet = time.Time{} // a call with a context may have changed it
			// An idle stream asks less often: the replies only tell that
			// the peer wrote WAL with nothing for us (PostgreSQL sends no
			// keepalive for that unasked), and each is confirmed as it
			// arrives.
			interval := s.cfg.StatusInterval
			if now.Sub(lastData) > idleStatusInterval {
				interval = max(interval, idleStatusInterval)
			}
			nextStatus = now.Add(interval)
		}
		// Through a backlog or a large transaction, be woken by a few
		// kilobytes at once, never waiting longer than the pause below
		// (wake.go); otherwise by every byte.
		batched := a.behind() && a.busy() || a.inLarge()
		if batched {
			wake.set(backlogWake)
		} else {
			wake.set(1)
		}
		deadline := nextStatus
		var soon time.Time
		switch {
		case a.busy():
			// Transactions wait in the pipeline: confirm them as soon as
			// the peer pauses.
			soon = now.Add(a.pause())
		case batched:
			// Inside a large transaction: what follows its end may be
			// fresh, so wait briefly (with the poller's rounding, a
			// millisecond).
			soon = now.Add(freshPause)
		}
		if !soon.IsZero() && soon.Before(deadline) {
			deadline = soon
		}
		// A deadline on the socket, not a context per message: receiving is
		// the hot loop, and every wait is short, so shutdown is prompt.
		if !closeEnough(deadlineSet, deadline, now) {
			if err := repl.Conn().SetReadDeadline(deadline); err != nil {
				return fmt.Errorf("receive from peer %q: %w", s.cfg.Peer.Name, err)
			}
			deadlineSet = deadline
		}
		raw, err := repl.ReceiveMessage(context.Background())
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if pgconn.Timeout(err) {
				if a.busy() {
					end, err := a.idle(ctx)
					if err != nil {
						return err
					}
					committed(end)
					lastHeard = time.Now() // applying is not the peer's silence
				}
				continue
			}
			return fmt.Errorf("receive from peer %q: %w", s.cfg.Peer.Name, err)
		}
		data := false
		switch msg := raw.(type) {
		case *pgproto3.CopyData:
			if len(msg.Data) == 0 {
				continue
			}
			switch msg.Data[0] {
			case pglogrepl.PrimaryKeepaliveMessageByteID:
				ka, err := pglogrepl.ParsePrimaryKeepaliveMessage(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse keepalive: %w", err)
				}
				// Between transactions, everything the sender read up to
				// ka.ServerWALEnd has reached us: nothing below it is pending.
				// Confirmed soon rather than at the next status: peers
				// waiting in wait_for_peers see it. Not at once: a walsender
				// pings after every transaction it decodes.
				if a.quiet() && ka.ServerWALEnd > flushed {
					flushed, received = ka.ServerWALEnd, max(received, ka.ServerWALEnd)
					s.stats.setApplied(flushed)
					confirmSoon()
				}
				if ka.ReplyRequested {
					nextStatus = time.Now()
				}
			case pglogrepl.XLogDataByteID:
				xld, err := pglogrepl.ParseXLogData(msg.Data[1:])
				if err != nil {
					return fmt.Errorf("parse XLogData: %w", err)
				}
				received = max(received, xld.WALStart)
				s.stats.received(len(msg.Data))
				end, err := a.handle(ctx, xld.WALData)
				if err != nil {
					return err
				}
				committed(end)
				data = true
			}
		case *pgproto3.ErrorResponse:
			return fmt.Errorf("peer %q: %w", s.cfg.Peer.Name, pgconn.ErrorResponseToPgError(msg))
		case *pgproto3.CopyDone:
			return fmt.Errorf("peer %q ended the stream", s.cfg.Peer.Name)
		}
		// Time spent applying (waiting for locks, for the clock) is not the
		// peer's silence: lastHeard is when the message is done with.
		heard, heardData = true, heardData || data
	}
}

// deadlineSlack is how far the socket's read deadline may be from the
// one wanted before it is set again. Through a backlog the wanted one
// moves by microseconds with every message, and setting it for each cost
// a twentieth of the daemon's CPU; the poller wakes in whole milliseconds
// anyway.
const deadlineSlack = 100 * time.Microsecond

// closeEnough reports whether the read deadline set serves for the one
// wanted: both already passed (a read then returns at once either way),
// or both ahead and within deadlineSlack of each other. A wanted deadline
// that has passed (a fresh group goes once nothing more has arrived) is
// never served by one ahead, however close: the poller would round that
// wait up to a whole millisecond.
func closeEnough(set, want, now time.Time) bool {
	if set.IsZero() {
		return false
	}
	wantPassed, setPassed := !want.After(now), !set.After(now)
	if wantPassed || setPassed {
		return wantPassed && setPassed
	}
	d := set.Sub(want)
	return d >= -deadlineSlack && d <= deadlineSlack
}

// pollPeer samples the peer's WAL position and both Postgres clocks over
// ordinary connections, every second while changes arrive: the position for
// lag in bytes and seconds, the clocks for the skew between them. It ends
// with ctx.
func (s *Stream) pollPeer(ctx context.Context) {
	// The insert position: everything committed lies below it.
	peer := &probe{dsn: s.cfg.Peer.DSN, query: "SELECT pg_current_wal_insert_lsn(), clock_timestamp()"}
	local := &probe{dsn: s.cfg.LocalDSN, query: "SELECT '0/0'::pg_lsn, clock_timestamp()"}
	defer peer.close()
	defer local.close()
	received := int64(-1)
	for {
		localOffset, _, okLocal := local.sample(ctx)
		peerOffset, lsn, okPeer := peer.sample(ctx)
		if okPeer {
			s.stats.sample(time.Now(), time.Now().Add(peerOffset), lsn)
		}
		if okLocal && okPeer {
			s.checkSkew(localOffset, peerOffset-localOffset)
		}
		// Every second while changes arrive; an idle stream every
		// idleProbeEvery, which still dates AppliedThrough for pruning and
		// shows a stalled stream's lag well within health_max_lag.
		wait := time.Second
		if now := s.stats.receivedBytes.Load(); now == received {
			wait = idleProbeEvery
		} else {
			received = now
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		}
	}
}

// idleProbeEvery is how often pollPeer samples for a stream that received
// nothing since its last sample.
const idleProbeEvery = 5 * time.Second

// checkSkew records the skew between the peer's Postgres clock and ours and
// logs when it crosses max_clock_skew, either way. A peer ahead of us is
// the case that matters: its changes wait for our clock (the causality
// guard), so they are applied late, though never out of order or lost.
func (s *Stream) checkSkew(localOffset, skew time.Duration) {
	warning := ""
	if max := s.cfg.MaxClockSkew; max > 0 && skew > max {
		warning = fmt.Sprintf("the clock of peer %s is %s ahead of this node's Postgres clock (max_clock_skew %s), so its changes are applied only once this clock has caught up: synchronise both servers' clocks (NTP)",
			s.cfg.Peer.Name, skew.Round(time.Millisecond), max)
	}
	if s.stats.setClocks(localOffset, skew, warning) {
		if warning != "" {
			s.log.Warn("clock skew", "err", warning, "skew", skew.Round(time.Millisecond))
		} else {
			s.log.Info("clock skew back within max_clock_skew", "skew", skew.Round(time.Millisecond))
		}
	}
}

// probe is an ordinary connection that reads a WAL position and the
// server's clock, reconnecting as needed.
type probe struct {
	dsn, query string
	conn       *pgx.Conn
}

// sample returns the server clock's offset from the daemon's (taken at the
// middle of the round trip) and the position read; ok is false when the
// server could not be asked.
func (p *probe) sample(ctx context.Context) (offset time.Duration, lsn pglogrepl.LSN, ok bool) {
	if p.conn == nil {
		var err error
		if p.conn, err = pgsession.Connect(ctx, p.dsn, "pgmesh lag probe"); err != nil {
			return 0, 0, false
		}
	}
	var at time.Time
	qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	start := time.Now()
	if err := p.conn.QueryRow(qctx, p.query).Scan(&lsn, &at); err != nil {
		p.close()
		return 0, 0, false
	}
	mid := start.Add(time.Since(start) / 2)
	return at.Sub(mid), lsn, true
}

func (p *probe) close() {
	if p.conn != nil {
		p.conn.Close(context.Background())
		p.conn = nil
	}
}
