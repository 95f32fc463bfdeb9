// Package flyreplay is HTTP middleware for applications that run one
// instance per region next to a pgmesh node, behind a proxy that can replay
// a request in another region (Fly.io's fly-replay response header).
//
// A handler returns its error instead of writing a response. When the error
// is pgmesh's home-region error (SQLSTATE PM001: the row belongs to another
// node) the middleware answers 409 with `fly-replay: region=<home>`, so the
// proxy runs the request again where the row may be written; a read-only
// error (SQLSTATE 25006, e.g. a node still joining) is replayed to a
// fallback region. Any other error goes to OnError.
//
// With a replay window set, a successful write also sets a short-lived
// cookie naming this region: the same user's next requests that land in
// another region are replayed here until the window ends, so they read
// their own writes while the other regions catch up.
package flyreplay

import (
	"errors"
	"net/http"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

// SQLStates the middleware recognises.
const (
	// WrongHome is raised by pgmesh when a row is written on a node other
	// than its home; the error's Detail is the home node's name.
	WrongHome = "PM001"
	// ReadOnly is PostgreSQL's read_only_sql_transaction.
	ReadOnly = "25006"
)

// Config sets up the middleware.
type Config struct {
	// Region is the platform region this instance runs in (e.g. FLY_REGION).
	Region string
	// Regions maps pgmesh node names to platform regions; a node missing
	// here is taken to be named like its region.
	Regions map[string]string
	// ReadOnlyRegion is where requests that hit a read-only database are
	// replayed; empty: such errors go to OnError.
	ReadOnlyRegion string
	// ReplayWindow, when set, keeps a user's requests in the region of
	// their last write for this long (a cookie).
	ReplayWindow time.Duration
	// CookieName names that cookie (default "pgmesh-region").
	CookieName string
	// OnError answers other errors (default: 500 Internal Server Error).
	OnError func(w http.ResponseWriter, r *http.Request, err error)
}

// HandlerFunc is an HTTP handler that reports failure by returning an error
// (and must not have written the response when it does).
type HandlerFunc func(w http.ResponseWriter, r *http.Request) error

// Wrap returns h as an http.Handler with replay handling.
func (c Config) Wrap(h HandlerFunc) http.Handler {
	cookie := c.CookieName
	if cookie == "" {
		cookie = "pgmesh-region"
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if ck, err := r.Cookie(cookie); err == nil && ck.Value != "" && ck.Value != c.Region {
			// This user wrote in another region moments ago.
			Replay(w, ck.Value)
			return
		}
		err := h(&writeTracker{ResponseWriter: w, onWrite: func() {
			if c.ReplayWindow > 0 && isWrite(r) {
				http.SetCookie(w, &http.Cookie{Name: cookie, Value: c.Region, Path: "/",
					MaxAge: int(c.ReplayWindow.Seconds()), HttpOnly: true, SameSite: http.SameSiteLaxMode})
			}
		}}, r)
		if err == nil {
			return
		}
		if region, ok := c.ReplayRegion(err); ok && region != c.Region {
			Replay(w, region)
			return
		}
		if c.OnError != nil {
			c.OnError(w, r, err)
			return
		}
		http.Error(w, "internal server error", http.StatusInternalServerError)
	})
}

// ReplayRegion reports the region err asks the request to be replayed in.
func (c Config) ReplayRegion(err error) (string, bool) {
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return "", false
	}
	switch pe.Code {
	case WrongHome:
		if pe.Detail == "" {
			return "", false
		}
		if region, ok := c.Regions[pe.Detail]; ok {
			return region, true
		}
		return pe.Detail, true
	case ReadOnly:
		return c.ReadOnlyRegion, c.ReadOnlyRegion != ""
	}
	return "", false
}

// Replay answers 409 and asks the proxy to run the request in region.
func Replay(w http.ResponseWriter, region string) {
	w.Header().Set("fly-replay", "region="+region)
	w.WriteHeader(http.StatusConflict)
}

func isWrite(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions:
		return false
	}
	return true
}

// writeTracker sets the replay cookie just before a successful response's
// headers go out.
type writeTracker struct {
	http.ResponseWriter
	onWrite func()
	done    bool
}

func (t *writeTracker) WriteHeader(code int) {
	if !t.done {
		t.done = true
		if code < 400 {
			t.onWrite()
		}
	}
	t.ResponseWriter.WriteHeader(code)
}

func (t *writeTracker) Write(b []byte) (int, error) {
	if !t.done {
		t.WriteHeader(http.StatusOK)
	}
	return t.ResponseWriter.Write(b)
}
