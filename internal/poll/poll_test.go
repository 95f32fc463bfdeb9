package poll

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestUntil(t *testing.T) {
	ctx := context.Background()
	n := 0
	if err := Until(ctx, time.Millisecond, time.Second, func() error {
		if n++; n < 3 {
			return errors.New("not yet")
		}
		return nil
	}); err != nil || n != 3 {
		t.Fatalf("done on the third check: err %v after %d checks", err, n)
	}
	notYet := errors.New("not yet")
	if err := Until(ctx, time.Millisecond, 20*time.Millisecond, func() error { return notYet }); err != notYet {
		t.Fatalf("timeout returns the last error, got %v", err)
	}
	fatal := errors.New("fatal")
	n = 0
	if err := Until(ctx, time.Millisecond, time.Second, func() error { n++; return Stop(fatal) }); err != fatal || n != 1 {
		t.Fatalf("Stop ends at once: %v after %d checks", err, n)
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := Until(cctx, time.Hour, time.Hour, func() error { return notYet }); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled context ends the wait, got %v", err)
	}
}
