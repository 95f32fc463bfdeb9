package replicator

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/pgmesh/pgmesh/conflict"
)

// The applier's modes and the moves between them, driven through a fake
// session that answers as a database where nothing conflicts, unless a
// test makes a group or a batch fail. What the statements do to real
// rows is tested against PostgreSQL (collapse_integration_test.go,
// replay_test.go, systemtest).

// fakeSession records what the modes ask of the database.
type fakeSession struct {
	open     bool
	calls    []string
	progress pglogrepl.LSN // the origin's progress: the last commit's end
	// failGroup fails the group sent with this number (counted from 0 over
	// every batch); the groups after it in its batch fail at their guard.
	failGroup int
	// failBatch fails the next batch (a careful or bulk one).
	failBatch error
	inFlight  []*fastGroup
	sent      int
	failed    bool // a group of the batch in flight failed
}

func newFakeSession() *fakeSession { return &fakeSession{failGroup: -1} }

func (f *fakeSession) call(format string, args ...any) {
	f.calls = append(f.calls, fmt.Sprintf(format, args...))
}

func (f *fakeSession) conn() *pgconn.PgConn { panic("the fake session has no connection") }
func (f *fakeSession) inTxn() bool          { return f.open }

func (f *fakeSession) begin(context.Context) error {
	if !f.open {
		f.open = true
		f.call("BEGIN")
	}
	return nil
}

func (f *fakeSession) exec(ctx context.Context, sql string, _ [][]byte) *pgconn.Result {
	_ = f.begin(ctx)
	f.call("exec %s", strings.Fields(sql)[0])
	return &pgconn.Result{CommandTag: pgconn.NewCommandTag("SELECT 0")}
}

func (f *fakeSession) execOnce(ctx context.Context, sql string, params [][]byte) *pgconn.Result {
	return f.exec(ctx, sql, params)
}

func (f *fakeSession) prepare(context.Context, string) error { return nil }

func (f *fakeSession) run(ctx context.Context, sql string) error {
	_ = f.begin(ctx)
	f.call("run %s", sql)
	return nil
}

func (f *fakeSession) batch(_ context.Context, stmts []stmt) ([]*pgconn.Result, error) {
	f.open = true
	if err := f.failBatch; err != nil {
		f.failBatch = nil
		f.call("batch of %d failed", len(stmts))
		return nil, err
	}
	f.call("batch of %d", len(stmts))
	results := make([]*pgconn.Result, len(stmts))
	for i := range results {
		results[i] = &pgconn.Result{CommandTag: pgconn.NewCommandTag("INSERT 0 1")}
	}
	return results, nil
}

func (f *fakeSession) commit(_ context.Context, c stamp) error {
	if c.end != 0 {
		f.progress = c.end
	}
	f.open = false
	f.call("commit %s", c.end)
	return nil
}

func (f *fakeSession) rollback(context.Context) {
	f.open = false
	f.call("rollback")
}

func (f *fakeSession) forget() {}

func (f *fakeSession) sendBatch(_ context.Context, groups []*fastGroup) error {
	if len(f.inFlight) == 0 {
		f.failed = false
	}
	f.inFlight = append(f.inFlight, groups...)
	f.call("send %d groups", len(groups))
	return nil
}

func (f *fakeSession) readGroup() (error, error) {
	g := f.inFlight[0]
	f.inFlight = f.inFlight[1:]
	n := f.sent
	f.sent++
	if n == f.failGroup || f.failed {
		f.failed = true
		return errors.New("the group failed"), nil
	}
	f.progress = g.end
	return nil, nil
}

func (f *fakeSession) endBatch(bool) error { return nil }

// Messages as pgoutput sends them.

var pgEpochUTC = time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)

func pgTime(t time.Time) uint64 { return uint64(t.Sub(pgEpochUTC).Microseconds()) }

func beginMsg(final pglogrepl.LSN, xid uint32, at time.Time) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'B'}, uint64(final))
	b = binary.BigEndian.AppendUint64(b, pgTime(at))
	return binary.BigEndian.AppendUint32(b, xid)
}

func commitMsg(final, end pglogrepl.LSN, at time.Time) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'C', 0}, uint64(final))
	b = binary.BigEndian.AppendUint64(b, uint64(end))
	return binary.BigEndian.AppendUint64(b, pgTime(at))
}

func insertMsg(rel uint32, id int) []byte {
	return message('I', rel, []byte{'N'}, tupleBytes(fmt.Sprint(id), "name", "1"))
}

