package conflict

import "testing"

func TestRowVersionNamesTheTableAsALiteral(t *testing.T) {
	got := RowVersion("t", `"s"."it's"`)
	want := `pgmesh.row_version('"s"."it''s"'::regclass, t.xmin)`
	if got != want {
		t.Fatalf("got %s, want %s", got, want)
	}
}
