// Package compare finds rows that differ between the members of a group
// without moving tables over the network: each node hashes chunks of each
// table's primary-key order inside Postgres, only chunks whose counts or
// hashes differ are read key by key, and every differing key is read again
// once the nodes have applied what each had committed, so that rows still
// in flight are not reported as drift. For each differing key it names
// every node's version and the one last-update-wins says should win;
// Repair writes that winner again so it travels through replication.
package compare

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"golang.org/x/sync/errgroup"

	"github.com/pgmesh/pgmesh/conflict"
	"github.com/pgmesh/pgmesh/internal/pgquote"
	"github.com/pgmesh/pgmesh/internal/pgsession"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/origin"
)

// Node is a member whose database is compared.
type Node struct {
	Name string `json:"name"`
	ID   int    `json:"id"`
	DSN  string `json:"-"`
}

// Options tune a comparison.
type Options struct {
	// Tables are schema-qualified names (public. may be left out); empty:
	// every replicated table.
	Tables []string
	// ChunkRows is how many rows one hashed chunk holds (default 10000).
	ChunkRows int
	// Rule is the group's last-update-wins rule, which picks winners.
	Rule conflict.Rule
	// Settle bounds the wait for the nodes to apply each other's changes
	// (default 60s).
	Settle time.Duration
	// Progress, when set, is told when a table's chunks are hashed.
	Progress func(table string, chunks, of int)
	// Where and Columns narrow the comparison to the share of the tables
	// that every node compared receives (replication sets): rows matching
	// the filter, the listed columns. Empty: every row, every column.
	Where   string
	Columns []string
}

// Version is one node's version of a differing row.
type Version struct {
	Node    string `json:"node"`
	Present bool   `json:"present"`
	// Hash of the row's values (present rows only).
	Hash string `json:"hash,omitempty"`
	// CommitTS and Origin say when and where the version was written: the
	// row's last commit, or for an absent row the delete remembered by a
	// tombstone (nil when none is).
	CommitTS *time.Time `json:"commit_ts,omitempty"`
	Origin   string     `json:"origin,omitempty"`
}

// Diff is a key whose rows differ between nodes.
type Diff struct {
	Key      json.RawMessage `json:"key"`
	Versions []Version       `json:"versions"`
	// Winner is the node whose version last-update-wins keeps; WinnerIsDelete
	// says that version is a delete.
	Winner         string `json:"winner"`
	WinnerIsDelete bool   `json:"winner_is_delete"`
}

// TableResult is the outcome for one table.
type TableResult struct {
	Table string `json:"table"`
	// NotComparable says why the table was not compared (no primary key).
	NotComparable string  `json:"not_comparable,omitempty"`
	Rows          int64   `json:"rows_compared"`
	Seconds       float64 `json:"seconds"`
	Diffs         []Diff  `json:"diffs"`
	// InFlight counts keys that kept changing while they were checked:
	// written meanwhile, not drift.
	InFlight int `json:"in_flight,omitempty"`
	// Nodes and Where, when set, say that only these nodes were compared,
	// on the rows matching Where: the share of the table they all receive.
	Nodes []string `json:"nodes,omitempty"`
	Where string   `json:"where,omitempty"`
}

// sessionSettings make every node print values the same way, so that equal
// rows hash equally whatever each server's defaults are.
var sessionSettings = pgsession.Settings{
	"TimeZone": "UTC", "DateStyle": "ISO, YMD", "IntervalStyle": "postgres",
	"extra_float_digits": "1", "bytea_output": "hex", "default_transaction_read_only": "on",
}

type conn struct {
	node Node
	c    *pgx.Conn
}

func connectAll(ctx context.Context, nodes []Node) ([]*conn, error) {
	var out []*conn
	for _, n := range nodes {
		c, err := pgsession.Connect(ctx, n.DSN, "pgmesh compare", sessionSettings)
		if err != nil {
			closeAll(out)
			return nil, fmt.Errorf("connect to node %s's Postgres: %w", n.Name, err)
		}
		out = append(out, &conn{node: n, c: c})
	}
	return out, nil
}