// insertMsgs is n inserts into testRel, of ids first to first+n-1.
func insertMsgs(first, n int) [][]byte {
	msgs := make([][]byte, n)
	for i := range msgs {
		msgs[i] = insertMsg(testRel, first+i)
	}
	return msgs
}

func originMsg(name string) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'O'}, 0x10)
	return append(append(b, name...), 0)
}

func ddlMsg(command string) []byte {
	b := binary.BigEndian.AppendUint64([]byte{'M', 1}, 0)
	b = append(append(b, ddlPrefix...), 0)
	content := fmt.Sprintf(`{"search_path": "public", "command": %q}`, command)
	b = binary.BigEndian.AppendUint32(b, uint32(len(content)))
	return append(b, content...)
}

// txn is a source transaction: its messages, Begin to Commit, and its end.
func txn(n int, at time.Time, changes ...[]byte) ([][]byte, pglogrepl.LSN) {
	final := pglogrepl.LSN(0x1000 * n)
	end := final + 8
	msgs := [][]byte{beginMsg(final, uint32(n), at)}
	msgs = append(msgs, changes...)
	return append(msgs, commitMsg(final, end, at)), end
}

const testRel = 16384

// testApplier is an applier on a fake session, with the table of
// testRelation known and loaded as relation testRel.
func testApplier(t testing.TB, retry pglogrepl.LSN) (*applier, *fakeSession) {
	t.Helper()
	f := newFakeSession()
	cfg := &Config{LocalNode: "local", Peer: Peer{Name: "peer", ID: 2}, NodeID: func(string) int { return 1 },
		Rule: conflict.Rule{Resolution: 10 * time.Millisecond}, Logger: slog.New(slog.DiscardHandler)}
	a := newApplier(f, cfg, 0, 7, newStats("peer"), retry, parkedTables{}, cfg.Logger)
	r := testRelation()
	r.tombName, r.identityAlways, r.delta, r.loadedAt = `s."T x"`, make([]bool, 3), make([]bool, 3), time.Now()
	a.rels[testRel] = r
	return a, f
}

// feed hands the applier msgs and returns the mode after each, by name.
func feed(t *testing.T, a *applier, msgs [][]byte) []string {
	t.Helper()
	var modes []string
	for _, m := range msgs {
		if _, err := a.handle(context.Background(), m); err != nil {
			t.Fatalf("message %q: %v", m[0], err)
		}
		modes = append(modes, modeName(a.mode))
	}
	return modes
}

func modeName(m mode) string {
	switch m.(type) {
	case *grouped:
		return "grouped"
	case *careful:
		return "careful"
	case *bulk:
		return "bulk"
	}
	return fmt.Sprintf("%T", m)
}

func count(calls []string, prefix string) int {
	n := 0
	for _, c := range calls {
		if strings.HasPrefix(c, prefix) {
			n++
		}
	}
	return n
}

func TestPlainTransactionsStayGrouped(t *testing.T) {
	a, f := testApplier(t, 0)
	at := time.Now().Add(-time.Second).Truncate(10 * time.Millisecond)
	var last pglogrepl.LSN
	for n := 1; n <= 5; n++ {
		msgs, end := txn(n, at, insertMsg(testRel, n))
		modes := feed(t, a, msgs[:1])
		if a.between() {
			t.Fatal("between transactions while one is read")
		}
		if modes = append(modes, feed(t, a, msgs[1:])...); strings.Join(modes, " ") != "grouped grouped grouped" {
			t.Fatalf("transaction %d went through modes %v, want grouped throughout", n, modes)
		}
		last = end
	}
	if !a.busy() {
		t.Fatal("nothing waits, yet four transactions joined a group while the first was in flight")
	}
	if err := a.drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := a.takeConfirmed(); got != last || f.progress != last {
		t.Errorf("confirmed %s, origin progress %s, want both at the last end %s", got, f.progress, last)
	}
	// The first transaction went alone (the server was idle); the other
	// four, of the same rounded time, as one group.
	if got := count(f.calls, "send"); got != 2 {
		t.Errorf("%d batches sent, want 2: %q", got, f.calls)
	}
	if st := a.stats.snapshot(); st.LocalCommits != 2 || st.AppliedTxns != 5 {
		t.Errorf("%d local commits for %d transactions, want 2 for 5", st.LocalCommits, st.AppliedTxns)
	}
}

