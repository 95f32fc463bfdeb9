package api

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"time"

	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

// Error is an error a daemon answered, with its HTTP status.
type Error struct {
	Status  int
	Message string
}

func (e *Error) Error() string { return e.Message }

// ErrorBody is how the API answers errors.
type ErrorBody struct {
	Error string `json:"error"`
}

// Transport is how a process reaches daemons: plain HTTP, or HTTPS
// verifying them against the group's CA. Each process makes its own (the
// daemon from its TLS settings, the CLI from --tls-ca-file); nothing is
// shared through package state.
type Transport struct {
	http   *http.Client
	scheme string
}

// NewTransport returns a transport; tlsConfig nil means plain HTTP.
func NewTransport(tlsConfig *tls.Config) *Transport {
	// Long operations (a join's copy, a compare) answer only when done.
	c := &http.Client{Timeout: 5 * time.Minute}
	if tlsConfig == nil {
		return &Transport{http: c, scheme: "http://"}
	}
	c.Transport = &http.Transport{TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true}
	return &Transport{http: c, scheme: "https://"}
}

// CATransport returns an HTTPS transport trusting the CA certificate in the
// PEM file at path.
func CATransport(path string) (*Transport, error) {
	pool, err := LoadCA(path)
	if err != nil {
		return nil, err
	}
	return NewTransport(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool}), nil
}

// LoadCA reads the group's CA certificate.
func LoadCA(path string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read tls_ca_file: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls_ca_file %s holds no PEM certificate: give the group's CA certificate", path)
	}
	return pool, nil
}

// Client calls the API of the daemon at addr (host:port). token, when set,
// is the group's join token: member calls need it, and so do calls from
// another host.
func (t *Transport) Client(addr, token string) *Client {
	return &Client{t: t, addr: addr, token: token}
}

// Client is a typed client of one daemon's API: one method per route.
type Client struct {
	t     *Transport
	addr  string
	token string
}

// Addr is the daemon's address.
func (c *Client) Addr() string { return c.addr }

// Do sends a JSON request and decodes the JSON answer into out (if not
// nil). The typed methods use it; the daemon uses it alone to pass a
// member call on to the Raft leader unchanged.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.t.scheme+c.addr+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.t.http.Do(req)
	if err != nil {
		return fmt.Errorf("cannot reach the pgmesh daemon at %s: %w", c.addr, unwrapURL(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("read answer from %s: %w", c.addr, err)
	}
	if resp.StatusCode >= 300 {
		var eb ErrorBody
		if json.Unmarshal(b, &eb) == nil && eb.Error != "" {
			return &Error{Status: resp.StatusCode, Message: eb.Error}
		}
		return &Error{Status: resp.StatusCode, Message: fmt.Sprintf("%s answered %s", c.addr, resp.Status)}
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("decode answer from %s: %w", c.addr, err)
		}
	}
	return nil
}

func unwrapURL(err error) error {
	var ue interface{ Unwrap() error }
	if errors.As(err, &ue) && ue.Unwrap() != nil {
		return ue.Unwrap()
	}
	return err
}

func get[T any](ctx context.Context, c *Client, path string) (T, error) {
	var out T
	err := c.Do(ctx, http.MethodGet, path, nil, &out)
	return out, err
}

func post[T any](ctx context.Context, c *Client, path string, in any) (T, error) {
	var out T
	err := c.Do(ctx, http.MethodPost, path, in, &out)
	return out, err
}

// Routes for the CLI (and anyone on the daemon's host).

// Status is GET /v1/status: the node's view of the group.
func (c *Client) Status(ctx context.Context) (StatusReport, error) {
	return get[StatusReport](ctx, c, "/v1/status")
}

// Conflicts is GET /v1/conflicts (query: limit, table, type).
func (c *Client) Conflicts(ctx context.Context, query url.Values) ([]Conflict, error) {
	return get[[]Conflict](ctx, c, "/v1/conflicts?"+query.Encode())
}

// CreateGroup is POST /v1/group/create.
func (c *Client) CreateGroup(ctx context.Context, req CreateRequest) (CreateResponse, error) {
	return post[CreateResponse](ctx, c, "/v1/group/create", req)
}

// JoinGroup is POST /v1/group/join: it starts the join and returns.
func (c *Client) JoinGroup(ctx context.Context, req JoinRequest) (JoinResponse, error) {
	return post[JoinResponse](ctx, c, "/v1/group/join", req)
}

// Part is POST /v1/node/part.
func (c *Client) Part(ctx context.Context, req PartRequest) (JoinResponse, error) {
	return post[JoinResponse](ctx, c, "/v1/node/part", req)
}

// Setting is POST /v1/setting: a change made alike on every active member.
func (c *Client) Setting(ctx context.Context, s Setting) (SettingResponse, error) {
	return post[SettingResponse](ctx, c, "/v1/setting", s)
}

