package daemon

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/membership"
)

// sequences keeps the group's global sequences (docs/sequences.md): it
// converts them, draws galloc chunks through the Raft leader ahead of use,
// and moves timeshard sequences forward to the clock.
type sequences struct {
	db    *pgxpool.Pool
	node  string // this node's name
	store *membership.Store
	// leader is a client of the Raft leader's API (noLeader when there is
	// none).
	leader   func(ctx context.Context, noLeader error) (*api.Client, error)
	problems *problemLog
	// everywhere makes a setting on every active node (everywhere.go).
	everywhere func(context.Context, api.Setting) ([]string, error)
	// tendSoon wakes maintain at once (a sequence was converted).
	tendSoon chan struct{}
}

// audit lists what converting the sequences here would change.
func (gs *sequences) audit(ctx context.Context) ([]api.AuditRow, error) {
	rows, err := gs.db.Query(ctx, `SELECT what, table_name, column_name, data_type, statement
		FROM pgmesh.sequence_audit ORDER BY step, table_name, column_name`)
	if err != nil {
		return nil, fmt.Errorf("read pgmesh.sequence_audit: %w", err)
	}
	return pgx.CollectRows(rows, func(r pgx.CollectableRow) (api.AuditRow, error) {
		var a api.AuditRow
		return a, r.Scan(&a.What, &a.Table, &a.Column, &a.Type, &a.Statement)
	})
}

