package replicator

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

func TestParseTextArray(t *testing.T) {
	cases := map[string][]string{
		`{}`:                     nil,
		`{a}`:                    {"a"},
		`{a,b,c}`:                {"a", "b", "c"},
		`{"with space","a,b",x}`: {"with space", "a,b", "x"},
		`{"quo\"te","back\\sl"}`: {`quo"te`, `back\sl`},
		`{"Mixed Case",plain}`:   {"Mixed Case", "plain"},
		`{"",nonempty}`:          {"", "nonempty"},
		`{"ends with \\\\"}`:     {`ends with \\`},
		`{élan,"日本語 テーブル"}`:      {"élan", "日本語 テーブル"},
	}
	for in, want := range cases {
		if got := parseTextArray(in); !slices.Equal(got, want) {
			t.Errorf("parseTextArray(%s) = %q, want %q", in, got, want)
		}
	}
}

// testRelation is a peer table "s"."T x" (id int, "Name" text, n int) with
// id as replica identity and, locally, id as primary key.
func testRelation() *relation {
	r := newRelation(&pglogrepl.RelationMessage{Namespace: "s", RelationName: "T x", ReplicaIdentity: 'd',
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "id", Flags: 1}, {Name: "Name"}, {Name: "n"}}}, nil)
	r.localType = []string{"integer", "text", "bigint"}
	r.pk = []int{0}
	return r
}

func tuple(vals ...any) *pglogrepl.TupleData {
	t := &pglogrepl.TupleData{}
	for _, v := range vals {
		switch v := v.(type) {
		case nil:
			t.Columns = append(t.Columns, &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeNull})
		case byte: // 'u': unchanged TOAST
			t.Columns = append(t.Columns, &pglogrepl.TupleDataColumn{DataType: v})
		case string:
			t.Columns = append(t.Columns, &pglogrepl.TupleDataColumn{DataType: pglogrepl.TupleDataTypeText, Data: []byte(v)})
		}
	}
	return t
}

func TestRelationNamesAndKeys(t *testing.T) {
	r := testRelation()
	if r.qualified != `"s"."T x"` || r.name != "s.T x" {
		t.Errorf("qualified %s, name %s", r.qualified, r.name)
	}
	if !slices.Equal(r.keys, []int{0}) || r.full {
		t.Errorf("replica identity columns %v (full %v), want [0]", r.keys, r.full)
	}
	var p params
	if got := r.where(&p, []int{0, 1}, [][]byte{[]byte("1"), []byte("x")}, false); got != `t."id" = $1 AND t."Name" = $2` {
		t.Errorf("where = %s", got)
	}
	if got := r.where(&p, []int{2}, [][]byte{nil}, true); got != `t."n" IS NOT DISTINCT FROM $3` {
		t.Errorf("null-safe where = %s", got)
	}
	p = params{}
	if got := r.keyJSON(&p, []int{0}, [][]byte{[]byte("7")}); got != `(SELECT to_jsonb(pgmesh_v.*) FROM (SELECT $1::integer AS "id") pgmesh_v)` {
		t.Errorf("keyJSON = %s", got)
	}
	if len(p.vals) != 1 || string(p.vals[0]) != "7" {
		t.Errorf("keyJSON params %q", p.vals)
	}
}

func TestRelationMatch(t *testing.T) {
	r := testRelation()
	if cols, nullSafe := r.match(tuple("1", "a", "2")); !slices.Equal(cols, []int{0}) || nullSafe {
		t.Errorf("with the key present: %v %v, want the primary key", cols, nullSafe)
	}
	// A key column sent as NULL or unchanged TOAST cannot match by the
	// local primary key: the peer's replica identity is used.
	if cols, _ := r.match(tuple(nil, "a", "2")); !slices.Equal(cols, []int{0}) {
		t.Errorf("key NULL: %v, want the replica identity", cols)
	}
	r.pk, r.keys, r.full = nil, nil, true
	if cols, nullSafe := r.match(tuple("1", nil, "2")); !slices.Equal(cols, []int{0, 1, 2}) || !nullSafe {
		t.Errorf("REPLICA IDENTITY FULL without a key: %v %v, want every column, null-safe", cols, nullSafe)
	}
}

func TestValuesLeaveOutUnchangedToast(t *testing.T) {
	cols, vals := values(tuple("1", byte(pglogrepl.TupleDataTypeToast), nil))
	if !slices.Equal(cols, []int{0, 2}) || string(vals[0]) != "1" || vals[1] != nil {
		t.Errorf("values = %v %q, want columns 0 and 2 (NULL), the TOAST column left out", cols, vals)
	}
	if got := pick(tuple("1", byte(pglogrepl.TupleDataTypeToast), "x"), []int{2, 0}); string(got[0]) != "x" || string(got[1]) != "1" {
		t.Errorf("pick = %q", got)
	}
	if carries(tuple("1", byte(pglogrepl.TupleDataTypeToast)), []int{1}) || !carries(tuple("1", "a"), []int{0, 1}) {
		t.Error("carries must be false for unchanged TOAST and true for sent values")
	}
}

