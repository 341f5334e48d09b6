package balancer_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/leastload/balancer"
)

// dispatcher is what the benchmarks compare: the balancer and the naive
// pools a user might write instead.
type dispatcher interface {
	Do(ctx context.Context, req int) (int, error)
	Close() error
}

// newDispatcher builds the named dispatcher with workers workers, worker i
// running fn(i). depth is the per-worker queue capacity where the
// dispatcher has one.
func newDispatcher(b *testing.B, name string, workers, depth int, fn func(i int) balancer.Func[int, int]) dispatcher {
	return newDispatcherOf(b, name, workers, 1, depth, fn)
}

// newDispatcherOf is newDispatcher with workers of the given concurrency;
// the baselines get that many goroutines per worker queue.
func newDispatcherOf(b *testing.B, name string, workers, concurrency, depth int, fn func(i int) balancer.Func[int, int]) dispatcher {
	b.Helper()
	switch name {
	case "balancer", "estimate":
		opts := []balancer.Option{balancer.WithQueueDepth(depth), balancer.WithConcurrency(concurrency)}
		if name == "estimate" {
			opts = append(opts, balancer.WithLoadEstimate())
		}
		d, err := balancer.New(0, fn(0), opts...)
		if err != nil {
			b.Fatal(err)
		}
		for i := range workers {
			if _, err := d.AddWorker(fn(i)); err != nil {
				b.Fatal(err)
			}
		}
		return d
	case "shared":
		return newSharedPool(workers, concurrency, fn)
	case "roundrobin":
		return newQueuePool(workers, concurrency, depth, fn, func(p *queuePool) int {
			return int(p.next.Add(1) % uint64(len(p.queues)))
		})
	case "random":
		return newQueuePool(workers, concurrency, depth, fn, func(p *queuePool) int {
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

// newSharedPool starts concurrency goroutines running fn(i) for each
// worker i.
func newSharedPool(workers, concurrency int, fn func(i int) balancer.Func[int, int]) *sharedPool {
	p := &sharedPool{jobs: make(chan job)}
	for i := range workers * concurrency {
		f := fn(i / concurrency)
		p.wg.Go(func() {
			for j := range p.jobs {
				v, err := f(j.ctx, j.req)
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

// newQueuePool gives worker i a queue of concurrency × depth jobs served
// by concurrency goroutines running fn(i).
func newQueuePool(workers, concurrency, depth int, fn func(i int) balancer.Func[int, int], pick func(*queuePool) int) *queuePool {
	p := &queuePool{queues: make([]chan job, workers), pick: pick}
	for i := range p.queues {
		q := make(chan job, concurrency*depth)
		p.queues[i] = q
		f := fn(i)
		for range concurrency {
			p.wg.Go(func() {
				for j := range q {
					v, err := f(j.ctx, j.req)
					j.reply <- jobResult{v, err}
				}
			})
		}
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

func allTrivial(int) balancer.Func[int, int] { return trivial }

// BenchmarkDo measures the cost of one request with a trivial Func: the
// dispatch overhead. callers goroutines share b.N requests. The
// "workers=1,concurrency=8" rows run one worker of concurrency 8, to compare with
// eight workers of concurrency 1.
func BenchmarkDo(b *testing.B) {
	for _, callers := range []int{1, 8, 64} {
		b.Run(fmt.Sprintf("balancer/workers=1,concurrency=8/depth=1/callers=%d", callers), func(b *testing.B) {
			d := newDispatcherOf(b, "balancer", 1, 8, 1, allTrivial)
			defer d.Close()
			benchCallers(b, d, callers)
		})
	}
	for _, workers := range []int{8, 4096} {
		for _, depth := range []int{balancer.DefaultQueueDepth, 4} {
			for _, callers := range []int{1, 8, 64} {
				for _, name := range []string{"balancer", "shared", "roundrobin", "random"} {
					if name == "shared" && depth != 1 {
						continue // it has no per-worker queue
					}
					b.Run(fmt.Sprintf("%s/workers=%d/depth=%d/callers=%d", name, workers, depth, callers), func(b *testing.B) {
						d := newDispatcher(b, name, workers, depth, allTrivial)
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
	start := make(chan struct{}) // the callers start together, after the timer is reset
	for range callers {
		wg.Go(func() {
			<-start
			for left.Add(-1) >= 0 {
				if _, err := d.Do(ctx, 1); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.ResetTimer()
	close(start)
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

// BenchmarkBalance measures balance quality: the latency that callers see
// when requests arrive on their own schedule (open loop, Poisson arrivals)
// at 70 % and 90 % of the workers' capacity. Service times are whole
// milliseconds (time.Sleep is about that coarse here), geometric with mean
// 2 ms. "even" is eight equal workers; "slow" makes two of them 4x
// slower; "cap4" is four workers of concurrency 4 (sixteen slots), one of
// them 4x slower, where the baselines get four goroutines per worker.
// "estimate" is the balancer with WithLoadEstimate. One op is one
// experiment of balanceRequests requests; latency is from the scheduled
// arrival to the result, reported as p50, p99 and p99.9 in ms. Run with
// -benchtime=1x.
func BenchmarkBalance(b *testing.B) {
	dispatchers := []struct {
		name  string
		depth int
	}{
		{"balancer", balancer.DefaultQueueDepth}, {"balancer", 2},
		{"estimate", 1}, {"estimate", 4},
		{"shared", 1}, {"roundrobin", 1}, {"random", 1},
	}
	for _, f := range fleets {
		for _, load := range []float64{0.7, 0.9} {
			for _, d := range dispatchers {
				b.Run(fmt.Sprintf("workers=%s/load=%.1f/%s/depth=%d", f.name, load, d.name, d.depth), func(b *testing.B) {
					var lat []time.Duration
					for range b.N {
						lat = append(lat, openLoop(b, d.name, d.depth, f, load)...)
					}
					slices.Sort(lat)
					for _, q := range []struct {
						unit string
						p    float64
					}{{"p50-ms", 0.5}, {"p99-ms", 0.99}, {"p99.9-ms", 0.999}} {
						b.ReportMetric(float64(lat[int(q.p*float64(len(lat)-1))])/1e6, q.unit)
					}
				})
			}
		}
	}
}

// fleet describes the workers of a balance experiment: the last slow of
// them take factor times as long.
type fleet struct {
	name                 string
	workers, concurrency int
	slow, factor         int
}

var fleets = []fleet{
	{name: "even", workers: 8, concurrency: 1},
	{name: "slow", workers: 8, concurrency: 1, slow: 2, factor: 4},
	{name: "cap4", workers: 4, concurrency: 4, slow: 1, factor: 4},
}

func (f fleet) slowdown(i int) int {
	if i >= f.workers-f.slow {
		return f.factor
	}
	return 1
}

const (
	balanceRequests = 2000
	meanService     = 2 * time.Millisecond
)

// openLoop runs one open-loop experiment and returns each request's latency.
func openLoop(b *testing.B, name string, depth int, f fleet, load float64) []time.Duration {
	sleeper := func(i int) balancer.Func[int, int] {
		return func(ctx context.Context, ms int) (int, error) {
			time.Sleep(time.Duration(ms*f.slowdown(i)) * time.Millisecond)
			return ms, nil
		}
	}
	var capacity float64 // requests per second
	for i := range f.workers {
		capacity += float64(f.concurrency) / (meanService.Seconds()*float64(f.slowdown(i)) + sleepOvershoot().Seconds())
	}
	rate := load * capacity

	d := newDispatcherOf(b, name, f.workers, f.concurrency, depth, sleeper)
	defer d.Close()
	rng := rand.New(rand.NewPCG(1, 2)) // the same arrivals and service times for every dispatcher
	lat := make([]time.Duration, balanceRequests)
	var wg sync.WaitGroup
	start := time.Now()
	var at float64 // seconds after start
	for i := range lat {
		at += rng.ExpFloat64() / rate
		ms := 1
		for rng.IntN(2) == 0 { // geometric, p = 1/2: mean 2
			ms++
		}
		due := start.Add(time.Duration(at * float64(time.Second)))
		time.Sleep(time.Until(due))
		wg.Go(func() {
			if _, err := d.Do(context.Background(), ms); err != nil {
				b.Error(err)
			}
			lat[i] = time.Since(due)
		})
	}
	wg.Wait()
	return lat
}

// sleepOvershoot is how much longer than asked time.Sleep takes on this
// machine (about 0.1 ms here). The offered load counts it as service time,
// so that "0.9" is 90 % of what the workers can really serve.
var sleepOvershoot = sync.OnceValue(func() time.Duration {
	const n = 50
	start := time.Now()
	for range n {
		time.Sleep(time.Millisecond)
	}
	return max(time.Since(start)/n-time.Millisecond, 0)
})
