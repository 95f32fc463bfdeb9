package membership

import (
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/raft"

	"github.com/pgmesh/pgmesh/repset"
)

// State is a node's place in the group's life cycle.
type State string

const (
	Joining State = "joining" // registered; slots being prepared
	Active  State = "active"  // replicating in both directions
	Parted  State = "parted"  // removed; its id is never reused
)

// MaxNodeID bounds node ids: they must fit the 10 bits global sequences use.
const MaxNodeID = 1023

// Node is one member as recorded in the Raft state. It holds no secrets:
// peers take passwords from their own environment or pgpass.
type Node struct {
	Name     string    `json:"name"`
	ID       int       `json:"id"`
	DSN      string    `json:"public_dsn"`
	API      string    `json:"api_addr"`
	Raft     string    `json:"raft_addr"`
	State    State     `json:"state"`
	JoinedAt time.Time `json:"joined_at"`
	// LUWResolution is the node's luw_resolution (a Go duration), which
	// every member must share; empty for nodes recorded before it was.
	LUWResolution string `json:"luw_resolution,omitempty"`
}

// Group is the replicated control-plane state.
type Group struct {
	Name string `json:"name"`
	// TokenHash is the hex SHA-256 of the join token; the token itself is
	// never stored.
	TokenHash string           `json:"token_hash"`
	NextID    int              `json:"next_id"`
	Nodes     map[string]*Node `json:"nodes"`
	// Sequences are the galloc sequences, by name.
	Sequences map[string]*GallocSeq `json:"sequences,omitempty"`
	// Locks are group-wide locks (e.g. the DDL lock), by name.
	Locks map[string]Lock `json:"locks,omitempty"`
	// Repsets are the replication sets; nil in groups created before they
	// existed, which read as the default set holding every table.
	Repsets repset.Sets `json:"repsets,omitempty"`
	// Index is the Raft index of the last command applied to this state:
	// after a restart the state is rebuilt entry by entry, and Index tells
	// an older state from a newer one.
	Index uint64 `json:"index"`
}

// Sets returns the group's replication sets (a copy).
func (g *Group) Sets() repset.Sets {
	if g.Repsets == nil {
		return repset.New(true, nil)
	}
	return g.Repsets.Clone()
}

// Receivers returns the nodes that receive changes: every member not parted.
func (g *Group) Receivers() []string {
	var out []string
	for _, n := range g.Sorted() {
		if n.State != Parted {
			out = append(out, n.Name)
		}
	}
	return out
}

// Lock is held by a node until it releases it or it expires (a holder that
// died must not block the group for ever).
type Lock struct {
	Holder  string    `json:"holder"`
	Expires time.Time `json:"expires"`
}

// GallocSeq hands out chunks of one sequence's value range.
type GallocSeq struct {
	NextStart int64   `json:"next_start"`
	Chunks    []Chunk `json:"chunks"`
}

// Chunk is a range [Start, End) of sequence values owned by one node.
type Chunk struct {
	Node  string `json:"node"`
	Start int64  `json:"start"`
	End   int64  `json:"end"`
}

// Clone returns a deep copy safe to read without locks.
func (g *Group) Clone() *Group {
	if g == nil {
		return nil
	}
	c := *g
	c.Nodes = make(map[string]*Node, len(g.Nodes))
	for k, v := range g.Nodes {
		n := *v
		c.Nodes[k] = &n
	}
	c.Locks = make(map[string]Lock, len(g.Locks))
	for k, v := range g.Locks {
		c.Locks[k] = v
	}
	c.Sequences = make(map[string]*GallocSeq, len(g.Sequences))
	for k, v := range g.Sequences {
		sq := *v
		sq.Chunks = append([]Chunk(nil), v.Chunks...)
		c.Sequences[k] = &sq
	}
	c.Repsets = g.Repsets.Clone()
	return &c
}

// Sorted returns the nodes ordered by id, then name.
func (g *Group) Sorted() []*Node {
	var ns []*Node
	for _, n := range g.Nodes {
		ns = append(ns, n)
	}
	// Ids are unique once assigned; the name orders nodes not yet given one,
	// so the order never depends on map iteration.
	sort.Slice(ns, func(i, j int) bool {
		if ns[i].ID != ns[j].ID {
			return ns[i].ID < ns[j].ID
		}
		return ns[i].Name < ns[j].Name
	})
	return ns
}

