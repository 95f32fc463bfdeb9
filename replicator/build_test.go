package replicator

import (
	"bytes"
	"testing"

	"github.com/jackc/pgx/v5/pgtype"
)

// textArray writes what pgtype's generic encoder writes for a text[] of
// byte strings: NULLs, empty values, multi-byte text, one element, many.
func TestTextArrayMatchesPgtype(t *testing.T) {
	m := pgtype.NewMap()
	for name, vals := range map[string][][]byte{
		"one":               {[]byte("42")},
		"several":           {[]byte("1"), []byte("two"), []byte("héllo, \"world\"")},
		"null and empty":    {nil, {}, []byte("x"), nil},
		"only null":         {nil},
		"long value":        {bytes.Repeat([]byte("ab"), 5000)},
		"timestamp strings": {[]byte("2026-12-07 20:00:00.123456+00")},
	} {
		want, err := m.Encode(pgtype.TextArrayOID, pgtype.BinaryFormatCode, pgtype.FlatArray[[]byte](vals), nil)
		if err != nil {
			t.Fatal(err)
		}
		if got := textArray(vals); !bytes.Equal(got, want) {
			t.Errorf("%s: textArray wrote\n%x\npgtype writes\n%x", name, got, want)
		}
	}
}

// No values make an array of no dimensions, as array_send writes it
// (pgtype writes one dimension of length 0, which reads the same).
func TestEmptyTextArray(t *testing.T) {
	want := []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 25}
	if got := textArray(nil); !bytes.Equal(got, want) {
		t.Fatalf("textArray(nil) = %x, want %x", got, want)
	}
}