// Parked is GET /v1/parked.
func (c *Client) Parked(ctx context.Context) ([]ParkedTable, error) {
	return get[[]ParkedTable](ctx, c, "/v1/parked")
}

// Replay is POST /v1/parked/replay.
func (c *Client) Replay(ctx context.Context, req QueueRequest) (QueueResponse, error) {
	return post[QueueResponse](ctx, c, "/v1/parked/replay", req)
}

// Discard is POST /v1/parked/discard.
func (c *Client) Discard(ctx context.Context, req QueueRequest) (QueueResponse, error) {
	return post[QueueResponse](ctx, c, "/v1/parked/discard", req)
}

// Wait is POST /v1/wait.
func (c *Client) Wait(ctx context.Context, req WaitRequest) (WaitResponse, error) {
	return post[WaitResponse](ctx, c, "/v1/wait", req)
}

// Audit is GET /v1/sequences/audit.
func (c *Client) Audit(ctx context.Context) ([]AuditRow, error) {
	return get[[]AuditRow](ctx, c, "/v1/sequences/audit")
}

// Convert is POST /v1/sequences/convert.
func (c *Client) Convert(ctx context.Context, req ConvertRequest) (SettingResponse, error) {
	return post[SettingResponse](ctx, c, "/v1/sequences/convert", req)
}

// Sequences is GET /v1/sequences.
func (c *Client) Sequences(ctx context.Context) ([]SequenceInfo, error) {
	return get[[]SequenceInfo](ctx, c, "/v1/sequences")
}

// DDL is POST /v1/ddl.
func (c *Client) DDL(ctx context.Context, req DDLRequest) error {
	return c.Do(ctx, http.MethodPost, "/v1/ddl", req, nil)
}

// Compare is POST /v1/compare.
func (c *Client) Compare(ctx context.Context, req CompareRequest) (CompareResponse, error) {
	return post[CompareResponse](ctx, c, "/v1/compare", req)
}

// Repsets is GET /v1/repsets.
func (c *Client) Repsets(ctx context.Context) (RepsetsResponse, error) {
	return get[RepsetsResponse](ctx, c, "/v1/repsets")
}

// EditRepset is POST /v1/repset.
func (c *Client) EditRepset(ctx context.Context, req RepsetRequest) (RepsetsResponse, error) {
	return post[RepsetsResponse](ctx, c, "/v1/repset", req)
}

// Member routes (/v1/cluster/...): the caller holds the group's token.

// Register is POST /v1/cluster/join: enter the group as a joining node.
func (c *Client) Register(ctx context.Context, req RegisterRequest) (JoinResponse, error) {
	return post[JoinResponse](ctx, c, "/v1/cluster/join", req)
}

// SetState is POST /v1/cluster/state (the Raft leader records it).
func (c *Client) SetState(ctx context.Context, req StateRequest) (JoinResponse, error) {
	return post[JoinResponse](ctx, c, "/v1/cluster/state", req)
}

// ClusterPart is POST /v1/cluster/part (the Raft leader parts the node).
func (c *Client) ClusterPart(ctx context.Context, req PartRequest) (JoinResponse, error) {
	return post[JoinResponse](ctx, c, "/v1/cluster/part", req)
}

// Pause is POST /v1/cluster/pause: hold the member's streams for a lease.
func (c *Client) Pause(ctx context.Context) (PauseResponse, error) {
	return post[PauseResponse](ctx, c, "/v1/cluster/pause", struct{}{})
}

// Resume is POST /v1/cluster/resume.
func (c *Client) Resume(ctx context.Context, req ResumeRequest) (ResumeResponse, error) {
	return post[ResumeResponse](ctx, c, "/v1/cluster/resume", req)
}

// ApplySetting is POST /v1/cluster/setting: make the change on that member.
func (c *Client) ApplySetting(ctx context.Context, s Setting) error {
	return c.Do(ctx, http.MethodPost, "/v1/cluster/setting", s, nil)
}

// Galloc is POST /v1/cluster/galloc: draw a chunk of a galloc sequence.
func (c *Client) Galloc(ctx context.Context, req GallocRequest) (membership.Chunk, error) {
	return post[membership.Chunk](ctx, c, "/v1/cluster/galloc", req)
}

// Lock is POST /v1/cluster/lock: take or give up a group-wide lock.
func (c *Client) Lock(ctx context.Context, req LockRequest) error {
	return c.Do(ctx, http.MethodPost, "/v1/cluster/lock", req, nil)
}

// EditRepsets is POST /v1/cluster/repset: the Raft leader applies the edit
// and answers the sets as changed.
func (c *Client) EditRepsets(ctx context.Context, edit membership.RepsetEdit) (repset.Sets, error) {
	return post[repset.Sets](ctx, c, "/v1/cluster/repset", edit)
}
