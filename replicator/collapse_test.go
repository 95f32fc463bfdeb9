package replicator

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

// Changes to testRelation's table, written as the test reads best.
func ins(r *relation, id, name string) change {
	return change{r: r, op: pglogrepl.MessageTypeInsert, cols: []int{0, 1, 2}, vals: [][]byte{[]byte(id), []byte(name), nil},
		key: [][]byte{[]byte(id)}}
}

func upd(r *relation, id string, cols []int, vals ...string) change {
	c := change{r: r, op: pglogrepl.MessageTypeUpdate, cols: cols, key: [][]byte{[]byte(id)}}
	for _, v := range vals {
		c.vals = append(c.vals, []byte(v))
	}
	return c
}

func del(r *relation, id string, at time.Time) change {
	return change{r: r, op: pglogrepl.MessageTypeDelete, key: [][]byte{[]byte(id)}, commitTS: at}
}

// describe prints a table set's statements as the test reads best.
func describe(ts *tableSet) string {
	deletes, updates, inserts, deletesOfNew := ts.deletes, ts.updates, ts.inserts, ts.deletesOfNew
	var out []string
	keys := func(rows []*finalRow) string {
		var k []string
		for _, row := range rows {
			k = append(k, string(row.key[0]))
		}
		return strings.Join(k, ",")
	}
	if len(deletes) > 0 {
		out = append(out, "delete "+keys(deletes))
	}
	for _, p := range updates {
		var rows []string
		for _, row := range p.rows {
			rows = append(rows, fmt.Sprintf("%s%q", row.key[0], row.vals))
		}
		out = append(out, fmt.Sprintf("update %v %s", p.cols, strings.Join(rows, " ")))
	}
	for _, p := range inserts {
		var rows []string
		for _, row := range p.rows {
			rows = append(rows, fmt.Sprintf("%q", row.vals))
		}
		out = append(out, fmt.Sprintf("insert %v %s", p.cols, strings.Join(rows, " ")))
	}
	if len(deletesOfNew) > 0 {
		out = append(out, "delete new "+keys(deletesOfNew))
	}
	return strings.Join(out, "; ")
}

func TestCollapseToFinalImages(t *testing.T) {
	r := testRelation()
	t1, t2 := time.Unix(100, 0), time.Unix(200, 0)
	cases := []struct {
		name    string
		changes []change
		want    string
	}{
		{"updates of one row become its last image",
			[]change{upd(r, "1", []int{0, 1}, "1", "a"), upd(r, "1", []int{0, 1}, "1", "b")},
			`update [0 1] 1["1" "b"]`},
		{"an unchanged TOAST value keeps the earlier update's value",
			[]change{upd(r, "1", []int{0, 1, 2}, "1", "a", "7"), upd(r, "1", []int{0, 2}, "1", "8")},
			`update [0 1 2] 1["1" "a" "8"]`},
		{"updates with different columns sent are separate statements",
			[]change{upd(r, "1", []int{0, 1}, "1", "a"), upd(r, "2", []int{0, 2}, "2", "5"), upd(r, "3", []int{0, 1}, "3", "c")},
			`update [0 1] 1["1" "a"] 3["3" "c"]; update [0 2] 2["2" "5"]`},
		{"an insert and its updates become one insert",
			[]change{ins(r, "1", "a"), upd(r, "1", []int{0, 1}, "1", "b")},
			`insert [0 1 2] ["1" "b" ""]`},
		{"an insert, update and delete still leave the delete",
			[]change{ins(r, "1", "a"), upd(r, "1", []int{0, 1}, "1", "b"), del(r, "1", t2)},
			`insert [0 1 2] ["1" "b" ""]; delete new 1`},
		{"deletes of rows that were there come first",
			[]change{ins(r, "5", "e"), upd(r, "2", []int{0, 1}, "2", "x"), del(r, "1", t1)},
			`delete 1; update [0 1] 2["2" "x"]; insert [0 1 2] ["5" "e" ""]`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			sets, ok := collapse(c.changes)
			if !ok || len(sets) != 1 {
				t.Fatalf("collapse: ok %v, %d tables", ok, len(sets))
			}
			if got := describe(sets[0]); got != c.want {
				t.Errorf("got  %s\nwant %s", got, c.want)
			}
		})
	}

	// The delete's own commit time goes into the tombstone.
	sets, _ := collapse([]change{upd(r, "1", []int{0, 1}, "1", "a"), del(r, "1", t2), del(r, "2", t1)})
	deletes := sets[0].deletes
	if len(deletes) != 2 || !deletes[0].deletedAt.Equal(t2) || !deletes[1].deletedAt.Equal(t1) {
		t.Errorf("tombstone times: %+v", deletes)
	}
}

