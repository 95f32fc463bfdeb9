package replicator

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
)

func TestCopyTextEscapesWhatCopyReads(t *testing.T) {
	c := &copyIn{r: testRelation(), cols: []int{0, 1, 2}, rows: [][][]byte{
		{[]byte("1"), []byte("a\tb\nc\\d\re"), nil},
		{[]byte("2"), []byte(""), []byte(`\N`)},
	}}
	want := "1\ta\\tb\\nc\\\\d\\re\t\\N\n" + "2\t\t\\\\N\n"
	if got := string(c.data()); got != want {
		t.Errorf("COPY data\n got %q\nwant %q", got, want)
	}
	if got := c.sql(); got != `COPY "s"."T x" ("id", "Name", "n") FROM STDIN` {
		t.Errorf("COPY statement %s", got)
	}
}

// In bulk, a run of inserts is copied in and then checked for remembered
// deletes; grouped, it is one INSERT over arrays, checked the same way
// (with the key's array as sent, not encoded again).
func TestBulkRunsOfInsertsGoByCopy(t *testing.T) {
	a, _ := testApplier(t, 0)
	r := a.rels[testRel]
	var changes []change
	for _, k := range []string{"1", "2", "3"} {
		changes = append(changes, change{r: r, op: pglogrepl.MessageTypeInsert, cols: []int{0, 1, 2},
			vals: [][]byte{[]byte(k), []byte("x"), nil}, key: [][]byte{[]byte(k)}, commitTS: time.Now()})
	}
	stmts, _, err := a.statements(changes, true)
	if err != nil {
		t.Fatal(err)
	}
	if len(stmts) != 2 || stmts[0].copy == nil || len(stmts[0].copy.rows) != 3 ||
		!strings.Contains(stmts[1].sql, "pgmesh.raise_if_deleted($2::text, ARRAY(SELECT jsonb_build_object('id', u.k0::integer) FROM unnest($1::text[]) AS u(k0)))") {
		t.Fatalf("bulk statements: %+v", stmts)
	}
	stmts, _, err = a.statements(changes, false)
	if err != nil {
		t.Fatal(err)
	}
	if len(stmts) != 2 || stmts[0].copy != nil || !strings.Contains(stmts[0].sql, "FROM unnest(") ||
		strings.Contains(stmts[0].sql, "RETURNING") || !strings.Contains(stmts[1].sql, "pgmesh.raise_if_deleted($2::text") ||
		!bytes.Equal(stmts[1].params[0], stmts[0].params[0]) {
		t.Fatalf("grouped statements: %+v", stmts)
	}
}
