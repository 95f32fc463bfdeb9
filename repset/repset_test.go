package repset

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

var tables = []string{"public.cache", "public.customers", "public.orders"}

func TestNewGroupDefaultHoldsEveryTable(t *testing.T) {
	s := New(true, nil)
	got := s.Shares("a", tables)
	if len(got) != 3 {
		t.Fatalf("default share = %v, want every table", got)
	}
	if l := s.Local(tables); l != nil {
		t.Fatalf("local = %v, want none", l)
	}
	// With new tables off, the default set holds the tables given only.
	s = New(false, tables[:2])
	if l := s.Local(tables); !reflect.DeepEqual(l, []string{"public.orders"}) {
		t.Fatalf("local = %v, want public.orders", l)
	}
}

func TestRemoveMakesLocalAndAddBack(t *testing.T) {
	s := New(true, nil)
	if err := s.Remove(Default, []string{"public.cache"}); err != nil {
		t.Fatal(err)
	}
	if l := s.Local(tables); !reflect.DeepEqual(l, []string{"public.cache"}) {
		t.Fatalf("local = %v", l)
	}
	if err := s.Remove(Default, []string{"public.cache"}); err == nil || !strings.Contains(err.Error(), "is not in replication set") {
		t.Fatalf("removing twice: %v", err)
	}
	if err := s.Add(Default, []string{"public.cache"}, Table{}); err != nil {
		t.Fatal(err)
	}
	if l := s.Local(tables); l != nil {
		t.Fatalf("local after add = %v", l)
	}
	if len(s[Default].Except) != 0 || len(s[Default].Tables) != 0 {
		t.Fatalf("default after add back = %+v, want plain all-tables", s[Default])
	}
}

func TestSharesUnionFiltersAndColumns(t *testing.T) {
	s := New(true, nil)
	must(t, s.Remove(Default, []string{"public.customers"}))
	must(t, s.Add(Default, []string{"public.customers"}, Table{Where: "region <> 'eu'", Columns: []string{"id", "region"}}))
	must(t, s.Create("eu", []string{"b", "a"}, []string{"a", "b", "c"}))
	must(t, s.Add("eu", []string{"public.customers"}, Table{Where: "region = 'eu'", Columns: []string{"id", "name", "region"}}))

	a := s.Shares("a", tables)["public.customers"]
	if a.Where != "(region <> 'eu') OR (region = 'eu')" || !reflect.DeepEqual(a.Columns, []string{"id", "name", "region"}) {
		t.Fatalf("a's share = %+v", a)
	}
	c := s.Shares("c", tables)["public.customers"]
	if c.Where != "region <> 'eu'" || !reflect.DeepEqual(c.Columns, []string{"id", "region"}) {
		t.Fatalf("c's share = %+v", c)
	}
	// A set without a filter or a column list makes the union whole.
	must(t, s.Create("all", nil, nil))
	must(t, s.Add("all", []string{"public.customers"}, Table{}))
	if a := s.Shares("a", tables)["public.customers"]; a.Where != "" || a.Columns != nil {
		t.Fatalf("a's share with an unfiltered set = %+v", a)
	}
}

func TestEditErrors(t *testing.T) {
	s := New(true, nil)
	for _, c := range []struct {
		err  error
		want string
	}{
		{s.Create("EU", nil, nil), "is not valid"},
		{s.Create("eu", []string{"x"}, []string{"a"}), `node "x" is not a member`},
		{s.Create(Default, nil, nil), "already exists"},
		{s.Add("nope", []string{"public.t"}, Table{}), `replication set "nope" does not exist`},
		{s.Drop(Default), "cannot be dropped"},
		{s.Drop("nope"), "does not exist"},
	} {
		if c.err == nil || !strings.Contains(c.err.Error(), c.want) {
			t.Errorf("error %v, want one containing %q", c.err, c.want)
		}
	}
}

func TestForgetNodeKeepsAnEmptiedSetEmpty(t *testing.T) {
	s := New(true, nil)
	must(t, s.Create("eu", []string{"a"}, []string{"a", "b"}))
	must(t, s.Add("eu", []string{"public.orders"}, Table{}))
	s.ForgetNode("a")
	// Through JSON, as Raft stores it: an emptied list must not become
	// "every node".
	b, err := json.Marshal(s)
	must(t, err)
	var back Sets
	must(t, json.Unmarshal(b, &back))
	if back["eu"].Member("b") {
		t.Fatal("a set whose only member parted is received by every node")
	}
	if !back[Default].Member("b") {
		t.Fatal("the default set lost its every-node membership")
	}
	if back.Hash() != s.Hash() {
		t.Fatal("hash changed through JSON")
	}
}

func TestObjectsQuoteColumnsAndKeepFilters(t *testing.T) {
	got := objects(map[string]Share{
		`public."Mixed"`: {Columns: []string{"Id", "x"}},
		"public.b":       {Where: "k % 2 = 0"},
	})
	want := `TABLE public."Mixed" ("Id", "x"), TABLE public.b WHERE (k % 2 = 0)`
	if got != want {
		t.Fatalf("objects = %s\nwant      %s", got, want)
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