func closeAll(cs []*conn) {
	for _, c := range cs {
		c.c.Close(context.Background())
	}
}

// Compare compares the tables on every node. nodes[0] is the node the
// table list and chunk boundaries are taken from.
func Compare(ctx context.Context, nodes []Node, opts Options) ([]TableResult, error) {
	if opts.ChunkRows <= 0 {
		opts.ChunkRows = 10000
	}
	if opts.Settle <= 0 {
		opts.Settle = time.Minute
	}
	cs, err := connectAll(ctx, nodes)
	if err != nil {
		return nil, err
	}
	defer closeAll(cs)
	tables, err := listTables(ctx, cs[0].c, opts.Tables)
	if err != nil {
		return nil, err
	}
	var out []TableResult
	for _, t := range tables {
		t.where = opts.Where
		if len(opts.Columns) > 0 {
			t.cols = slices.DeleteFunc(t.cols, func(c string) bool { return !slices.Contains(opts.Columns, c) })
		}
		res, err := compareTable(ctx, cs, t, opts)
		if err != nil {
			return nil, fmt.Errorf("compare %s: %w", t.name, err)
		}
		out = append(out, res)
	}
	return out, nil
}

// Tables returns the names of the tables Compare would compare on node.
func Tables(ctx context.Context, node Node, names []string) ([]string, error) {
	cs, err := connectAll(ctx, []Node{node})
	if err != nil {
		return nil, err
	}
	defer closeAll(cs)
	ts, err := listTables(ctx, cs[0].c, names)
	out := make([]string, len(ts))
	for i, t := range ts {
		out[i] = t.name
	}
	return out, err
}

// table is what comparing a table needs to know of it.
type table struct {
	name      string   // schema.table as written in results
	qualified string   // quoted, for statements
	cols      []string // every column, by name (so column order may differ between nodes)
	key       []string // primary key columns, in key order
	keyTypes  []string
	noKey     bool
	where     string // row filter of the compared share; empty: every row
}

// listTables returns the named tables, or every table the pgmesh
// publication holds, from the first node's catalog.
func listTables(ctx context.Context, c *pgx.Conn, names []string) ([]*table, error) {
	rows, err := c.Query(ctx, `SELECT n.nspname, c.relname,
		array(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
		      AND a.attgenerated = '' ORDER BY a.attname),
		array(SELECT a.attname::text FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		      WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.ord),
		array(SELECT format_type(a.atttypid, a.atttypmod) FROM pg_index i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY k(attnum, ord)
		      JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
		      WHERE i.indrelid = c.oid AND i.indisprimary ORDER BY k.ord)
		FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
		JOIN pgmesh.user_tables u ON u.relid = c.oid
		WHERE u.relation IN (SELECT relation FROM pgmesh.replication_set_tables) ORDER BY 1, 2`)
	if err != nil {
		return nil, fmt.Errorf("list replicated tables: %w", err)
	}
	var all []*table
	for rows.Next() {
		var schema, name string
		t := &table{}
		if err := rows.Scan(&schema, &name, &t.cols, &t.key, &t.keyTypes); err != nil {
			return nil, err
		}
		t.name = schema + "." + name
		t.qualified = pgx.Identifier{schema, name}.Sanitize()
		t.noKey = len(t.key) == 0
		all = append(all, t)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("list replicated tables: %w", err)
	}
	if len(names) == 0 {
		return all, nil
	}
	var out []*table
	for _, want := range names {
		if !strings.Contains(want, ".") {
			want = "public." + want
		}
		i := slices.IndexFunc(all, func(t *table) bool { return t.name == want })
		if i < 0 {
			return nil, fmt.Errorf("table %s is not replicated by pgmesh (or does not exist): name a table of a user schema, as schema.table", want)
		}
		out = append(out, all[i])
	}
	return out, nil
}

