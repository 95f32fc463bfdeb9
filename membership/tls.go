package membership

import (
	"crypto/tls"
	"net"
	"time"

	"github.com/hashicorp/raft"
)

// tlsStream is a Raft stream layer over TLS. Raft has no authentication of
// its own, so with TLS both sides present certificates signed by the group's
// CA: a process without one cannot join the conversation.
type tlsStream struct {
	net.Listener
	advertise net.Addr
	client    *tls.Config
}

func newTLSStream(listen string, advertise net.Addr, server, client *tls.Config) (*tlsStream, error) {
	ln, err := tls.Listen("tcp", listen, server)
	if err != nil {
		return nil, err
	}
	return &tlsStream{Listener: ln, advertise: advertise, client: client}, nil
}

// Addr is the advertised address, which peers dial.
func (s *tlsStream) Addr() net.Addr { return s.advertise }

func (s *tlsStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	d := &net.Dialer{Timeout: timeout}
	return tls.DialWithDialer(d, "tcp", string(address), s.client)
}
