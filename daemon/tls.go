package daemon

import (
	"crypto/tls"
	"errors"
	"fmt"

	"github.com/pgmesh/pgmesh/api"
)

// TLS for the API and Raft ports. With tls_cert_file and tls_key_file set,
// the API serves HTTPS only and Raft speaks mutual TLS: every member's
// certificate must be signed by the group's CA (tls_ca_file), and serve as
// both server and client certificate. A group uses TLS on every node or on
// none. Postgres connections are separate: they follow each DSN's sslmode.

// tlsSetup holds the configurations built from the certificate files.
type tlsSetup struct {
	api    *tls.Config // the API server: certificate only (requests carry the token)
	raft   *tls.Config // the Raft server: client certificates required
	client *tls.Config // dialing peers' API and Raft ports
}

// checkTLS reports missing halves of the TLS settings.
func (c *Config) checkTLS() error {
	switch {
	case c.TLSCertFile == "" && c.TLSKeyFile == "" && c.TLSCAFile == "":
		return nil
	case c.TLSCertFile == "" || c.TLSKeyFile == "":
		return errors.New("only one of tls_cert_file and tls_key_file is set: give both (this node's certificate and its key), or neither to run without TLS")
	case c.TLSCAFile == "":
		return errors.New("tls_ca_file is not set: TLS needs the group's CA certificate to verify the other members")
	}
	return nil
}

// loadTLS reads the certificate files; nil without TLS.
func loadTLS(c Config) (*tlsSetup, error) {
	if c.TLSCertFile == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(c.TLSCertFile, c.TLSKeyFile)
	if err != nil {
		return nil, fmt.Errorf("load tls_cert_file %s and tls_key_file %s: %w: give a PEM certificate and its private key", c.TLSCertFile, c.TLSKeyFile, err)
	}
	pool, err := api.LoadCA(c.TLSCAFile)
	if err != nil {
		return nil, err
	}
	base := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}}
	api := base.Clone()
	raft := base.Clone()
	raft.ClientAuth, raft.ClientCAs = tls.RequireAndVerifyClientCert, pool
	client := base.Clone()
	client.RootCAs = pool
	return &tlsSetup{api: api, raft: raft, client: client}, nil
}
