package replicator

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
)

// Only errors of the change itself park its table; the moment's errors
// (locks, serialization, a lost connection) are retried as before.
func TestChangeError(t *testing.T) {
	for code, want := range map[string]bool{
		"22001": true, "22P02": true, "23514": true, "23502": true, "42703": true, "42P01": true,
		"40001": false, "40P01": false, "55P03": false, "57014": false, "08006": false, "53100": false,
	} {
		err := fmt.Errorf("apply change: %w", &pgconn.PgError{Code: code})
		if got := changeError(err); got != want {
			t.Errorf("SQLSTATE %s: changeError %v, want %v", code, got, want)
		}
	}
	if !changeError(fmt.Errorf("x: %w", &schemaError{errors.New("no such column here")})) {
		t.Error("a column this node lacks is not an error of the change")
	}
	if changeError(errors.New("connection reset")) {
		t.Error("a plain error counts as an error of the change")
	}
}

// The errors a differing schema causes most often come with what to change.
func TestFixHint(t *testing.T) {
	for code, want := range map[string]string{"22001": "widen the column", "23514": "CHECK constraint", "23502": "NOT NULL", "40001": ""} {
		got := fixHint(fmt.Errorf("x: %w", &pgconn.PgError{Code: code}))
		if want == "" && got != "" || !strings.Contains(got, want) {
			t.Errorf("SQLSTATE %s: hint %q, want one saying %q", code, got, want)
		}
	}
}
