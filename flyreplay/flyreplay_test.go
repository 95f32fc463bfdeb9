package flyreplay

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgconn"
)

func TestReplayOnWrongHome(t *testing.T) {
	c := Config{Region: "syd", Regions: map[string]string{"tokyo": "nrt"}, ReadOnlyRegion: "iad"}
	cases := []struct {
		err        error
		wantCode   int
		wantReplay string
	}{
		{&pgconn.PgError{Code: WrongHome, Detail: "tokyo"}, 409, "region=nrt"},
		{fmt.Errorf("insert order: %w", &pgconn.PgError{Code: WrongHome, Detail: "dallas"}), 409, "region=dallas"},
		{&pgconn.PgError{Code: ReadOnly}, 409, "region=iad"},
		{&pgconn.PgError{Code: "23505"}, 500, ""},
		{errors.New("boom"), 500, ""},
		{&pgconn.PgError{Code: WrongHome, Detail: "syd"}, 500, ""}, // already home: do not loop
	}
	for _, tc := range cases {
		h := c.Wrap(func(w http.ResponseWriter, r *http.Request) error { return tc.err })
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders", nil))
		if rec.Code != tc.wantCode || rec.Header().Get("fly-replay") != tc.wantReplay {
			t.Errorf("%v: got %d %q, want %d %q", tc.err, rec.Code, rec.Header().Get("fly-replay"), tc.wantCode, tc.wantReplay)
		}
	}
}

func TestReplayWindowCookie(t *testing.T) {
	write := Config{Region: "syd", ReplayWindow: 5 * time.Second}.Wrap(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusCreated)
		return nil
	})
	rec := httptest.NewRecorder()
	write.ServeHTTP(rec, httptest.NewRequest(http.MethodPost, "/orders", nil))
	cookies := rec.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Value != "syd" || cookies[0].MaxAge != 5 {
		t.Fatalf("write set cookies %v, want pgmesh-region=syd for 5s", cookies)
	}
	// The next request lands in Tokyo: it is replayed to Sydney.
	read := Config{Region: "nrt"}.Wrap(func(w http.ResponseWriter, r *http.Request) error {
		t.Fatal("the handler ran in the wrong region")
		return nil
	})
	req := httptest.NewRequest(http.MethodGet, "/orders", nil)
	req.AddCookie(cookies[0])
	rec = httptest.NewRecorder()
	read.ServeHTTP(rec, req)
	if rec.Code != 409 || rec.Header().Get("fly-replay") != "region=syd" {
		t.Fatalf("read after write: %d %q", rec.Code, rec.Header().Get("fly-replay"))
	}
	// A GET sets no cookie.
	rec = httptest.NewRecorder()
	Config{Region: "syd", ReplayWindow: time.Second}.Wrap(func(w http.ResponseWriter, r *http.Request) error {
		_, err := w.Write([]byte("ok"))
		return err
	}).ServeHTTP(rec, httptest.NewRequest(http.MethodGet, "/", nil))
	if len(rec.Result().Cookies()) != 0 {
		t.Fatal("a read set the replay cookie")
	}
}