// applyAudit runs every audit statement here in one transaction.
func (gs *sequences) applyAudit(ctx context.Context) error {
	rows, err := gs.audit(ctx)
	if err != nil {
		return err
	}
	// The statements rewrite tables: noted (pgmesh.after_ddl), so the rows
	// they write keep an unknown version rather than this moment's.
	return pgx.BeginFunc(ctx, gs.db, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SELECT pgmesh.before_ddl()`); err != nil {
			return err
		}
		for _, r := range rows {
			if _, err := tx.Exec(ctx, r.Statement); err != nil {
				return fmt.Errorf("%s: %w", r.Statement, err)
			}
		}
		_, err := tx.Exec(ctx, `SELECT pgmesh.after_ddl()`)
		return err
	})
}

// convert converts the sequences req names (every one, if none) on every
// active node, one sequence at a time through the setting fan-out. A
// mistake in req is an *api.Error with status 400.
func (gs *sequences) convert(ctx context.Context, req api.ConvertRequest) (api.SettingResponse, error) {
	var out api.SettingResponse
	if req.Kind != "timeshard" && req.Kind != "galloc" {
		return out, &api.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("--kind %q: choose timeshard or galloc", req.Kind)}
	}
	if req.ChunkSize == 0 {
		req.ChunkSize = 10000
	}
	seqs := req.Sequences
	if len(seqs) == 0 {
		rows, err := gs.db.Query(ctx, `SELECT format('%I.%I', schemaname, sequencename) FROM pg_sequences
			WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'pgmesh') AND schemaname NOT LIKE 'pg\_%' ORDER BY 1`)
		if err == nil {
			seqs, err = pgx.CollectRows(rows, pgx.RowTo[string])
		}
		if err != nil {
			return out, err
		}
	}
	for _, seq := range seqs {
		var name string
		var minStart int64
		// Values already handed out anywhere lie below the sequence's value
		// and its column's largest value (the data is the same everywhere).
		err := gs.db.QueryRow(ctx, `SELECT format('%I.%I', n.nspname, c.relname),
			greatest((SELECT last_value FROM pg_sequences WHERE format('%I.%I', schemaname, sequencename) = format('%I.%I', n.nspname, c.relname)), 0) + 1
			FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1::regclass AND c.relkind = 'S'`, seq).Scan(&name, &minStart)
		if err != nil {
			return out, &api.Error{Status: http.StatusBadRequest, Message: fmt.Sprintf("sequence %q: %v", seq, err)}
		}
		highest, err := gs.ownedMax(ctx, name)
		if err != nil {
			return out, err
		}
		minStart = max(minStart, highest+1)
		conv := &api.SequenceSetting{Sequence: name, ChunkSize: req.ChunkSize, MinStart: minStart}
		s := api.Setting{Timeshard: conv}
		if req.Kind == "galloc" {
			s = api.Setting{Galloc: conv}
		}
		if _, err := gs.everywhere(ctx, s); err != nil {
			return out, &api.Error{Status: http.StatusBadGateway, Message: fmt.Sprintf("convert %s: %v", name, err)}
		}
		out.Nodes = append(out.Nodes, name)
	}
	return out, nil
}

// ownedMax is the largest value in the column that owns (or defaults to) seq.
func (gs *sequences) ownedMax(ctx context.Context, seq string) (int64, error) {
	var cols []string
	rows, err := gs.db.Query(ctx, `SELECT format('SELECT coalesce(max(%I), 0)::bigint FROM %I.%I', a.attname, n.nspname, c.relname)
		FROM pg_depend dep JOIN pg_class c ON c.oid = dep.refobjid JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = dep.refobjsubid
		WHERE dep.classid = 'pg_class'::regclass AND dep.objid = $1::regclass AND dep.refclassid = 'pg_class'::regclass
		  AND dep.deptype IN ('a', 'i')`, seq)
	if err == nil {
		cols, err = pgx.CollectRows(rows, pgx.RowTo[string])
	}
	if err != nil {
		return 0, err
	}
	var highest int64
	for _, q := range cols {
		var v int64
		if err := gs.db.QueryRow(ctx, q).Scan(&v); err != nil {
			return 0, err
		}
		highest = max(highest, v)
	}
	return highest, nil
}

// sequenceList is every global sequence with its kind and the chunks
// each node holds.
func (d *Daemon) sequenceList(ctx context.Context) ([]api.SequenceInfo, error) {
	rows, err := d.db.Query(ctx, `SELECT seq, kind, chunk_size FROM pgmesh.global_sequence ORDER BY seq`)
	if err != nil {
		return nil, err
	}
	out, err := pgx.CollectRows(rows, func(row pgx.CollectableRow) (api.SequenceInfo, error) {
		var s api.SequenceInfo
		return s, row.Scan(&s.Sequence, &s.Kind, &s.ChunkSize)
	})
	if err != nil {
		return nil, err
	}
	if g, _ := d.store.Group(); g != nil {
		for i := range out {
			if sq := g.Sequences[out[i].Sequence]; sq != nil {
				out[i].Chunks = sq.Chunks
			}
		}
	}
	return out, nil
}

// allocChunk draws a chunk through the Raft leader.
func (gs *sequences) allocChunk(ctx context.Context, seq string, size, minStart int64) (*membership.Chunk, error) {
	if gs.store.IsLeader() {
		return gs.store.AllocChunk(seq, gs.node, size, minStart)
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	leader, err := gs.leader(cctx, errors.New("the node group has no Raft leader (no quorum?), so no new chunk can be drawn"))
	if err != nil {
		return nil, err
	}
	ch, err := leader.Galloc(cctx, api.GallocRequest{Seq: seq, Node: gs.node, Size: size, MinStart: minStart})
	return &ch, err
}

// convertGalloc makes the columns that default to seq draw from chunks of
// a plain range, handed out through Raft: pgmesh.galloc_nextval(seq) maps a
// per-node counter onto this node's chunks. seq itself is fenced, so code
// still calling nextval() on it fails instead of repeating other nodes'
// values.
func (gs *sequences) convertGalloc(ctx context.Context, seq string, size, minStart int64) error {
	if size < 1 {
		return errors.New("chunk size must be positive")
	}
	var identity bool
	if err := gs.db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_depend WHERE objid = $1::regclass AND deptype = 'i')`, seq).Scan(&identity); err != nil {
		return err
	}
	if identity {
		return fmt.Errorf("%s belongs to an identity column, whose values cannot come from a function: convert it with --kind timeshard, or make the column a plain bigint with a default first", seq)
	}
	// The chunk in use and those maintain keeps ahead of it: a
	// burst of values right after the conversion must not outrun the first
	// prefetch (TestGlobalSequences once drew 10,000 values on a node
	// before its maintainer, idle at one look a second, woke).
	for ordinal := int64(0); ordinal <= gallocAhead; ordinal++ {
		ch, err := gs.allocChunk(ctx, seq, size, minStart)
		if err != nil {
			return err
		}
		if _, err := gs.db.Exec(ctx, `INSERT INTO pgmesh.galloc_chunk VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING`,
			seq, ordinal, ch.Start, ch.End); err != nil {
			return err
		}
	}
	defer func() {
		select {
		case gs.tendSoon <- struct{}{}:
		default:
		}
	}()
	return pgx.BeginFunc(ctx, gs.db, func(tx pgx.Tx) error { return drawThroughGalloc(ctx, tx, seq, size) })
}

