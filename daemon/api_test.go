package daemon

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
)

func TestLocalOnly(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusNoContent) })
	h := localOnly(ok, func(r *http.Request) error {
		if r.Header.Get("Authorization") == "Bearer good" {
			return nil
		}
		return errors.New("refused")
	})
	for _, c := range []struct {
		method, path, remote, token string
		want                        int
	}{
		{"POST", "/v1/node/part", "127.0.0.1:5000", "", http.StatusNoContent},
		{"POST", "/v1/node/part", "[::1]:5000", "", http.StatusNoContent},
		{"POST", "/v1/node/part", "10.1.2.3:5000", "", http.StatusForbidden},
		{"POST", "/v1/node/part", "10.1.2.3:5000", "good", http.StatusNoContent},
		{"GET", "/v1/conflicts", "10.1.2.3:5000", "", http.StatusForbidden},
		{"GET", "/v1/status", "10.1.2.3:5000", "", http.StatusNoContent},
		{"GET", "/health", "10.1.2.3:5000", "", http.StatusNoContent},
		{"GET", "/metrics", "10.1.2.3:5000", "", http.StatusNoContent},
		{"POST", "/v1/cluster/join", "10.1.2.3:5000", "", http.StatusNoContent}, // checks the token itself
	} {
		r := httptest.NewRequest(c.method, c.path, nil)
		r.RemoteAddr = c.remote
		if c.token != "" {
			r.Header.Set("Authorization", "Bearer "+c.token)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		if w.Code != c.want {
			t.Errorf("%s %s from %s (token %q): %d, want %d", c.method, c.path, c.remote, c.token, w.Code, c.want)
		}
	}
}

func TestAllowsPlugin(t *testing.T) {
	cases := []struct {
		setting string
		want    bool
	}{
		{"pgoutput, test_decoding", true},
		{"test_decoding,pgoutput", true},
		{`"pgoutput"`, true},
		{"test_decoding", false},
		{"", false},
		{"pgoutput_extra", false},
		{"$libdir/pgoutput", true},
	}
	for _, c := range cases {
		if got := allowsPlugin(c.setting, "pgoutput"); got != c.want {
			t.Errorf("allowsPlugin(%q) = %v, want %v", c.setting, got, c.want)
		}
	}
}
