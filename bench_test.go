package balancer_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/leastload/balancer"
)

// dispatcher is what the benchmarks compare: the balancer and the naive
// pools a user might write instead.
type dispatcher interface {
	Do(ctx context.Context, req int) (int, error)
	Close() error
}

// newDispatcher builds the named dispatcher with workers workers running fn.
// depth is the per-worker queue capacity where the dispatcher has one.
func newDispatcher(b *testing.B, name string, workers, depth int, fn balancer.Func[int, int]) dispatcher {
	b.Helper()
	switch name {
	case "balancer":
		d, err := balancer.New(workers, fn, balancer.WithQueueDepth(depth))
		if err != nil {
			b.Fatal(err)
		}
		return d
	case "shared":
		return newSharedPool(workers, fn)
	case "roundrobin":
		return newQueuePool(workers, depth, fn, func(p *queuePool) int {
			return int(p.next.Add(1) % uint64(len(p.queues)))
		})
	case "random":
		return newQueuePool(workers, depth, fn, func(p *queuePool) int {
			return rand.IntN(len(p.queues))
		})
	}
	b.Fatalf("unknown dispatcher %q", name)
	return nil
}

// job is a request to a baseline pool; reply has capacity 1.
type job struct {
	ctx   context.Context
	req   int
	reply chan jobResult
}

type jobResult struct {
	v   int
	err error
}

var replies = sync.Pool{New: func() any { return make(chan jobResult, 1) }}

// sharedPool is the usual Go worker pool: N goroutines reading one channel.
type sharedPool struct {
	jobs chan job
	wg   sync.WaitGroup
}

func newSharedPool(workers int, fn balancer.Func[int, int]) *sharedPool {
	p := &sharedPool{jobs: make(chan job)}
	for range workers {
		p.wg.Go(func() {
			for j := range p.jobs {
				v, err := fn(j.ctx, j.req)
				j.reply <- jobResult{v, err}
			}
		})
	}
	return p
}

func (p *sharedPool) Do(ctx context.Context, req int) (int, error) {
	reply := replies.Get().(chan jobResult)
	p.jobs <- job{ctx, req, reply}
	r := <-reply
	replies.Put(reply)
	return r.v, r.err
}

func (p *sharedPool) Close() error {
	close(p.jobs)
	p.wg.Wait()
	return nil
}

// queuePool gives each worker its own queue and lets pick choose one,
// blind to load: round-robin or random.
type queuePool struct {
	queues []chan job
	next   atomic.Uint64
	pick   func(*queuePool) int
	wg     sync.WaitGroup
}

func newQueuePool(workers, depth int, fn balancer.Func[int, int], pick func(*queuePool) int) *queuePool {
	p := &queuePool{queues: make([]chan job, workers), pick: pick}
	for i := range p.queues {
		q := make(chan job, depth)
		p.queues[i] = q
		p.wg.Go(func() {
			for j := range q {
				v, err := fn(j.ctx, j.req)
				j.reply <- jobResult{v, err}
			}
		})
	}
	return p
}

func (p *queuePool) Do(ctx context.Context, req int) (int, error) {
	reply := replies.Get().(chan jobResult)
	p.queues[p.pick(p)] <- job{ctx, req, reply}
	r := <-reply
	replies.Put(reply)
	return r.v, r.err
}

func (p *queuePool) Close() error {
	for _, q := range p.queues {
		close(q)
	}
	p.wg.Wait()
	return nil
}

func trivial(ctx context.Context, x int) (int, error) { return x + 1, nil }

// BenchmarkDo measures the cost of one request with a trivial Func: the
// dispatch overhead. callers goroutines share b.N requests.
func BenchmarkDo(b *testing.B) {
	for _, workers := range []int{8, 4096} {
		for _, depth := range []int{1, balancer.DefaultQueueDepth} {
			for _, callers := range []int{1, 8, 64} {
				for _, name := range []string{"balancer", "shared", "roundrobin", "random"} {
					if name == "shared" && depth != 1 {
						continue // it has no per-worker queue
					}
					b.Run(fmt.Sprintf("%s/workers=%d/depth=%d/callers=%d", name, workers, depth, callers), func(b *testing.B) {
						d := newDispatcher(b, name, workers, depth, trivial)
						defer d.Close()
						benchCallers(b, d, callers)
					})
				}
			}
		}
	}
}

// benchCallers runs b.N requests through d from callers goroutines.
func benchCallers(b *testing.B, d dispatcher, callers int) {
	b.ReportAllocs()
	ctx := context.Background()
	var left atomic.Int64
	left.Store(int64(b.N))
	var wg sync.WaitGroup
	b.ResetTimer()
	for range callers {
		wg.Go(func() {
			for left.Add(-1) >= 0 {
				if _, err := d.Do(ctx, 1); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
}

// BenchmarkSubmit measures Submit plus reading the result, for its
// allocations.
func BenchmarkSubmit(b *testing.B) {
	d, err := balancer.New(8, trivial)
	if err != nil {
		b.Fatal(err)
	}
	defer d.Close()
	b.ReportAllocs()
	ctx := context.Background()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			c, err := d.Submit(ctx, 1)
			if err != nil {
				b.Error(err)
				return
			}
			<-c
		}
	})
}