// rowHash is an expression hashing a row's values in column-name order.
func (t *table) rowHash() string {
	cols := make([]string, len(t.cols))
	for i, c := range t.cols {
		cols[i] = "t." + pgquote.Ident(c)
	}
	return "hashtextextended(ROW(" + strings.Join(cols, ", ") + ")::text, 0)"
}

// keyJSON is the key as pgmesh.tombstone stores it.
func (t *table) keyJSON() string {
	var kv []string
	for _, c := range t.key {
		kv = append(kv, pgquote.Literal(c), "t."+pgquote.Ident(c))
	}
	return "jsonb_build_object(" + strings.Join(kv, ", ") + ")"
}

func (t *table) keyOrder() string {
	cols := make([]string, len(t.key))
	for i, c := range t.key {
		cols[i] = "t." + pgquote.Ident(c)
	}
	return strings.Join(cols, ", ")
}

// bound is a key value as text (one per key column), or nil for no bound.
type bound []string

// rangeCond is the condition for keys in [lo, hi) (nil: unbounded), its
// parameters appended to args. Row comparisons over the key columns use the
// primary key's index.
func (t *table) rangeCond(lo, hi bound, args *[]any) string {
	keys := make([]string, len(t.key))
	for i, c := range t.key {
		keys[i] = "t." + pgquote.Ident(c)
	}
	typed := func(b bound) string {
		ps := make([]string, len(b))
		for i, v := range b {
			*args = append(*args, v)
			ps[i] = "$" + strconv.Itoa(len(*args)) + "::" + t.keyTypes[i]
		}
		if len(ps) == 1 {
			return ps[0]
		}
		return "(" + strings.Join(ps, ", ") + ")"
	}
	key := keys[0]
	if len(keys) > 1 {
		key = "(" + strings.Join(keys, ", ") + ")"
	}
	var conds []string
	if lo != nil {
		conds = append(conds, key+" >= "+typed(lo))
	}
	if hi != nil {
		conds = append(conds, key+" < "+typed(hi))
	}
	return t.inShare(strings.Join(conds, " AND "))
}

// inShare adds the share's row filter to a condition (empty: true).
func (t *table) inShare(cond string) string {
	switch {
	case t.where == "" && cond == "":
		return "true"
	case t.where == "":
		return cond
	case cond == "":
		return "(" + t.where + ")"
	}
	return cond + " AND (" + t.where + ")"
}

// sumsEverywhere is chunkSums on every node, the nodes in parallel.
func sumsEverywhere(ctx context.Context, cs []*conn, t *table, lo, hi bound, bounds []bound) (counts [][]int64, sums [][]string, err error) {
	counts, sums = make([][]int64, len(cs)), make([][]string, len(cs))
	g, gctx := errgroup.WithContext(ctx)
	for i, c := range cs {
		g.Go(func() error {
			var err error
			counts[i], sums[i], err = chunkSums(gctx, c, t, lo, hi, bounds)
			return err
		})
	}
	return counts, sums, g.Wait()
}

// chunkSums returns each chunk's row count and hash sum on one node. With
// a one-column key every chunk comes from one pass over the table
// (width_bucket numbers the chunks by their lower bounds); otherwise each
// chunk is a range read through the key's index.
func chunkSums(ctx context.Context, c *conn, t *table, lo, hi bound, bounds []bound) (counts []int64, sums []string, err error) {
	n := len(bounds) + 1
	counts, sums = make([]int64, n), make([]string, n)
	for i := range sums {
		sums[i] = "0"
	}
	if len(t.key) == 1 {
		lows := make([]string, len(bounds))
		for i, b := range bounds {
			lows[i] = b[0]
		}
		args := []any{lows}
		q := fmt.Sprintf(`SELECT width_bucket(t.%s, $1::%s[]), count(*), sum(%s::numeric)::text FROM %s t WHERE %s GROUP BY 1`,
			pgquote.Ident(t.key[0]), t.keyTypes[0], t.rowHash(), t.qualified, t.rangeCond(lo, hi, &args))
		rows, err := c.c.Query(ctx, q, args...)
		if err != nil {
			return nil, nil, fmt.Errorf("hash chunks on node %s: %w", c.node.Name, err)
		}
		defer rows.Close()
		for rows.Next() {
			var j int
			var cnt int64
			var sum string
			if err := rows.Scan(&j, &cnt, &sum); err != nil {
				return nil, nil, err
			}
			counts[j], sums[j] = cnt, sum
		}
		return counts, sums, rows.Err()
	}
	for j := range n {
		clo, chi := lo, hi
		if j > 0 {
			clo = bounds[j-1]
		}
		if j < len(bounds) {
			chi = bounds[j]
		}
		var args []any
		q := fmt.Sprintf(`SELECT count(*), coalesce(sum(%s::numeric), 0)::text FROM %s t WHERE %s`,
			t.rowHash(), t.qualified, t.rangeCond(clo, chi, &args))
		if err := c.c.QueryRow(ctx, q, args...).Scan(&counts[j], &sums[j]); err != nil {
			return nil, nil, fmt.Errorf("hash a chunk on node %s: %w", c.node.Name, err)
		}
	}
	return counts, sums, nil
}

