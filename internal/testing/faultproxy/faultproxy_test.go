package faultproxy

import (
	"io"
	"net"
	"testing"
	"time"
)

// sink accepts connections and counts what it reads.
func sink(t *testing.T) (addr string, got chan int64) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	got = make(chan int64, 4)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				n, _ := io.Copy(io.Discard, c)
				c.Close()
				got <- n
			}()
		}
	}()
	return ln.Addr().String(), got
}

// proxiedSink is a proxy in front of a sink, closed after the test.
func proxiedSink(t *testing.T) (*Proxy, chan int64) {
	t.Helper()
	addr, got := sink(t)
	p, err := New(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p, got
}

func TestBandwidthCapsThroughput(t *testing.T) {
	p, got := proxiedSink(t)
	const rate, size = 256 << 10, 512 << 10
	p.SetBandwidth(rate)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := <-got; n != size {
		t.Fatalf("sink got %d bytes, want %d", n, size)
	}
	// One burst goes at once; the rest cannot go faster than the cap.
	if min := time.Duration(float64(size-chunk) / rate * float64(time.Second)); time.Since(start) < min {
		t.Fatalf("%d bytes through a %d B/s link took %s, less than %s", size, rate, time.Since(start), min)
	}
}

func TestCutRefusesAndHealRestores(t *testing.T) {
	p, got := proxiedSink(t)
	p.Cut()
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	// The proxy accepts, then closes at once: a read sees the end.
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = c.Read(make([]byte, 1))
	if ne, ok := err.(net.Error); err == nil || ok && ne.Timeout() {
		t.Fatalf("a cut link was not closed: read returned %v", err)
	}
	c.Close()
	p.Heal()
	c, err = net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("hello")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := <-got; n != 5 {
		t.Fatalf("sink got %d bytes after heal, want 5", n)
	}
}

func TestStallHoldsOneDirectionUntilHeal(t *testing.T) {
	p, got := proxiedSink(t)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	p.Stall(false) // client to target
	if _, err := c.Write([]byte("held")); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case n := <-got:
		t.Fatalf("the sink got %d bytes through a stalled direction", n)
	case <-time.After(200 * time.Millisecond):
	}
	p.Heal()
	if n := <-got; n != 4 {
		t.Fatalf("after heal the sink got %d bytes, want 4", n)
	}
}

// Latency delays every byte once: a stream of data arrives one latency
// after it was sent, not one latency per chunk the proxy reads, which
// would cap a link at a chunk per latency (320 kB/s at 100 ms).
func TestLatencyDoesNotAddUp(t *testing.T) {
	p, got := proxiedSink(t)
	const latency = 100 * time.Millisecond
	p.SetLatency(latency, 0)
	c, err := net.Dial("tcp", p.Addr())
	if err != nil {
		t.Fatal(err)
	}
	const size = 4 << 20
	start := time.Now()
	if _, err := c.Write(make([]byte, size)); err != nil {
		t.Fatal(err)
	}
	c.Close()
	select {
	case n := <-got:
		if n != size {
			t.Fatalf("the sink read %d bytes, want %d", n, size)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the data did not arrive")
	}
	// Chunk by chunk it would take 128 latencies (12.8s).
	if took := time.Since(start); took > 20*latency {
		t.Fatalf("4 MB took %s through a link with %s latency", took, latency)
	}
}
