package replicator

import (
	"slices"
	"testing"

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
		Columns: []*pglogrepl.RelationMessageColumn{{Name: "id", Flags: 1}, {Name: "Name"}, {Name: "n"}}})
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