// command is one Raft log entry.
type command struct {
	Op        string    `json:"op"`
	Group     string    `json:"group,omitempty"`
	TokenHash string    `json:"token_hash,omitempty"`
	Node      *Node     `json:"node,omitempty"`
	Name      string    `json:"name,omitempty"`
	State     State     `json:"state,omitempty"`
	Seq       string    `json:"seq,omitempty"`
	Lock      string    `json:"lock,omitempty"`
	At        time.Time `json:"at,omitempty"` // leader's clock when proposed
	Expires   time.Time `json:"expires,omitempty"`
	Size      int64     `json:"size,omitempty"`
	MinStart  int64     `json:"min_start,omitempty"`
	// Repsets seeds a new group's sets; Repset edits them.
	Repsets repset.Sets `json:"repsets,omitempty"`
	Repset  *RepsetEdit `json:"repset,omitempty"`
}

// RepsetEdit is one change to the replication sets. The FSM checks it
// against the state it applies to, so concurrent edits cannot lose each
// other.
type RepsetEdit struct {
	Action string       `json:"action"` // create, add, remove or drop
	Set    string       `json:"set"`
	Nodes  []string     `json:"nodes,omitempty"`
	Tables []string     `json:"tables,omitempty"`
	Spec   repset.Table `json:"spec"`
}

// fsm applies commands to the group state and wakes watchers on change.
type fsm struct {
	mu      sync.Mutex
	group   *Group
	changed chan struct{}
}

func newFSM() *fsm { return &fsm{changed: make(chan struct{})} }

func (f *fsm) notify() {
	close(f.changed)
	f.changed = make(chan struct{})
}

