package replicator

import (
	"bytes"
	"encoding/binary"
	"fmt"

	"github.com/jackc/pglogrepl"
)

// parseFast decodes a pgoutput message for the fast and bulk paths. Row
// changes (insert, update, delete: nearly every message) are decoded here
// into pglogrepl's types, with their values pointing into data rather than
// copied one column at a time, and two allocations per tuple instead of two
// per column; data must stay unchanged while the change is kept (the
// callers keep a copy of each message until its transaction is confirmed).
// Every other message goes to pglogrepl.Parse.
//
// A row change is decoded into sc's room, which the next call reuses: the
// callers keep nothing of the decoded change past it but its values
// (rowChange), which point into data.
func parseFast(data []byte, sc *parseScratch) (pglogrepl.Message, error) {
	switch msgType(data) {
	case pglogrepl.MessageTypeInsert, pglogrepl.MessageTypeUpdate, pglogrepl.MessageTypeDelete:
	default:
		return pglogrepl.Parse(data)
	}
	d := decoder{data: data, pos: 1}
	var msg pglogrepl.Message
	rel := d.uint32()
	switch typ := msgType(data); typ {
	case pglogrepl.MessageTypeInsert:
		m := &sc.insert
		*m = pglogrepl.InsertMessage{RelationID: rel}
		d.expect(pglogrepl.UpdateMessageTupleTypeNew) // the new row, as in an update
		m.Tuple = d.tuple(&sc.tuples[0])
		m.SetType(typ)
		msg = m
	case pglogrepl.MessageTypeUpdate:
		m := &sc.update
		*m = pglogrepl.UpdateMessage{RelationID: rel}
		if k := d.peek(); k == pglogrepl.UpdateMessageTupleTypeKey || k == pglogrepl.UpdateMessageTupleTypeOld {
			m.OldTupleType = d.u8()
			m.OldTuple = d.tuple(&sc.tuples[1])
		}
		d.expect(pglogrepl.UpdateMessageTupleTypeNew)
		m.NewTuple = d.tuple(&sc.tuples[0])
		m.SetType(typ)
		msg = m
	case pglogrepl.MessageTypeDelete:
		m := &sc.delete
		*m = pglogrepl.DeleteMessage{RelationID: rel}
		m.OldTupleType = d.u8()
		if m.OldTupleType != pglogrepl.DeleteMessageTupleTypeKey && m.OldTupleType != pglogrepl.DeleteMessageTupleTypeOld {
			d.fail("a key or old row (K or O)")
		}
		m.OldTuple = d.tuple(&sc.tuples[1])
		m.SetType(typ)
		msg = m
	}
	if d.err != nil {
		return nil, fmt.Errorf("%q message: %w", rune(data[0]), d.err)
	}
	return msg, nil
}

// parseScratch is the room parseFast decodes row changes into: one
// message of each kind and two tuples (old and new). Reused, a change costs
// no allocation to decode, where it cost four (five with its old row).
type parseScratch struct {
	insert pglogrepl.InsertMessage
	update pglogrepl.UpdateMessage
	delete pglogrepl.DeleteMessage
	tuples [2]scratchTuple
}

type scratchTuple struct {
	td   pglogrepl.TupleData
	cols []pglogrepl.TupleDataColumn
	ptrs []*pglogrepl.TupleDataColumn
}

// decoder reads a message, remembering the first error (a message cut
// short, or a byte where another was due).
type decoder struct {
	data []byte
	pos  int
	err  error
}

func (d *decoder) fail(want string) {
	if d.err == nil {
		d.err = fmt.Errorf("byte %d: want %s; the message is malformed or cut short", d.pos, want)
	}
}

func (d *decoder) take(n int, want string) []byte {
	if d.err != nil || n < 0 || len(d.data)-d.pos < n {
		d.fail(want)
		return nil
	}
	b := d.data[d.pos : d.pos+n : d.pos+n]
	d.pos += n
	return b
}

func (d *decoder) peek() byte {
	if d.err != nil || d.pos >= len(d.data) {
		return 0
	}
	return d.data[d.pos]
}

func (d *decoder) u8() byte {
	if b := d.take(1, "one more byte"); b != nil {
		return b[0]
	}
	return 0
}

func (d *decoder) expect(b byte) {
	if d.u8() != b {
		d.fail(fmt.Sprintf("%q", rune(b)))
	}
}

func (d *decoder) uint16() uint16 {
	if b := d.take(2, "a 16-bit integer"); b != nil {
		return binary.BigEndian.Uint16(b)
	}
	return 0
}

func (d *decoder) uint32() uint32 {
	if b := d.take(4, "a 32-bit integer"); b != nil {
		return binary.BigEndian.Uint32(b)
	}
	return 0
}

// tuple reads a TupleData: the columns in one array, their values pointing
// into the message (an empty value stays empty, not NULL).
func (d *decoder) tuple(st *scratchTuple) *pglogrepl.TupleData {
	n := int(d.uint16())
	if d.err != nil {
		return nil
	}
	if cap(st.cols) < n {
		st.cols = make([]pglogrepl.TupleDataColumn, n)
		st.ptrs = make([]*pglogrepl.TupleDataColumn, n)
	}
	cols, ptrs := st.cols[:n], st.ptrs[:n]
	for i := range cols {
		c := &cols[i]
		ptrs[i] = c
		*c = pglogrepl.TupleDataColumn{DataType: d.u8()}
		switch c.DataType {
		case pglogrepl.TupleDataTypeText, pglogrepl.TupleDataTypeBinary:
			c.Length = d.uint32()
			if d.err == nil && int(c.Length) > len(d.data)-d.pos {
				// Said only when it fails: formatting it for every value
				// cost a tenth of the daemon's CPU.
				d.fail(fmt.Sprintf("a value of %d bytes", c.Length))
			}
			c.Data = d.take(int(c.Length), "a value")
		case pglogrepl.TupleDataTypeNull, pglogrepl.TupleDataTypeToast:
		default:
			d.fail("a column kind (n, u, t or b)")
		}
		if d.err != nil {
			return nil
		}
	}
	st.td = pglogrepl.TupleData{ColumnNum: uint16(n), Columns: ptrs}
	return &st.td
}

// copies holds the copies of messages the grouped and bulk modes keep
// until their transactions are confirmed (the next receive reuses the
// stream's buffer), carved out of 64 KB blocks: a copy costs no
// allocation of its own. A block lives as long as any copy in it, so what
// is kept beyond the copies still needed is less than a block; anything
// kept longer (a relation's message) is copied out of it.
type copies struct {
	block []byte
}

const copyBlock = 64 << 10

// of returns a copy of b that later copies never overwrite.
func (c *copies) of(b []byte) []byte {
	if len(b) > cap(c.block)-len(c.block) {
		if len(b) > copyBlock/4 {
			return bytes.Clone(b) // a large message: a block would waste too much
		}
		c.block = make([]byte, 0, copyBlock)
	}
	n := len(c.block)
	c.block = append(c.block, b...)
	return c.block[n:len(c.block):len(c.block)]
}
