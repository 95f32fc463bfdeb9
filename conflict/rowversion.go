package conflict

import (
	"fmt"

	"github.com/pgmesh/pgmesh/internal/pgquote"
)

// RowVersion is the version of the row alias (a row of table, given by its
// quoted, qualified name) as SQL reads it: a set-returning call, for FROM
// or LATERAL, with the columns timestamp (NULL when unknown) and roident (0
// for a local write or an unknown version). The SQL function
// pgmesh.row_version (migration 14) owns the reading: the commit time and
// origin of the row's xmin, except for rows a table rewrite wrote, whose
// version is unknown (the oldest, see Version).
func RowVersion(alias, table string) string {
	return fmt.Sprintf("pgmesh.row_version(%s::regclass, %s.xmin)", pgquote.Literal(table), alias)
}
