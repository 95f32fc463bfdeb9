package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pgmesh/pgmesh/api"
	"github.com/pgmesh/pgmesh/internal/poll"
	"github.com/pgmesh/pgmesh/membership"
	"github.com/pgmesh/pgmesh/repset"
)

// cluster is this node's side of the calls between members: how it reaches
// another member (its API, its Postgres), the group's token it presents and
// checks, and the changes to the Raft state that only the leader makes for
// the members that ask it (the /v1/cluster/ routes, forwarded to the leader
// from any member).
type cluster struct {
	self  string
	store *membership.Store
	log   *slog.Logger
	// transport carries calls to other members (HTTPS with TLS on).
	transport *api.Transport
	// peerDSNs and peerAPIs override how a member is reached (peer_dsns,
	// peer_api_addrs in the config).
	peerDSNs, peerAPIs map[string]string
	dataDir            string
}

// peerDSN is how this node reaches a peer's Postgres: its public_dsn, or
// the peer_dsns override for it.
func (c *cluster) peerDSN(n *membership.Node) string {
	if o, ok := c.peerDSNs[n.Name]; ok {
		return o
	}
	return n.DSN
}

// peerAPI is how this node reaches a peer's API: its advertise_api, or the
// peer_api_addrs override for it.
func (c *cluster) peerAPI(n *membership.Node) string {
	if o, ok := c.peerAPIs[n.Name]; ok {
		return o
	}
	return n.API
}

// client calls the member at addr, presenting token ("" for the routes
// open to anyone).
func (c *cluster) client(addr, token string) *api.Client {
	return c.transport.Client(addr, token)
}

// member is a client of the member at addr, with the group's token.
func (c *cluster) member(addr string) (*api.Client, error) {
	token, err := c.loadToken()
	if err != nil {
		return nil, err
	}
	return c.client(addr, token), nil
}

// tokenPath is where a member keeps the group's join token (mode 0600) to
// authenticate its calls to other members.
func (c *cluster) tokenPath() string { return filepath.Join(c.dataDir, "join-token") }

func (c *cluster) saveToken(token string) error {
	return os.WriteFile(c.tokenPath(), []byte(token), 0o600)
}

func (c *cluster) loadToken() (string, error) {
	b, err := os.ReadFile(c.tokenPath())
	if errors.Is(err, os.ErrNotExist) {
		return "", errors.New("this node holds no join token (it is not in a group)")
	}
	return strings.TrimSpace(string(b)), err
}

// loadWait bounds how long a call waits for a restarted node to load the
// group's state: a leader commits its log within a few round trips.
const loadWait = 15 * time.Second

// group is the group this node is in (nil when it is in none). On a node
// that restarted and has not applied its Raft log yet, it waits up to
// loadWait for it (membership.Store.Loaded), then answers 503.
func (c *cluster) group(ctx context.Context) (*membership.Group, error) {
	ctx, cancel := context.WithTimeout(ctx, loadWait)
	defer cancel()
	g, err := c.store.Loaded(ctx)
	if err != nil {
		return nil, &api.Error{Status: http.StatusServiceUnavailable, Message: fmt.Sprintf("node %q: %v", c.self, err)}
	}
	return g, nil
}

// authorized checks the bearer token of a member-to-member call.
func (c *cluster) authorized(r *http.Request) (*membership.Group, error) {
	g, err := c.group(r.Context())
	if err != nil {
		return nil, err
	}
	if g == nil {
		return nil, &api.Error{Status: http.StatusConflict, Message: fmt.Sprintf("node %q is not in a node group: point --via at a member of the group", c.self)}
	}
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !g.CheckToken(token) {
		return nil, &api.Error{Status: http.StatusForbidden, Message: fmt.Sprintf("the join token was refused by group %q: use the token printed by 'pgmesh group create'", g.Name)}
	}
	return g, nil
}

// leader returns a client of the Raft leader's API, for a node that is not
// it. An election (members restarted, say) takes a few timeouts: it waits
// up to loadWait for a leader, then returns noLeader.
func (c *cluster) leader(ctx context.Context, noLeader error) (*api.Client, error) {
	g, err := c.group(ctx)
	if err != nil {
		return nil, err
	}
	if g == nil {
		return nil, errors.New("this node is not in a node group")
	}
	var leader *membership.Node
	if err := poll.Until(ctx, 100*time.Millisecond, loadWait, func() error {
		if leader = c.leaderNode(); leader == nil {
			return noLeader
		}
		return nil
	}); err != nil {
		return nil, noLeader
	}
	return c.member(c.peerAPI(leader))
}

// leaderNode is the Raft leader as a member, or nil while there is none.
func (c *cluster) leaderNode() *membership.Node {
	g, _ := c.store.Group()
	if g == nil {
		return nil
	}
	return g.Nodes[c.store.Leader()]
}

// fromMember adapts fn to a route other members call: the handler decodes
// the request, checks the caller's token, calls fn with the group, and
// answers what fn returns, or the error with its own status (an
// *api.Error) or failed.
func fromMember[Req, Resp any](c *cluster, failed int, fn func(context.Context, *membership.Group, Req) (Resp, error)) http.HandlerFunc {
	return memberRoute(c, false, failed, fn)
}