func compareTable(ctx context.Context, cs []*conn, t *table, opts Options) (TableResult, error) {
	start := time.Now()
	res := TableResult{Table: t.name, Diffs: []Diff{}}
	if t.noKey {
		res.NotComparable = "it has no primary key, so rows cannot be matched between nodes: add one"
		return res, nil
	}
	if err := settle(ctx, cs, opts.Settle); err != nil {
		return res, err
	}
	bounds, err := chunkBounds(ctx, cs[0].c, t, nil, nil, opts.ChunkRows)
	if err != nil {
		return res, err
	}
	type chunk struct{ lo, hi bound }
	chunks := make([]chunk, 0, len(bounds)+1)
	var prev bound
	for _, b := range bounds {
		chunks = append(chunks, chunk{prev, b})
		prev = b
	}
	chunks = append(chunks, chunk{prev, nil})

	counts, sums, err := sumsEverywhere(ctx, cs, t, nil, nil, bounds)
	if err != nil {
		return res, err
	}
	if opts.Progress != nil {
		opts.Progress(t.name, len(chunks), len(chunks))
	}
	for _, n := range counts[0] {
		res.Rows += n
	}
	// Differing chunks are narrowed down, then read key by key.
	suspects := map[string]json.RawMessage{}
	for j, ch := range chunks {
		if err := narrow(ctx, cs, t, ch.lo, ch.hi, column(counts, j), column(sums, j), suspects, 0); err != nil {
			return res, err
		}
	}
	// Read the suspects again once everything committed has been applied
	// everywhere: a key is drift when it still differs and no version
	// moved since the last look; keys still changing are in flight.
	last := map[string][]Version{}
	for round := 0; round < 5 && len(suspects) > 0; round++ {
		if err := settle(ctx, cs, opts.Settle); err != nil {
			return res, err
		}
		keys := make([]string, 0, len(suspects))
		for k := range suspects {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		now, err := readKeys(ctx, cs, t, keys)
		if err != nil {
			return res, err
		}
		for _, k := range keys {
			vs := now[k]
			switch {
			case !differ(vs):
				delete(suspects, k)
			case last[k] != nil && slices.EqualFunc(last[k], vs, sameVersion):
				res.Diffs = append(res.Diffs, decide(opts.Rule, cs, suspects[k], vs))
				delete(suspects, k)
			default:
				last[k] = vs
			}
		}
	}
	res.InFlight = len(suspects)
	slices.SortFunc(res.Diffs, func(a, b Diff) int { return strings.Compare(string(a.Key), string(b.Key)) })
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// column returns every node's j-th value.
func column[T any](perNode [][]T, j int) []T {
	out := make([]T, len(perNode))
	for i := range perNode {
		out[i] = perNode[i][j]
	}
	return out
}

// narrowTo is how many rows a differing range may hold before it is read
// key by key; larger ones are split in narrowWays and hashed again.
const (
	narrowTo   = 500
	narrowWays = 16
)

// narrow adds to suspects the keys whose rows differ in [lo, hi), given
// each node's count and hash sum of that range: nothing when they agree,
// the keys read from every node when the range is small, else the same for
// each of its sub-ranges, hashed on every node.
func narrow(ctx context.Context, cs []*conn, t *table, lo, hi bound, counts []int64, sums []string, suspects map[string]json.RawMessage, depth int) error {
	if !slices.ContainsFunc(counts[1:], func(n int64) bool { return n != counts[0] }) &&
		!slices.ContainsFunc(sums[1:], func(s string) bool { return s != sums[0] }) {
		return nil
	}
	rows := slices.Max(counts)
	// Depth bounds the splitting when the nodes' rows lie far apart in key
	// order, so that cuts made on one node do not shrink another's share.
	if rows <= narrowTo || depth >= 6 {
		per, err := readChunk(ctx, cs, t, lo, hi)
		if err != nil {
			return err
		}
		for k, vs := range per {
			if differ(vs) {
				suspects[k] = json.RawMessage(k)
			}
		}
		return nil
	}
	// The sub-ranges are cut on the node holding the most rows of it, so
	// that each is smaller than the range wherever the rows are.
	most := slices.Index(counts, rows)
	bounds, err := chunkBounds(ctx, cs[most].c, t, lo, hi, int(max(rows/narrowWays, 1)))
	if err != nil {
		return err
	}
	subCounts, subSums, err := sumsEverywhere(ctx, cs, t, lo, hi, bounds)
	if err != nil {
		return err
	}
	for j := range len(bounds) + 1 {
		sublo, subhi := lo, hi
		if j > 0 {
			sublo = bounds[j-1]
		}
		if j < len(bounds) {
			subhi = bounds[j]
		}
		if err := narrow(ctx, cs, t, sublo, subhi, column(subCounts, j), column(subSums, j), suspects, depth+1); err != nil {
			return err
		}
	}
	return nil
}

func sameVersion(a, b Version) bool {
	return a.Node == b.Node && a.Present == b.Present && a.Hash == b.Hash && a.Origin == b.Origin &&
		(a.CommitTS == nil) == (b.CommitTS == nil) && (a.CommitTS == nil || a.CommitTS.Equal(*b.CommitTS))
}

// differ reports whether the nodes' versions of a key are not all the same row.
func differ(vs []Version) bool {
	for _, v := range vs[1:] {
		if v.Present != vs[0].Present || v.Hash != vs[0].Hash {
			return true
		}
	}
	return false
}

// chunkBounds returns the key of every chunkRows-th row in [lo, hi) on the
// first node.
func chunkBounds(ctx context.Context, c *pgx.Conn, t *table, lo, hi bound, chunkRows int) ([]bound, error) {
	var sel []string
	for _, k := range t.key {
		sel = append(sel, "s."+pgquote.Ident(k)+"::text")
	}
	args := []any{chunkRows}
	q := fmt.Sprintf(`SELECT %s FROM (SELECT %s, row_number() OVER (ORDER BY %s) AS pgmesh_rn FROM %s t WHERE %s) s
		WHERE s.pgmesh_rn %% $1 = 0 ORDER BY s.pgmesh_rn`, strings.Join(sel, ", "), t.keyOrder(), t.keyOrder(), t.qualified,
		t.rangeCond(lo, hi, &args))
	rows, err := c.Query(ctx, q, args...)
	if err != nil {
		return nil, fmt.Errorf("find chunk boundaries: %w", err)
	}
	defer rows.Close()
	var out []bound
	for rows.Next() {
		b := make(bound, len(t.key))
		ptrs := make([]any, len(b))
		for i := range b {
			ptrs[i] = &b[i]
		}
		if err := rows.Scan(ptrs...); err != nil {
			return nil, err
		}
		out = append(out, b)
	}
	return out, rows.Err()
}

// versionQuery selects, for the rows matching cond, the key as JSON, the
// row hash, its commit time (microseconds) and its origin's name.
func (t *table) versionQuery(cond string) string {
	return fmt.Sprintf(`SELECT %s::text, %s::text, (extract(epoch FROM c.timestamp) * 1000000)::bigint,
		CASE WHEN coalesce(c.roident, 0) = 0 THEN NULL ELSE (SELECT o.roname FROM pg_replication_origin o WHERE o.roident = c.roident) END
		FROM %s t LEFT JOIN LATERAL %s c ON true WHERE %s`,
		t.keyJSON(), t.rowHash(), t.qualified, conflict.RowVersion("t", t.qualified), cond)
}

// readChunk reads every node's versions of the rows in [lo, hi).
func readChunk(ctx context.Context, cs []*conn, t *table, lo, hi bound) (map[string][]Version, error) {
	return readVersions(ctx, cs, t, func(args *[]any) string { return t.rangeCond(lo, hi, args) }, nil)
}

// readKeys reads every node's versions of the given keys (JSON objects).
func readKeys(ctx context.Context, cs []*conn, t *table, keys []string) (map[string][]Version, error) {
	return readVersions(ctx, cs, t, func(args *[]any) string {
		*args = append(*args, keys)
		return t.inShare(t.keyJSON() + " = ANY($1::jsonb[])")
	}, keys)
}

func readVersions(ctx context.Context, cs []*conn, t *table, cond func(*[]any) string, keys []string) (map[string][]Version, error) {
	per := make([]map[string]Version, len(cs))
	g, gctx := errgroup.WithContext(ctx)
	for i, c := range cs {
		g.Go(func() error {
			var args []any
			rows, err := c.c.Query(gctx, t.versionQuery(cond(&args)), args...)
			if err != nil {
				return fmt.Errorf("read rows on node %s: %w", c.node.Name, err)
			}
			m := map[string]Version{}
			for rows.Next() {
				var key, hash string
				var us *int64
				var roname *string
				if err := rows.Scan(&key, &hash, &us, &roname); err != nil {
					return err
				}
				v := Version{Node: c.node.Name, Present: true, Hash: hash, Origin: c.node.Name}
				if us != nil {
					at := time.UnixMicro(*us).UTC()
					v.CommitTS = &at
				}
				if roname != nil {
					v.Origin = *roname
					if n, ok := origin.NodeOf(*roname); ok {
						v.Origin = n
					}
				}
				m[normalizeKey(key)] = v
			}
			if err := rows.Err(); err != nil {
				return fmt.Errorf("read rows on node %s: %w", c.node.Name, err)
			}
			per[i] = m
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	all := map[string]bool{}
	for _, k := range keys {
		all[normalizeKey(k)] = true
	}
	for _, m := range per {
		for k := range m {
			all[k] = true
		}
	}
	out := map[string][]Version{}
	var mu sync.Mutex
	g, gctx = errgroup.WithContext(ctx)
	for i, c := range cs {
		var absent []string
		for k := range all {
			if _, ok := per[i][k]; !ok {
				absent = append(absent, k)
			}
		}
		g.Go(func() error {
			tombs, err := tombstones(gctx, c, t, absent)
			if err != nil {
				return err
			}
			mu.Lock()
			defer mu.Unlock()
			for k := range all {
				v, ok := per[i][k]
				if !ok {
					v = tombs[k]
				}
				out[k] = append(out[k], v)
			}
			return nil
		})
	}
	if err := g.Wait(); err != nil {
		return nil, err
	}
	// The goroutines appended in any order: put versions in node order.
	for k, vs := range out {
		ordered := make([]Version, 0, len(cs))
		for _, c := range cs {
			if i := slices.IndexFunc(vs, func(v Version) bool { return v.Node == c.node.Name }); i >= 0 {
				ordered = append(ordered, vs[i])
			}
		}
		out[k] = ordered
	}
	return out, nil
}

// normalizeKey makes the JSON text of a key comparable between nodes:
// sorted members, one spelling, numbers kept exactly.
func normalizeKey(k string) string {
	dec := json.NewDecoder(strings.NewReader(k))
	dec.UseNumber()
	var v map[string]any
	if dec.Decode(&v) != nil {
		return k
	}
	b, _ := json.Marshal(v)
	return string(b)
}

// tombstones returns the node's versions of keys it holds no row for: the
// delete its tombstone remembers, or a version with no time (never had it).
func tombstones(ctx context.Context, c *conn, t *table, keys []string) (map[string]Version, error) {
	out := map[string]Version{}
	for _, k := range keys {
		out[k] = Version{Node: c.node.Name}
	}
	if len(keys) == 0 {
		return out, nil
	}
	schema, name, _ := strings.Cut(t.name, ".")
	rows, err := c.c.Query(ctx, `SELECT key::text, `+conflict.TombstoneAtMicros("")+`, deleted_by
		FROM pgmesh.tombstone WHERE relation = format('%I.%I', $1::text, $2::text) AND key = ANY($3::jsonb[])`,
		schema, name, keys)
	if err != nil {
		return nil, fmt.Errorf("read tombstones on node %s: %w", c.node.Name, err)
	}
	defer rows.Close()
	for rows.Next() {
		var key string
		var us *int64
		var by *string
		if err := rows.Scan(&key, &us, &by); err != nil {
			return nil, err
		}
		tomb := conflict.TombstoneVersion(us, by, c.node.Name)
		v := Version{Node: c.node.Name, Origin: tomb.Node}
		if us != nil {
			v.CommitTS = &tomb.CommitTS
		}
		out[normalizeKey(key)] = v
	}
	return out, rows.Err()
}

// decide names the version last-update-wins keeps. An absent row with no
// tombstone is a node that never got the row: it loses to anything.
func decide(rule conflict.Rule, cs []*conn, key json.RawMessage, vs []Version) Diff {
	d := Diff{Key: key, Versions: vs}
	ids := map[string]int{}
	for _, c := range cs {
		ids[c.node.Name] = c.node.ID
	}
	var best *conflict.Version
	for _, v := range vs {
		if !v.Present && v.CommitTS == nil {
			continue
		}
		cv := conflict.Version{Node: v.Origin, NodeID: ids[v.Origin]}
		if v.CommitTS != nil {
			cv.CommitTS = *v.CommitTS
		}
		if best == nil || rule.Newer(cv, *best) {
			best = &cv
			d.Winner, d.WinnerIsDelete = v.Node, !v.Present
		}
	}
	return d
}

// settle waits until every node has applied what every other node had
// committed when it was called (its WAL insert position then), read from
// each node's pgmesh.peer_progress.
func settle(ctx context.Context, cs []*conn, timeout time.Duration) error {
	targets := make([]pglogrepl.LSN, len(cs))
	for i, c := range cs {
		if err := c.c.QueryRow(ctx, `SELECT pg_current_wal_insert_lsn()`).Scan(&targets[i]); err != nil {
			return fmt.Errorf("read the WAL position of node %s: %w", c.node.Name, err)
		}
	}
	deadline := time.Now().Add(timeout)
	for i, from := range cs {
		for _, c := range cs {
			if c == from {
				continue
			}
			err := poll.Until(ctx, 50*time.Millisecond, time.Until(deadline), func() error {
				var applied *pglogrepl.LSN
				err := c.c.QueryRow(ctx, `SELECT applied_lsn FROM pgmesh.peer_progress WHERE node_name = $1`, from.node.Name).Scan(&applied)
				if err != nil && !errors.Is(err, pgx.ErrNoRows) {
					return poll.Stop(fmt.Errorf("read the progress of node %s on %s: %w", from.node.Name, c.node.Name, err))
				}
				if applied != nil && *applied >= targets[i] {
					return nil
				}
				return fmt.Errorf("node %s has not applied node %s's changes up to %s within %s, so rows still in flight cannot be told from drift: check 'pgmesh status' on %s and compare again",
					c.node.Name, from.node.Name, targets[i], timeout, c.node.Name)
			})
			if err != nil {
				return err
			}
		}
	}
	return nil
}