func TestInsertRunsContinueOnlyForTheSameShape(t *testing.T) {
	r, other := testRelation(), testRelation()
	run := insertRun{r: r, cols: []int{0, 1, 2}, rows: make([][][]byte, 10)}
	if !run.continues(r, []int{0, 1, 2}) {
		t.Error("same relation and columns must continue the run")
	}
	if run.continues(other, []int{0, 1, 2}) || run.continues(r, []int{0, 2}) {
		t.Error("another relation or column set must start a new run")
	}
	run.rows = make([][][]byte, fastMaxRun)
	if run.continues(r, []int{0, 1, 2}) {
		t.Error("a full run must not grow")
	}
}

func TestProtocolPerVersion(t *testing.T) {
	for major, want := range map[int]int{15: 3, 16: 4, 17: 4, 18: 4} {
		if got := protoVersion(major); got != want {
			t.Errorf("PostgreSQL %d: protocol %d, want %d", major, got, want)
		}
	}
}

func TestFastPathStatements(t *testing.T) {
	r := testRelation()
	r.tombName = `s."T x"`
	r.identityAlways = make([]bool, 3)

	var p params
	one := r.insertSQL(&p, []int{0, 1}, []string{r.typed(&p, 0, []byte("1")), r.typed(&p, 1, []byte("a"))}, "")
	for _, want := range []string{`WITH i AS (INSERT INTO "s"."T x" ("id", "Name") SELECT $1::integer, $2::text`,
		`RETURNING jsonb_build_object('id', "id") AS k)`, `SELECT pgmesh.raise_if_deleted($3, array_agg(i.k)) FROM i`} {
		if !strings.Contains(one, want) {
			t.Errorf("insert of one row lacks %q:\n%s", want, one)
		}
	}
	if strings.Contains(one, "OVERRIDING") {
		t.Error("no identity column, yet OVERRIDING SYSTEM VALUE")
	}
	r.anyIdentity = true
	p = params{}
	arr := p.add(nil)
	run := r.insertSQL(&p, []int{0}, []string{"u.c0::integer"}, " FROM unnest("+arr+"::text[]) AS u(c0)")
	if !strings.Contains(run, `OVERRIDING SYSTEM VALUE SELECT u.c0::integer FROM unnest($1::text[]) AS u(c0) RETURNING`) ||
		!strings.Contains(run, `raise_if_deleted($2,`) {
		t.Errorf("insert run:\n%s", run)
	}

	p = params{}
	up, ok := r.updateSQL(&p, []int{0, 1, 2}, [][]byte{[]byte("1"), []byte("b"), nil}, [][]byte{[]byte("1")}, 7)
	if !ok || !strings.Contains(up, `UPDATE "s"."T x" t SET "id" = $1, "Name" = $2, "n" = $3 WHERE t."id" = $4 AND CASE WHEN (SELECT v.roident FROM pgmesh.row_version('"s"."T x"'::regclass, t.xmin) v) = 7`) ||
		!strings.HasSuffix(up, expectOneRow) || len(p.vals) != 4 || p.vals[2] != nil {
		t.Errorf("update (ok %v, params %q):\n%s", ok, p.vals, up)
	}
	r.identityAlways[0] = true
	p = params{}
	if up, _ := r.updateSQL(&p, []int{0, 2}, [][]byte{[]byte("1"), []byte("5")}, [][]byte{[]byte("1")}, 7); strings.Contains(up, `"id" = $`) && !strings.Contains(up, `t."id" = $`) {
		t.Errorf("a GENERATED ALWAYS column must not be set:\n%s", up)
	}
	if _, ok := r.updateSQL(&p, []int{0}, [][]byte{[]byte("1")}, [][]byte{[]byte("1")}, 7); ok {
		t.Error("an update of nothing but GENERATED ALWAYS columns must go careful")
	}

	p = params{}
	del := r.deleteSQL(&p, [][]byte{[]byte("9")}, 7, time.Date(2026, 11, 30, 8, 0, 0, 5000, time.UTC), "tokyo")
	for _, want := range []string{`DELETE FROM "s"."T x" t WHERE t."id" = $1 AND CASE`, `RETURNING jsonb_build_object('id', t."id") AS k`,
		`INSERT INTO pgmesh.tombstone`, `pgmesh.luw_newer(`} {
		if !strings.Contains(del, want) {
			t.Errorf("delete lacks %q:\n%s", want, del)
		}
	}
	if got := []string{string(p.vals[1]), string(p.vals[2]), string(p.vals[3])}; !slices.Equal(got, []string{`s."T x"`, "2026-11-30 08:00:00.000005+00", "tokyo"}) {
		t.Errorf("delete parameters %q", got)
	}
}
