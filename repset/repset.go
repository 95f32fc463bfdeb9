// Package repset holds replication sets: which tables (and which of their
// rows and columns) each node receives. The group's definitions live in
// Raft (membership keeps a Sets value); this package owns the rules for
// editing them and for turning them into what one receiver gets from every
// sender, which publish.go writes into that sender's publication.
package repset

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"regexp"
	"slices"
	"sort"
	"strings"
)

// Default is the set every group starts with: every node is a member, and
// (unless the group was created with repset_new_tables off) every table not
// removed from it, including tables created later.
const Default = "default"

// Set is one replication set as the group records it.
type Set struct {
	Name string `json:"name"`
	// Nodes are the members that receive the set; nil means every node,
	// including nodes that join later (empty: none, once its members parted).
	Nodes []string `json:"nodes"`
	// Tables are the tables added explicitly, by "schema.table" as
	// format('%I.%I') writes it.
	Tables map[string]Table `json:"tables,omitempty"`
	// AllTables makes every user table a member too, except those in
	// Except (tables removed from the set). Only the default set has it.
	AllTables bool     `json:"all_tables,omitempty"`
	Except    []string `json:"except,omitempty"`
}

// Table is how a set holds one table.
type Table struct {
	// Where is a row filter (SQL boolean expression over the table's
	// columns); empty: every row.
	Where string `json:"where,omitempty"`
	// Columns lists the columns sent; empty: every column.
	Columns []string `json:"columns,omitempty"`
}

// Sets are a group's replication sets by name.
type Sets map[string]*Set

// New returns the sets of a new group: the default set alone. With
// allTables off it holds exactly the tables given (those existing when the
// group was created) and later tables start local.
func New(allTables bool, tables []string) Sets {
	d := &Set{Name: Default, AllTables: allTables}
	if !allTables {
		d.Tables = map[string]Table{}
		for _, t := range tables {
			d.Tables[t] = Table{}
		}
	}
	return Sets{Default: d}
}

// Clone returns a deep copy.
func (s Sets) Clone() Sets {
	if s == nil {
		return nil
	}
	c := make(Sets, len(s))
	for name, set := range s {
		cp := *set
		cp.Nodes = slices.Clone(set.Nodes)
		cp.Except = slices.Clone(set.Except)
		if set.Tables != nil {
			cp.Tables = make(map[string]Table, len(set.Tables))
			for t, spec := range set.Tables {
				spec.Columns = slices.Clone(spec.Columns)
				cp.Tables[t] = spec
			}
		}
		c[name] = &cp
	}
	return c
}

// Hash identifies the sets' content, so nodes can tell they publish the same.
func (s Sets) Hash() string {
	b, _ := json.Marshal(s)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:8])
}

