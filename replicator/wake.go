package replicator

import (
	"crypto/tls"
	"net"
	"syscall"
)

// While a stream catches up on a backlog, the peer's walsender sends each
// message as it decodes it, and a reader faster than the sender is woken
// for nearly every one: a read and a poll per message were over half the
// daemon's CPU. Asking the kernel to wake the reader only once a few
// kilobytes wait (SO_RCVLOWAT) makes each wake read dozens of
// transactions. The same holds inside a large transaction, applied in bulk
// or skipped (applier.inLarge). Otherwise the threshold stays
// at one byte: a lone transaction must not wait for others. A deadline
// bounds every wait: the backlog's pause, or freshPause inside a large
// transaction, since what follows it may be fresh.
const backlogWake = 4096

// wakeThreshold sets a TCP socket's SO_RCVLOWAT, remembering the value so
// that only changes cost a system call. It does nothing on other sockets
// (a Unix socket) or where the option is not supported.
type wakeThreshold struct {
	raw syscall.RawConn
	cur int
}

func newWakeThreshold(c net.Conn) *wakeThreshold {
	if t, ok := c.(*tls.Conn); ok {
		c = t.NetConn()
	}
	tcp, ok := c.(*net.TCPConn)
	if !ok {
		return &wakeThreshold{}
	}
	raw, err := tcp.SyscallConn()
	if err != nil {
		return &wakeThreshold{}
	}
	return &wakeThreshold{raw: raw, cur: 1}
}

// set makes the socket wake its reader once n bytes wait (best effort: a
// failure leaves the kernel's default, which costs only CPU).
func (w *wakeThreshold) set(n int) {
	if w.raw == nil || n == w.cur {
		return
	}
	w.cur = n
	_ = w.raw.Control(func(fd uintptr) { setRcvLowat(fd, n) })
}
