package pgquote

import "testing"

func TestQuoting(t *testing.T) {
	for in, want := range map[string]string{`plain`: `'plain'`, `it's`: `'it''s'`, `''`: `''''''`, `back\slash`: `'back\slash'`} {
		if got := Literal(in); got != want {
			t.Errorf("Literal(%q) = %s, want %s", in, got, want)
		}
	}
	for in, want := range map[string]string{`t`: `"t"`, `Mixed Case`: `"Mixed Case"`, `a"b`: `"a""b"`} {
		if got := Ident(in); got != want {
			t.Errorf("Ident(%q) = %s, want %s", in, got, want)
		}
	}
}
