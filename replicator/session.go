package replicator

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// session is the apply connection as the modes see it: one local
// transaction at a time, the statements prepared on it, the batches of
// groups the pipeline sends through it, and the one commit, with its guards.
// pgSession is the real one; the modes' unit tests drive a fake.
type session interface {
	// conn is the connection itself, for catalog reads (relation.load, the
	// origins' names) and the parked queue, never asked for while a batch is
	// in flight.
	conn() *pgconn.PgConn
	// begin opens the local transaction unless it is open.
	begin(ctx context.Context) error
	inTxn() bool
	// exec runs sql, prepared the first time, with text parameters whose
	// types the server infers, in the local transaction.
	exec(ctx context.Context, sql string, params [][]byte) *pgconn.Result
	// execOnce runs sql unprepared (its text is not used again), in the
	// local transaction.
	execOnce(ctx context.Context, sql string, params [][]byte) *pgconn.Result
	// prepare prepares sql now, for a later batch; the server's refusal
	// of sql itself is an *unpreparable.
	prepare(ctx context.Context, sql string) error
	// run runs statements by the simple protocol in the local transaction
	// (TRUNCATE, DDL).
	run(ctx context.Context, sql string) error
	// batch runs statements in the local transaction in one round trip,
	// opening it first if need be; it returns the results up to the first
	// failure, and that failure.
	batch(ctx context.Context, stmts []stmt) ([]*pgconn.Result, error)
	// commit ends the local transaction, stamped as c says.
	commit(ctx context.Context, c stamp) error
	rollback(ctx context.Context)
	// forget drops the prepared statements: DDL ran, their plans may not fit.
	forget()

	// The pipeline's transport: send groups (each its statements and a
	// Sync), after any still in flight, read back each group's outcome in
	// order, end the batch once everything sent is read back.
	sendBatch(ctx context.Context, groups []*fastGroup) error
	readGroup() (failure error, err error)
	endBatch(failed bool) error
}

// stmt is one statement with its parameters, prepared by the session
// under a name of its own the first time its text is seen, or rows to
// COPY in (copy set, the bulk mode's runs of inserts).
type stmt struct {
	sql     string
	params  [][]byte
	formats []int16 // nil: all text
	copy    *copyIn
}

// copyIn is rows of a table given as pgoutput's text values (nil for
// NULL), one per column of cols.
type copyIn struct {
	r    *relation
	cols []int
	rows [][][]byte
}

// sql is the COPY statement taking the rows.
func (c *copyIn) sql() string {
	names := make([]string, len(c.cols))
	for i, col := range c.cols {
		names[i] = quote(c.r.cols[col])
	}
	return fmt.Sprintf("COPY %s (%s) FROM STDIN", c.r.qualified, strings.Join(names, ", "))
}

// data is the rows in COPY's text format. COPY writes the values given
// for identity columns too, as INSERT does with OVERRIDING SYSTEM VALUE.
func (c *copyIn) data() []byte {
	var b []byte
	for _, row := range c.rows {
		for i, v := range row {
			if i > 0 {
				b = append(b, '\t')
			}
			b = appendCopyText(b, v)
		}
		b = append(b, '\n')
	}
	return b
}

// appendCopyText appends v as a field of COPY's text format.
func appendCopyText(b, v []byte) []byte {
	if v == nil {
		return append(b, `\N`...)
	}
	for _, ch := range v {
		switch ch {
		case '\\':
			b = append(b, '\\', '\\')
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, ch)
		}
	}
	return b
}

// stamp is how a local transaction commits: with the origin's progress
// moved to end (0/0 leaves it where it is) and the source's commit time,
// once the local clock has passed at (zero: no wait), and, when expect is
// set, only if the origin's progress is still expect (the commit guard of a
// group, see grouped.go). rollback ends it without a commit (a dry run).
type stamp struct {
	end      pglogrepl.LSN
	commitTS time.Time
	at       time.Time
	expect   *pglogrepl.LSN
	rollback bool
}