// Apply returns the affected node (a copy) or an error.
func (f *fsm) Apply(l *raft.Log) any {
	var c command
	if err := json.Unmarshal(l.Data, &c); err != nil {
		return fmt.Errorf("decode raft command: %w", err)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	res := f.apply(c)
	if f.group != nil {
		f.group.Index = l.Index
	}
	if _, isErr := res.(error); !isErr {
		f.notify()
	}
	return res
}

func (f *fsm) apply(c command) any {
	switch c.Op {
	case "create_group":
		if f.group != nil {
			return fmt.Errorf("this node already belongs to node group %q", f.group.Name)
		}
		f.group = &Group{Name: c.Group, TokenHash: c.TokenHash, NextID: 1, Nodes: map[string]*Node{}, Repsets: c.Repsets}
		return f.addNode(c.Node)
	case "add_node":
		if f.group == nil {
			return fmt.Errorf("no node group exists")
		}
		return f.addNode(c.Node)
	case "set_state":
		n, err := f.node(c.Name)
		if err != nil {
			return err
		}
		n.State = c.State
		if n.State == Parted && f.group.Repsets != nil {
			f.group.Repsets.ForgetNode(n.Name)
		}
		cp := *n
		return &cp
	case "repset":
		if f.group == nil {
			return fmt.Errorf("no node group exists")
		}
		sets := f.group.Sets()
		if err := f.editSets(sets, c.Repset); err != nil {
			return err
		}
		f.group.Repsets = sets
		return sets.Clone()
	case "lock_acquire":
		if f.group == nil {
			return fmt.Errorf("no node group exists")
		}
		if f.group.Locks == nil {
			f.group.Locks = map[string]Lock{}
		}
		// Times come from the command, so every replica decides alike.
		if l, held := f.group.Locks[c.Lock]; held && l.Holder != c.Name && l.Expires.After(c.At) {
			return &LockHeld{Lock: c.Lock, Holder: l.Holder, Expires: l.Expires}
		}
		f.group.Locks[c.Lock] = Lock{Holder: c.Name, Expires: c.Expires}
		return nil
	case "lock_release":
		if f.group != nil {
			if l, held := f.group.Locks[c.Lock]; held && l.Holder == c.Name {
				delete(f.group.Locks, c.Lock)
			}
		}
		return nil
	case "alloc_chunk":
		if _, err := f.node(c.Name); err != nil {
			return err
		}
		if c.Size < 1 {
			return fmt.Errorf("chunk size must be positive")
		}
		if f.group.Sequences == nil {
			f.group.Sequences = map[string]*GallocSeq{}
		}
		sq := f.group.Sequences[c.Seq]
		if sq == nil {
			sq = &GallocSeq{NextStart: 1}
			f.group.Sequences[c.Seq] = sq
		}
		// Never below values that already exist anywhere.
		sq.NextStart = max(sq.NextStart, c.MinStart)
		ch := Chunk{Node: c.Name, Start: sq.NextStart, End: sq.NextStart + c.Size}
		sq.NextStart = ch.End
		sq.Chunks = append(sq.Chunks, ch)
		return &ch
	default:
		return fmt.Errorf("unknown raft command %q", c.Op)
	}
}

func (f *fsm) editSets(sets repset.Sets, e *RepsetEdit) error {
	if e == nil {
		return fmt.Errorf("empty replication set edit")
	}
	switch e.Action {
	case "create":
		var members []string
		for name, n := range f.group.Nodes {
			if n.State != Parted {
				members = append(members, name)
			}
		}
		return sets.Create(e.Set, e.Nodes, members)
	case "add":
		return sets.Add(e.Set, e.Tables, e.Spec)
	case "remove":
		return sets.Remove(e.Set, e.Tables)
	case "drop":
		return sets.Drop(e.Set)
	}
	return fmt.Errorf("unknown replication set action %q", e.Action)
}

// LockHeld is the answer to acquiring a lock another node holds.
type LockHeld struct {
	Lock, Holder string
	Expires      time.Time
}

func (e *LockHeld) Error() string {
	return fmt.Sprintf("the %s lock is held by node %q (until %s at the latest)", e.Lock, e.Holder, e.Expires.Format(time.RFC3339))
}

func (f *fsm) node(name string) (*Node, error) {
	if f.group == nil {
		return nil, fmt.Errorf("no node group exists")
	}
	n, ok := f.group.Nodes[name]
	if !ok {
		return nil, fmt.Errorf("node %q is not a member of group %q", name, f.group.Name)
	}
	return n, nil
}

// addNode registers a node, or re-registers one whose earlier join did not
// finish. Ids are never reused: a parted node that joins again gets a new one.
func (f *fsm) addNode(n *Node) any {
	if old, ok := f.group.Nodes[n.Name]; ok {
		switch old.State {
		case Joining:
			old.DSN, old.API, old.Raft = n.DSN, n.API, n.Raft
			cp := *old
			return &cp
		case Active:
			return fmt.Errorf("node name %q is already an active member of group %q: choose another node_name, or part the old node first", n.Name, f.group.Name)
		}
	}
	if f.group.NextID > MaxNodeID {
		return fmt.Errorf("group %q has used all %d node ids", f.group.Name, MaxNodeID)
	}
	nn := *n
	nn.ID = f.group.NextID
	f.group.NextID++
	f.group.Nodes[nn.Name] = &nn
	cp := nn
	return &cp
}

func (f *fsm) snapshotState() (*Group, <-chan struct{}) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.group.Clone(), f.changed
}

func (f *fsm) Snapshot() (raft.FSMSnapshot, error) {
	g, _ := f.snapshotState()
	b, err := json.Marshal(g)
	if err != nil {
		return nil, err
	}
	return &snapshot{data: b}, nil
}

func (f *fsm) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	var g *Group
	if err := json.NewDecoder(rc).Decode(&g); err != nil {
		return fmt.Errorf("decode raft snapshot: %w", err)
	}
	f.mu.Lock()
	f.group = g
	f.notify()
	f.mu.Unlock()
	return nil
}

type snapshot struct{ data []byte }

func (s *snapshot) Persist(sink raft.SnapshotSink) error {
	if _, err := sink.Write(s.data); err != nil {
		sink.Cancel()
		return err
	}
	return sink.Close()
}

func (s *snapshot) Release() {}
