package balancer

import (
	"context"
	"sync/atomic"
)

// FanIn merges chans into one channel. It forwards every value from every
// input and closes the output once all inputs are closed, at once if there
// are none; nil inputs are ignored. When ctx ends it stops forwarding,
// closes the output and its goroutines exit, so a consumer that stops
// reading should cancel ctx. Values from one input keep their order; values
// from different inputs interleave in no set order.
//
// FanIn starts one goroutine per input; each ends when its input closes or
// ctx ends. Like the standard library's context functions, FanIn panics if
// ctx is nil.
func FanIn[T any](ctx context.Context, chans ...<-chan T) <-chan T {
	if ctx == nil {
		panic("balancer: FanIn called with a nil Context")
	}
	out := make(chan T)
	var open atomic.Int64
	for _, c := range chans {
		if c != nil {
			open.Add(1)
		}
	}
	if open.Load() == 0 {
		close(out)
		return out
	}
	for _, c := range chans {
		if c != nil {
			go forward(ctx, c, out, &open)
		}
	}
	return out
}

// forward copies in to out until in closes or ctx ends. The last forwarder
// to stop closes out: the senders, not the receiver, close it.
func forward[T any](ctx context.Context, in <-chan T, out chan<- T, open *atomic.Int64) {
	defer func() {
		if open.Add(-1) == 0 {
			close(out)
		}
	}()
	for {
		select {
		case v, ok := <-in:
			if !ok {
				return
			}
			select {
			case out <- v:
			case <-ctx.Done():
				return
			}
		case <-ctx.Done():
			return
		}
	}
}
