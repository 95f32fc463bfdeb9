//go:build linux

package replicator

import (
	"crypto/tls"
	"net"
	"path/filepath"
	"syscall"
	"testing"
)

func rcvLowat(t *testing.T, c net.Conn) int {
	t.Helper()
	raw, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	var gerr error
	if err := raw.Control(func(fd uintptr) {
		n, gerr = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVLOWAT)
	}); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatal(gerr)
	}
	return n
}

// dialed is a client connection to a listener on network and address,
// both closed when the test ends.
func dialed(t *testing.T, network, address string) net.Conn {
	t.Helper()
	ln, err := net.Listen(network, address)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	c, err := net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// The wake threshold reaches the TCP socket under a stream, TLS or not,
// and goes back to one byte; on a Unix socket it does nothing.
func TestWakeThresholdSetsTheSocket(t *testing.T) {
	c := dialed(t, "tcp", "127.0.0.1:0")

	for _, conn := range []net.Conn{c, tls.Client(c, &tls.Config{})} {
		w := newWakeThreshold(conn)
		w.set(backlogWake)
		if got := rcvLowat(t, c); got != backlogWake {
			t.Fatalf("%T: SO_RCVLOWAT %d after set(%d)", conn, got, backlogWake)
		}
		w.set(1)
		if got := rcvLowat(t, c); got != 1 {
			t.Fatalf("%T: SO_RCVLOWAT %d after set(1)", conn, got)
		}
	}

	u := dialed(t, "unix", filepath.Join(t.TempDir(), "s"))
	w := newWakeThreshold(u)
	w.set(backlogWake) // must not fail or panic
	if w.raw != nil {
		t.Fatal("a Unix socket got a wake threshold")
	}
}
