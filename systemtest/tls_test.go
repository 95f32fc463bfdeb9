//go:build integration

package systemtest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/testing/localmesh"
	"github.com/pgmesh/pgmesh/internal/testing/pgtest"
)

// testPKI is a CA and one certificate it signed for 127.0.0.1, usable as
// server and client certificate, as PEM files in dir.
type testPKI struct {
	caFile, certFile, keyFile string
	cert, key                 []byte // PEM
}

func newPKI(t *testing.T, dir string) testPKI {
	t.Helper()
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "pgmesh test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	must(err)
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	must(err)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "pgmesh node"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, ca, &key.PublicKey, caKey)
	must(err)
	keyDER, err := x509.MarshalECPrivateKey(key)
	must(err)
	p := testPKI{caFile: filepath.Join(dir, "ca.crt"), certFile: filepath.Join(dir, "node.crt"), keyFile: filepath.Join(dir, "node.key"),
		cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER}),
		key:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER})}
	must(os.WriteFile(p.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644))
	must(os.WriteFile(p.certFile, p.cert, 0o644))
	must(os.WriteFile(p.keyFile, p.key, 0o600))
	return p
}

// Two nodes with TLS on their API and Raft ports and SSL-only Postgres
// connections (sslmode=verify-full): the group forms and replicates, the API
// answers no plain HTTP, Raft admits no one without a certificate from the
// group's CA, and every connection the daemons open to Postgres uses SSL.
func TestTLSEverywhere(t *testing.T) {
	ctx := ctxFor(t)
	const secret = "s3cret-Pa55word"
	pki := newPKI(t, t.TempDir())
	// The test process and the CLI it runs speak HTTPS to the daemons.
	https, err := api.CATransport(pki.caFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("PGMESH_TLS_CA_FILE", pki.caFile)

	var nodes []*localmesh.Node
	for _, name := range []string{"a", "b"} {
		n, err := localmesh.NewNode(ctx, bin, name, pgtest.Options{ServerCert: pki.cert, ServerKey: pki.key})
		if err != nil {
			t.Fatal(err)
		}
		keepLogs(t, n)
		n.Transport = https
		mustExec(t, ctx, n, joinSchema)
		// The password is ignored by the test clusters (trust), but must
		// never leave the node: not into the Raft log, status or logs.
		ssl := fmt.Sprintf("postgres://postgres:%s@127.0.0.1:%d/postgres?sslmode=verify-full&sslrootcert=%s", secret, n.PG.Port, pki.caFile)
		n.ExtraArgs = []string{"--dsn", ssl, "--tls-cert-file", pki.certFile, "--tls-key-file", pki.keyFile, "--tls-ca-file", pki.caFile}
		if err := n.Start(ctx); err != nil {
			t.Fatal(err)
		}
		nodes = append(nodes, n)
	}
	a, b := nodes[0], nodes[1]
	if _, err := localmesh.Form(ctx, "test", a, b); err != nil {
		t.Fatal(err)
	}
	if err := localmesh.WaitConnected(ctx, 30*time.Second, a, b); err != nil {
		t.Fatal(err)
	}
	mustExec(t, ctx, a, `INSERT INTO ledger (id, node, n) VALUES (1, 'a', 1)`)
	mustExec(t, ctx, b, `INSERT INTO ledger (id, node, n) VALUES (2, 'b', 1)`)
	converged(t, ctx, 30*time.Second, "ledger", a, b)

	// The API speaks only HTTPS.
	resp, err := http.Get("http://" + a.API + "/v1/status")
	if err == nil {
		resp.Body.Close()
		if resp.StatusCode < 400 {
			t.Fatalf("plain HTTP to a TLS API answered %s", resp.Status)
		}
	}
	// Raft refuses a client without a certificate, even one that trusts the CA.
	pool := x509.NewCertPool()
	ca, _ := os.ReadFile(pki.caFile)
	pool.AppendCertsFromPEM(ca)
	conn, err := tls.Dial("tcp", a.Raft, &tls.Config{RootCAs: pool})
	if err == nil {
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		_, err = conn.Write([]byte{0})
		if err == nil {
			_, err = conn.Read(make([]byte, 1))
		}
		conn.Close()
	}
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("raft port accepted a client without a certificate (err %v)", err)
	}

	// Every connection the daemons hold to each Postgres is encrypted.
	for _, n := range nodes {
		var total, plain int64
		c := connect(t, ctx, n)
		if err := c.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE NOT s.ssl)
			FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
			WHERE a.application_name LIKE 'pgmesh%'`).Scan(&total, &plain); err != nil {
			t.Fatal(err)
		}
		if total < 4 || plain != 0 {
			t.Fatalf("%s: %d pgmesh connections, %d without SSL", n.Name, total, plain)
		}
	}
	// The password stays on its node: not in the Raft log or snapshots,
	// the daemon logs, or status.
	for _, n := range nodes {
		out, _, err := n.CLI(ctx, "status", "--json")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, secret) {
			t.Fatalf("%s's status shows the password", n.Name)
		}
		files := []string{n.LogPath}
		_ = filepath.WalkDir(n.DataDir, func(path string, e os.DirEntry, err error) error {
			if err == nil && !e.IsDir() {
				files = append(files, path)
			}
			return nil
		})
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(string(b), secret) {
				t.Fatalf("%s holds the password", f)
			}
		}
		if len(files) < 3 {
			t.Fatalf("only %d files checked on %s: %v", len(files), n.Name, files)
		}
	}
}
