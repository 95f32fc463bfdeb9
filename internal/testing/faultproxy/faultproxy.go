// Package faultproxy is a TCP proxy for tests that misbehaves on demand:
// it adds latency and jitter, throttles bandwidth, stalls one direction,
// cuts a link (existing connections reset, new ones refused) and heals it. Tests place one on each link they want to
// control; it only ever listens on and dials loopback addresses it is given.
package faultproxy

import (
	"context"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Proxy forwards connections from its listen address to a target.
type Proxy struct {
	ln     net.Listener
	target string

	mu      sync.Mutex
	latency time.Duration // one way
	jitter  time.Duration
	cut     bool
	// limit caps each direction's bytes per second, shared by every
	// connection (nil: unlimited).
	limit   map[bool]*rate.Limiter
	stalled map[bool]bool // directions that forward nothing until Heal
	conns   map[net.Conn]bool
	closed  bool
	wg      sync.WaitGroup
}

// New listens on 127.0.0.1 (a free port) and forwards to target.
func New(target string) (*Proxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &Proxy{ln: ln, target: target, conns: map[net.Conn]bool{}, stalled: map[bool]bool{}}
	p.wg.Add(1)
	go p.accept()
	return p, nil
}

// Addr is the address to connect to instead of the target.
func (p *Proxy) Addr() string { return p.ln.Addr().String() }

// SetLatency delays every chunk by d (plus up to jitter) in each direction,
// so a round trip costs about 2d.
func (p *Proxy) SetLatency(d, jitter time.Duration) {
	p.mu.Lock()
	p.latency, p.jitter = d, jitter
	p.mu.Unlock()
}

// chunk is the most a pipe reads at once; it is also the limiters' burst.
const chunk = 32 << 10

// SetBandwidth caps the link at bytesPerSec in each direction (0: no cap),
// like a thin pipe between regions.
func (p *Proxy) SetBandwidth(bytesPerSec int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if bytesPerSec <= 0 {
		p.limit = nil
		return
	}
	p.limit = map[bool]*rate.Limiter{
		false: rate.NewLimiter(rate.Limit(bytesPerSec), chunk),
		true:  rate.NewLimiter(rate.Limit(bytesPerSec), chunk),
	}
}

// Cut resets every connection and refuses new ones until Heal.
func (p *Proxy) Cut() {
	p.mu.Lock()
	p.cut = true
	p.mu.Unlock()
	p.Reset()
}

// Stall stops forwarding in one direction (back: from the target to the
// client) without closing anything, like a route lost one way: bytes wait
// in the kernel's buffers, and the peer's sends block, until Heal.
func (p *Proxy) Stall(back bool) {
	p.mu.Lock()
	p.stalled[back] = true
	p.mu.Unlock()
}

// Heal lets connections through again, both ways.
func (p *Proxy) Heal() {
	p.mu.Lock()
	p.cut = false
	clear(p.stalled)
	p.mu.Unlock()
}

// Reset closes every open connection (new ones are accepted unless cut).
func (p *Proxy) Reset() {
	p.mu.Lock()
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
}

// Close stops the proxy and waits for its goroutines.
func (p *Proxy) Close() {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	p.ln.Close()
	p.Reset()
	p.wg.Wait()
}

func (p *Proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.ln.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cut || p.closed {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.mu.Unlock()
		up, err := net.DialTimeout("tcp", p.target, 5*time.Second)
		if err != nil {
			c.Close()
			continue
		}
		p.mu.Lock()
		p.conns[c], p.conns[up] = true, true
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(c, up, false)
		go p.pipe(up, c, true)
	}
}

// pipe copies src to dst until either side closes. back is the direction
// from the target to the client. It is a delay line: each chunk read is due
// latency (plus jitter) after it arrived, never before the chunk ahead of
// it, and a second goroutine writes it then, throttled; so latency delays
// every byte once instead of adding up behind earlier chunks.
func (p *Proxy) pipe(src, dst net.Conn, back bool) {
	defer p.wg.Done()
	type delayed struct {
		data []byte
		due  time.Time
	}
	line := make(chan delayed, 256)
	var writer sync.WaitGroup
	writer.Go(func() {
		for c := range line {
			time.Sleep(time.Until(c.due))
			p.mu.Lock()
			lim := p.limit[back]
			p.mu.Unlock()
			if lim != nil && lim.WaitN(context.Background(), len(c.data)) != nil {
				break
			}
			if _, err := dst.Write(c.data); err != nil {
				break
			}
		}
		src.Close() // the reader stops too
		for range line {
		}
	})
	defer func() {
		close(line)
		writer.Wait()
		src.Close()
		dst.Close()
		p.mu.Lock()
		delete(p.conns, src)
		delete(p.conns, dst)
		p.mu.Unlock()
	}()
	var last time.Time
	for {
		for p.isStalled(back) {
			time.Sleep(10 * time.Millisecond)
		}
		buf := make([]byte, chunk)
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			d := p.latency
			if p.jitter > 0 {
				d += time.Duration(rand.Int64N(int64(p.jitter)))
			}
			p.mu.Unlock()
			last = later(time.Now().Add(d), last)
			line <- delayed{buf[:n], last}
		}
		if err != nil {
			return // EOF or a reset: close both sides
		}
	}
}

func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func (p *Proxy) isStalled(back bool) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stalled[back] && !p.closed
}
