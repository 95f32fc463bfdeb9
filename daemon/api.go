package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/pgmesh/pgmesh/api"
)

// The API has two parts: /v1/* for the local CLI, and /v1/cluster/* for
// other members, which must present the group's join token.
func (d *Daemon) routes() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/status", d.handleStatus)
	mux.HandleFunc("GET /v1/conflicts", d.handleConflicts)
	mux.HandleFunc("POST /v1/group/create", post(http.StatusOK, http.StatusInternalServerError, d.createGroup))
	mux.HandleFunc("POST /v1/group/join", post(http.StatusAccepted, http.StatusBadRequest, d.joining.start))
	mux.HandleFunc("POST /v1/node/part", post(http.StatusOK, http.StatusBadGateway, d.part))
	mux.HandleFunc("POST /v1/setting", post(http.StatusOK, http.StatusBadGateway, d.settings.set))
	mux.HandleFunc("POST /v1/cluster/setting", fromMember(d.cluster, http.StatusBadRequest, d.settings.here))
	mux.HandleFunc("POST /v1/wait", post(http.StatusOK, http.StatusInternalServerError, d.wait))
	mux.HandleFunc("GET /v1/sequences/audit", get(d.sequences.audit))
	mux.HandleFunc("POST /v1/sequences/convert", post(http.StatusOK, http.StatusInternalServerError, d.sequences.convert))
	mux.HandleFunc("GET /v1/sequences", get(d.sequenceList))
	mux.HandleFunc("POST /v1/cluster/galloc", onLeader(d.cluster, http.StatusConflict, d.cluster.galloc))
	mux.HandleFunc("POST /v1/ddl", post(http.StatusOK, http.StatusInternalServerError, noAnswer(d.runDDL)))
	mux.HandleFunc("POST /v1/compare", post(http.StatusOK, http.StatusInternalServerError, d.comparer.compare))
	mux.HandleFunc("POST /v1/cluster/lock", onLeader(d.cluster, http.StatusConflict, d.cluster.lock))
	mux.HandleFunc("GET /v1/parked", get(d.parkedList))
	mux.HandleFunc("POST /v1/parked/replay", post(http.StatusOK, http.StatusInternalServerError, d.replayParked))
	mux.HandleFunc("POST /v1/parked/discard", post(http.StatusOK, http.StatusInternalServerError, d.discardParked))
	mux.HandleFunc("GET /v1/repsets", get(d.repsets.list))
	mux.HandleFunc("POST /v1/repset", post(http.StatusOK, http.StatusInternalServerError, d.repsets.change))
	mux.HandleFunc("POST /v1/cluster/repset", onLeader(d.cluster, http.StatusBadRequest, d.cluster.editRepsets))
	mux.HandleFunc("GET /status", d.handleStatus)
	mux.HandleFunc("GET /health", d.handleHealth)
	mux.Handle("GET /metrics", d.metricsHandler())
	mux.HandleFunc("POST /v1/cluster/join", onLeader(d.cluster, http.StatusConflict, d.cluster.register))
	mux.HandleFunc("POST /v1/cluster/state", onLeader(d.cluster, http.StatusConflict, d.cluster.activate))
	mux.HandleFunc("POST /v1/cluster/part", onLeader(d.cluster, http.StatusConflict, d.cluster.part))
	mux.HandleFunc("POST /v1/cluster/pause", fromMember(d.cluster, http.StatusServiceUnavailable, d.pauses.pause))
	mux.HandleFunc("POST /v1/cluster/resume", fromMember(d.cluster, http.StatusInternalServerError, d.pauses.resume))
	return localOnly(mux, func(r *http.Request) error { _, err := d.cluster.authorized(r); return err })
}