// commitGuardSQL is the one statement that stamps a local transaction with
// the origin's progress and commit time. It checks, when $3 is set, that
// every earlier group from this peer committed, and waits for the local
// clock to pass the transaction's rounded commit time when $4 is set
// (clockGuard). It ends a pipelined group, whose Sync commits it, and
// precedes COMMIT in every other transaction.
var commitGuardSQL = `SELECT pg_catalog.pg_replication_origin_xact_setup($1::pg_lsn, $2::timestamptz)
WHERE CASE WHEN $3::pg_lsn IS NULL OR coalesce(pg_catalog.pg_replication_origin_session_progress(false), '0/0') = $3::pg_lsn THEN true
	ELSE pgmesh.apply_conflict('an earlier transaction from this peer is not applied yet') END
	AND ($4::timestamptz IS NULL OR ` + clockGuard("$4") + `)`

// guard is the commit guard statement for c.
func (c stamp) guard() stmt {
	params := [][]byte{[]byte(c.end.String()), []byte(pgquote.Timestamp(c.commitTS)), nil, nil}
	if c.expect != nil {
		params[2] = []byte(c.expect.String())
	}
	if !c.at.IsZero() {
		params[3] = []byte(pgquote.Timestamp(c.at))
	}
	return stmt{sql: commitGuardSQL, params: params}
}

// clockGuard is a condition that holds once the local server's clock has
// passed the timestamptz parameter param, waiting for it if need be: a
// remote transaction commits here only after its rounded commit time, so
// every later local write to its rows is stamped later (causality; see
// ARCHITECTURE.md). The server's clock is the one that stamps commits, so
// it is the one waited on, not the daemon's.
func clockGuard(param string) string {
	return `CASE WHEN pg_catalog.clock_timestamp() > ` + param + `::timestamptz THEN true
	ELSE pgmesh.wait_for_clock(` + param + `::timestamptz) END`
}

// pgSession is the session on a real connection.
type pgSession struct {
	pc    *pgconn.PgConn
	open  bool
	names map[string]string // SQL text -> prepared statement name
	next  int               // the next name's number; never reused
	// fresh are the texts first prepared in the batch in flight: they count
	// as prepared only once it committed.
	fresh []string
	pl    *pgconn.Pipeline
	wbuf  []byte // the write buffer lent to pgx for each batch (writeRoom)
}

func newPgSession(pc *pgconn.PgConn) *pgSession {
	return &pgSession{pc: pc, names: map[string]string{}}
}

func (s *pgSession) conn() *pgconn.PgConn { return s.pc }
func (s *pgSession) inTxn() bool          { return s.open }

func (s *pgSession) begin(ctx context.Context) error {
	if s.open {
		return nil
	}
	if err := s.pc.Exec(ctx, "BEGIN").Close(); err != nil {
		return fmt.Errorf("begin local transaction: %w", err)
	}
	s.open = true
	return nil
}

// name returns sql's statement name, and whether it is new: then the
// caller prepares it.
func (s *pgSession) name(sql string) (string, bool) {
	if n, ok := s.names[sql]; ok {
		return n, false
	}
	n := "pgmesh_" + strconv.Itoa(s.next)
	s.next++
	s.names[sql] = n
	return n, true
}

func (s *pgSession) prepare(ctx context.Context, sql string) error {
	_, err := s.prepared(ctx, sql)
	return err
}

// prepared returns sql's statement name, preparing it the first time.
func (s *pgSession) prepared(ctx context.Context, sql string) (string, error) {
	if s.pl != nil {
		return "", errors.New("internal error: a statement is prepared while a batch is in flight")
	}
	n, fresh := s.name(sql)
	if fresh {
		if _, err := s.pc.Prepare(ctx, n, sql, nil); err != nil {
			delete(s.names, sql)
			return "", &unpreparable{err}
		}
	}
	return n, nil
}

// unpreparable is the server's refusal to prepare a statement (a column
// type this node cannot take, say).
type unpreparable struct{ err error }

func (e *unpreparable) Error() string { return "prepare statement: " + e.err.Error() }
func (e *unpreparable) Unwrap() error { return e.err }