// onLeader is fromMember for a route that changes the Raft state: a member
// that is not the leader forwards the call to the leader, and fn runs
// there.
func onLeader[Req, Resp any](c *cluster, failed int, fn func(context.Context, *membership.Group, Req) (Resp, error)) http.HandlerFunc {
	return memberRoute(c, true, failed, fn)
}

func memberRoute[Req, Resp any](c *cluster, leaderOnly bool, failed int, fn func(context.Context, *membership.Group, Req) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := readJSON(r, &req); err != nil {
			writeErr(w, 0, err)
			return
		}
		g, err := c.authorized(r)
		if err != nil {
			writeErr(w, 0, err)
			return
		}
		if leaderOnly && c.forward(w, r, req) {
			return
		}
		resp, err := fn(r.Context(), g, req)
		if err != nil {
			writeErr(w, failed, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

// forward sends a member-to-member call on to the Raft leader when this node
// is not it. It reports whether it handled the request.
func (c *cluster) forward(w http.ResponseWriter, r *http.Request, in any) bool {
	if c.store.IsLeader() {
		return false
	}
	token, _ := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	// Leadership may be changing (the leader just died): re-resolve the
	// leader and retry transport failures for a while. Answers from the
	// leader, errors included, are final.
	var out json.RawMessage
	becameLeader := false
	err := poll.Until(r.Context(), 200*time.Millisecond, 15*time.Second, func() error {
		if c.store.IsLeader() {
			becameLeader = true
			return nil
		}
		leader := c.leaderNode()
		if leader == nil {
			return errors.New("the node group has no Raft leader right now (is a majority of members down?): joins and parts need a majority; try again when it is back")
		}
		err := c.client(c.peerAPI(leader), token).Do(r.Context(), r.Method, r.URL.Path, in, &out)
		if _, final := errors.AsType[*api.Error](err); final {
			return poll.Stop(err)
		}
		return err
	})
	if becameLeader {
		return false
	}
	if _, final := errors.AsType[*api.Error](err); final {
		writeErr(w, http.StatusBadGateway, err)
		return true
	}
	if err != nil {
		writeErr(w, http.StatusServiceUnavailable, err)
		return true
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
	return true
}

// The changes the leader makes for other members (onLeader routes).

// register records a joining node in the group.
func (c *cluster) register(_ context.Context, g *membership.Group, req api.RegisterRequest) (api.JoinResponse, error) {
	n := *req.Node.Member()
	if !ValidNodeName(n.Name) || n.DSN == "" || n.API == "" || n.Raft == "" {
		return api.JoinResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("join request for node %q lacks a valid name, public_dsn, API or Raft address", n.Name))
	}
	if other := differingResolution(g, n.LUWResolution, n.Name); other != nil && n.LUWResolution != "" {
		return api.JoinResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("node %s has luw_resolution %s, but member %s uses %s: every node must round commit times the same way, so set luw_resolution: %s on %s and join again",
			n.Name, n.LUWResolution, other.Name, other.LUWResolution, other.LUWResolution, n.Name))
	}
	added, err := c.store.AddNode(n)
	if err != nil {
		return api.JoinResponse{}, err
	}
	c.log.Info("registered joining node", "joining", added.Name, "node_id", added.ID)
	return api.JoinResponse{Group: g.Name, Node: api.NodeOf(added)}, nil
}

// activate records that a joining node has its data and streams.
func (c *cluster) activate(_ context.Context, g *membership.Group, req api.StateRequest) (api.JoinResponse, error) {
	if req.State != membership.Active {
		return api.JoinResponse{}, withStatus(http.StatusBadRequest, fmt.Errorf("state %q cannot be set this way", req.State))
	}
	n, err := c.store.SetState(req.Name, req.State)
	if err != nil {
		return api.JoinResponse{}, err
	}
	return api.JoinResponse{Group: g.Name, Node: api.NodeOf(n)}, nil
}

// part records a member as parted (the member asked drained it first).
func (c *cluster) part(_ context.Context, g *membership.Group, req api.PartRequest) (api.JoinResponse, error) {
	n, err := c.store.Part(req.Name)
	if err != nil {
		return api.JoinResponse{}, err
	}
	c.log.Info("parted node", "parted", req.Name)
	return api.JoinResponse{Group: g.Name, Node: api.NodeOf(n)}, nil
}

// lock takes or gives up a group-wide lock for a member; a lock another
// member holds answers 423.
func (c *cluster) lock(_ context.Context, _ *membership.Group, req api.LockRequest) (struct{}, error) {
	var err error
	if req.Release {
		err = c.store.ReleaseLock(req.Lock, req.Node)
	} else {
		err = c.store.AcquireLock(req.Lock, req.Node, time.Duration(req.TTLms)*time.Millisecond)
	}
	if _, held := errors.AsType[*membership.LockHeld](err); held {
		return struct{}{}, withStatus(http.StatusLocked, err)
	}
	return struct{}{}, err
}

// galloc draws a chunk of a global sequence for a member.
func (c *cluster) galloc(_ context.Context, _ *membership.Group, req api.GallocRequest) (*membership.Chunk, error) {
	return c.store.AllocChunk(req.Seq, req.Node, req.Size, req.MinStart)
}

// editRepsets changes the replication sets for a member.
func (c *cluster) editRepsets(_ context.Context, _ *membership.Group, edit membership.RepsetEdit) (repset.Sets, error) {
	return c.store.EditRepsets(edit)
}