// A stream that keeps up sends a fresh group once it is freshPause old,
// though the previous one is still in flight, and the stream does not wait
// at all for more before sending it: only what has already arrived joins
// it. Not so for a change from a higher node id: it commits at its
// interval's end anyway, so the others of that interval join its group.
func TestFreshGroupsGoSoon(t *testing.T) {
	for _, c := range []struct {
		name    string
		localID int
		at      time.Time
		sends   int
		pause   time.Duration
	}{
		{"from a lower id, no wait: a group per pause", 3, time.Now().Add(-15 * time.Millisecond), 3, 0},
		{"from a higher id, a wait for the clock: the rest as one group", 1, time.Now().Add(time.Second), 2, time.Millisecond},
	} {
		t.Run(c.name, func(t *testing.T) {
			a, f := testApplier(t, 0)
			a.cfg.NodeID = func(string) int { return c.localID }
			for n := 1; n <= 5; n++ {
				msgs, _ := txn(n, c.at, insertMsg(testRel, n))
				feed(t, a, msgs)
				if n == 2 {
					if got := a.grouped.pause(); got != c.pause {
						t.Errorf("the stream waits %s for more, want %s", got, c.pause)
					}
				}
				// The time a group waits is the input here: the second
				// transaction opens a group, the third finds it waited
				// long enough.
				time.Sleep(freshPause)
			}
			if err := a.drain(context.Background()); err != nil {
				t.Fatal(err)
			}
			if got := count(f.calls, "send"); got != c.sends {
				t.Errorf("%d batches sent, want %d: %q", got, c.sends, f.calls)
			}
		})
	}
}

// A forwarded transaction is skipped; once it shows itself large, the
// stream reads the rest of it in batches (inLarge), and a small one not at
// all.
func TestLargeSkippedTransactionIsPassedOver(t *testing.T) {
	a, f := testApplier(t, 0)
	for _, rows := range []int{largeSkip - 1, 3 * largeSkip} {
		changes := append([][]byte{originMsg("pgmesh_c")}, insertMsgs(0, rows)...)
		msgs, end := txn(rows, time.Now(), changes...)
		var passed int
		var confirmed pglogrepl.LSN
		for i, m := range msgs {
			end, err := a.handle(context.Background(), m)
			if err != nil {
				t.Fatal(err)
			}
			confirmed = max(confirmed, end)
			if a.inLarge() {
				passed++
			} else if passed > 0 && i < len(msgs)-1 {
				t.Fatalf("%d rows: no longer passing over after message %d of %d", rows, i, len(msgs))
			}
		}
		if want := max(0, rows-largeSkip+1); passed != want {
			t.Errorf("%d rows: passing over after %d messages, want %d", rows, passed, want)
		}
		if a.inLarge() || !a.between() {
			t.Errorf("%d rows: after its commit, passing over %v, between transactions %v", rows, a.inLarge(), a.between())
		}
		if confirmed != end || len(f.calls) != 0 {
			t.Errorf("%d rows: confirmed %s (want %s) with calls %q, want none", rows, confirmed, end, f.calls)
		}
	}
}

// A transaction's changes start with the room the last two needed, the
// smaller of them: a one-row transaction after a large one must not hold
// the large one's room while its group waits.
func TestRoomForChangesFollowsTheStream(t *testing.T) {
	a, _ := testApplier(t, 0)
	at := time.Now().Add(-time.Second)
	for i, c := range []struct{ rows, wantRoom int }{
		{100, 0},   // the first: nothing known
		{100, 0},   // the smaller of 100 and nothing
		{1, 100},   // after two of 100
		{100, 0},   // after 100 and 1: one row needs no room ahead
		{100, 0},   // after 1 and 100
		{100, 100}, // after two of 100 again
	} {
		msgs, _ := txn(i+1, at, insertMsgs(1000*(i+1), c.rows)...)
		feed(t, a, msgs[:1])
		if got := cap(a.grouped.txn.rows); got != c.wantRoom {
			t.Errorf("transaction %d (%d rows) starts with room for %d changes, want %d", i+1, c.rows, got, c.wantRoom)
		}
		feed(t, a, msgs[1:])
	}
}

