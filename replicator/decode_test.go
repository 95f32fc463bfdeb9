package replicator

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/jackc/pglogrepl"
)

// Test messages, built as pgoutput writes them.
func tupleBytes(cols ...any) []byte {
	b := binary.BigEndian.AppendUint16(nil, uint16(len(cols)))
	for _, c := range cols {
		switch c := c.(type) {
		case nil:
			b = append(b, 'n')
		case byte:
			b = append(b, c) // 'u'
		case string:
			b = append(b, 't')
			b = binary.BigEndian.AppendUint32(b, uint32(len(c)))
			b = append(b, c...)
		}
	}
	return b
}

func message(typ byte, rel uint32, parts ...[]byte) []byte {
	b := binary.BigEndian.AppendUint32([]byte{typ}, rel)
	for _, p := range parts {
		b = append(b, p...)
	}
	return b
}

func TestParseFastMatchesPglogrepl(t *testing.T) {
	msgs := map[string][]byte{
		"insert":               message('I', 16384, []byte{'N'}, tupleBytes("1", "", nil, "héllo")),
		"update":               message('U', 7, []byte{'N'}, tupleBytes("1", byte('u'), "x")),
		"update with its key":  message('U', 7, []byte{'K'}, tupleBytes("1", nil, nil), []byte{'N'}, tupleBytes("2", byte('u'), "x")),
		"update with old row":  message('U', 7, []byte{'O'}, tupleBytes("1", "a", "b"), []byte{'N'}, tupleBytes("1", "a", "c")),
		"delete":               message('D', 9, []byte{'K'}, tupleBytes("5", nil)),
		"delete of a full row": message('D', 9, []byte{'O'}, tupleBytes("5", "")),
	}
	for name, data := range msgs {
		want, err := pglogrepl.Parse(data)
		if err != nil {
			t.Fatalf("%s: pglogrepl: %v", name, err)
		}
		got, err := parseFast(data, new(parseScratch))
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !reflect.DeepEqual(got, want) {
			t.Errorf("%s:\n got %#v\nwant %#v", name, got, want)
		}
	}
	// Decoded into reused room, one after the other in varying orders
	// (wider rows before narrower, values where NULLs were before), each
	// message still reads as pglogrepl reads it.
	var sc parseScratch
	for range 5 {
		for name, data := range msgs {
			want, _ := pglogrepl.Parse(data)
			got, err := parseFast(data, &sc)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			if !reflect.DeepEqual(got, want) {
				t.Errorf("%s, reusing room:\n got %#v\nwant %#v", name, got, want)
			}
		}
	}
	// An empty value is empty, not NULL; values point into the message.
	data := msgs["insert"]
	m, _ := parseFast(data, new(parseScratch))
	cols := m.(*pglogrepl.InsertMessage).Tuple.Columns
	if cols[1].Data == nil || len(cols[1].Data) != 0 || cols[2].Data != nil {
		t.Errorf("empty %q, NULL %q", cols[1].Data, cols[2].Data)
	}
	cols[0].Data[0] = '9'
	if data[13] != '9' { // type, relation, N, count, t, length, then the value
		t.Error("the value is a copy, not the message's bytes")
	}
}

func TestParseFastRefusesMalformedMessages(t *testing.T) {
	full := message('U', 7, []byte{'K'}, tupleBytes("1", "two"), []byte{'N'}, tupleBytes("1", "three"))
	for n := 1; n < len(full); n++ {
		if _, err := parseFast(full[:n], new(parseScratch)); err == nil {
			t.Errorf("a message cut to %d of %d bytes decoded without an error", n, len(full))
		}
	}
	// A value cut short names its length.
	cut := message('I', 1, []byte{'N'}, tupleBytes("abcdefghij"))
	if _, err := parseFast(cut[:len(cut)-3], new(parseScratch)); err == nil || !strings.Contains(err.Error(), "want a value of 10 bytes") {
		t.Errorf("a value cut short: %v", err)
	}
	bad := map[string][]byte{
		"insert without N":      message('I', 1, []byte{'X'}, tupleBytes("1")),
		"delete without K or O": message('D', 1, []byte{'N'}, tupleBytes("1")),
		"unknown column kind":   message('I', 1, []byte{'N'}, []byte{0, 1, 'z'}),
	}
	for name, data := range bad {
		if _, err := parseFast(data, new(parseScratch)); err == nil {
			t.Errorf("%s: decoded without an error", name)
		}
	}
}

// Copies carved from one block stay as they were copied, however many
// follow, and appending to one never reaches the next.
func TestCopiesKeepTheirBytes(t *testing.T) {
	var c copies
	var kept [][]byte
	var want []string
	for i := range 5000 {
		msg := []byte(strings.Repeat(fmt.Sprint(i%10), 1+i%97))
		if i%1000 == 999 {
			msg = bytes.Repeat([]byte{'L'}, copyBlock) // larger than a block
		}
		kept, want = append(kept, c.of(msg)), append(want, string(msg))
		msg[0] = '!' // the caller's buffer is reused
	}
	_ = append(kept[0], 'x') // a copy has no room to grow into the next
	for i := range kept {
		if string(kept[i]) != want[i] {
			t.Fatalf("copy %d reads %q, want %q", i, kept[i], want[i])
		}
	}
}