func (s *pgSession) exec(ctx context.Context, sql string, params [][]byte) *pgconn.Result {
	if err := s.begin(ctx); err != nil {
		return &pgconn.Result{Err: err}
	}
	n, err := s.prepared(ctx, sql)
	if err != nil {
		return &pgconn.Result{Err: err}
	}
	return s.pc.ExecPrepared(ctx, n, params, nil, nil).Read()
}

func (s *pgSession) execOnce(ctx context.Context, sql string, params [][]byte) *pgconn.Result {
	if err := s.begin(ctx); err != nil {
		return &pgconn.Result{Err: err}
	}
	return s.pc.ExecParams(ctx, sql, params, nil, nil, nil).Read()
}

func (s *pgSession) run(ctx context.Context, sql string) error {
	if err := s.begin(ctx); err != nil {
		return err
	}
	_, err := s.pc.Exec(ctx, sql).ReadAll()
	return err
}

func (s *pgSession) batch(ctx context.Context, stmts []stmt) ([]*pgconn.Result, error) {
	var results []*pgconn.Result
	for len(stmts) > 0 {
		if c := stmts[0].copy; c != nil {
			if err := s.begin(ctx); err != nil {
				return results, err
			}
			tag, err := s.pc.CopyFrom(ctx, bytes.NewReader(c.data()), c.sql())
			results = append(results, &pgconn.Result{CommandTag: tag, Err: err})
			if err != nil {
				return results, err
			}
			stmts = stmts[1:]
			continue
		}
		n := slices.IndexFunc(stmts, func(st stmt) bool { return st.copy != nil })
		if n < 0 {
			n = len(stmts)
		}
		res, err := s.execBatch(ctx, stmts[:n])
		results = append(results, res...)
		if err != nil {
			return results, err
		}
		stmts = stmts[n:]
	}
	return results, nil
}

// execBatch runs statements in one round trip, in the local transaction.
func (s *pgSession) execBatch(ctx context.Context, stmts []stmt) ([]*pgconn.Result, error) {
	b, first, err := s.newBatch(ctx, stmts)
	if err != nil {
		return nil, err
	}
	results, err := s.pc.ExecBatch(ctx, b).ReadAll()
	s.open = true // by the BEGIN at its head, even if a later statement failed (rollback ends it)
	if len(results) >= first {
		results = results[first:]
	}
	return results, err
}

// newBatch is a batch running stmts in the local transaction: BEGIN first
// unless it is open (first is then 1), each statement prepared once.
func (s *pgSession) newBatch(ctx context.Context, stmts []stmt) (b *pgconn.Batch, first int, err error) {
	b = &pgconn.Batch{}
	if !s.open {
		b.ExecParams("BEGIN", nil, nil, nil, nil)
		first = 1
	}
	for _, st := range stmts {
		n, err := s.prepared(ctx, st.sql)
		if err != nil {
			return nil, 0, err
		}
		b.ExecPrepared(n, st.params, st.formats, nil)
	}
	return b, first, nil
}

// commit stamps the local transaction and ends it in one round trip (a
// transaction whose changes all were no-ops here is begun first).
func (s *pgSession) commit(ctx context.Context, c stamp) error {
	b, _, err := s.newBatch(ctx, []stmt{c.guard()})
	if err != nil {
		return err
	}
	end := "COMMIT"
	if c.rollback {
		end = "ROLLBACK"
	}
	b.ExecParams(end, nil, nil, nil, nil)
	_, err = s.pc.ExecBatch(ctx, b).ReadAll()
	s.open = false
	return err
}

func (s *pgSession) rollback(ctx context.Context) {
	if s.pl != nil {
		// A batch in flight: the connection is closed next.
		_ = s.pl.Close()
		s.pl = nil
		return
	}
	if s.open {
		_ = s.pc.Exec(ctx, "ROLLBACK").Close()
		s.open = false
	}
}

func (s *pgSession) forget() {
	clear(s.names)
}