// drawThroughGalloc records seq as a galloc sequence, points the columns
// that default to it at pgmesh.galloc_nextval, and fences it, in tx.
func drawThroughGalloc(ctx context.Context, tx pgx.Tx, seq string, size int64) error {
	var oid uint32
	if err := tx.QueryRow(ctx, `SELECT $1::regclass::oid`, seq).Scan(&oid); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, fmt.Sprintf(`CREATE SEQUENCE IF NOT EXISTS pgmesh.galloc_%d AS bigint`, oid)); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `INSERT INTO pgmesh.global_sequence VALUES ($1, 'galloc', $2)
		ON CONFLICT (seq) DO UPDATE SET kind = 'galloc', chunk_size = EXCLUDED.chunk_size`, seq, size); err != nil {
		return err
	}
	// Columns defaulting to seq now draw through galloc.
	rows, err := tx.Query(ctx, `SELECT format('ALTER TABLE %I.%I ALTER COLUMN %I SET DEFAULT pgmesh.galloc_nextval(%L::regclass)',
			n.nspname, c.relname, a.attname, $1::text)
		FROM pg_attrdef ad JOIN pg_class c ON c.oid = ad.adrelid JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum
		JOIN pg_depend dep ON dep.classid = 'pg_attrdef'::regclass AND dep.objid = ad.oid
		     AND dep.refclassid = 'pg_class'::regclass AND dep.refobjid = $1::regclass`, seq)
	if err != nil {
		return err
	}
	alters, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		return err
	}
	for _, a := range alters {
		if _, err := tx.Exec(ctx, a); err != nil {
			return err
		}
	}
	// Fence the plain sequence: nextval() on it now fails loudly.
	_, err = tx.Exec(ctx, fmt.Sprintf(`ALTER SEQUENCE %s MINVALUE -1 MAXVALUE 0 START WITH 0 RESTART WITH 0;
		SELECT setval(%s, 0, true);
		COMMENT ON SEQUENCE %s IS 'pgmesh galloc: draw values with pgmesh.galloc_nextval(''%s'')'`,
		seq, pgquote.Literal(seq), seq, strings.ReplaceAll(seq, "'", "''")))
	return err
}

// maintain keeps global sequences going, until ctx ends: galloc
// sequences get their next chunks ahead of time; timeshard sequences are
// moved forward to the clock.
// While there are galloc sequences they are looked at every 50 ms, so that
// a burst of values does not outrun the chunks drawn ahead; a group without
// any is looked at once a second, which keeps an idle daemon idle, and at
// once when a sequence is converted here.
func (gs *sequences) maintain(ctx context.Context) {
	wait := time.Duration(0)
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(wait):
		case <-gs.tendSoon:
		}
		problems, galloc, err := gs.tend(ctx)
		if err != nil && ctx.Err() == nil {
			problems = append(problems, "global sequences: "+err.Error())
		}
		gs.problems.set("sequences", problems)
		wait = time.Second
		if galloc {
			wait = 50 * time.Millisecond
		}
	}
}

// tend does one round of maintain and reports whether
// the group has galloc sequences.
func (gs *sequences) tend(ctx context.Context) (problems []string, galloc bool, err error) {
	rows, err := gs.db.Query(ctx, `SELECT g.seq, g.kind, coalesce(g.chunk_size, 0), (SELECT node_id FROM pgmesh.node WHERE is_local)
		FROM pgmesh.global_sequence g`)
	if err != nil {
		return nil, false, err
	}
	type seqState struct {
		seq, kind string
		size      int64
		nodeID    *int32
	}
	states, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (seqState, error) {
		var s seqState
		return s, r.Scan(&s.seq, &s.kind, &s.size, &s.nodeID)
	})
	if err != nil {
		return nil, false, err
	}
	for _, s := range states {
		switch s.kind {
		case "timeshard":
			if s.nodeID == nil {
				continue
			}
			// Forward only, and only when well behind: a concurrent nextval
			// cannot have moved past the new value in the meantime.
			if _, err := gs.db.Exec(ctx, `SELECT setval($1::regclass, f) FROM (SELECT pgmesh.timeshard_floor($2) AS f) x
				WHERE (SELECT last_value FROM pg_sequence_last_value($1::regclass) AS v(last_value)) < f - (1000::bigint << 22)`, s.seq, *s.nodeID); err != nil {
				return problems, galloc, err
			}
		case "galloc":
			galloc = true
			if err := gs.prefetchChunks(ctx, s.seq, s.size); err != nil {
				problems = append(problems, fmt.Sprintf("galloc sequence %s cannot draw its next chunk (%v): this node goes on with the chunks it holds, then pgmesh.galloc_nextval fails until a chunk can be drawn", s.seq, err))
			}
		}
	}
	return problems, galloc, nil
}

// gallocAhead is how many chunks beyond the one in use a node holds, so a
// burst of values does not outrun the daemon and a Raft outage is bridged.
const gallocAhead = 2

// prefetchChunks draws chunks until this node holds gallocAhead beyond the
// one its counter is in.
func (gs *sequences) prefetchChunks(ctx context.Context, seq string, size int64) error {
	var inUse, held int64
	err := gs.db.QueryRow(ctx, `SELECT coalesce((pg_sequence_last_value(format('pgmesh.%I', 'galloc_' || $1::text::regclass::oid)::regclass) - 1) / $2, 0),
		coalesce((SELECT max(ordinal) FROM pgmesh.galloc_chunk WHERE seq = $1::text), -1)`, seq, size).Scan(&inUse, &held)
	if err != nil {
		return err
	}
	for ord := held + 1; ord <= inUse+gallocAhead; ord++ {
		ch, err := gs.allocChunk(ctx, seq, size, 0)
		if err != nil {
			return err
		}
		if _, err := gs.db.Exec(ctx, `INSERT INTO pgmesh.galloc_chunk VALUES ($1, $2, $3, $4)`, seq, ord, ch.Start, ch.End); err != nil {
			return err
		}
	}
	return nil
}