func TestDDLGoesCarefulAndBack(t *testing.T) {
	a, f := testApplier(t, 0)
	at := time.Now().Add(-time.Second)
	msgs, end := txn(1, at, insertMsg(testRel, 1), ddlMsg("ALTER TABLE s.t ADD c int"))
	modes := feed(t, a, msgs)
	if got := strings.Join(modes, " "); got != "grouped grouped careful grouped" {
		t.Errorf("modes %q, want the transaction careful from its DDL and grouped after its commit", got)
	}
	if count(f.calls, "run ") != 1 || count(f.calls, "commit") != 1 {
		t.Errorf("calls %q, want the DDL run and one commit", f.calls)
	}
	if f.progress != end || !a.between() {
		t.Errorf("origin progress %s (want %s), between transactions: %v", f.progress, end, a.between())
	}
}

func TestLargeTransactionGoesBulk(t *testing.T) {
	a, f := testApplier(t, 0)
	msgs, end := txn(1, time.Now(), insertMsgs(0, fastMaxTxnChanges+1)...)
	var modes []string
	for i, m := range msgs {
		if _, err := a.handle(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		modes = append(modes, modeName(a.mode))
		// The stream reads a bulk transaction in batches, and what
		// follows its commit as it comes.
		if bulk := modes[i] == "bulk"; a.inLarge() != bulk {
			t.Fatalf("after message %d of %d, in mode %s: inside a large transaction %v", i, len(msgs), modes[i], !bulk)
		}
	}
	if modes[len(modes)-3] != "grouped" || modes[len(modes)-2] != "bulk" || modes[len(modes)-1] != "grouped" {
		t.Errorf("modes end with %q, want grouped until it is large, bulk from there, grouped after its commit", modes[len(modes)-3:])
	}
	if got, want := count(f.calls, "batch"), (fastMaxTxnChanges+1+bulkChunk-1)/bulkChunk; got != want {
		t.Errorf("%d chunks sent, want %d", got, want)
	}
	if f.progress != end {
		t.Errorf("origin progress %s, want %s", f.progress, end)
	}
}

func TestFailedBulkTransactionIsRetriedCarefully(t *testing.T) {
	a, f := testApplier(t, 0)
	msgs, _ := txn(1, time.Now(), insertMsgs(0, fastMaxTxnChanges+bulkChunk)...)
	f.failBatch = &pgconn.PgError{Code: "23505", Message: "duplicate key"}
	var err error
	for _, m := range msgs {
		if _, err = a.handle(context.Background(), m); err != nil {
			break
		}
	}
	retry, ok := errors.AsType[*retryCarefully](err)
	if !ok || retry.lsn != 0x1000 {
		t.Fatalf("a failed bulk transaction ended with %v, want a careful retry of 0/1000", err)
	}
	if modeName(a.mode) != "grouped" || f.open || count(f.calls, "rollback") != 1 {
		t.Errorf("after the failure: mode %s, transaction open %v, calls %q", modeName(a.mode), f.open, f.calls)
	}

	// Streamed again, it goes careful instead of bulk.
	a, f = testApplier(t, retry.lsn)
	modes := feed(t, a, msgs)
	if modes[len(modes)-2] != "careful" || modes[len(modes)-1] != "grouped" || count(f.calls, "commit") != 1 {
		t.Errorf("the retry ended in modes %q with calls %q, want careful, then grouped after one commit", modes[len(modes)-2:], f.calls[len(f.calls)-3:])
	}
}

// A backlog of large transactions streams its groups: each is sent as it
// closes, behind those in flight, and nothing is read back until the
// stream pauses with nothing left to send. The server always has the next
// group, and the stream never waits for it. (Small transactions keep
// batches: TestPlainTransactionsStayGrouped.)
func TestHeavyBacklogStreamsItsGroups(t *testing.T) {
	a, f := testApplier(t, 0)
	last := feedHeavyBacklog(t, a, 3)[2]
	if got := count(f.calls, "send"); got != 2 || f.progress != 0 {
		t.Fatalf("after three intervals: %d sends, progress %s; want the first two groups sent, none alone, and none read back: %q", got, f.progress, f.calls)
	}
	if got := a.pause(); got != backlogPause {
		t.Errorf("pause %s, want %s", got, backlogPause)
	}
	ctx := context.Background()
	if _, err := a.idle(ctx); err != nil {
		t.Fatal(err)
	}
	if got := count(f.calls, "send"); got != 3 || f.progress != 0 || !a.busy() {
		t.Fatalf("after a pause: %d sends, progress %s, busy %v; want the last group sent behind the others, none read back", got, f.progress, a.busy())
	}
	confirmed, err := a.idle(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if f.progress != last || a.busy() || confirmed != last {
		t.Errorf("after a second pause: progress %s, busy %v, confirmed %s; want everything read back and confirmed to %s", f.progress, a.busy(), confirmed, last)
	}
	if st := a.stats.snapshot(); st.LocalCommits != 3 || st.AppliedTxns != 3 {
		t.Errorf("%d local commits for %d transactions, want 3 for 3", st.LocalCommits, st.AppliedTxns)
	}
}

// A streamed group that fails takes every group sent behind it to the
// careful mode with it, in order: none of them committed, because each
// checks that the one before it did.
func TestFailedStreamedGroupTakesThoseBehindIt(t *testing.T) {
	a, f := testApplier(t, 0)
	f.failGroup = 1 // the second of four groups
	ends := feedHeavyBacklog(t, a, 4)
	if err := a.drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if got := count(f.calls, "send"); got != 4 {
		t.Errorf("%d sends, want each of the 4 groups streamed: %q", got, f.calls)
	}
	if st := a.stats.snapshot(); st.RetriedTxns != 3 || st.LocalCommits != 4 || f.progress != ends[3] {
		t.Errorf("%d transactions retried, %d local commits, origin progress %s: want the last 3 applied carefully after the first group, to %s",
			st.RetriedTxns, st.LocalCommits, f.progress, ends[3])
	}
}

// feedHeavyBacklog feeds a a backlog of n transactions of heavyTxnRows
// inserts each, every one in an interval of its own (n groups), and
// returns their ends.
func feedHeavyBacklog(t *testing.T, a *applier, n int) []pglogrepl.LSN {
	t.Helper()
	at := time.Now().Add(-time.Second).Truncate(10 * time.Millisecond)
	var ends []pglogrepl.LSN
	for i := range n {
		msgs, end := txn(i+1, at.Add(time.Duration(i)*10*time.Millisecond), insertMsgs(i*heavyTxnRows, heavyTxnRows)...)
		feed(t, a, msgs)
		ends = append(ends, end)
	}
	return ends
}

func TestFailedGroupGoesCarefulForAStretch(t *testing.T) {
	a, f := testApplier(t, 0)
	at := time.Now().Add(-time.Second).Truncate(10 * time.Millisecond)
	f.failGroup = 1 // the second group: the four transactions after the first
	n := 0
	next := func() ([]string, pglogrepl.LSN) {
		n++
		msgs, end := txn(n, at, insertMsg(testRel, n))
		return feed(t, a, msgs), end
	}
	for range 5 {
		next()
	}
	if err := a.drain(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := a.stats.snapshot(); st.RetriedTxns != 4 || f.progress != 0x5008 {
		t.Fatalf("%d transactions retried, origin progress %s: want the failed group's 4 applied carefully, to 0/5008", st.RetriedTxns, f.progress)
	}
	if a.careful.stretch != carefulStretch {
		t.Fatalf("stretch %d after a failure, want %d", a.careful.stretch, carefulStretch)
	}
	for i := range carefulStretch {
		modes, end := next()
		want := "careful careful careful"
		if i == carefulStretch-1 {
			want = "careful careful grouped" // the stretch is over
		}
		if got := strings.Join(modes, " "); got != want {
			t.Fatalf("transaction %d of the stretch: modes %q, want %q", i+1, got, want)
		}
		if f.progress != end {
			t.Fatalf("transaction %d of the stretch: progress %s, want %s", i+1, f.progress, end)
		}
	}
	if modes, _ := next(); modes[0] != "grouped" {
		t.Errorf("after the stretch, modes %q, want grouped", modes)
	}
}

// A TRUNCATE alone in its transaction goes careful, and its transaction
// commits like any other.
func TestTruncateCommits(t *testing.T) {
	a, f := testApplier(t, 0)
	truncate := binary.BigEndian.AppendUint32([]byte{'T'}, 1)
	truncate = binary.BigEndian.AppendUint32(append(truncate, 0), testRel)
	msgs, end := txn(1, time.Now(), truncate)
	if got := strings.Join(feed(t, a, msgs), " "); got != "grouped careful grouped" {
		t.Errorf("modes %q, want careful for the TRUNCATE", got)
	}
	if count(f.calls, `run TRUNCATE "s"."T x"`) != 1 || f.progress != end || f.open {
		t.Errorf("calls %q, progress %s (want %s), transaction left open: %v", f.calls, f.progress, end, f.open)
	}
}
