// Package pgquote quotes SQL literals and identifiers for statements that
// cannot take parameters (DDL, utility commands, multi-statement strings).
package pgquote

import (
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Literal quotes s as a standard-conforming SQL string literal.
func Literal(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// Ident quotes name as an SQL identifier.
func Ident(name string) string { return pgx.Identifier{name}.Sanitize() }

// Timestamp writes t as timestamptz text with microsecond precision, the
// precision commit timestamps have.
func Timestamp(t time.Time) string {
	return t.UTC().Format("2006-01-02 15:04:05.000000") + "+00"
}
