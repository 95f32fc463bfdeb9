package daemon

import (
	"strings"
	"testing"

	"github.com/pgmesh/pgmesh/api"
)

func TestQueueTargets(t *testing.T) {
	list := []api.ParkedTable{
		{Peer: "a", Table: "public.t"}, {Peer: "b", Table: "public.t"},
		{Peer: "a", Table: "sales.orders"}, {Peer: "a", Table: "public.orders"},
	}
	for _, c := range []struct {
		table, peer string
		want        []string // peer/table
		err         string
	}{
		{table: "t", want: []string{"a/public.t", "b/public.t"}},
		{table: "public.t", peer: "b", want: []string{"b/public.t"}},
		{table: "sales.orders", want: []string{"a/sales.orders"}},
		{table: "orders", err: "more than one schema (public.orders, sales.orders)"},
		{table: "t", peer: "c", err: "no changes of t from peer c are parked"},
		{table: "nosuch", err: "no changes of nosuch are parked"},
		{table: "", err: "name the table"},
	} {
		got, err := queueTargets(list, c.table, c.peer)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("%s from %q: error %v, want one saying %q", c.table, c.peer, err, c.err)
			}
			continue
		}
		var names []string
		for _, p := range got {
			names = append(names, p.Peer+"/"+p.Table)
		}
		if err != nil || strings.Join(names, " ") != strings.Join(c.want, " ") {
			t.Errorf("%s from %q: %v %v, want %v", c.table, c.peer, names, err, c.want)
		}
	}
}
