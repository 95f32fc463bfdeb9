package membership

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/hashicorp/raft"
)

func apply(t *testing.T, f *fsm, c command) any {
	t.Helper()
	b, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	return f.Apply(&raft.Log{Data: b})
}

func TestNodeIDsAreNeverReused(t *testing.T) {
	f := newFSM()
	apply(t, f, command{Op: "create_group", Group: "g", TokenHash: HashToken("t"), Node: &Node{Name: "a", State: Active}})
	b := apply(t, f, command{Op: "add_node", Node: &Node{Name: "b", State: Joining}}).(*Node)
	if b.ID != 2 {
		t.Fatalf("b got id %d, want 2", b.ID)
	}
	// Retrying an unfinished join keeps the id.
	if again := apply(t, f, command{Op: "add_node", Node: &Node{Name: "b", State: Joining}}).(*Node); again.ID != 2 {
		t.Fatalf("retried join got id %d, want 2", again.ID)
	}
	apply(t, f, command{Op: "set_state", Name: "b", State: Active})
	if err, ok := apply(t, f, command{Op: "add_node", Node: &Node{Name: "b"}}).(error); !ok || !strings.Contains(err.Error(), "already an active member") {
		t.Fatalf("re-adding an active node: %v", err)
	}
	apply(t, f, command{Op: "set_state", Name: "b", State: Parted})
	rejoined := apply(t, f, command{Op: "add_node", Node: &Node{Name: "b", State: Joining}}).(*Node)
	if rejoined.ID != 3 {
		t.Fatalf("a parted node rejoining got id %d, want a new one (3)", rejoined.ID)
	}
}

func TestSnapshotRestore(t *testing.T) {
	f := newFSM()
	apply(t, f, command{Op: "create_group", Group: "g", TokenHash: HashToken("secret"), Node: &Node{Name: "a", State: Active}})
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	data := snap.(*snapshot).data
	if strings.Contains(string(data), "secret") {
		t.Fatal("the snapshot holds the token itself")
	}
	g := newFSM()
	if err := g.Restore(readCloser{strings.NewReader(string(data))}); err != nil {
		t.Fatal(err)
	}
	got, _ := g.snapshotState()
	if got.Name != "g" || got.Nodes["a"].ID != 1 || !got.CheckToken("secret") || got.CheckToken("other") {
		t.Fatalf("restored state wrong: %+v", got)
	}
}

type readCloser struct{ *strings.Reader }

func (readCloser) Close() error { return nil }

func TestGallocChunksNeverOverlap(t *testing.T) {
	f := newFSM()
	apply(t, f, command{Op: "create_group", Group: "g", TokenHash: HashToken("t"), Node: &Node{Name: "a", State: Active}})
	apply(t, f, command{Op: "add_node", Node: &Node{Name: "b", State: Active}})
	c1 := apply(t, f, command{Op: "alloc_chunk", Seq: "s", Name: "a", Size: 100, MinStart: 51}).(*Chunk)
	c2 := apply(t, f, command{Op: "alloc_chunk", Seq: "s", Name: "b", Size: 100, MinStart: 51}).(*Chunk)
	c3 := apply(t, f, command{Op: "alloc_chunk", Seq: "s", Name: "a", Size: 100, MinStart: 1000}).(*Chunk)
	if *c1 != (Chunk{"a", 51, 151}) || *c2 != (Chunk{"b", 151, 251}) || *c3 != (Chunk{"a", 1000, 1100}) {
		t.Fatalf("chunks %v %v %v", c1, c2, c3)
	}
	if _, ok := apply(t, f, command{Op: "alloc_chunk", Seq: "s", Name: "nobody", Size: 100}).(error); !ok {
		t.Fatal("a chunk for an unknown node")
	}
}