// localOnly lets requests from other hosts reach only what members need
// from each other (status, health, metrics, and the /v1/cluster/ routes,
// which check the token themselves); anything else — parting a node,
// changing settings, reading conflicts with their row data — must come
// from this host or carry the group's token.
func localOnly(next http.Handler, authorized func(*http.Request) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		host, _, _ := net.SplitHostPort(r.RemoteAddr)
		open := r.Method == http.MethodGet && (r.URL.Path == "/v1/status" || r.URL.Path == "/status" ||
			r.URL.Path == "/health" || r.URL.Path == "/metrics")
		if isLoopback(host) || open || strings.HasPrefix(r.URL.Path, "/v1/cluster/") {
			next.ServeHTTP(w, r)
			return
		}
		if err := authorized(r); err != nil {
			writeErr(w, http.StatusForbidden, &api.Error{Status: http.StatusForbidden,
				Message: fmt.Sprintf("%s %s from another host needs the group's token: run the command on the node itself, or set PGMESH_TOKEN", r.Method, r.URL.Path)})
			return
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

func writeErr(w http.ResponseWriter, code int, err error) {
	var ae *api.Error
	if errors.As(err, &ae) {
		code = ae.Status
	}
	writeJSON(w, code, api.ErrorBody{Error: err.Error()})
}

// withStatus gives err the HTTP status code, unless it carries one.
func withStatus(code int, err error) error {
	if _, ok := errors.AsType[*api.Error](err); ok {
		return err
	}
	return &api.Error{Status: code, Message: err.Error()}
}

// post adapts fn to a route whose request is a JSON body: the handler
// decodes it, calls fn, and answers ok with what fn returns, or the error
// with its own status (an *api.Error) or failed. Handlers stay this thin:
// the work is in fn, where it can be called and tested without HTTP.
func post[Req, Resp any](ok, failed int, fn func(context.Context, Req) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req Req
		if err := readJSON(r, &req); err != nil {
			writeErr(w, 0, err)
			return
		}
		resp, err := fn(r.Context(), req)
		if err != nil {
			writeErr(w, failed, err)
			return
		}
		writeJSON(w, ok, resp)
	}
}

// noAnswer adapts fn, which answers nothing but its error, to post.
func noAnswer[Req any](fn func(context.Context, Req) error) func(context.Context, Req) (struct{}, error) {
	return func(ctx context.Context, req Req) (struct{}, error) { return struct{}{}, fn(ctx, req) }
}

// get adapts fn to a route that reads nothing but the request's context;
// an error without its own status answers 500.
func get[Resp any](fn func(context.Context) (Resp, error)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		resp, err := fn(r.Context())
		if err != nil {
			writeErr(w, http.StatusInternalServerError, err)
			return
		}
		writeJSON(w, http.StatusOK, resp)
	}
}

func readJSON(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return &api.Error{Status: http.StatusBadRequest, Message: "malformed request: " + err.Error()}
	}
	return nil
}

// Status assembles this node's view of the group.
func (d *Daemon) Status() api.StatusReport {
	g, _ := d.store.Group()
	rep := api.StatusReport{Node: d.cfg.NodeName, State: "not in a group", RaftState: d.store.RaftState(),
		RaftLeader: d.store.Leader(), Nodes: []*api.Node{}, Peers: d.reconciler.streams.statuses()}
	if g != nil {
		rep.Group = g.Name
		rep.Nodes = api.NodesOf(g.Sorted())
		if me := g.Nodes[d.cfg.NodeName]; me != nil {
			rep.State = string(me.State)
		}
	}
	rep.Join = d.join.snapshot()
	rep.Problems = d.problems.all()
	rep.Slots = d.slots.found.get()
	rep.Standbys = d.standbys.last.get()
	rep.Promotion = d.promotion.status()
	rep.LocalTables, rep.RepsetsPublished = d.reconciler.publications.taken()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	var err error
	if rep.Parked, err = d.parked(ctx); err != nil {
		rep.Problems = append(rep.Problems, err.Error())
	}
	for _, p := range rep.Peers {
		if p.LastError != "" {
			rep.Problems = append(rep.Problems, fmt.Sprintf("stream from %s: %s", p.Peer, p.LastError))
		}
	}
	return rep
}

func (d *Daemon) handleStatus(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, d.Status())
}

func (d *Daemon) handleConflicts(w http.ResponseWriter, r *http.Request) {
	limit := 50
	if s := r.URL.Query().Get("limit"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			writeErr(w, http.StatusBadRequest, fmt.Errorf("limit %q is not a positive number", s))
			return
		}
		limit = n
	}
	out, err := d.conflicts(r.Context(), r.URL.Query().Get("table"), r.URL.Query().Get("type"), limit)
	if err != nil {
		writeErr(w, http.StatusInternalServerError, fmt.Errorf("read pgmesh.conflict_history: %w", err))
		return
	}
	writeJSON(w, http.StatusOK, out)
}

// conflicts reads the newest limit rows of pgmesh.conflict_history, of one
// table and one conflict type when they are given.
func (d *Daemon) conflicts(ctx context.Context, table, typ string, limit int) ([]api.Conflict, error) {
	rows, err := d.db.Query(ctx, `SELECT id, occurred_at, local_node, origin_node, relation,
		conflict_type, resolution, key_tuple, local_tuple, remote_tuple, applied_tuple,
		local_commit_ts, local_origin, remote_commit_ts, remote_commit_lsn::text, remote_xid, reason
		FROM pgmesh.conflict_history
		WHERE ($1 = '' OR relation = $1 OR relation = 'public.' || $1) AND ($2 = '' OR conflict_type = $2)
		ORDER BY id DESC LIMIT $3`, table, typ, limit)
	if err != nil {
		return nil, err
	}
	return pgx.CollectRows(rows, func(row pgx.CollectableRow) (api.Conflict, error) {
		var c api.Conflict
		err := row.Scan(&c.ID, &c.OccurredAt, &c.LocalNode, &c.OriginNode, &c.Relation, &c.Type, &c.Resolution,
			&c.KeyTuple, &c.LocalTuple, &c.RemoteTuple, &c.AppliedTuple, &c.LocalCommitTS, &c.LocalOrigin,
			&c.RemoteCommitTS, &c.RemoteLSN, &c.RemoteXID, &c.Reason)
		return c, err
	})
}
