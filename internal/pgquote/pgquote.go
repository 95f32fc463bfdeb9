// Package pgquote quotes SQL literals and identifiers for statements that
// cannot take parameters (DDL, utility commands, multi-statement strings).
package pgquote

import (
	"strings"

	"github.com/jackc/pgx/v5"
)

// Literal quotes s as a standard-conforming SQL string literal.
func Literal(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

// Ident quotes name as an SQL identifier.
func Ident(name string) string { return pgx.Identifier{name}.Sanitize() }
