// Package poll waits for a condition by checking it again and again, with
// a deadline and a context: the one loop pgmesh's waits share.
package poll

import (
	"context"
	"errors"
	"time"
)

// stop marks an error that ends the wait at once.
type stop struct{ err error }

func (s stop) Error() string { return s.err.Error() }
func (s stop) Unwrap() error { return s.err }

// Stop wraps err so that Until returns it at once instead of checking again.
func Stop(err error) error { return stop{err} }

// Until checks cond every interval until it returns nil, and then returns
// nil. It gives up when timeout has passed, returning cond's last error, or
// when ctx ends, returning ctx's error; an error made with Stop ends it at
// once and is returned unwrapped. cond always runs at least once.
func Until(ctx context.Context, every, timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	t := time.NewTimer(0)
	defer t.Stop()
	for {
		err := cond()
		var s stop
		switch {
		case err == nil:
			return nil
		case errors.As(err, &s):
			return s.err
		case !time.Now().Before(deadline):
			return err
		}
		t.Reset(every)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-t.C:
		}
	}
}