func (s *pgSession) sendBatch(ctx context.Context, groups []*fastGroup) error {
	if s.pl == nil {
		s.pl = s.pc.StartPipeline(ctx)
	}
	s.pc.Frontend().Send(writeRoom{buf: &s.wbuf, n: batchBytes(groups)})
	for _, g := range groups {
		for _, st := range g.stmts {
			n, fresh := s.name(st.sql)
			if fresh {
				// Prepared in the batch: nothing waits for the server
				// while a group is built. Should the server refuse it,
				// the group fails and goes careful, which reports why.
				s.pl.SendPrepare(n, st.sql, nil)
				s.fresh = append(s.fresh, st.sql)
			}
			s.pl.SendQueryPrepared(n, st.params, st.formats, nil)
		}
		s.pl.SendPipelineSync()
	}
	if err := s.pl.Flush(); err != nil {
		return fmt.Errorf("send transactions to the local database: %w", err)
	}
	return nil
}

// writeRoom is a frontend message of no bytes: it hands pgx's Frontend a
// write buffer with room for n more bytes, one the session keeps from
// batch to batch. The Frontend drops a buffer larger than 1 KB after each
// flush, so each batch (hundreds of kilobytes of array parameters)
// otherwise regrew one from there, copying it at every step: with the
// memory handed back, a quarter of the daemon's CPU in a pgbench catch-up.
// The buffer is only written through the Frontend, on this goroutine: the
// Frontend either drops it at its flush or (a batch under 1 KB) keeps
// using it, and then it is what dst is here next time.
type writeRoom struct {
	buf *[]byte
	n   int
}

// keptWriteRoom bounds the buffer kept between batches; a larger one
// serves its batch only.
const keptWriteRoom = 4 << 20

func (writeRoom) Frontend()           {}
func (writeRoom) Decode([]byte) error { return errors.New("writeRoom is only sent") }
func (r writeRoom) Encode(dst []byte) ([]byte, error) {
	buf := *r.buf
	if need := len(dst) + r.n; cap(buf) < need {
		buf = make([]byte, 0, need)
	}
	buf = append(buf[:0], dst...)
	if cap(buf) <= keptWriteRoom {
		*r.buf = buf
	}
	return buf, nil
}

// batchBytes bounds the protocol bytes of the groups' statements: each
// statement's parameters, and a few dozen bytes of message headers, names,
// formats and its Describe and Execute; the text of one not yet prepared.
func batchBytes(groups []*fastGroup) int {
	n := 0
	for _, g := range groups {
		n += 8 // Sync
		for _, st := range g.stmts {
			n += 64 + len(st.sql) + 2*len(st.formats)
			for _, p := range st.params {
				n += 4 + len(p)
			}
		}
	}
	return n
}

// readGroup reads one group's results, through its Sync. It returns the
// server's error for the group (nil if it committed), or err when the
// connection failed.
func (s *pgSession) readGroup() (failure error, err error) {
	keep := func(err error) error {
		var pe *pgconn.PgError
		if !errors.As(err, &pe) {
			return err
		}
		if failure == nil {
			failure = err
		}
		return nil
	}
	for {
		res, err := s.pl.GetResults()
		if err != nil {
			if err := keep(err); err != nil {
				s.pl = nil // the connection is closed next
				return nil, err
			}
			continue
		}
		switch r := res.(type) {
		case *pgconn.ResultReader:
			if _, err := r.Close(); err != nil {
				if err := keep(err); err != nil {
					s.pl = nil
					return nil, err
				}
			}
		case *pgconn.PipelineSync:
			return failure, nil
		case nil:
			return nil, errors.New("the pipeline ended before the transaction's sync")
		}
	}
}

func (s *pgSession) endBatch(failed bool) error {
	if failed {
		// A statement prepared in the batch may have been skipped after
		// the failure: each is prepared again, under a new name, when next
		// used.
		for _, sql := range s.fresh {
			delete(s.names, sql)
		}
	}
	s.fresh = s.fresh[:0]
	err := s.pl.Close()
	s.pl = nil
	var pe *pgconn.PgError
	if err != nil && !errors.As(err, &pe) {
		return fmt.Errorf("end apply pipeline: %w", err)
	}
	return nil
}