func TestCollapseRefusesWhatConflictsOneByOne(t *testing.T) {
	r := testRelation()
	ordered := testRelation()
	ordered.orderedTriggers = true
	keyless := testRelation()
	keyless.pk = nil
	moved := upd(r, "1", []int{0}, "2")
	moved.newKey = true
	cases := map[string][]change{
		"a change after a delete":             {del(r, "1", time.Time{}), ins(r, "1", "a")},
		"an update after a delete":            {del(r, "1", time.Time{}), upd(r, "1", []int{0}, "1")},
		"an insert of a key already inserted": {ins(r, "1", "a"), ins(r, "1", "b")},
		"an insert of a key updated":          {upd(r, "1", []int{0}, "1"), ins(r, "1", "b")},
		"an update that moves the key":        {moved},
		"a table whose triggers fire":         {ins(ordered, "1", "a")},
		"an update of a table without a key":  {{r: keyless, op: pglogrepl.MessageTypeUpdate}},
	}
	for name, changes := range cases {
		if _, ok := collapse(changes); ok {
			t.Errorf("%s: collapsed, but applied one by one it conflicts (or must be seen in order)", name)
		}
	}
	// Inserts into a table without a key are kept, in order.
	sets, ok := collapse([]change{{r: keyless, op: pglogrepl.MessageTypeInsert, cols: []int{0}, vals: [][]byte{[]byte("1")}},
		{r: keyless, op: pglogrepl.MessageTypeInsert, cols: []int{0}, vals: [][]byte{[]byte("1")}}})
	if !ok || len(sets[0].keyless) != 1 || len(sets[0].keyless[0].rows) != 2 {
		t.Errorf("inserts without a key: ok %v, %+v", ok, sets)
	}
}

func TestSetStatementsOnlyWhenFewer(t *testing.T) {
	r, other := testRelation(), testRelation()
	one := []change{upd(r, "1", []int{0, 1}, "1", "a"), ins(other, "9", "x")}
	sets, _ := collapse(one)
	if s, o := setStatementCount(sets), oneByOneCount(one); s != 2 || o != 2 {
		t.Errorf("one transaction: %d set statements, %d one by one; want 2 and 2", s, o)
	}
	var many []change
	for i := range 10 {
		id := fmt.Sprint(i % 3)
		many = append(many, upd(r, id, []int{0, 1}, id, "a"), ins(other, fmt.Sprint(100+i), "x"))
	}
	sets, _ = collapse(many)
	if s, o := setStatementCount(sets), oneByOneCount(many); s != 2 || o != 20 {
		t.Errorf("ten transactions: %d set statements, %d one by one; want 2 and 20", s, o)
	}
}

func TestMergeImage(t *testing.T) {
	cols, vals := mergeImage([]int{0, 2}, [][]byte{[]byte("a"), []byte("c")}, []int{1, 2, 3}, [][]byte{[]byte("B"), nil, []byte("D")})
	if !slices.Equal(cols, []int{0, 1, 2, 3}) || fmt.Sprintf("%q", vals) != `["a" "B" "" "D"]` || vals[2] != nil {
		t.Errorf("merged %v %q", cols, vals)
	}
}

func TestSetStatementsSQL(t *testing.T) {
	r := testRelation()
	r.identityAlways = make([]bool, 3)
	up, ok := r.updateSetSQL([]int{0, 2}, 7)
	for _, want := range []string{
		`UPDATE "s"."T x" t SET "id" = u.c0::integer, "n" = u.c1::bigint FROM unnest($1::text[], $2::text[], $3::text[]) AS u(k0, c0, c1)`,
		`WHERE t."id" = u.k0::integer AND CASE WHEN NOT (t."id" = u.k0::integer) THEN false ELSE CASE WHEN (SELECT v.roident FROM pgmesh.row_version('"s"."T x"'::regclass, t.xmin) v) = 7`,
		`count(*) = cardinality($1::text[])`} {
		if !ok || !strings.Contains(up, want) {
			t.Errorf("update set lacks %q:\n%s", want, up)
		}
	}
	r.identityAlways[0], r.identityAlways[2] = true, true
	clear(r.texts) // as a load of the changed catalog does
	if _, ok := r.updateSetSQL([]int{0, 2}, 7); ok {
		t.Error("an update set of nothing but GENERATED ALWAYS columns must not be built")
	}
	d := r.deleteSetSQL(7)
	for _, want := range []string{`DELETE FROM "s"."T x" t USING unnest($1::text[], $2::text[]) AS u(k0, at)`,
		`RETURNING jsonb_build_object('id', t."id") AS k, u.at`, `SELECT $3::text, c.k, c.at::timestamptz, $4::text FROM c`,
		`pgmesh.luw_newer(`, `count(*) = cardinality($1::text[])`} {
		if !strings.Contains(d, want) {
			t.Errorf("delete set lacks %q:\n%s", want, d)
		}
	}
}