// Sorted returns the sets by name, the default set first.
func (s Sets) Sorted() []*Set {
	out := make([]*Set, 0, len(s))
	for _, set := range s {
		out = append(out, set)
	}
	sort.Slice(out, func(i, j int) bool {
		if (out[i].Name == Default) != (out[j].Name == Default) {
			return out[i].Name == Default
		}
		return out[i].Name < out[j].Name
	})
	return out
}

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9_]{0,39}$`)

// ValidName reports whether name can name a set (the rule node names follow).
func ValidName(name string) bool { return nameRE.MatchString(name) }

// Member reports whether node receives the set.
func (s *Set) Member(node string) bool {
	return s.Nodes == nil || slices.Contains(s.Nodes, node)
}

// Holds returns how the set holds table, given that table exists.
func (s *Set) Holds(table string) (Table, bool) {
	if spec, ok := s.Tables[table]; ok {
		return spec, true
	}
	if s.AllTables && !slices.Contains(s.Except, table) {
		return Table{}, true
	}
	return Table{}, false
}

func (s Sets) get(name string) (*Set, error) {
	set, ok := s[name]
	if !ok {
		return nil, fmt.Errorf("replication set %q does not exist: pgmesh repset list shows the sets, pgmesh repset create makes one", name)
	}
	return set, nil
}

// Create adds an empty set received by nodes (every node when empty); known
// are the group's current members.
func (s Sets) Create(name string, nodes, known []string) error {
	if !ValidName(name) {
		return fmt.Errorf("replication set name %q is not valid: use 1 to 40 lower-case letters, digits and _, starting with a letter", name)
	}
	if _, ok := s[name]; ok {
		return fmt.Errorf("replication set %q already exists: pgmesh repset list shows it", name)
	}
	for _, n := range nodes {
		if !slices.Contains(known, n) {
			return fmt.Errorf("node %q is not a member of the group: pgmesh status lists the members", n)
		}
	}
	var members []string // nil: every node
	if len(nodes) > 0 {
		members = slices.Clone(nodes)
		slices.Sort(members)
		members = slices.Compact(members)
	}
	s[name] = &Set{Name: name, Nodes: members, Tables: map[string]Table{}}
	return nil
}

// Add puts tables into a set, or changes how the set holds them.
func (s Sets) Add(name string, tables []string, spec Table) error {
	set, err := s.get(name)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if set.AllTables {
			set.Except = slices.DeleteFunc(set.Except, func(e string) bool { return e == t })
			if spec.Where == "" && len(spec.Columns) == 0 {
				delete(set.Tables, t) // held as one of all tables
				continue
			}
		}
		if set.Tables == nil {
			set.Tables = map[string]Table{}
		}
		set.Tables[t] = Table{Where: spec.Where, Columns: slices.Clone(spec.Columns)}
	}
	return nil
}

// Remove takes tables out of a set.
func (s Sets) Remove(name string, tables []string) error {
	set, err := s.get(name)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if _, ok := set.Holds(t); !ok {
			return fmt.Errorf("table %s is not in replication set %q: pgmesh repset list shows what each set holds", t, name)
		}
	}
	for _, t := range tables {
		delete(set.Tables, t)
		if set.AllTables && !slices.Contains(set.Except, t) {
			set.Except = append(set.Except, t)
			slices.Sort(set.Except)
		}
	}
	return nil
}

// Drop removes a set; the default set stays.
func (s Sets) Drop(name string) error {
	if name == Default {
		return fmt.Errorf("the default replication set cannot be dropped: remove its tables instead (pgmesh repset remove default TABLE...)")
	}
	if _, err := s.get(name); err != nil {
		return err
	}
	delete(s, name)
	return nil
}

// ForgetNode takes a parted node out of every set that names it, so that a
// node joining later under the same name starts like any new node. A set
// left without members is kept, received by nobody.
func (s Sets) ForgetNode(node string) {
	for _, set := range s {
		if slices.Contains(set.Nodes, node) {
			// Never nil here: an emptied list still means "no node".
			set.Nodes = slices.DeleteFunc(set.Nodes, func(n string) bool { return n == node })
		}
	}
}

// Share is what one receiver gets of one table from every sender: the
// union of the sets that hold it and that it is a member of.
type Share struct {
	// Where combines the sets' row filters with OR; empty when any set
	// sends every row.
	Where string
	// Columns is the union of the sets' column lists; empty when any set
	// sends every column.
	Columns []string
}

// Shares returns, for receiver, every table of tables (the user tables that
// exist) that it receives, and how.
func (s Sets) Shares(receiver string, tables []string) map[string]Share {
	out := map[string]Share{}
	for _, t := range tables {
		var (
			held             bool
			filters, cols    []string
			allRows, allCols bool
		)
		for _, set := range s.Sorted() {
			if !set.Member(receiver) {
				continue
			}
			spec, ok := set.Holds(t)
			if !ok {
				continue
			}
			held = true
			if spec.Where == "" {
				allRows = true
			} else if !slices.Contains(filters, spec.Where) {
				filters = append(filters, spec.Where)
			}
			if len(spec.Columns) == 0 {
				allCols = true
			} else {
				cols = append(cols, spec.Columns...)
			}
		}
		if !held {
			continue
		}
		var sh Share
		if !allRows {
			if len(filters) == 1 {
				sh.Where = filters[0]
			} else {
				sh.Where = "(" + strings.Join(filters, ") OR (") + ")"
			}
		}
		if !allCols {
			slices.Sort(cols)
			sh.Columns = slices.Compact(cols)
		}
		out[t] = sh
	}
	return out
}

// Local returns the tables of tables that no set holds: their changes never
// leave the node that made them.
func (s Sets) Local(tables []string) []string {
	var out []string
	for _, t := range tables {
		held := false
		for _, set := range s {
			if _, ok := set.Holds(t); ok {
				held = true
				break
			}
		}
		if !held {
			out = append(out, t)
		}
	}
	return out
}
