// The tests sit inside the package because the layout has one test file
// besides the benchmarks and examples, and the heap's invariants need the
// inside. Every behaviour test uses the exported API only.
package balancer

import (
	"context"
	"errors"
	"fmt"
	"go/ast"
	"go/doc"
	"go/parser"
	"go/token"
	"log/slog"
	"math"
	"math/rand/v2"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"
	"weak"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// gates is a Func whose request i runs until gate i is opened.
type gates struct {
	ch      []chan struct{}
	started chan int // receives i as request i starts, if not nil
}

func newGates(n int) *gates {
	g := &gates{ch: make([]chan struct{}, n)}
	for i := range g.ch {
		g.ch[i] = make(chan struct{})
	}
	return g
}

func (g *gates) fn(ctx context.Context, i int) (int, error) {
	if g.started != nil {
		g.started <- i
	}
	<-g.ch[i]
	return i, nil
}

func (g *gates) open(i int) { close(g.ch[i]) }

func (g *gates) openAll() {
	for i := range g.ch {
		select {
		case <-g.ch[i]:
		default:
			close(g.ch[i])
		}
	}
}

func square(ctx context.Context, x int) (int, error) { return x * x, nil }

// sleeper returns a Func that takes d and returns its request.
func sleeper(d time.Duration) Func[int, int] {
	return func(ctx context.Context, i int) (int, error) {
		time.Sleep(d)
		return i, nil
	}
}

// gated returns a Func that counts its runs in ran and returns its
// request once release is closed.
func gated(ran *atomic.Int64, release <-chan struct{}) Func[int, int] {
	return func(ctx context.Context, i int) (int, error) {
		ran.Add(1)
		<-release
		return i, nil
	}
}

// submitHeld submits i from a goroutine, since Submit itself waits while
// the request is held back, and returns a channel for its result once
// everything in the bubble has settled. Call it inside synctest.Test.
func submitHeld(t *testing.T, b *Balancer[int, int], i int) <-chan Result[int, int] {
	t.Helper()
	c := make(chan Result[int, int], 1)
	go func() {
		r, err := b.Submit(context.Background(), i)
		if assert.NoError(t, err) {
			c <- <-r
		}
	}()
	synctest.Wait()
	return c
}

// doHeld is submitHeld for Do, whose requests wait in the queue rather
// than in a hand-off.
func doHeld(t *testing.T, b *Balancer[int, int], i int) <-chan Result[int, int] {
	t.Helper()
	c := make(chan Result[int, int], 1)
	go func() {
		v, err := b.Do(context.Background(), i)
		c <- Result[int, int]{Req: i, Value: v, Err: err}
	}()
	synctest.Wait()
	return c
}

// must returns v, and panics if err is not nil: for calls that cannot fail
// in the test.
func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

func mustNew(t *testing.T, workers int, fn Func[int, int], opts ...Option) *Balancer[int, int] {
	t.Helper()
	b, err := New(workers, fn, opts...)
	require.NoError(t, err)
	return b
}

// pendings lists each worker's pending count in ID order.
func pendings(b *Balancer[int, int]) []int {
	var p []int
	for _, w := range b.Stats().Workers {
		p = append(p, w.Pending)
	}
	return p
}

// 1. Least-pending dispatch, ties to the worker that waited longest.
func TestDispatchGoesToLeastPending(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(7)
		b := mustNew(t, 3, g.fn, WithQueueDepth(4), WithLoadEstimate(false))
		defer b.Close()
		results := make([]<-chan Result[int, int], 7)
		submit := func(i int, want []int) {
			t.Helper()
			var err error
			results[i], err = b.Submit(context.Background(), i)
			require.NoError(t, err)
			synctest.Wait()
			assert.Equal(t, want, pendings(b), "pending per worker after request %d", i)
		}
		submit(0, []int{1, 0, 0})
		submit(1, []int{1, 1, 0})
		submit(2, []int{1, 1, 1})
		submit(3, []int{2, 1, 1})
		submit(4, []int{2, 2, 1})
		submit(5, []int{2, 2, 2})
		g.open(1) // worker 1 runs 1, then 4
		g.open(4)
		synctest.Wait()
		assert.Equal(t, []int{2, 0, 2}, pendings(b), "after worker 1 drained")
		submit(6, []int{2, 1, 2})
		g.openAll()
		for i, want := range []int{0, 1, 2, 0, 1, 2, 1} {
			assert.Equal(t, want, (<-results[i]).Worker, "worker of request %d", i)
		}
	})
}

func TestLightLoadSpreadsOverAllWorkers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 4, square)
		defer b.Close()
		var got []int
		for i := range 8 {
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			got = append(got, (<-c).Worker)
			synctest.Wait() // the loop has taken the completion
		}
		assert.Equal(t, []int{0, 1, 2, 3, 0, 1, 2, 3}, got)
	})
}

// Estimates that stay true (the load estimate, at the defaults).

// Equal workers compare equal: sequential requests to four workers whose
// Func takes 1 ms ± 5 % spread over all four, although their moving
// averages differ by the noise.
func TestEqualWorkersShareLightLoad(t *testing.T) {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	synctest.Test(t, func(t *testing.T) {
		rng := rand.New(rand.NewPCG(seed, 1))
		var mu sync.Mutex
		jitter := func() time.Duration {
			mu.Lock()
			defer mu.Unlock()
			return time.Duration(float64(time.Millisecond) * (0.95 + 0.1*rng.Float64()))
		}
		b := mustNew(t, 4, func(ctx context.Context, i int) (int, error) {
			time.Sleep(jitter())
			return i, nil
		})
		defer b.Close()
		const requests = 400
		got := make([]int, 4)
		for i := range requests {
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			got[(<-c).Worker]++
		}
		t.Logf("requests per worker: %v", got)
		for id, n := range got {
			assert.True(t, n >= requests/5 && n <= requests*3/10, "worker %d ran %d of %d", id, n, requests)
		}
	})
}

// With no observation yet, dispatch is the count rule exactly, weights
// included, however long the first requests have been running.
func TestColdStartIsLeastPending(t *testing.T) {
	for _, tt := range []struct {
		name    string
		weights []float64
		want    []int
	}{
		{"equal", []float64{1, 1, 1, 1}, []int{2, 2, 2, 2}},
		{"weighted", []float64{1, 1, 2}, []int{2, 2, 4}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				release := make(chan struct{})
				var specs []WorkerSpec[int, int]
				for _, w := range tt.weights {
					specs = append(specs, WorkerSpec[int, int]{
						Func:    func(ctx context.Context, i int) (int, error) { <-release; return i, nil },
						Options: []WorkerOption{WithWeight(w)},
					})
				}
				b, err := NewFrom(specs, WithQueueDepth(4))
				require.NoError(t, err)
				defer b.Close()
				var cs []<-chan Result[int, int]
				for i := range 8 {
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					cs = append(cs, c)
					time.Sleep(time.Millisecond) // the requests running grow older
				}
				assert.Equal(t, tt.want, pendings(b))
				close(release)
				for _, c := range cs {
					assert.NoError(t, (<-c).Err)
				}
			})
		})
	}
}

// One slow first call does not exile a worker: four workers of 2 ms, and
// worker 3's first call takes 10 ms; of 1000 requests through All it runs
// its share.
func TestSlowFirstCallDoesNotExile(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var first atomic.Bool
		first.Store(true)
		spec := WorkerSpec[int, int]{Func: sleeper(2 * time.Millisecond)}
		slow := WorkerSpec[int, int]{Func: func(ctx context.Context, i int) (int, error) {
			d := 2 * time.Millisecond
			if first.CompareAndSwap(true, false) {
				d = 10 * time.Millisecond
			}
			time.Sleep(d)
			return i, nil
		}}
		b, err := NewFrom([]WorkerSpec[int, int]{spec, spec, spec, slow})
		require.NoError(t, err)
		defer b.Close()
		got := make([]int, 4)
		for _, r := range b.All(context.Background(), slices.Values(make([]int, 1000))) {
			require.NoError(t, r.Err)
			got[r.Worker]++
		}
		t.Logf("requests per worker: %v", got)
		assert.GreaterOrEqual(t, got[3], 200, "worker 3 ran %d of 1000", got[3])
	})
}

// A declared weight is the speed the estimate assumes until it has
// measured: a new worker is expected to serve as its peers do, times its
// weight. Two workers have learnt 8 ms; a third, new, is tried first (it
// has waited longest) at weight 1 or 4, but at weight 1/4 it is expected
// to take 32 ms, and gets no request while the others have room. At
// weight 4 its first run counts 1.5 × 2 ms (see observe), so it still
// looks faster and takes a second request; then it is one of three equal
// workers.
func TestWeightIsThePrior(t *testing.T) {
	for _, tt := range []struct {
		weight float64
		want   []int
	}{
		{1, []int{2, 0, 1, 2}},
		{4, []int{2, 2, 0, 1}},
		{0.25, []int{0, 1, 0, 1}},
	} {
		t.Run(fmt.Sprint(tt.weight), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustNew(t, 2, sleeper(8*time.Millisecond))
				defer b.Close()
				for i := range 4 {
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					<-c
				}
				_, err := b.AddWorker(sleeper(8*time.Millisecond), WithWeight(tt.weight))
				require.NoError(t, err)
				var got []int
				for i := range 4 {
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					got = append(got, (<-c).Worker)
				}
				assert.Equal(t, tt.want, got)
			})
		})
	}
	// Under load the prior decides where a cost alone does: two workers
	// of 8 ms, each with a request running and room for one more, and a
	// new one of weight 4 (2 ms expected: it takes the next request) or
	// 1/4 (32 ms: it does not).
	for _, tt := range []struct {
		weight float64
		new    bool
	}{{4, true}, {0.25, false}} {
		t.Run(fmt.Sprint("busy peers, ", tt.weight), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				release := make(chan struct{})
				fn := func(ctx context.Context, i int) (int, error) {
					if i < 0 {
						<-release
					}
					time.Sleep(8 * time.Millisecond)
					return i, nil
				}
				b := mustNew(t, 2, fn, WithQueueDepth(2))
				defer b.Close()
				for i := range 4 {
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					<-c
				}
				var cs []<-chan Result[int, int]
				for range 2 {
					c, err := b.Submit(context.Background(), -1)
					require.NoError(t, err)
					cs = append(cs, c)
				}
				synctest.Wait()
				require.Equal(t, []int{1, 1}, pendings(b))
				id, err := b.AddWorker(fn, WithWeight(tt.weight))
				require.NoError(t, err)
				c, err := b.Submit(context.Background(), 0)
				require.NoError(t, err)
				cs = append(cs, c)
				synctest.Wait()
				want := []int{2, 1, 0}
				if tt.new {
					want = []int{1, 1, 1}
				}
				assert.Equal(t, want, pendings(b), "worker %d is new", id)
				close(release)
				for _, c := range cs {
					assert.NoError(t, (<-c).Err)
				}
			})
		})
	}
}

// An estimate nobody refreshes expires after the worker's patience: the
// worker then counts as its prior and takes one request, its probe, while
// the old estimate stands for the rest. A probe that lands off the centre
// step doubles the patience; regular runs in line set it back.
func TestEstimatesExpire(t *testing.T) {
	const ms = int64(time.Millisecond)
	h := newHeapHarness(4, true)
	h.fixRef(2 * time.Millisecond)
	w := h.add(1)
	w.observe(20*time.Millisecond, ms)
	h.s.now = ms + staleAfter
	assert.False(t, h.s.stale(w), "at its patience")
	assert.Equal(t, float64(20*ms), h.s.expect(w))
	h.s.now++
	require.True(t, h.s.stale(w), "past its patience")
	assert.Equal(t, float64(2*ms), h.s.expect(w), "expired: the prior")

	h.s.touch(w)
	h.s.dispatch()
	require.True(t, w.probing)
	assert.Equal(t, float64(20*ms), h.s.expect(w), "while the probe runs, the old estimate stands")
	assert.Equal(t, 2*h.s.key(w, float64(20*ms)), h.s.cost(w), "so the worker takes no more than the probe")

	h.s.complete(w) // the probe did not run
	assert.False(t, w.probing)
	assert.Zero(t, w.impatience)
	assert.True(t, h.s.stale(w), "still expired: the next dispatch probes again")

	h.s.dispatch()
	require.True(t, w.probing)
	end := h.s.now
	w.observe(20*time.Millisecond, end) // a new mean: the worker is still slow
	assert.Equal(t, 20*ms, w.service.Load())
	h.s.complete(w)
	assert.Equal(t, 1, w.impatience, "off the centre step: twice as patient")
	h.s.now = end + 2*staleAfter
	assert.False(t, h.s.stale(w))
	h.s.now++
	assert.True(t, h.s.stale(w))

	h.s.dispatch()
	end = h.s.now
	w.observe(2*time.Millisecond, end) // it recovered
	h.s.complete(w)
	assert.Equal(t, 1, w.impatience, "one run in line leaves patience as it was")
	for i := range trustAfter {
		h.s.dispatch()
		w.observe(2*time.Millisecond, end+int64(i+1)*ms)
		h.s.complete(w)
	}
	assert.Zero(t, w.impatience, "trustAfter runs in line in a row set it back")

	for range maxImpatience + 2 { // patience grows to a bound
		h.s.now = w.seen.Load() + staleAfter<<maxImpatience + 1
		h.s.touch(w)
		h.s.dispatch()
		w.observe(20*time.Millisecond, h.s.now)
		h.s.complete(w)
	}
	assert.Equal(t, maxImpatience, w.impatience)

	c4 := h.addWorker(workerOptions{concurrency: 4, weight: 1})
	c4.observe(20*time.Millisecond, ms)
	h.s.now = ms + staleAfter
	assert.False(t, h.s.stale(c4), "four slots: the same patience")
	h.s.now++
	assert.True(t, h.s.stale(c4), "four slots: the same patience")
}

// A probe's own run decides whether the loop grows more patient with its
// worker, not the averages it folded into: a long request of a worker
// that recovered, taken for still slow (see stillSlow), leaves patience as
// it was, so the worker is probed again as soon.
func TestAProbesRunDecidesPatience(t *testing.T) {
	const ms = int64(time.Millisecond)
	for _, tt := range []struct {
		run        time.Duration
		impatience int
	}{
		{4 * time.Millisecond, 0},  // 2× the prior: within two steps of it
		{10 * time.Millisecond, 1}, // 5×
	} {
		h := newHeapHarness(1, true)
		h.fixRef(2 * time.Millisecond)
		h.b.ref.Store(2 * ms) // what the slots read
		w := h.add(1)
		for i := range fallSmoothing + 1 {
			w.observe(20*time.Millisecond, int64(i+1)*ms)
		}
		h.s.now = w.seen.Load() + staleAfter + 1
		h.s.touch(w)
		h.s.dispatch()
		require.True(t, w.probing, "%v", tt.run)
		require.True(t, w.stillSlow(tt.run))
		w.observe(tt.run, h.s.now)
		require.Greater(t, float64(w.service.Load()), bucket*bucket*2*float64(ms), "the averages still say slow")
		h.s.complete(w)
		assert.Equal(t, tt.impatience, w.impatience, "%v", tt.run)
	}
}

// A probe that finds its worker still slow folds into the averages that
// many runs made, for its gap, instead of starting them anew from its one
// run: a short request at a worker 10× slower made it look 3× slower
// (half the run, half the prior), and the hold-back then sent it requests
// whenever the fast workers were busy. A probe on the centre step, or
// after an estimate that was not two steps slow, starts them anew.
func TestAProbeThatFindsTheWorkerStillSlowKeepsItsEstimate(t *testing.T) {
	const ms = int64(time.Millisecond)
	h := newHeapHarness(1, true)
	h.fixRef(2 * time.Millisecond)
	h.b.ref.Store(2 * ms) // what the slots read
	measured := func(d time.Duration) *worker[int, int] {
		w := h.add(1)
		for i := range fallSmoothing + 1 {
			w.observe(d, int64(i+1)*ms)
		}
		require.Equal(t, int64(d), w.service.Load())
		require.Equal(t, int64(d), w.level.Load())
		return w
	}
	gap := staleAfter + 1
	fresh := -math.Expm1(-float64(gap) / float64(decay))

	w := measured(20 * time.Millisecond)
	w.observe(10*time.Millisecond, w.seen.Load()+gap) // 5× the prior: still slow
	want := 20*ms + int64(fresh*float64(-10*ms))
	assert.Equal(t, want, w.service.Load(), "still slow: the run folds in for its gap")
	assert.Equal(t, want, w.level.Load())
	assert.Greater(t, float64(w.level.Load()), bucket*bucket*2*float64(ms), "off the centre step by two steps and more")

	w = measured(20 * time.Millisecond)
	w.observe(4*time.Millisecond, w.seen.Load()+gap) // 2×, off the centre step: a short request, still slow
	want = 20*ms + int64(fresh*float64(-16*ms))
	assert.Equal(t, want, w.service.Load(), "off the centre step: the run folds in")
	assert.Equal(t, want, w.level.Load())

	w = measured(20 * time.Millisecond)
	w.observe(3*time.Millisecond, w.seen.Load()+gap) // 1.5×, on the centre step: it recovered
	assert.Equal(t, 3*ms, w.service.Load(), "a new mean")
	assert.Equal(t, 2*ms+ms/2, w.level.Load(), "halfway to the prior")

	w = measured(4 * time.Millisecond) // off the centre, not two steps
	w.observe(10*time.Millisecond, w.seen.Load()+gap)
	assert.Equal(t, 10*ms, w.service.Load(), "the old estimate did not say slow: a new mean")
	assert.Equal(t, 6*ms, w.level.Load())

	w = measured(20 * time.Millisecond)
	w.observe(10*time.Millisecond, w.seen.Load()+staleAfter) // not expired: folds as ever
	assert.Equal(t, 20*ms+int64(-math.Expm1(-float64(staleAfter)/float64(decay))*float64(-10*ms)), w.service.Load())
}

// The common ground is the lower median of the workers' estimates, each
// as a worker of weight 1 would serve; workers with no run do not count.
func TestReckonTakesTheLowerMedian(t *testing.T) {
	h := newHeapHarness(1, true)
	for _, tt := range []struct {
		d      time.Duration
		weight float64
	}{{4, 1}, {1, 1}, {2, 4}, {0, 1}} {
		w := h.add(tt.weight)
		if tt.d > 0 {
			w.observe(tt.d*time.Millisecond, 0)
		}
	}
	h.s.reckon()
	assert.Equal(t, float64(4*time.Millisecond), h.s.ref, "of 4, 1 and 2 × 4 ms, the lower median")

	// While the estimates are few, every completion that doubles their
	// count reckons, however little time has passed.
	h = newHeapHarness(1, true)
	var want []time.Duration
	var got []time.Duration
	for i, d := range []time.Duration{8, 2, 4, 1} {
		w := h.add(1)
		h.s.dispatch()
		w.observe(d*time.Millisecond, int64(i+1))
		h.s.complete(w)
		got = append(got, time.Duration(h.s.ref))
	}
	want = []time.Duration{8 * time.Millisecond, 2 * time.Millisecond, 2 * time.Millisecond, 2 * time.Millisecond}
	assert.Equal(t, want, got, "after the 1st, 2nd (and 4th) completions")
}

// Workers whose estimates are within the centre step of the median (from
// a step below it to centreTop, 1.84×, above) compare equal and take
// turns; a worker twice as slow does not.
func TestEstimatesWithinAStepCompareEqual(t *testing.T) {
	h := newHeapHarness(1, true)
	h.fixRef(2 * time.Millisecond)
	a, b, c, d := h.add(1), h.add(1), h.add(1), h.add(1)
	a.observe(2*time.Millisecond, 0)
	b.observe(2900*time.Microsecond, 0)
	c.observe(4*time.Millisecond, 0)
	d.observe(3600*time.Microsecond, 0)
	for _, w := range []*worker[int, int]{a, b, c, d} {
		h.s.touch(w)
	}
	assert.Equal(t, h.s.cost(a), h.s.cost(b), "2 and 2.9 ms")
	assert.Equal(t, h.s.cost(a), h.s.cost(d), "2 and 3.6 ms: 1.8×, below the centre step's top")
	assert.Less(t, h.s.cost(d), h.s.cost(c), "3.6 and 4 ms")
	var got []int
	for range 6 {
		w := h.p.root()
		got = append(got, w.id)
		require.True(t, h.dispatch(t))
		h.s.complete(w)
	}
	assert.Equal(t, []int{0, 1, 3, 0, 1, 3}, got)
}

// Through the loop, in fake time: worker 1 serves its first two requests
// in 25 ms (the first counts as a cold call, the second shows it slow),
// then requests arrive every 10 ms and go to worker 0, until worker 1's
// estimate has gone unrefreshed for its patience (and the loop has
// reckoned, every reckonEvery); then one request probes it. A worker
// that recovered rejoins the rotation; one still slow is probed again
// after twice the patience, and while a probe runs it takes nothing else.
func TestStaleEstimateIsProbed(t *testing.T) {
	for _, tt := range []struct {
		name      string
		slowRuns  int64 // worker 1's runs that take 25 ms
		recovered bool
	}{
		{"recovered", 2, true},
		{"still slow", 1 << 40, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var runs atomic.Int64
				b, err := NewFrom([]WorkerSpec[int, int]{
					{Func: sleeper(2 * time.Millisecond)},
					{Func: func(ctx context.Context, i int) (int, error) {
						d := 2 * time.Millisecond
						if runs.Add(1) <= tt.slowRuns {
							d = 25 * time.Millisecond
						}
						time.Sleep(d)
						return i, nil
					}},
				}, WithQueueDepth(4))
				require.NoError(t, err)
				defer b.Close()
				start := time.Now()
				type arrival struct {
					at time.Duration
					c  <-chan Result[int, int]
				}
				var arrivals []arrival
				for i := range 1200 { // 12 s
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					arrivals = append(arrivals, arrival{time.Since(start), c})
					time.Sleep(10 * time.Millisecond)
				}
				var ones []time.Duration // arrivals that went to worker 1
				for _, a := range arrivals {
					if r := <-a.c; r.Worker == 1 {
						ones = append(ones, a.at)
					}
				}
				require.GreaterOrEqual(t, len(ones), 3)
				assert.Equal(t, []time.Duration{10 * time.Millisecond, 40 * time.Millisecond}, ones[:2],
					"new, it takes turns; its cold first run leaves it in line")
				seen := 65 * time.Millisecond // its second run ends
				probe := ones[2]
				patience := time.Duration(staleAfter)
				assert.Greater(t, probe, seen+patience, "not before its patience")
				assert.LessOrEqual(t, probe, seen+patience+time.Duration(reckonEvery)+10*time.Millisecond, "probed once the loop reckons")
				if tt.recovered {
					n := 0
					for _, at := range ones[3:] {
						if at <= probe+200*time.Millisecond {
							n++
						}
					}
					assert.Equal(t, 10, n, "back in turn: every other request of the next 20")
					return
				}
				require.GreaterOrEqual(t, len(ones), 4, "probed again")
				next := ones[3]
				assert.Greater(t, next, probe+25*time.Millisecond+2*patience, "twice as patient after a slow probe")
				assert.LessOrEqual(t, next, probe+25*time.Millisecond+2*patience+time.Duration(reckonEvery)+10*time.Millisecond)
			})
		})
	}
}

// 2. No deadlock: full buffers, backpressure, TrySubmit, callers that leave.
func TestNoDeadlockWithFullBuffers(t *testing.T) {
	const workers, depth = 3, 2
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var ran atomic.Int64
		fn := func(ctx context.Context, i int) (int, error) {
			<-release
			ran.Add(1)
			return i, nil
		}
		b := mustNew(t, workers, fn, WithQueueDepth(depth))
		callers := 4 * workers * (depth + 1)
		var wg sync.WaitGroup
		for i := range callers {
			wg.Go(func() {
				v, err := b.Do(context.Background(), i)
				assert.NoError(t, err)
				assert.Equal(t, i, v)
			})
		}
		synctest.Wait()
		s := b.Stats()
		assert.Equal(t, workers*depth, s.Pending, "every worker at its depth")
		assert.Equal(t, uint64(workers*depth), s.Accepted, "the rest wait in Do")
		close(release)
		wg.Wait()
		require.NoError(t, b.Close())
		assert.Equal(t, int64(callers), ran.Load())
	})
}

func TestSubmitWaitsForCapacityUntilCtxEnds(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(2)
		b := mustNew(t, 1, g.fn, WithQueueDepth(1))
		defer b.Close()
		defer g.openAll()
		_, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		_, err = b.Submit(ctx, 1)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, time.Second, time.Since(start), "waited for the deadline, no longer")
		assert.Equal(t, uint64(1), b.Stats().Accepted)
	})
}

func TestTrySubmit(t *testing.T) {
	ctx := context.Background()
	synctest.Test(t, func(t *testing.T) {
		none := mustNew(t, 0, square)
		_, err := none.TrySubmit(ctx, 1)
		assert.ErrorIs(t, err, ErrFull, "no workers")
		require.NoError(t, none.Close())

		g := newGates(3)
		b := mustNew(t, 1, g.fn, WithQueueDepth(2))
		c0, err := b.TrySubmit(ctx, 0)
		assert.NoError(t, err, "fresh idle balancer accepts")
		c1, err := b.TrySubmit(ctx, 1)
		assert.NoError(t, err, "room for a second")
		_, err = b.TrySubmit(ctx, 2)
		assert.ErrorIs(t, err, ErrFull, "every worker at its depth")
		g.open(0)
		assert.Equal(t, 0, (<-c0).Value)
		synctest.Wait()
		c2, err := b.TrySubmit(ctx, 2)
		assert.NoError(t, err, "a slot freed")
		g.openAll()
		assert.Equal(t, 1, (<-c1).Value)
		assert.Equal(t, 2, (<-c2).Value)
		require.NoError(t, b.Close())
		_, err = b.TrySubmit(ctx, 3)
		assert.ErrorIs(t, err, ErrClosed)
	})
	t.Run("the request's ctx reaches the Func", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			type key struct{}
			started := make(chan string, 1)
			b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
				started <- ctx.Value(key{}).(string)
				<-ctx.Done()
				return 0, context.Cause(ctx)
			})
			defer b.Close()
			errGone := errors.New("client went away")
			ctx, cancel := context.WithCancelCause(context.WithValue(context.Background(), key{}, "trace-42"))
			c, err := b.TrySubmit(ctx, 1)
			require.NoError(t, err)
			assert.Equal(t, "trace-42", <-started)
			cancel(errGone)
			assert.ErrorIs(t, (<-c).Err, errGone)
		})
	})
	t.Run("a done or nil ctx is refused", func(t *testing.T) {
		b := mustNew(t, 1, square)
		defer b.Close()
		done, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := b.TrySubmit(done, 1)
		assert.ErrorIs(t, err, context.Canceled)
		var nilCtx context.Context
		_, err = b.TrySubmit(nilCtx, 1)
		assert.ErrorIs(t, err, ErrInvalidArgument)
		assert.Zero(t, b.Stats().Accepted)
	})
}

func TestCallerThatWalksAwayBlocksNobody(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 2, square, WithQueueDepth(1))
		for i := range 20 {
			_, err := b.Submit(context.Background(), i) // result never read
			require.NoError(t, err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_, err := b.Do(ctx, 1)
		assert.ErrorIs(t, err, context.Canceled)
		require.NoError(t, b.Close())
		assert.Equal(t, uint64(20), b.Stats().Completed)
	})
}

// 3. Exactly one outcome per accepted request.
func TestSubmitYieldsOneResultThenCloses(t *testing.T) {
	b := mustNew(t, 2, square)
	defer b.Close()
	c, err := b.Submit(context.Background(), 7)
	require.NoError(t, err)
	r, ok := <-c
	require.True(t, ok)
	assert.Equal(t, Result[int, int]{Req: 7, Value: 49, Worker: 0, Attempts: 1}, r)
	_, ok = <-c
	assert.False(t, ok, "closed after its one result")
}

func TestRequestCancelledWhileQueuedDoesNotRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ran []int
		release := make(chan struct{})
		fn := func(ctx context.Context, i int) (int, error) {
			ran = append(ran, i) // one worker: no concurrent appends
			<-release
			return i, nil
		}
		b := mustNew(t, 1, fn, WithQueueDepth(2))
		defer b.Close()
		first, err := b.Submit(context.Background(), 1)
		require.NoError(t, err)
		ctx, cancel := context.WithCancel(context.Background())
		queued, err := b.Submit(ctx, 2)
		require.NoError(t, err)
		cancel()
		close(release)
		assert.NoError(t, (<-first).Err)
		assert.ErrorIs(t, (<-queued).Err, context.Canceled)
		assert.Equal(t, []int{1}, ran, "the cancelled request never ran")
	})
}

func TestFuncGetsTheRequestContext(t *testing.T) {
	type key struct{}
	fn := func(ctx context.Context, _ int) (string, error) {
		v, _ := ctx.Value(key{}).(string)
		return v, nil
	}
	b, err := New(1, fn)
	require.NoError(t, err)
	defer b.Close()
	got, err := b.Do(context.WithValue(context.Background(), key{}, "carried"), 0)
	require.NoError(t, err)
	assert.Equal(t, "carried", got)
}

func TestDoReturnsWhenCtxEndsWhileFuncRuns(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(1)
		g.started = make(chan int, 1)
		b := mustNew(t, 1, g.fn)
		defer b.Close()
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() {
			_, err := b.Do(ctx, 0)
			errc <- err
		}()
		<-g.started
		cancel()
		assert.ErrorIs(t, <-errc, context.Canceled, "Do returned with the Func still running")
		g.open(0)
	})
}

// 4. Errors unchanged; panics and Goexit become outcomes; the worker lives.
func TestFuncFailures(t *testing.T) {
	errBoom := errors.New("boom")
	fn := func(ctx context.Context, mode string) (int, error) {
		switch mode {
		case "error":
			return 0, fmt.Errorf("wrapped: %w", errBoom)
		case "panic":
			panic(errBoom)
		case "goexit":
			runtime.Goexit()
		}
		return 1, nil
	}
	synctest.Test(t, func(t *testing.T) {
		b, err := New(1, fn, WithQueueDepth(1))
		require.NoError(t, err)
		defer b.Close()
		ctx := context.Background()

		_, err = b.Do(ctx, "error")
		assert.ErrorIs(t, err, errBoom)

		_, err = b.Do(ctx, "panic")
		var pe *PanicError
		require.ErrorAs(t, err, &pe)
		assert.Equal(t, errBoom, pe.Value)
		assert.Contains(t, string(pe.Stack), "panic")
		assert.Contains(t, pe.Error(), "boom")
		assert.ErrorIs(t, err, errBoom, "PanicError unwraps an error value")

		_, err = b.Do(ctx, "goexit")
		assert.ErrorIs(t, err, ErrGoexit)

		v, err := b.Do(ctx, "ok") // the one worker still serves, its slot freed
		assert.NoError(t, err)
		assert.Equal(t, 1, v)
		synctest.Wait()
		s := b.Stats()
		assert.Equal(t, 0, s.Pending)
		assert.Equal(t, uint64(4), s.Completed)
		assert.Equal(t, uint64(3), s.Failed)
		assert.Equal(t, uint64(1), s.Panics)
	})
}

// 5. Close and Shutdown.
func TestCloseFinishesAcceptedAndRefusesNew(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(4)
		b := mustNew(t, 1, g.fn, WithQueueDepth(4))
		var accepted []<-chan Result[int, int]
		for i := range 4 {
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			accepted = append(accepted, c)
		}
		closed := make(chan error)
		go func() { closed <- b.Close() }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("Close returned with requests pending")
		default:
		}
		_, err := b.Submit(context.Background(), 9)
		assert.ErrorIs(t, err, ErrClosed)
		_, err = b.Do(context.Background(), 9)
		assert.ErrorIs(t, err, ErrClosed)
		_, err = b.TrySubmit(context.Background(), 9)
		assert.ErrorIs(t, err, ErrClosed)
		_, err = b.AddWorker(square)
		assert.ErrorIs(t, err, ErrClosed)
		assert.ErrorIs(t, b.RemoveWorker(context.Background(), 0), ErrClosed)

		g.openAll()
		for i, c := range accepted {
			r := <-c
			assert.NoError(t, r.Err)
			assert.Equal(t, i, r.Value)
		}
		assert.NoError(t, <-closed)
		assert.NoError(t, b.Close(), "idempotent")
		s := b.Stats()
		assert.Equal(t, uint64(4), s.Completed, "final figures after Close")
		assert.Equal(t, 0, s.Pending)
	})
}

// submitOne submits i to a balancer that squares and checks its fate:
// refused with ErrClosed, or accepted with the right result. It reports
// whether i was accepted.
func submitOne(t *testing.T, b *Balancer[int, int], i int, outcomes, refused *atomic.Int64) bool {
	c, err := b.Submit(context.Background(), i)
	if err != nil {
		assert.ErrorIs(t, err, ErrClosed)
		refused.Add(1)
		return false
	}
	r := <-c
	assert.NoError(t, r.Err)
	assert.Equal(t, i*i, r.Value)
	outcomes.Add(1)
	return true
}

func TestCloseWhileSubmitting(t *testing.T) {
	b := mustNew(t, 4, square, WithQueueDepth(1))
	var wg sync.WaitGroup
	var outcomes, refused atomic.Int64
	for range 8 {
		wg.Go(func() {
			for i := 0; ; i++ {
				if !submitOne(t, b, i, &outcomes, &refused) {
					return
				}
			}
		})
	}
	for b.Stats().Accepted < 100 {
		runtime.Gosched() // polls real state: let the submitters get going
	}
	var closers sync.WaitGroup
	for range 3 {
		closers.Go(func() { assert.NoError(t, b.Close()) })
	}
	closers.Wait()
	wg.Wait()
	assert.Equal(t, int64(8), refused.Load())
	assert.Equal(t, int64(b.Stats().Accepted), outcomes.Load(), "every accepted request had its outcome")
}

func TestShutdownGivesUpOnSlowFuncs(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		started := make(chan int, 2)
		fn := func(ctx context.Context, i int) (int, error) {
			started <- i
			if i == 0 {
				<-release // ignores its ctx
				return 0, nil
			}
			<-ctx.Done()
			return 0, ctx.Err()
		}
		b := mustNew(t, 2, fn, WithQueueDepth(3))
		var cs []<-chan Result[int, int]
		for i := range 4 { // 0 and 2 on worker 0, 1 and 3 on worker 1
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			cs = append(cs, c)
		}
		<-started
		<-started
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		assert.ErrorIs(t, b.Shutdown(ctx), context.DeadlineExceeded)

		r1 := <-cs[1]
		assert.ErrorIs(t, r1.Err, context.Canceled, "running request's ctx cancelled")
		assert.ErrorIs(t, (<-cs[2]).Err, ErrClosed, "queued behind a Func that ignores ctx")
		assert.ErrorIs(t, (<-cs[3]).Err, ErrClosed, "queued, not started")
		select {
		case <-cs[0]:
			t.Fatal("the Func that ignores its ctx cannot have finished")
		default:
		}
		close(release)
		assert.NoError(t, (<-cs[0]).Err)
		require.NoError(t, b.Close())
		s := b.Stats()
		assert.Equal(t, uint64(4), s.Completed)
		assert.Equal(t, uint64(4), s.Accepted)
	})
}

func TestShutdownInTimeReturnsNil(t *testing.T) {
	b := mustNew(t, 2, square)
	_, err := b.Do(context.Background(), 3)
	require.NoError(t, err)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	assert.NoError(t, b.Shutdown(ctx))
}

// 6. AddWorker and RemoveWorker.
func TestAddWorkerIsNextAndIDsAreFresh(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(4)
		b := mustNew(t, 2, g.fn, WithQueueDepth(2))
		defer b.Close()
		defer g.openAll()
		for i := range 2 {
			_, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
		}
		id, err := b.AddWorker(g.fn)
		require.NoError(t, err)
		assert.Equal(t, 2, id)
		c, err := b.Submit(context.Background(), 2)
		require.NoError(t, err)
		synctest.Wait()
		assert.Equal(t, []int{1, 1, 1}, pendings(b))

		g.open(1) // lets worker 1 drain, so RemoveWorker can return
		require.NoError(t, b.RemoveWorker(context.Background(), 1))
		id, err = b.AddWorker(g.fn)
		require.NoError(t, err)
		assert.Equal(t, 3, id, "IDs are never reused")
		g.open(2)
		assert.Equal(t, 2, (<-c).Worker)
	})
}

func TestRemoveWorkerDrainsAndWaits(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(5)
		b := mustNew(t, 2, g.fn, WithQueueDepth(2))
		defer b.Close()
		var cs []<-chan Result[int, int]
		for i := range 4 { // 0 and 2 on worker 0; 1 and 3 on worker 1
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			cs = append(cs, c)
		}
		removed := make(chan error, 1)
		go func() { removed <- b.RemoveWorker(context.Background(), 1) }()
		synctest.Wait()
		assert.Empty(t, removed, "RemoveWorker waits for the queue to drain")
		ws := b.Stats().Workers
		require.Len(t, ws, 2)
		assert.True(t, ws[1].Removed)

		g.open(0)
		assert.Equal(t, 0, (<-cs[0]).Worker)
		c4, err := b.Submit(context.Background(), 4)
		require.NoError(t, err)
		synctest.Wait()
		assert.Equal(t, []int{2, 2}, pendings(b), "request 4 went to worker 0 though worker 1 is busy too")

		g.open(1)
		g.open(3)
		assert.NoError(t, <-removed)
		assert.Equal(t, 1, (<-cs[1]).Worker)
		assert.Equal(t, 1, (<-cs[3]).Worker)
		assert.Len(t, b.Stats().Workers, 1)
		g.openAll()
		assert.Equal(t, 0, (<-c4).Worker)
		assert.Equal(t, uint64(5), b.Stats().Completed, "a retired worker's counts stay in the totals")
	})
}

func TestRemoveWorkerCtxBoundsOnlyTheWait(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(2)
		b := mustNew(t, 1, g.fn)
		defer b.Close()
		c, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		assert.ErrorIs(t, b.RemoveWorker(ctx, 0), context.DeadlineExceeded)
		assert.ErrorIs(t, b.RemoveWorker(context.Background(), 0), ErrUnknownWorker, "the removal stood")
		g.open(0)
		assert.NoError(t, (<-c).Err, "the removed worker finished its request")
	})
}

func TestRemoveLastWorkerThenAdd(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 1, square)
		defer b.Close()
		require.NoError(t, b.RemoveWorker(context.Background(), 0))
		assert.ErrorIs(t, b.RemoveWorker(context.Background(), 0), ErrUnknownWorker)
		assert.ErrorIs(t, b.RemoveWorker(context.Background(), 42), ErrUnknownWorker)

		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_, err := b.Do(ctx, 2)
		assert.ErrorIs(t, err, context.DeadlineExceeded, "no worker: Do waits until its ctx ends")

		got := make(chan int)
		go func() {
			v, err := b.Do(context.Background(), 3)
			assert.NoError(t, err)
			got <- v
		}()
		synctest.Wait()
		_, err = b.AddWorker(square)
		require.NoError(t, err)
		assert.Equal(t, 9, <-got)
	})
}

// 6b. Workers with capacity.

// loads lists each worker's running and queued requests in ID order.
func loads(b *Balancer[int, int]) (running, queued []int) {
	for _, w := range b.Stats().Workers {
		running = append(running, w.Running)
		queued = append(queued, w.Queued)
	}
	return running, queued
}

// Without the load estimate, workers of concurrency 1, 2 and 4 and one of
// weight 4 are ordered by pending ÷ (concurrency × weight), ties to the one
// that waited longest.
func TestDispatchByPendingPerSlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(10)
		b, err := NewFrom([]WorkerSpec[int, int]{
			{Func: g.fn},
			{Func: g.fn, Options: []WorkerOption{WithConcurrency(2)}},
			{Func: g.fn, Options: []WorkerOption{WithConcurrency(4)}},
			{Func: g.fn, Options: []WorkerOption{WithWeight(4)}},
		}, WithLoadEstimate(false))
		require.NoError(t, err)
		defer b.Close()
		defer g.openAll()
		results := make([]<-chan Result[int, int], 10)
		submit := func(i int, want []int) {
			t.Helper()
			results[i], err = b.Submit(context.Background(), i)
			require.NoError(t, err)
			synctest.Wait()
			assert.Equal(t, want, pendings(b), "pending per worker after request %d", i)
			running, queued := loads(b)
			assert.Equal(t, want, running, "running per worker after request %d: nothing queues at depth 1", i)
			assert.Equal(t, []int{0, 0, 0, 0}, queued)
		}
		// Costs (pending+1)/(c × weight): 1, 1/2, 1/4, 1/4.
		submit(0, []int{0, 0, 1, 0}) // 1/4, and worker 2 waited longest
		submit(1, []int{0, 0, 1, 1}) // worker 3 full at 1/4
		submit(2, []int{0, 1, 1, 1}) // 1/2 ties with worker 2's 2/4; worker 1 waited longer
		submit(3, []int{0, 1, 2, 1}) // 2/4
		submit(4, []int{0, 1, 3, 1}) // 3/4
		submit(5, []int{1, 1, 3, 1}) // 1 = 2/2 = 4/4; worker 0 waited longest
		submit(6, []int{1, 2, 3, 1}) // worker 1 before worker 2
		submit(7, []int{1, 2, 4, 1}) // every worker full now
		c8 := make(chan Result[int, int], 1)
		go func() { // Submit waits for a slot
			r, err := b.Submit(context.Background(), 8)
			if assert.NoError(t, err) {
				c8 <- <-r
			}
		}()
		synctest.Wait()
		assert.Equal(t, 1, b.Stats().Waiting)
		g.open(3) // a slot of worker 2 frees; request 8 takes it
		assert.Equal(t, 2, (<-results[3]).Worker)
		synctest.Wait()
		assert.Equal(t, []int{1, 2, 4, 1}, pendings(b))
		g.open(8)
		assert.Equal(t, 2, (<-c8).Worker)
		g.open(1)
		assert.Equal(t, 3, (<-results[1]).Worker)
		synctest.Wait()
		assert.Equal(t, []int{1, 2, 3, 0}, pendings(b), "after worker 3 and a slot of worker 2 freed")
		submit(9, []int{1, 2, 3, 1}) // 1/4 beats worker 2's 4/4
	})
}

// A worker of concurrency c never runs more than c at once, queues depth ×
// c, and Stats says which are running and which queued.
func TestConcurrencyBoundsRunning(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var now, most atomic.Int64
		release := make(chan struct{})
		fn := func(ctx context.Context, i int) (int, error) {
			n := now.Add(1)
			for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
			}
			<-release
			now.Add(-1)
			return i, nil
		}
		b := mustNew(t, 1, fn, WithConcurrency(3), WithQueueDepth(2))
		defer b.Close()
		var cs []<-chan Result[int, int]
		for i := range 6 {
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			cs = append(cs, c)
		}
		synctest.Wait()
		ws := untimed(b.Stats().Workers[0])
		assert.Equal(t, WorkerStats{ID: 0, Concurrency: 3, Pending: 6, Running: 3, Queued: 3, Weight: 1}, ws)
		_, err := b.TrySubmit(context.Background(), 6)
		assert.ErrorIs(t, err, ErrFull, "3 × 2 pending is the limit")
		for range 3 {
			release <- struct{}{}
			synctest.Wait()
			running, queued := loads(b)
			assert.Equal(t, []int{3}, running, "a freed slot takes the next queued request")
			assert.Less(t, queued[0], 3)
		}
		close(release)
		for _, c := range cs {
			assert.NoError(t, (<-c).Err)
		}
		assert.Equal(t, int64(3), most.Load())
	})
}

// The load estimate of a worker of concurrency c is one moving average fed
// by every slot, and its cost counts the slots: s while one is free, then
// s × (pending+1)/c.
func TestEstimateLearnsFromEverySlot(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		sleep := func(ctx context.Context, ms int) (int, error) {
			time.Sleep(time.Duration(ms) * time.Millisecond)
			return ms, nil
		}
		b := mustNew(t, 1, sleep, WithConcurrency(4), WithLoadEstimate(true))
		defer b.Close()
		var cs []<-chan Result[int, int]
		for _, ms := range []int{16, 32, 48, 64} { // one on each slot
			c, err := b.Submit(context.Background(), ms)
			require.NoError(t, err)
			cs = append(cs, c)
		}
		want := 16 * time.Millisecond // the first observation is taken whole
		for i, ms := range []int{16, 32, 48, 64} {
			require.NoError(t, (<-cs[i]).Err)
			synctest.Wait()
			if i > 0 { // a running mean of the first runs
				want += (time.Duration(ms)*time.Millisecond - want) / time.Duration(i+1)
			}
			assert.Equal(t, want, b.Stats().Workers[0].MeanService, "after the run of %d ms", ms)
		}
	})
	t.Run("cost counts the slots", func(t *testing.T) {
		h := newHeapHarness(2, true)
		h.s.ref = float64(8 * time.Millisecond) // on a step of the scale, so that costs are exact
		w := h.addWorker(workerOptions{concurrency: 4, weight: 1})
		w.observe(8*time.Millisecond, 0)
		var got []float64
		for range 8 {
			got = append(got, h.s.cost(w)/float64(time.Millisecond))
			require.True(t, h.dispatch(t))
		}
		assert.Equal(t, []float64{8, 10, 12, 14, 16, 18, 20, 22}, got, "(pending+4)/4 × 8 ms")
		assert.Equal(t, math.Inf(1), h.s.cost(w), "full at 4 × 2")
	})
}

// Under load at the defaults, a worker of concurrency 2, and one that
// serves twice as fast, each get twice the requests of a plain worker.
// Under light load the faster worker gets every request: at the defaults
// because its speed is measured, without the estimate because its weight
// says so; without either the two take turns.
func TestDefaultsMakeCapacityAndWeightCount(t *testing.T) {
	t.Run("under load", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b, err := NewFrom([]WorkerSpec[int, int]{
				{Func: sleeper(2 * time.Millisecond)},
				{Func: sleeper(2 * time.Millisecond), Options: []WorkerOption{WithConcurrency(2)}},
				{Func: sleeper(time.Millisecond), Options: []WorkerOption{WithWeight(4)}},
			})
			require.NoError(t, err)
			defer b.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			var wg sync.WaitGroup
			for range 8 { // more callers than slots: every slot stays busy
				wg.Go(func() {
					for ctx.Err() == nil {
						b.Do(ctx, 0)
					}
				})
			}
			wg.Wait()
			var got []uint64
			for _, w := range b.Stats().Workers {
				got = append(got, w.Completed)
			}
			assert.InDeltaSlice(t, []uint64{500, 1000, 1000}, got, 2, "requests per worker in 1 s")
		})
	})
	t.Run("light load", func(t *testing.T) {
		for _, tt := range []struct {
			name     string
			estimate bool
			weight   float64
			want     []int
		}{
			{"defaults", true, 1, []int{0, 1, 1, 1, 1}}, // each new worker is tried first
			{"count, weights equal", false, 1, []int{0, 1, 0, 1, 0}},
			{"count, weight 2", false, 2, []int{1, 1, 1, 1, 1}},
		} {
			t.Run(tt.name, func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					b := mustNew(t, 1, sleeper(2*time.Millisecond), WithLoadEstimate(tt.estimate))
					defer b.Close()
					_, err := b.AddWorker(sleeper(time.Millisecond), WithWeight(tt.weight))
					require.NoError(t, err)
					var got []int
					for range 5 {
						c, err := b.Submit(context.Background(), 0)
						require.NoError(t, err)
						got = append(got, (<-c).Worker)
						time.Sleep(10 * time.Millisecond) // the next request arrives later, both workers idle
					}
					assert.Equal(t, tt.want, got)
				})
			})
		}
	})
}

// A worker of concurrency 3 loses only the slot of a request that panics
// or calls Goexit, for that request only; RemoveWorker waits for all its
// slots to drain, and Shutdown cancels every running slot.
func TestSlotsFailAndStopAlone(t *testing.T) {
	fn := func(ctx context.Context, i int) (int, error) {
		switch i {
		case -1:
			panic("slot")
		case -2:
			runtime.Goexit()
		case 0:
			return 0, nil
		}
		<-ctx.Done() // i > 0: runs until cancelled
		return i, ctx.Err()
	}
	t.Run("panic and Goexit free one slot each", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustNew(t, 1, fn, WithConcurrency(3))
			defer b.Close()
			ctx, cancel := context.WithCancel(context.Background())
			blocked, err := b.Submit(ctx, 1) // holds one slot throughout
			require.NoError(t, err)
			for range 5 {
				_, err := b.Do(context.Background(), -1)
				var pe *PanicError
				assert.ErrorAs(t, err, &pe)
				_, err = b.Do(context.Background(), -2)
				assert.ErrorIs(t, err, ErrGoexit)
			}
			synctest.Wait()
			// The only worker is never ejected, however it fails.
			ws := untimed(b.Stats().Workers[0])
			assert.InDelta(t, 1-math.Pow(7.0/8, 10), ws.FailureRate, 1e-4)
			ws.FailureRate = 0
			assert.Equal(t, WorkerStats{ID: 0, Concurrency: 3, Pending: 1, Running: 1, Completed: 10, Failed: 10, Panics: 5, Weight: 1, Streak: 10}, ws)
			// Both free slots still serve, at once.
			var cs []<-chan Result[int, int]
			for i := range 2 {
				c, err := b.Submit(ctx, 2+i)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			synctest.Wait()
			running, _ := loads(b)
			assert.Equal(t, []int{3}, running)
			cancel()
			for _, c := range append(cs, blocked) {
				assert.ErrorIs(t, (<-c).Err, context.Canceled)
			}
		})
	})
	t.Run("RemoveWorker drains every slot", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustNew(t, 1, fn, WithConcurrency(3), WithQueueDepth(2))
			defer b.Close()
			ctx, cancel := context.WithCancel(context.Background())
			var cs []<-chan Result[int, int]
			for i := range 6 {
				c, err := b.Submit(ctx, 1+i)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			removed := make(chan error, 1)
			go func() { removed <- b.RemoveWorker(context.Background(), 0) }()
			synctest.Wait()
			assert.Empty(t, removed, "three run, three wait")
			cancel()
			assert.NoError(t, <-removed)
			for _, c := range cs {
				assert.ErrorIs(t, (<-c).Err, context.Canceled)
			}
			assert.Empty(t, b.Stats().Workers)
		})
	})
	t.Run("Shutdown cancels every running slot", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustNew(t, 2, fn, WithConcurrency(3))
			var cs []<-chan Result[int, int]
			for i := range 6 {
				c, err := b.Submit(context.Background(), 1+i)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			synctest.Wait()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			assert.ErrorIs(t, b.Shutdown(ctx), context.DeadlineExceeded)
			for _, c := range cs {
				assert.ErrorIs(t, (<-c).Err, context.Canceled)
			}
			require.NoError(t, b.Close(), "waits for all six slots' goroutines")
		})
	})
}

// Hold-back counts slots: a full worker of concurrency c frees slots c
// times as often. Fast runs 2 at once in 10 ms each, slow 1 in 60 ms. With
// fast full, waiting for it takes (k + 2) / (2 per 10 ms) for the k-th
// caller, so callers are held until holdMargin (1.5) × that reaches slow's
// 60 ms: the sixth caller sends one to slow.
// The hold-back expects a worker of several slots with one free to take
// its whole service time, not a share of it: fast (10 ms) is full and slow
// (60 ms, two slots) has both free, so one caller is held for fast, since
// 1.5 × 2 × 10 ms < 60 ms.
func TestHoldBackExpectsAFreeSlotsWholeTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b, err := NewFrom([]WorkerSpec[int, int]{
			{Func: sleeper(10 * time.Millisecond)},
			{Func: sleeper(60 * time.Millisecond), Options: []WorkerOption{WithConcurrency(2)}},
		})
		require.NoError(t, err)
		defer b.Close()
		for range 2 { // both learn their speed (see observe)
			var cs []<-chan Result[int, int]
			for i := range 3 {
				cs = append(cs, submitHeld(t, b, i))
			}
			for _, c := range cs {
				<-c
			}
			synctest.Wait()
		}
		require.Equal(t, []time.Duration{10 * time.Millisecond, 60 * time.Millisecond},
			[]time.Duration{b.Stats().Workers[0].MeanService, b.Stats().Workers[1].MeanService})
		busy := submitHeld(t, b, 0)
		held := submitHeld(t, b, 1)
		assert.Equal(t, []int{1, 0}, pendings(b), "fast is full, slow has both slots free")
		assert.Equal(t, 1, b.Stats().Waiting, "held for fast")
		assert.Equal(t, 0, (<-busy).Worker)
		assert.Equal(t, 0, (<-held).Worker)
	})
}

func TestHoldBackCountsSlots(t *testing.T) {
	for _, how := range []struct {
		name string
		call func(*testing.T, *Balancer[int, int], int) <-chan Result[int, int]
	}{{"Submit", submitHeld}, {"Do", doHeld}} {
		t.Run(how.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b, err := NewFrom([]WorkerSpec[int, int]{
					{Func: sleeper(10 * time.Millisecond), Options: []WorkerOption{WithConcurrency(2)}},
					{Func: sleeper(60 * time.Millisecond)},
				}, WithLoadEstimate(true))
				require.NoError(t, err)
				defer b.Close()
				var cs []<-chan Result[int, int]
				submit := func(i int) { cs = append(cs, how.call(t, b, i)) }
				for i := range 6 { // both are new, so both are tried, twice (see observe)
					submit(i)
					if i == 2 {
						for _, c := range cs {
							<-c
						}
						cs = nil
						synctest.Wait()
					}
				}
				for _, c := range cs {
					<-c
				}
				synctest.Wait()
				require.Equal(t, []time.Duration{10 * time.Millisecond, 60 * time.Millisecond},
					[]time.Duration{b.Stats().Workers[0].MeanService, b.Stats().Workers[1].MeanService})

				cs = nil
				submit(3)
				submit(4)
				assert.Equal(t, []int{2, 0}, pendings(b), "fast is full")
				for k := 1; k <= 5; k++ {
					submit(4 + k)
					assert.Equal(t, []int{2, 0}, pendings(b), "%d callers held", k)
					assert.Equal(t, k, b.Stats().Waiting)
				}
				submit(10)
				assert.Equal(t, []int{2, 1}, pendings(b), "the sixth caller sent one to slow")
				assert.Equal(t, 5, b.Stats().Waiting)
				for _, c := range cs {
					assert.NoError(t, (<-c).Err)
				}
			})
		})
	}
}

// WorkerOptions given to New set every worker's defaults, AddWorker's too,
// and a worker's own options override them.
func TestWorkerOptionsGivenToNewAreDefaults(t *testing.T) {
	b := mustNew(t, 1, square, WithConcurrency(3), WithWeight(2))
	defer b.Close()
	_, err := b.AddWorker(square)
	require.NoError(t, err)
	_, err = b.AddWorker(square, WithConcurrency(1))
	require.NoError(t, err)
	var got [][2]float64
	for _, w := range b.Stats().Workers {
		got = append(got, [2]float64{float64(w.Concurrency), w.Weight})
	}
	assert.Equal(t, [][2]float64{{3, 2}, {3, 2}, {1, 2}}, got)
}

// untimed zeroes the moving averages, which depend on timing.
func untimed(w WorkerStats) WorkerStats {
	w.MeanService, w.MeanWait = 0, 0
	return w
}

// 7. FanIn.
func TestFanIn(t *testing.T) {
	ctx := context.Background()
	t.Run("forwards every value and closes", func(t *testing.T) {
		var ins []<-chan int
		for i := range 5 {
			c := make(chan int)
			go func() {
				defer close(c)
				for j := range 100 {
					c <- i*100 + j
				}
			}()
			ins = append(ins, c)
		}
		seen := map[int]bool{}
		for v := range FanIn(ctx, ins...) {
			assert.False(t, seen[v], "duplicate %d", v)
			seen[v] = true
		}
		assert.Len(t, seen, 500)
	})
	t.Run("no inputs closes at once", func(t *testing.T) {
		_, ok := <-FanIn[int](ctx)
		assert.False(t, ok)
	})
	t.Run("nil inputs are ignored", func(t *testing.T) {
		c := make(chan int, 1)
		c <- 1
		close(c)
		var got []int
		for v := range FanIn(ctx, nil, c, nil) {
			got = append(got, v)
		}
		assert.Equal(t, []int{1}, got)
		_, ok := <-FanIn[int](ctx, nil)
		assert.False(t, ok)
	})
	t.Run("ctx end closes the output and stops its goroutines", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			never := make(chan int) // never closed
			busy := make(chan int, 1)
			busy <- 1 // a value nobody reads
			out := FanIn(ctx, never, busy)
			synctest.Wait()
			cancel()
			for range out {
			}
			// synctest.Test fails if a FanIn goroutine is left behind.
		})
	})
	t.Run("nil ctx panics with a clear message", func(t *testing.T) {
		var nilCtx context.Context
		assert.PanicsWithValue(t, "balancer: FanIn called with a nil Context", func() {
			FanIn[int](nilCtx)
		})
	})
}

// 8. Bad input.
func TestBadInput(t *testing.T) {
	tests := []struct {
		name    string
		workers int
		fn      Func[int, int]
		opts    []Option
		names   string // what the message must name
	}{
		{"negative workers", -1, square, nil, "-1 workers"},
		{"nil func", 1, nil, nil, "nil Func"},
		{"depth zero", 1, square, []Option{WithQueueDepth(0)}, "depth 0"},
		{"negative depth", 1, square, []Option{WithQueueDepth(-3)}, "depth -3"},
		{"depth too large", 1, square, []Option{WithQueueDepth(MaxQueueDepth + 1)}, "depth 65537"},
		{"concurrency zero", 1, square, []Option{WithConcurrency(0)}, "concurrency 0"},
		{"negative concurrency", 1, square, []Option{WithConcurrency(-2)}, "concurrency -2"},
		{"concurrency too large", 1, square, []Option{WithConcurrency(MaxConcurrency + 1)}, "concurrency 65537"},
		{"concurrency × depth too large", 1, square, []Option{WithConcurrency(256), WithQueueDepth(257)}, "256 × queue depth 257"},
		{"weight zero", 1, square, []Option{WithWeight(0)}, "weight 0"},
		{"negative weight", 1, square, []Option{WithWeight(-1)}, "weight -1"},
		{"weight NaN", 1, square, []Option{WithWeight(math.NaN())}, "weight NaN"},
		{"weight infinite", 1, square, []Option{WithWeight(math.Inf(1))}, "weight +Inf"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := New(tt.workers, tt.fn, tt.opts...)
			assert.ErrorIs(t, err, ErrInvalidArgument)
			assert.ErrorContains(t, err, tt.names)
			assert.Nil(t, b)
		})
	}
	t.Run("NewFrom names the spec", func(t *testing.T) {
		for _, spec := range []WorkerSpec[int, int]{
			{},
			{Func: square, Options: []WorkerOption{WithConcurrency(0)}},
			{Func: square, Options: []WorkerOption{WithWeight(math.Inf(-1))}},
		} {
			b, err := NewFrom([]WorkerSpec[int, int]{{Func: square}, spec})
			assert.ErrorIs(t, err, ErrInvalidArgument)
			assert.ErrorContains(t, err, "worker 1")
			assert.Nil(t, b)
		}
	})
	b := mustNew(t, 1, square, nil, WithQueueDepth(MaxQueueDepth))
	defer b.Close()
	var nilCtx context.Context
	_, err := b.AddWorker(nil)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	for _, opt := range []WorkerOption{WithConcurrency(0), WithConcurrency(2), WithWeight(math.NaN())} {
		_, err = b.AddWorker(square, opt) // concurrency 2 × depth MaxQueueDepth is too many
		assert.ErrorIs(t, err, ErrInvalidArgument)
	}
	_, err = b.Do(nilCtx, 1)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	_, err = b.Submit(nilCtx, 1)
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.ErrorIs(t, b.RemoveWorker(nilCtx, 0), ErrInvalidArgument)
	assert.ErrorIs(t, b.Shutdown(nilCtx), ErrInvalidArgument)
	v, err := b.Do(context.Background(), 5)
	assert.NoError(t, err, "still usable after the bad calls")
	assert.Equal(t, 25, v)
}

// Stats times every request's wait for a slot, whichever call made it and
// wherever it waited: in front of the balancer (depth 1, so that callers
// wait in Do, Submit or All until the one worker frees its slot) or in the
// worker's queue (depth 3, so that the loop queues them there). Three
// requests of 10 ms each start at 0, 10 and 20 ms: they wait 0, 10 and
// 20 ms.
func TestStatsReportWaits(t *testing.T) {
	const calls = 3
	do := func(b *Balancer[int, int]) error {
		_, err := b.Do(context.Background(), 0)
		return err
	}
	submit := func(b *Balancer[int, int]) error {
		c, err := b.Submit(context.Background(), 0)
		if err == nil {
			err = (<-c).Err
		}
		return err
	}
	trySubmit := func(b *Balancer[int, int]) error {
		c, err := b.TrySubmit(context.Background(), 0)
		if err == nil {
			err = (<-c).Err
		}
		return err
	}
	all := func(n int) func(b *Balancer[int, int]) error {
		return func(b *Balancer[int, int]) error {
			for _, r := range b.All(context.Background(), slices.Values(make([]int, n))) {
				if r.Err != nil {
					return r.Err
				}
			}
			return nil
		}
	}
	tests := []struct {
		name    string
		depth   int
		callers int // each calling once
		call    func(b *Balancer[int, int]) error
	}{
		{"Do, waiting in front", 1, calls, do},
		{"Do, queued at the worker", calls, calls, do},
		{"Submit, waiting in front", 1, calls, submit},
		{"Submit, queued at the worker", calls, calls, submit},
		{"TrySubmit, queued at the worker", calls, calls, trySubmit},
		{"All, waiting in front", 1, calls, all(1)},
		{"All, queued at the worker", calls, 1, all(calls)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustNew(t, 1, sleeper(10*time.Millisecond), WithQueueDepth(tt.depth))
				defer b.Close()
				var wg sync.WaitGroup
				for range tt.callers {
					wg.Go(func() { assert.NoError(t, tt.call(b)) })
				}
				synctest.Wait()
				if tt.depth == 1 {
					assert.Equal(t, calls-1, b.Stats().Waiting, "callers waiting in front")
				} else {
					assert.Equal(t, []int{calls}, pendings(b), "requests held by the worker")
				}
				wg.Wait()
				s := b.Stats()
				// The first wait, 0, counts as 1 ns; then 1/16 of the way to
				// 10 ms, and 1/16 of the way from there to 20 ms.
				const mean = 625000 + (20_000_000-625000)/16
				assert.Equal(t, time.Duration(mean), s.MeanWait)
				assert.Equal(t, 30*time.Millisecond, s.TotalWait)
				assert.Equal(t, time.Duration(mean), s.Workers[0].MeanWait)
				assert.Equal(t, 30*time.Millisecond, s.Workers[0].TotalWait)
				assert.Equal(t, uint64(calls), s.Accepted)
				assert.Equal(t, uint64(calls), s.Completed)
				assert.Equal(t, 0, s.Waiting)
				require.NoError(t, b.RemoveWorker(context.Background(), 0))
				assert.Equal(t, 30*time.Millisecond, b.Stats().TotalWait, "a retired worker's waits stay in the total")
			})
		})
	}
}

// A slot ends a request in the order finish documents: its counters, then
// the freed slot to the loop, then the outcome to the caller. So whatever
// the outcome, a caller that has it finds Stats counting it, and finds
// the slot free for its next request. The hook stops the slot as it
// reports: the counters must be final and the outcome not yet sent.
func TestFinishCountsThenFreesThenAnswers(t *testing.T) {
	errBoom := errors.New("boom")
	fn := func(ctx context.Context, mode string) (int, error) {
		switch mode {
		case "error":
			return 0, errBoom
		case "panic":
			panic(errBoom)
		case "goexit":
			runtime.Goexit()
		}
		return 1, nil
	}
	tests := []struct {
		mode           string
		failed, panics uint64
	}{
		{"ok", 0, 0},
		{"error", 1, 0},
		{"panic", 1, 1},
		{"goexit", 1, 0},
	}
	for _, tt := range tests {
		t.Run(tt.mode, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				inReport, proceed := make(chan struct{}), make(chan struct{})
				b, err := New(1, fn, &withHooks{report: func() {
					close(inReport)
					<-proceed
				}})
				require.NoError(t, err)
				defer b.Close()
				got := make(chan error, 1)
				go func() {
					_, err := b.Do(context.Background(), tt.mode)
					got <- err
				}()
				<-inReport
				synctest.Wait()
				assert.Empty(t, got, "the outcome was sent before the slot was reported")
				s := b.Stats()
				assert.Equal(t, uint64(1), s.Completed, "Completed")
				assert.Equal(t, tt.failed, s.Failed, "Failed")
				assert.Equal(t, tt.panics, s.Panics, "Panics")
				assert.Equal(t, 0, s.Pending, "Pending")
				assert.Equal(t, 0, s.Workers[0].Pending, "the worker's Pending")
				assert.Equal(t, 0, s.Workers[0].Running, "the worker's Running")
				assert.Equal(t, int(tt.failed), s.Workers[0].Streak, "the worker's health, which the loop reads on the report")
				close(proceed)
				<-got
			})
		})
	}
	// The consequences, from outside: a lone caller that has its outcome
	// finds it counted, and the one slot free (TrySubmit accepts at once).
	t.Run("seen by a lone caller", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) { loneCallerFindsItCounted(t, fn) })
	})
}

// loneCallerFindsItCounted makes 1000 calls from one caller to one worker
// of depth 1: after each, Stats counts it and the slot is free.
func loneCallerFindsItCounted(t *testing.T, fn Func[string, int]) {
	b, err := New(1, fn)
	require.NoError(t, err)
	defer b.Close()
	for i := range 1000 {
		mode := []string{"ok", "error"}[i%2]
		_, err := b.Do(context.Background(), mode)
		s := b.Stats()
		require.Equal(t, uint64(2*i+1), s.Completed, "after call %d", i)
		require.Equal(t, uint64((i+1)/2), s.Failed, "after call %d", i)
		require.Equal(t, 0, s.Workers[0].Pending, "after call %d", i)
		require.Equal(t, mode == "error", err != nil)
		c, err := b.TrySubmit(context.Background(), "ok")
		require.NoError(t, err, "after call %d the slot was not free", i)
		require.NoError(t, (<-c).Err)
	}
}

// The loop counts a request as accepted, and as pending at its worker,
// before it hands the request over, so Stats never sees a request finish
// that it has not seen accepted. The hook stops the loop as it hands the
// request over.
func TestDispatchCountsBeforeItSends(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inSend, proceed := make(chan struct{}), make(chan struct{})
		b := mustNew(t, 1, square, &withHooks{send: func() {
			close(inSend)
			<-proceed
		}})
		defer b.Close()
		c, err := b.Submit(context.Background(), 3)
		require.NoError(t, err)
		<-inSend
		s := b.Stats()
		assert.Equal(t, uint64(1), s.Accepted, "Accepted")
		assert.Equal(t, 1, s.Pending, "Pending")
		assert.Equal(t, 1, s.Workers[0].Pending, "the worker's Pending")
		close(proceed)
		assert.Equal(t, 9, (<-c).Value)
	})
}

// The stall rule reads the age of the oldest request a worker runs,
// whichever slot runs it: a worker of concurrency 3 with requests that
// started 100, 50 and 10 ms ago, in every arrangement over its slots, an
// idle slot among them or not, is as old as its oldest.
func TestStallAgeIsTheOldestSlots(t *testing.T) {
	const now = int64(time.Second)
	h := newHeapHarness(2, true)
	h.s.ref = float64(100 * time.Millisecond) // on a step of the scale, so that the cost is exact
	w := h.addWorker(workerOptions{concurrency: 3, weight: 1})
	w.observe(10*time.Millisecond, 0)
	w.pending = 3
	starts := []int64{now - int64(100*time.Millisecond), now - int64(50*time.Millisecond), now - int64(10*time.Millisecond)}
	for _, perm := range [][]int{{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {1, 2, 0}, {2, 0, 1}, {2, 1, 0}} {
		for i, p := range perm {
			w.runners[i].since.Store(starts[p])
		}
		assert.Equal(t, int64(100*time.Millisecond), w.oldest(now), "starts %v", perm)
		assert.Equal(t, (3+3)*float64(100*time.Millisecond)/3, h.s.costAt(w, now), "starts %v", perm)
		for idle := range 3 {
			if perm[idle] == 0 {
				continue // the oldest
			}
			w.runners[idle].since.Store(0)
			assert.Equal(t, int64(100*time.Millisecond), w.oldest(now), "starts %v, slot %d idle", perm, idle)
			w.runners[idle].since.Store(starts[perm[idle]])
		}
	}
}

// The same through the loop, with a worker of two slots: its stalled
// request is the older of the two it runs, on either slot. Phase 1 gives
// each worker a 9 ms and an 11 ms request, so both learn 9.5 ms, and the
// slot that served the 9 ms one is first in line for the next request;
// the order of the two decides which slot the stall lands on, so the two
// subtests put it on different slots.
func TestStalledSlotCountsOnEitherSlot(t *testing.T) {
	for _, first := range []int{9, 11} {
		t.Run(fmt.Sprintf("%d ms first", first), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				release := make(chan struct{})
				fn := func(ctx context.Context, i int) (int, error) {
					if i > 0 {
						time.Sleep(time.Duration(i) * time.Millisecond)
					} else {
						<-release
					}
					return i, nil
				}
				b := mustNew(t, 2, fn, WithConcurrency(2), WithQueueDepth(2))
				defer b.Close()
				var cs []<-chan Result[int, int]
				submit := func(i int) {
					t.Helper()
					c, err := b.Submit(context.Background(), i)
					require.NoError(t, err)
					cs = append(cs, c)
					synctest.Wait()
				}
				for _, d := range []int{first, first, 20 - first, 20 - first} { // w0, w1, w0, w1
					submit(d)
				}
				time.Sleep(12 * time.Millisecond) // after the last finished
				submit(0)                         // to worker 0, whose last dispatch is older: it stalls
				require.Equal(t, []int{1, 0}, pendings(b))
				time.Sleep(90 * time.Millisecond)
				submit(0) // worker 1
				submit(0) // worker 0's other slot, 90 ms after the stall
				require.Equal(t, []int{2, 1}, pendings(b))
				time.Sleep(10 * time.Millisecond)
				// Worker 0 costs 3/2 × 100 ms, its oldest request's age;
				// worker 1 (3/2 and then 4/2) × 9.5 ms, so it takes all
				// it can hold. Counting the younger request's age instead
				// (10 ms), worker 0 would cost 15 ms and take the third.
				submit(0)
				submit(0)
				submit(0)
				assert.Equal(t, []int{2, 4}, pendings(b))
				close(release)
				for _, c := range cs {
					assert.NoError(t, (<-c).Err)
				}
			})
		})
	}
}

// 9. Stats under concurrency (run with -race): at every instant each
// worker's figures agree with its limits, and the totals with each other.
func TestStatsIsConsistentUnderLoad(t *testing.T) {
	const depth = 2
	b, err := NewFrom([]WorkerSpec[int, int]{
		{Func: square},
		{Func: square, Options: []WorkerOption{WithConcurrency(2)}},
		{Func: square, Options: []WorkerOption{WithConcurrency(3)}},
		{Func: square, Options: []WorkerOption{WithConcurrency(4)}},
	}, WithQueueDepth(depth))
	require.NoError(t, err)
	stop := make(chan struct{})
	var readers sync.WaitGroup
	for range 2 {
		readers.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				s := b.Stats()
				assert.GreaterOrEqual(t, s.Accepted, s.Completed)
				assert.LessOrEqual(t, s.Pending, (1+2+3+4)*depth)
				for _, w := range s.Workers {
					if !assert.True(t, 0 <= w.Running && w.Running <= w.Concurrency &&
						0 <= w.Queued && w.Pending == w.Running+w.Queued &&
						w.Pending <= w.Concurrency*depth, "worker %+v", w) {
						return
					}
				}
			}
		})
	}
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for i := range 500 {
				_, err := b.Do(context.Background(), i)
				assert.NoError(t, err)
			}
		})
	}
	wg.Wait()
	close(stop)
	readers.Wait()
	require.NoError(t, b.Close())
	s := b.Stats()
	assert.Equal(t, uint64(8000), s.Accepted)
	assert.Equal(t, uint64(8000), s.Completed)
	var sum uint64
	for _, w := range s.Workers {
		sum += w.Completed
		assert.Zero(t, w.Pending+w.Running+w.Queued, "worker %d after Close", w.ID)
	}
	assert.Equal(t, s.Completed, sum)
}

// The heap's invariant, from the inside.
func checkHeap(t *testing.T, h *heapHarness) {
	t.Helper()
	p := h.p
	for i, s := range p.slots {
		require.Equal(t, i, p.at[s.h], "worker %d's index", s.w.id)
		require.Equal(t, s.h, s.w.handle, "worker %d's handle", s.w.id)
		require.Equal(t, h.s.cost(s.w), s.cost, "worker %d's cost", s.w.id)
		if i > 0 {
			require.False(t, p.Less(i, (i-1)/2), "slot %d sorts before its parent", i)
		}
	}
}

// heapHarness runs the scheduler the way the loop does, without
// goroutines.
type heapHarness struct {
	b    *Balancer[int, int]
	s    *sched[int, int]
	p    *pool[int, int]
	next int
	now  int64 // the scheduler's clock
}

func newHeapHarness(depth int, estimate bool) *heapHarness {
	b := &Balancer[int, int]{depth: depth}
	h := &heapHarness{b: b, s: &b.sched, p: &b.sched.pool, now: 1}
	b.sched = sched[int, int]{estimate: estimate, eject: true, clock: func() int64 { return h.now }, jitter: func() float64 { return 0.5 }}
	return h
}

// checkOut checks the ejected workers: out of the heap, at most maxOut,
// and the next probe due where setDue would put it.
func checkOut(t *testing.T, h *heapHarness) {
	t.Helper()
	require.LessOrEqual(t, len(h.s.out), h.s.maxOut(), "too many ejected")
	due := h.s.due
	for _, w := range h.s.out {
		require.True(t, w.ejected)
		require.True(t, w.pending >= 0 && w.pending <= w.limit, "pending %d", w.pending)
		for _, s := range h.p.slots {
			require.NotSame(t, w, s.w, "ejected worker %d is in the heap", w.id)
		}
	}
	h.s.setDue()
	require.Equal(t, h.s.due, due, "the next probe due")
}

// fixRef sets the scheduler's common ground and keeps it there: the
// harness reckons no more.
func (h *heapHarness) fixRef(ref time.Duration) {
	h.s.ref, h.s.reckonAt, h.s.refreshed = float64(ref), math.MaxInt64, math.MaxInt64/2
}

// add adds a worker of concurrency 1 and the given weight.
func (h *heapHarness) add(weight float64) *worker[int, int] {
	return h.addWorker(workerOptions{concurrency: 1, weight: weight})
}

func (h *heapHarness) addWorker(o workerOptions) *worker[int, int] {
	w := newWorker(h.b, h.next, square, o)
	h.s.add(w)
	h.next++
	return w
}

func (h *heapHarness) remove(t *testing.T, i int) {
	w := h.p.slots[i].w
	h.s.remove(w)
	for _, s := range h.p.slots { // its handle may be an ejected worker's now, returned to keep one in service
		require.NotSame(t, w, s.w)
	}
}

// dispatch gives one request to the root, as the loop does when it has room.
func (h *heapHarness) dispatch(t *testing.T) bool {
	if len(h.s.doomed) > 0 { // as hasRoom does
		h.s.settle()
	}
	if h.p.Len() == 0 {
		return false
	}
	if h.p.root().pending >= h.p.root().limit {
		for _, s := range h.p.slots {
			require.GreaterOrEqual(t, s.w.pending, s.w.limit, "the root is full but worker %d has room", s.w.id)
		}
		return false
	}
	root := h.p.slots[0]
	for _, s := range h.p.slots {
		require.GreaterOrEqual(t, s.cost, root.cost, "the root is not the cheapest")
	}
	h.s.dispatch()
	return true
}

func (h *heapHarness) complete(w *worker[int, int], service time.Duration) {
	if h.s.estimate {
		w.observe(service, 0)
	}
	h.s.complete(w)
}

func TestPoolKeepsHeapInvariant(t *testing.T) {
	h := newHeapHarness(4, false)
	for i := range 16 {
		h.add(float64(1 + i%3))
		checkHeap(t, h)
	}
	for step := range 1000 {
		if step%3 == 2 { // complete on some worker with work
			if w := h.p.slots[(step*7)%h.p.Len()].w; w.pending > 0 {
				h.complete(w, 0)
			}
		} else {
			h.dispatch(t)
		}
		checkHeap(t, h)
	}
	h.remove(t, 5)
	h.add(1) // takes the freed handle
	checkHeap(t, h)
}

func TestEqualWorkersTakeTurns(t *testing.T) {
	h := newHeapHarness(2, false)
	for range 4 {
		h.add(1)
	}
	var got []int
	for range 8 {
		w := h.p.root()
		got = append(got, w.id)
		require.True(t, h.dispatch(t))
		h.complete(w, 0)
	}
	assert.Equal(t, []int{0, 1, 2, 3, 0, 1, 2, 3}, got)
}

// fastAndSlow returns a harness with load estimates and two workers seen
// to take 1 ms and 4 ms, with the scale's centre at 1 ms (so that 4 ms
// counts as 1.5³ = 3.375 ms, see key).
func fastAndSlow(depth int) (h *heapHarness, fast, slow *worker[int, int]) {
	h = newHeapHarness(depth, true)
	h.s.ref = float64(time.Millisecond)
	fast, slow = h.add(1), h.add(1)
	fast.observe(time.Millisecond, 0)
	slow.observe(4*time.Millisecond, 0)
	h.s.touch(fast)
	h.s.touch(slow)
	return h, fast, slow
}

func TestWeightsAndEstimatesOrderWorkers(t *testing.T) {
	t.Run("weight 2 takes twice the pending", func(t *testing.T) {
		h := newHeapHarness(16, false)
		light, heavy := h.add(1), h.add(2)
		for range 9 {
			require.True(t, h.dispatch(t))
		}
		assert.Equal(t, 3, light.pending)
		assert.Equal(t, 6, heavy.pending)
	})
	t.Run("slow worker gets less and recovers", func(t *testing.T) {
		h, fast, slow := fastAndSlow(16)
		for range 5 {
			require.True(t, h.dispatch(t))
		}
		assert.Equal(t, 4, fast.pending, "(3+1)×1 ms loses to (0+1)×3.375 ms, then (4+1)×1 ms beats (1+1)×3.375 ms")
		assert.Equal(t, 1, slow.pending)
		for range 4 * fallSmoothing { // slow serves fast now
			slow.observe(time.Millisecond, 0)
		}
		h.s.touch(slow)
		assert.Less(t, slow.service.Load(), int64(1100*time.Microsecond), "its average recovered")
	})
	t.Run("a full fast worker does not hold up a slow one with room", func(t *testing.T) {
		h, fast, slow := fastAndSlow(1)
		require.True(t, h.dispatch(t))
		require.True(t, h.dispatch(t), "slow has room")
		assert.Equal(t, []int{1, 1}, []int{fast.pending, slow.pending})
		assert.False(t, h.dispatch(t), "both full")
	})
	t.Run("a new worker is tried first", func(t *testing.T) {
		h := newHeapHarness(4, true)
		old := h.add(1)
		old.observe(time.Millisecond, 0)
		h.s.touch(old)
		fresh := h.add(1)
		require.True(t, h.dispatch(t))
		assert.Equal(t, 1, fresh.pending)
	})
	t.Run("the first runs make a running mean, and one outlier counts four times it at most", func(t *testing.T) {
		h := newHeapHarness(4, true)
		w := h.add(1)
		var got []time.Duration
		for _, d := range []time.Duration{16, 32, 16, 0, 1000} {
			w.observe(d*time.Millisecond, 0)
			got = append(got, time.Duration(w.service.Load()))
		}
		assert.Equal(t, []time.Duration{
			16 * time.Millisecond, // the first run is taken whole
			24 * time.Millisecond, // 16 + (32-16)/2
			21333334,              // 24 + (16-24)/3
			16000001,              // 21.3 + (0-21.3)/4, a zero run counting as 1 ns
			28000001,              // 16 + (4 × 16 - 16)/4: capped, and a rise moves it a quarter at most
		}, got)
	})
	t.Run("then the average rises fast and falls slowly", func(t *testing.T) {
		h := newHeapHarness(4, true)
		w := h.add(1)
		for range fallSmoothing {
			w.observe(20*time.Millisecond, 0)
		}
		var got, level []time.Duration
		for _, d := range []time.Duration{36, 8} {
			w.observe(d*time.Millisecond, 0)
			got = append(got, time.Duration(w.service.Load()))
			level = append(level, time.Duration(w.level.Load()))
		}
		assert.Equal(t, []time.Duration{24 * time.Millisecond, 23 * time.Millisecond}, got, "20 + (36-20)/4, then 24 + (8-24)/16")
		assert.Equal(t, []time.Duration{22 * time.Millisecond, 21125 * time.Microsecond}, level, "the level: 20 + (36-20)/8, then 22 + (8-22)/16")
	})
	t.Run("a run eight times the level or slower moves it a quarter of the way", func(t *testing.T) {
		h := newHeapHarness(4, true)
		w := h.add(1)
		end := int64(time.Second)
		for range fallSmoothing {
			end++
			w.observe(2*time.Millisecond, end)
		}
		var got, level []time.Duration
		for i, d := range []time.Duration{10, 100, 1000} {
			end++
			if i == 2 {
				end += int64(100 * time.Millisecond) // a gap: the same, through fold
			}
			w.observe(d*time.Millisecond, end)
			got = append(got, time.Duration(w.service.Load()))
			level = append(level, time.Duration(w.level.Load()))
		}
		assert.Equal(t, []time.Duration{3500 * time.Microsecond, 6125 * time.Microsecond, 10718750 * time.Nanosecond}, got,
			"the peak: 2 + (4 × 2 - 2)/4, then 3.5 + (4 × 3.5 - 3.5)/4, then 6.125 + (4 × 6.125 - 6.125)/4")
		assert.Equal(t, []time.Duration{3 * time.Millisecond, 8250 * time.Microsecond, 22687500 * time.Nanosecond}, level,
			"the level: 2 + (10-2)/8, then 3 + (8 × 3 - 3)/4, off the centre step at once, then 8.25 + (8 × 8.25 - 8.25)/4")
	})
	t.Run("a run after a gap counts for the time the average was not refreshed", func(t *testing.T) {
		h := newHeapHarness(4, true)
		w := h.add(1)
		end := int64(time.Second)
		for range fallSmoothing {
			w.observe(20*time.Millisecond, end)
		}
		end += staleAfter
		w.observe(10*time.Millisecond, end) // 1 − e^(-staleAfter/decay) of the way, more than 1/16
		after := int64(20*time.Millisecond) + int64(-math.Expm1(-float64(staleAfter)/float64(decay))*float64(-10*time.Millisecond))
		assert.Equal(t, after, w.service.Load())
		end += decayFrom
		w.observe(10*time.Millisecond, end) // a short gap: 1/16
		assert.Equal(t, after+(int64(10*time.Millisecond)-after)/fallSmoothing, w.service.Load())
		end += staleAfter + 1
		w.observe(30*time.Millisecond, end) // expired: a new average
		assert.Equal(t, int64(30*time.Millisecond), w.service.Load())
		w.observe(50*time.Millisecond, end+1) // its second run
		assert.Equal(t, int64(40*time.Millisecond), w.service.Load())
	})
}

// With load estimates, a request waits for a busy fast worker rather than
// take a free slow one, unless enough callers wait behind it or the wait
// outlasts the slow worker's expected time, and this holds again after a
// wait has run out once. Fast serves in 10 ms, slow in 60 ms; request -i
// makes fast stall until stalls[i] closes. The loop holds while
// holdMargin × (k+1) × fast's mean < 60 ms for k callers waiting.
func TestEstimateWaitsForAFastWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		stalls := []chan struct{}{nil, make(chan struct{}), make(chan struct{})}
		stallable := func(d time.Duration) Func[int, int] {
			return func(ctx context.Context, i int) (int, error) {
				if i < 0 {
					<-stalls[-i]
				}
				time.Sleep(d)
				return i, nil
			}
		}
		b := mustNew(t, 0, square, WithLoadEstimate(true))
		defer b.Close()
		fast, err := b.AddWorker(stallable(10 * time.Millisecond))
		require.NoError(t, err)
		slow, err := b.AddWorker(stallable(60 * time.Millisecond))
		require.NoError(t, err)
		submit := func(i int) <-chan Result[int, int] { return submitHeld(t, b, i) }
		// Both are new, so both are tried: fast first by ID, twice, so
		// that slow's first run, which counts 1.5 × fast's, is replaced
		// by its second (see observe).
		for range 2 {
			first, second := submit(1), submit(2)
			assert.Equal(t, []int{fast, slow}, []int{(<-first).Worker, (<-second).Worker})
			synctest.Wait()
		}

		// heldForFast submits two requests: the first takes fast, the
		// second is held for it rather than sent to slow, and fast serves
		// both in 2 × 10 ms.
		heldForFast := func(i int) {
			t.Helper()
			busy := submit(i)
			start := time.Now()
			held := submit(i + 1)
			assert.Equal(t, 1, b.Stats().Waiting, "held back while slow is free")
			assert.Equal(t, fast, (<-busy).Worker)
			assert.Equal(t, fast, (<-held).Worker)
			assert.Equal(t, 20*time.Millisecond, time.Since(start))
			synctest.Wait()
		}
		// stallRunsOut stalls fast with request -k: a caller held for it
		// goes to slow once it has waited slow's expected time, 60 ms,
		// and slow serves it in 60 ms more.
		stallRunsOut := func(k, i int) {
			t.Helper()
			stalled := submit(-k)
			start := time.Now()
			assert.Equal(t, slow, (<-submit(i)).Worker)
			assert.Equal(t, 120*time.Millisecond, time.Since(start), "60 ms held, 60 ms served")
			close(stalls[k])
			assert.Equal(t, fast, (<-stalled).Worker)
			synctest.Wait()
		}

		// One caller waits: fast is expected to free up and serve it in
		// 2 × 10 ms, and 1.5 × 20 < 60, so it waits.
		heldForFast(3)

		// Two callers wait (1.5 × 30 < 60); a third would be served by
		// fast after 40 ms, and 1.5 × 40 is not less than 60, so the
		// first of them goes to slow.
		busy := submit(5)
		held := submit(6)
		held2 := submit(7)
		assert.Equal(t, []int{1, 0}, pendings(b), "two held")
		next := submit(8)
		assert.Equal(t, []int{1, 1}, pendings(b), "the third caller sent the first to slow")
		assert.Equal(t, []int{fast, slow, fast, fast},
			[]int{(<-busy).Worker, (<-held).Worker, (<-held2).Worker, (<-next).Worker})
		synctest.Wait()

		stallRunsOut(1, 9)
		// After the wait ran out once, a caller is held again: the stall
		// counted as 4 × 10 ms and moved fast's mean a quarter of the way
		// there, to 17.5 ms, and 1.5 × 2 × 17.5 < 60; and a second stall
		// runs out the same way.
		heldForFast(11)
		stallRunsOut(2, 13)

		// TrySubmit never holds back.
		busy = submit(14)
		c, err := b.TrySubmit(context.Background(), 15)
		require.NoError(t, err)
		assert.Equal(t, slow, (<-c).Worker)
		<-busy
	})
}

// A request running longer than its worker's mean counts its age: a worker
// that stalls stops getting requests while the others have room, and only
// then gets its share. Both workers serve in 10 ms and hold up to 8; worker
// 0 stalls on request -1.
func TestStalledWorkerStopsGettingRequests(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		stall, gate := make(chan struct{}), make(chan struct{})
		fn := func(ctx context.Context, i int) (int, error) {
			switch {
			case i < 0:
				<-stall
			case i > 0:
				<-gate
			}
			time.Sleep(10 * time.Millisecond)
			return i, nil
		}
		b := mustNew(t, 2, fn, WithQueueDepth(8))
		defer b.Close()
		var cs []<-chan Result[int, int]
		submit := func(i int, want []int) {
			t.Helper()
			c, err := b.Submit(context.Background(), i)
			require.NoError(t, err)
			cs = append(cs, c)
			synctest.Wait()
			assert.Equal(t, want, pendings(b), "after request %d", i)
		}
		submit(0, []int{1, 0}) // both learn 10 ms
		submit(0, []int{1, 1})
		for _, c := range cs {
			<-c
		}
		synctest.Wait()
		submit(-1, []int{1, 0}) // worker 0 waited longest
		time.Sleep(100 * time.Millisecond)
		// Worker 0 costs 2 × its request's age, 200 ms; worker 1 costs
		// (pending+1) × 10 ms, so it takes all it can hold.
		for i := range 8 {
			submit(1+i, []int{1, 1 + i})
		}
		submit(9, []int{2, 8}) // worker 1 is full
		close(gate)
		close(stall)
		for _, c := range cs {
			assert.NoError(t, (<-c).Err)
		}
	})
}

// The stress test: many submitters, every kind of outcome, cancellations at
// every stage, worker churn and a Close or Shutdown in the middle of each
// round, checked request by request. A round is one balancer's life; rounds
// run until the requests made (accepted or refused) reach the target.
// BALANCER_STRESS=N sets the target (the full run uses 1000000); -short
// runs a small version. BALANCER_SEED=S replays a seed.
func TestStress(t *testing.T) {
	requests, round := 40_000, 10_000
	if testing.Short() {
		requests, round = 8_000, 4_000
	}
	if n, err := strconv.Atoi(os.Getenv("BALANCER_STRESS")); err == nil {
		requests, round = n, max(n/20, 1000)
	}
	seed := time.Now().UnixNano()
	if s, err := strconv.ParseInt(os.Getenv("BALANCER_SEED"), 10, 64); err == nil {
		seed = s
	}
	t.Logf("seed %d (replay with BALANCER_SEED=%d)", seed, seed)
	start := time.Now()
	var made, accepted, dos int64
	outcomes := map[string]int{}
	for r := int64(0); made < int64(requests); r++ {
		st := newStress(seed+r, round)
		// A hang is a failure too, and must name its seed; go test's own
		// timeout would not print the test's log.
		watchdog := time.AfterFunc(stressRoundLimit, func() {
			debug.SetTraceback("all")
			panic(fmt.Sprintf("TestStress: round %d still running after %v: replay with BALANCER_SEED=%d", r, stressRoundLimit, seed))
		})
		func() {
			// A check that fails stops the test from inside run: say
			// which round, on the way out.
			defer func() {
				watchdog.Stop()
				if t.Failed() {
					t.Logf("round %d (its own seed %d) failed: replay with BALANCER_SEED=%d", r, seed+r, seed)
				}
			}()
			st.run(t)
		}()
		if t.Failed() {
			t.FailNow()
		}
		made += st.accepted.Load() + st.refused.Load() + st.dos.Load()
		accepted += st.accepted.Load()
		dos += st.dos.Load()
		for k, n := range st.kinds {
			outcomes[k] += n
		}
	}
	t.Logf("%d requests made, %d of them by Do; %d accepted by Submit; outcomes %v, in %v", made, dos, accepted, outcomes, time.Since(start))
}

// stressRoundLimit is far above a round's time (under a second here, with
// the race detector) and below go test's default timeout.
const stressRoundLimit = 3 * time.Minute

const (
	kindOK = iota
	kindError
	kindPanic
	kindGoexit
	kindBlock // waits for its ctx, which its submitter always cancels
	kinds
)

var (
	errStress = errors.New("stress: Func failed")
	errDead   = errors.New("stress: the worker's backend failed")
)

// failing wraps the stress Func for a worker whose backend fails every
// request (always) or every other one.
func (st *stress) failing(always bool) Func[int, int] {
	return func(ctx context.Context, i int) (int, error) {
		if always || i%2 == 0 {
			st.ran[i].Add(1)
			if i%3 == 0 {
				return 0, Unprocessed(errDead) // retried elsewhere in rounds with WithRetry
			}
			return 0, errDead
		}
		return st.fn(ctx, i)
	}
}

type stress struct {
	seed     int64
	requests int
	depth    int
	retry    bool           // the round retries or hedges: a request may run on several workers, once on each
	ran      []atomic.Int32 // times the Func ran for request i
	kindOf   []int
	results  []<-chan Result[int, int] // nil if refused
	viaDo    []bool                    // request i went through Do, whose outcome is results[i]
	next     atomic.Int64
	accepted atomic.Int64 // by Submit
	refused  atomic.Int64 // by Submit
	dos      atomic.Int64 // calls of Do
	kinds    map[string]int
}

func newStress(seed int64, requests int) *stress {
	st := &stress{seed: seed, requests: requests, ran: make([]atomic.Int32, requests),
		kindOf: make([]int, requests), results: make([]<-chan Result[int, int], requests), viaDo: make([]bool, requests),
		kinds: map[string]int{}}
	rng := rand.New(rand.NewPCG(uint64(seed), 1))
	for i := range st.kindOf {
		st.kindOf[i] = rng.IntN(kinds)
	}
	return st
}

func (st *stress) fn(ctx context.Context, i int) (int, error) {
	st.ran[i].Add(1)
	switch st.kindOf[i] {
	case kindError:
		return 0, errStress
	case kindPanic:
		panic(i)
	case kindGoexit:
		runtime.Goexit()
	case kindBlock:
		<-ctx.Done()
		return 0, ctx.Err()
	}
	return 2 * i, nil
}

func (st *stress) run(t *testing.T) {
	st.depth = 1 + int(uint64(st.seed)/2%4)
	opts := []Option{WithQueueDepth(st.depth)}
	if st.seed%2 == 0 { // every other round weighs workers by their speed, and holds back
		opts = append(opts, WithLoadEstimate(true))
	}
	opts = append(opts, WithConcurrency(1+int(uint64(st.seed)/8%3))) // New's workers: 1 to 3
	if st.seed%5 < 2 {
		st.retry = true
		opts = append(opts, WithRetry(3), WithRetryOn(func(_ int, err error) bool { return errors.Is(err, errStress) }))
	}
	if st.seed%5 == 1 || st.seed%5 == 2 { // hedge at the median: often, racing every other event
		st.retry = true
		opts = append(opts, WithHedge(0.5, 0), WithConcurrency(16)) // slots to spare, or nothing is hedged
	}
	switch st.seed % 3 {
	case 0:
		opts = append(opts, WithEjection(false))
	case 1: // ejections of 100 µs, 200 µs, …, so that rounds probe often
		opts = append(opts, &withHooks{jitter: func() float64 { return -0.4999 }})
	}
	// Worker 0's backend fails every request and worker 1's every other:
	// they are ejected and probed while everything else goes on.
	specs := []WorkerSpec[int, int]{{Func: st.failing(true)}, {Func: st.failing(false)}}
	for range 6 {
		specs = append(specs, WorkerSpec[int, int]{Func: st.fn})
	}
	b, err := NewFrom(specs, opts...)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for g := range 64 {
		if g%4 == 0 {
			wg.Go(func() { st.doer(t, b, uint64(g)) })
		} else {
			wg.Go(func() { st.submitter(t, b, uint64(g)) })
		}
	}
	wg.Go(func() { st.churn(t, b) })
	wg.Go(func() { st.closer(t, b) })
	wg.Wait()
	require.NoError(t, b.Close())
	st.check(t, b)
	s := b.Stats()
	st.kinds["ejections"] += int(s.Ejections)
	st.kinds["probes"] += int(s.Probes)
	st.kinds["retries"] += int(s.Retries)
	st.kinds["hedges"] += int(s.Hedges)
}

// submitter sends requests until they run out or the balancer closes.
func (st *stress) submitter(t *testing.T, b *Balancer[int, int], g uint64) {
	rng := rand.New(rand.NewPCG(uint64(st.seed), g+2))
	var cancels []context.CancelFunc
	defer func() {
		for _, cancel := range cancels {
			cancel()
		}
	}()
	for {
		i := int(st.next.Add(1)) - 1
		if i >= st.requests {
			return
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancelFirst := rng.IntN(20) == 0
		if cancelFirst {
			cancel()
		}
		c, err := b.Submit(ctx, i)
		switch {
		case err == nil:
			st.results[i] = c
			st.accepted.Add(1)
		case cancelFirst && errors.Is(err, context.Canceled), errors.Is(err, ErrClosed):
			st.refused.Add(1)
		default:
			t.Errorf("request %d: Submit: %v", i, err)
		}
		if st.kindOf[i] == kindBlock || rng.IntN(10) == 0 {
			if rng.IntN(2) == 0 {
				runtime.Gosched() // sometimes let it reach a worker first
			}
			cancel()
		}
		if err == nil && rng.IntN(4) == 0 {
			r := <-c // most callers walk away; check() reads the rest
			st.results[i] = resultChan(r, c)
		}
		cancels = append(cancels, cancel)
		if errors.Is(err, ErrClosed) {
			return
		}
	}
}

// doer calls Do until the requests run out or the balancer closes. Some
// of its contexts are done before the call, some end at a random moment
// while it waits: in the queue, at a worker or while the Func runs.
func (st *stress) doer(t *testing.T, b *Balancer[int, int], g uint64) {
	rng := rand.New(rand.NewPCG(uint64(st.seed), g+2))
	for {
		i := int(st.next.Add(1)) - 1
		if i >= st.requests {
			return
		}
		st.viaDo[i] = true
		ctx, cancel := context.WithCancel(context.Background())
		switch {
		case rng.IntN(20) == 0:
			cancel()
		case st.kindOf[i] == kindBlock || rng.IntN(10) == 0:
			ctx, cancel = context.WithTimeout(context.Background(), time.Duration(rng.IntN(50))*time.Microsecond)
		}
		v, err := b.Do(ctx, i)
		cancel()
		c := make(chan Result[int, int], 1)
		c <- Result[int, int]{Req: i, Value: v, Err: err}
		close(c)
		st.results[i] = c
		st.dos.Add(1)
		if errors.Is(err, ErrClosed) {
			return
		}
	}
}

// checkDo checks the outcome of a request that went through Do. Do
// returns ctx.Err() as soon as ctx ends, whether or not the request was
// accepted or ran, so only ErrClosed (never ran) and a Func's outcome
// (ran once) are certain; it reports whether the balancer certainly
// accepted the request, and the kind of outcome.
func (st *stress) checkDo(t *testing.T, i int, r Result[int, int]) (accepted bool, kind string) {
	ran := st.ran[i].Load()
	require.LessOrEqual(t, ran, st.runs(), "request %d ran too often", i)
	var pe *PanicError
	switch {
	case errors.Is(r.Err, ErrClosed):
		require.True(t, ran == 0 || st.retry, "request %d: ErrClosed but it ran", i)
		return false, "do: closed"
	case errors.Is(r.Err, context.Canceled), errors.Is(r.Err, context.DeadlineExceeded):
		return false, "do: ctx ended"
	case r.Err == nil:
		require.Equal(t, kindOK, st.kindOf[i], "request %d", i)
		require.Equal(t, 2*i, r.Value)
		kind = "do: value"
	case errors.As(r.Err, &pe):
		require.Equal(t, kindPanic, st.kindOf[i])
		kind = "do: panic"
	case errors.Is(r.Err, ErrGoexit):
		require.Equal(t, kindGoexit, st.kindOf[i])
		kind = "do: goexit"
	case errors.Is(r.Err, errStress):
		require.Equal(t, kindError, st.kindOf[i])
		kind = "do: error"
	case errors.Is(r.Err, errDead):
		kind = "do: worker failed"
	default:
		t.Fatalf("request %d: unexpected outcome of Do %v", i, r.Err)
	}
	require.True(t, ran == 1 || st.retry && ran >= 1, "request %d: outcome %q but the Func ran %d times", i, kind, ran)
	return true, kind
}

// runs is how often a request may run: once, or once per attempt.
func (st *stress) runs() int32 {
	if st.retry {
		return 3
	}
	return 1
}

// resultChan gives check the one result already read, followed by whatever
// else c yields, which must be nothing.
func resultChan(r Result[int, int], c <-chan Result[int, int]) <-chan Result[int, int] {
	out := make(chan Result[int, int], 2)
	out <- r
	if extra, ok := <-c; ok {
		out <- extra
	}
	close(out)
	return out
}

// churn adds and removes workers while requests flow.
func (st *stress) churn(t *testing.T, b *Balancer[int, int]) {
	rng := rand.New(rand.NewPCG(uint64(st.seed), 1))
	ids := []int{0, 1, 2, 3, 4, 5, 6, 7}
	for st.next.Load() < int64(st.requests) {
		for _, w := range b.Stats().Workers {
			assert.LessOrEqual(t, w.Pending, w.Concurrency*st.depth, "worker %d over its limit", w.ID)
			assert.LessOrEqual(t, w.Running, w.Concurrency, "worker %d runs too many", w.ID)
			assert.True(t, w.Running >= 0 && w.Queued >= 0, "worker %d: %+v", w.ID, w)
		}
		if len(ids) > 1 && rng.IntN(2) == 0 {
			k := rng.IntN(len(ids))
			ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(2000))*time.Microsecond)
			err := b.RemoveWorker(ctx, ids[k])
			cancel()
			if errors.Is(err, ErrClosed) {
				return
			}
			if err != nil && !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("RemoveWorker(%d): %v", ids[k], err)
			}
			ids = append(ids[:k], ids[k+1:]...)
		} else {
			fn := st.fn
			if rng.IntN(4) == 0 {
				fn = st.failing(rng.IntN(2) == 0)
			}
			id, err := b.AddWorker(fn, WithWeight(float64(1+rng.IntN(3))), WithConcurrency(1+rng.IntN(4)))
			if errors.Is(err, ErrClosed) {
				return
			}
			if !assert.NoError(t, err) {
				return
			}
			ids = append(ids, id)
		}
		runtime.Gosched()
	}
}

// closer closes the balancer about halfway, with Close or with a Shutdown
// that may give up.
func (st *stress) closer(t *testing.T, b *Balancer[int, int]) {
	rng := rand.New(rand.NewPCG(uint64(st.seed), 0))
	at := int64(st.requests/2 + rng.IntN(st.requests/2))
	for st.next.Load() < at {
		runtime.Gosched() // polls real state
	}
	if rng.IntN(2) == 0 {
		assert.NoError(t, b.Close())
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(rng.IntN(1000))*time.Microsecond)
	defer cancel()
	if err := b.Shutdown(ctx); err != nil {
		assert.ErrorIs(t, err, context.DeadlineExceeded)
	}
}

// check reads every accepted request's channel: exactly one outcome each,
// of a kind its Func and its fate allow, and totals that agree with Stats.
func (st *stress) check(t *testing.T, b *Balancer[int, int]) {
	var completed, failed, panics, uncertain uint64
	for i, c := range st.results {
		if c == nil {
			assert.Zero(t, st.ran[i].Load(), "refused request %d ran", i)
			continue
		}
		r, ok := <-c
		require.True(t, ok, "request %d: no outcome", i)
		_, extra := <-c
		require.False(t, extra, "request %d: a second outcome", i)
		require.Equal(t, i, r.Req)
		if st.viaDo[i] {
			accepted, kind := st.checkDo(t, i, r)
			st.kinds[kind]++
			if !accepted {
				uncertain++
				continue
			}
			completed++
			failed += map[bool]uint64{true: 1}[r.Err != nil]
			if _, ok := r.Err.(*PanicError); ok {
				panics++
			}
			continue
		}
		completed++
		ran := st.ran[i].Load()
		require.LessOrEqual(t, ran, st.runs(), "request %d ran too often", i)
		var pe *PanicError
		kind := "value"
		switch {
		case r.Err == nil:
			require.Equal(t, kindOK, st.kindOf[i], "request %d", i)
			require.Equal(t, 2*i, r.Value)
		case errors.Is(r.Err, ErrClosed):
			kind = "closed"
			require.True(t, ran == 0 || st.retry, "request %d: ErrClosed but it ran", i)
		case errors.Is(r.Err, context.Canceled) && ran == 0:
			kind = "cancelled before it ran"
		case errors.Is(r.Err, context.Canceled) && st.retry && st.kindOf[i] != kindBlock:
			kind = "cancelled between attempts"
		case errors.As(r.Err, &pe):
			kind = "panic"
			panics++
			require.Equal(t, kindPanic, st.kindOf[i])
			require.Equal(t, i, pe.Value)
		case errors.Is(r.Err, ErrGoexit):
			kind = "goexit"
			require.Equal(t, kindGoexit, st.kindOf[i])
		case errors.Is(r.Err, errStress):
			kind = "error"
			require.Equal(t, kindError, st.kindOf[i])
		case errors.Is(r.Err, errDead):
			kind = "worker failed"
		case errors.Is(r.Err, context.Canceled):
			kind = "cancelled while running"
			require.Equal(t, kindBlock, st.kindOf[i])
		default:
			t.Fatalf("request %d: unexpected outcome %v", i, r.Err)
		}
		if r.Err != nil {
			failed++
		}
		switch {
		case kind == "closed" || kind == "cancelled before it ran":
		case st.retry:
			require.Equal(t, int(ran), r.Attempts, "request %d: outcome %q after %d attempts, but it ran %d times", i, kind, r.Attempts, ran)
		default:
			require.Equal(t, int32(1), ran, "request %d: outcome %q but the Func did not run", i, kind)
		}
		st.kinds[kind]++
	}
	// A Do that returned its ctx's error or ErrClosed may or may not have
	// been accepted, and may have failed or panicked after it returned.
	// With retries and hedges, each attempt counts in Completed, and
	// Failed and Panics count attempts too.
	s := b.Stats()
	extra := s.Retries + s.Hedges
	assert.Equal(t, s.Accepted+extra, s.Completed, "accepted, retried and completed")
	assert.GreaterOrEqual(t, s.Completed, completed, "completed")
	assert.LessOrEqual(t, s.Completed, completed+uncertain+extra, "completed")
	assert.GreaterOrEqual(t, s.Failed, failed, "failed")
	assert.LessOrEqual(t, s.Failed, failed+uncertain+extra, "failed")
	assert.GreaterOrEqual(t, s.Panics, panics, "panics")
	assert.LessOrEqual(t, s.Panics, panics+uncertain+extra, "panics")
	assert.Zero(t, s.Pending)
}

// Every method a Func may call on its own balancer returns: none waits for
// the caller, or for a worker that waits for the caller.
func TestMethodsCalledFromInsideAFunc(t *testing.T) {
	ctx := context.Background()
	t.Run("RemoveWorker of its own worker", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			b = mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
				return i, b.RemoveWorker(ctx, 0) // the backend died: retire
			})
			defer b.Close()
			v, err := b.Do(ctx, 7)
			assert.NoError(t, err, "returns nil once the removal stands")
			assert.Equal(t, 7, v)
			synctest.Wait()
			assert.Empty(t, b.Stats().Workers, "retired once its Func returned")
			_, err = b.TrySubmit(ctx, 8)
			assert.ErrorIs(t, err, ErrFull, "no worker left")
			assert.ErrorIs(t, b.RemoveWorker(ctx, 0), ErrUnknownWorker)
		})
	})
	t.Run("RemoveWorker of a worker that waits for the caller", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			removed := make(chan struct{})
			b = mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
				if i < 0 { // remove worker -i-1, which waits for this Func
					defer close(removed)
					return i, b.RemoveWorker(ctx, -i-1)
				}
				<-removed
				return i, nil
			})
			defer b.Close()
			waiter, err := b.Submit(ctx, 1) // on worker 0, waits for the removal
			require.NoError(t, err)
			remover, err := b.Submit(ctx, -1) // on worker 1, removes worker 0
			require.NoError(t, err)
			assert.Equal(t, Result[int, int]{Req: -1, Value: -1, Worker: 1, Attempts: 1}, <-remover)
			assert.Equal(t, Result[int, int]{Req: 1, Value: 1, Worker: 0, Attempts: 1}, <-waiter, "worker 0 drained")
			synctest.Wait()
			ws := b.Stats().Workers
			require.Len(t, ws, 1)
			assert.Equal(t, 1, ws[0].ID)
		})
	})
	t.Run("Close from every slot of a worker", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			var started sync.WaitGroup
			started.Add(3)
			b = mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
				started.Done()
				started.Wait() // all three slots are inside a Func
				return i, b.Close()
			}, WithConcurrency(3))
			var cs []<-chan Result[int, int]
			for i := range 3 {
				c, err := b.Submit(ctx, i)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			for _, c := range cs {
				assert.NoError(t, (<-c).Err)
			}
			require.NoError(t, b.Close())
		})
	})
	t.Run("every other method", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			type outcome struct {
				id   int
				err  error
				errs []error
			}
			got := make(chan outcome, 1)
			b = mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
				if i > 0 {
					return i, nil
				}
				var o outcome
				o.id, o.err = b.AddWorker(square)
				_, err := b.Do(ctx, 1) // the other worker is free
				o.errs = append(o.errs, err)
				c, err := b.TrySubmit(ctx, 2)
				o.errs = append(o.errs, err, (<-c).Err)
				c, err = b.Submit(ctx, 3)
				o.errs = append(o.errs, err, (<-c).Err)
				o.errs = append(o.errs, b.RemoveWorker(ctx, o.id))
				_ = b.Stats()
				got <- o
				return i, nil
			})
			defer b.Close()
			_, err := b.Do(ctx, 0)
			require.NoError(t, err)
			o := <-got
			assert.Equal(t, outcome{id: 2, errs: make([]error, 6)}, o)
		})
	})
}

// 10. Reliability: cancellation paths and Close in progress.

// Shutdown's cancellation reaches a running Func whatever its request's
// context, with cause ErrClosed, and however the Func watches its ctx; a
// caller's own cancellation keeps its cause.
func TestShutdownCancelsWithCause(t *testing.T) {
	type key struct{}
	// The ways a Func watches its ctx, each returning the cause it saw: it
	// waits on Done; it polls Err between steps and never calls Done, so
	// the context is ended before anyone asked for its channel; or it
	// waits on a context it derived.
	watches := []struct {
		name string
		wait func(ctx context.Context) error
	}{
		{"done", func(ctx context.Context) error {
			<-ctx.Done()
			return context.Cause(ctx)
		}},
		{"polled", func(ctx context.Context) error {
			for i := 0; ctx.Err() == nil; i++ {
				if i == 10_000 { // 10 s, where Shutdown gives up after 1
					return errors.New("its ctx never ended")
				}
				time.Sleep(time.Millisecond)
			}
			return context.Cause(ctx)
		}},
		{"derived", func(ctx context.Context) error {
			d, cancel := context.WithTimeout(ctx, 10*time.Hour)
			defer cancel()
			<-d.Done()
			return context.Cause(d)
		}},
	}
	// causeOf runs one request under ctx until end ends it, and returns
	// the cause its Func saw and its outcome.
	causeOf := func(t *testing.T, ctx context.Context, wait func(context.Context) error, end func(t *testing.T, b *Balancer[int, int])) (cause, outcome error) {
		causes := make(chan error, 1)
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			causes <- wait(ctx)
			return 0, ctx.Err()
		})
		c, err := b.Submit(ctx, 1)
		require.NoError(t, err)
		synctest.Wait() // running
		end(t, b)
		cause, outcome = <-causes, (<-c).Err
		require.NoError(t, b.Close())
		return cause, outcome
	}
	shutdown := func(t *testing.T, b *Balancer[int, int]) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		assert.ErrorIs(t, b.Shutdown(ctx), context.DeadlineExceeded)
	}
	tests := []struct {
		name string
		ctx  func() (context.Context, context.CancelFunc)
	}{
		{"background", func() (context.Context, context.CancelFunc) { return context.Background(), func() {} }},
		{"cancellable", func() (context.Context, context.CancelFunc) { return context.WithCancel(context.Background()) }},
		{"with values", func() (context.Context, context.CancelFunc) {
			return context.WithValue(context.Background(), key{}, 1), func() {}
		}},
		{"with a deadline", func() (context.Context, context.CancelFunc) {
			return context.WithTimeout(context.Background(), time.Hour)
		}},
	}
	for _, w := range watches {
		for _, tt := range tests {
			t.Run(w.name+"/"+tt.name, func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					ctx, cancel := tt.ctx()
					defer cancel()
					cause, outcome := causeOf(t, ctx, w.wait, shutdown)
					assert.ErrorIs(t, cause, ErrClosed)
					assert.ErrorIs(t, outcome, context.Canceled, "ctx.Err() is still context.Canceled")
				})
			})
		}
		t.Run(w.name+"/the caller's cause stands", func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				errGone := errors.New("client went away")
				ctx, cancel := context.WithCancelCause(context.Background())
				cause, outcome := causeOf(t, ctx, w.wait, func(*testing.T, *Balancer[int, int]) { cancel(errGone) })
				assert.ErrorIs(t, cause, errGone)
				assert.ErrorIs(t, outcome, context.Canceled)
			})
		})
	}
}

// keeper is a balancer of one worker whose Func hands out the ctx it ran
// under, for a test to look at after the Func returned.
func keeper(t *testing.T) (*Balancer[int, int], <-chan context.Context) {
	kept := make(chan context.Context, 1)
	return mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
		kept <- ctx
		return i, nil
	}), kept
}

// A Func's ctx tells its request's deadline and values, and, when the
// request's context can be done, is done once the Func has returned, like
// a context the balancer derived and cancelled: a goroutine the Func left
// behind sees it end. The request's context itself lives on.
func TestFuncContextIsTheRequests(t *testing.T) {
	type key struct{}
	synctest.Test(t, func(t *testing.T) {
		b, kept := keeper(t)
		defer b.Close()
		parent, cancel := context.WithTimeout(context.WithValue(context.Background(), key{}, "v"), time.Hour)
		defer cancel()
		_, err := b.Do(parent, 1)
		require.NoError(t, err)
		ctx := <-kept
		want, _ := parent.Deadline()
		got, ok := ctx.Deadline()
		assert.True(t, ok)
		assert.Equal(t, want, got)
		assert.Equal(t, "v", ctx.Value(key{}))
		assert.ErrorIs(t, ctx.Err(), context.Canceled, "the Func has returned")
		assert.ErrorIs(t, context.Cause(ctx), context.Canceled)
		select {
		case <-ctx.Done():
		default:
			t.Error("a Func's ctx is not done after it returned")
		}
		assert.NoError(t, parent.Err(), "the request's own context ended with its Func")

		// Asked for Done while the Func runs, ended by the request's
		// context, with its cause.
		running := make(chan context.Context, 1)
		b2 := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			running <- ctx
			<-ctx.Done()
			return i, nil
		})
		defer b2.Close()
		errGone := errors.New("client went away")
		parent2, cancel2 := context.WithCancelCause(parent)
		c, err := b2.Submit(parent2, 2)
		require.NoError(t, err)
		ctx = <-running
		synctest.Wait()
		assert.NoError(t, ctx.Err(), "done before anything ended it")
		cancel2(errGone)
		assert.NoError(t, (<-c).Err)
		assert.ErrorIs(t, context.Cause(ctx), errGone)
	})
}

// A Func's ctx ends with the first of its ends, even when the Func looks
// only after the second: Shutdown before the caller, the caller before
// Shutdown, and the Func's return before the caller.
func TestFuncContextKeepsItsFirstEnd(t *testing.T) {
	errGone := errors.New("client went away")
	// polled runs one request whose Func polls its ctx every 3 ms, ends
	// it with first and then second at 1 s (between two polls), and
	// returns the cause the Func saw.
	polled := func(t *testing.T, first, second func(*Balancer[int, int], context.CancelCauseFunc)) error {
		causes := make(chan error, 1)
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			for i := 0; ctx.Err() == nil && i < 10_000; i++ { // 30 s at most
				time.Sleep(3 * time.Millisecond)
			}
			causes <- context.Cause(ctx)
			return 0, ctx.Err()
		})
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		c, err := b.Submit(ctx, 1)
		require.NoError(t, err)
		time.Sleep(time.Second)
		first(b, cancel)
		second(b, cancel)
		<-c
		require.NoError(t, b.Close())
		return <-causes
	}
	shutdown := func(b *Balancer[int, int], _ context.CancelCauseFunc) {
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		_ = b.Shutdown(ctx) // gives up at once
	}
	leave := func(_ *Balancer[int, int], cancel context.CancelCauseFunc) { cancel(errGone) }
	synctest.Test(t, func(t *testing.T) {
		assert.ErrorIs(t, polled(t, shutdown, leave), ErrClosed)
	})
	synctest.Test(t, func(t *testing.T) {
		assert.ErrorIs(t, polled(t, leave, shutdown), errGone)
	})
	synctest.Test(t, func(t *testing.T) {
		b, kept := keeper(t)
		defer b.Close()
		ctx, cancel := context.WithCancelCause(context.Background())
		_, err := b.Do(ctx, 1)
		require.NoError(t, err)
		cancel(errGone) // after the Func returned, before anyone looked
		assert.ErrorIs(t, context.Cause(<-kept), context.Canceled)
	})
}

// Requests with a context that carries values and can never be done share
// one context at their slot only when their contexts are the same: each
// Func sees its own request's values, also for a context type that == would
// panic on.
func TestValuesContextsAreNotMixedUp(t *testing.T) {
	type key struct{}
	b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
		v, _ := ctx.Value(key{}).(int)
		return v, nil
	})
	defer b.Close()
	ctxs := []context.Context{
		context.WithValue(context.Background(), key{}, 1),
		context.WithValue(context.Background(), key{}, 2),
		listCtx{context.WithValue(context.Background(), key{}, 3), []int{3}},
		listCtx{context.WithValue(context.Background(), key{}, 4), []int{4}},
	}
	for i := range 80 {
		ctx := ctxs[i/2%len(ctxs)] // each context twice in a row, then the next
		v, err := b.Do(ctx, 0)
		require.NoError(t, err)
		require.Equal(t, ctx.Value(key{}), v, "request %d", i)
	}
}

// listCtx is a context whose type == panics on: a struct holding a slice.
type listCtx struct {
	context.Context
	list []int
}

// WorkerID tells a Func the ID of the worker that runs it, whatever its
// request's context, through a context it derived too, with hedging on, and
// the innermost worker where one balancer's Func calls another's.
func TestWorkerID(t *testing.T) {
	type key struct{}
	cancellable, cancel := context.WithCancel(context.Background())
	defer cancel()
	ctxs := map[string]context.Context{
		"background":  context.Background(),
		"todo":        context.TODO(),
		"with values": context.WithValue(context.Background(), key{}, 1),
		"cancellable": cancellable,
	}
	for _, hedged := range []bool{false, true} {
		opts := []Option{WithLoadEstimate(false)} // sequential requests take turns
		if hedged {
			opts = append(opts, WithHedge(0.5, time.Hour))
		}
		b := mustNew(t, 3, func(ctx context.Context, i int) (int, error) {
			id, ok := WorkerID(ctx)
			d, cancel := context.WithCancel(ctx)
			defer cancel()
			if did, dok := WorkerID(d); !ok || !dok || did != id {
				return 0, fmt.Errorf("WorkerID gave %d %v, derived %d %v", id, ok, did, dok)
			}
			return id, nil
		}, opts...)
		defer b.Close() // also if a check fails: the tests after count goroutines
		for name, ctx := range ctxs {
			seen := map[int]bool{}
			for range 30 {
				res := <-must(b.Submit(ctx, 0))
				require.NoError(t, res.Err, "%s, hedged %v", name, hedged)
				assert.Equal(t, res.Worker, res.Value, "%s, hedged %v", name, hedged)
				seen[res.Value] = true
			}
			assert.Len(t, seen, 3, "%s: every worker has its ID", name)
		}
	}
	for _, ctx := range []context.Context{nil, context.Background(), cancellable} {
		id, ok := WorkerID(ctx)
		assert.False(t, ok, "outside a Func")
		assert.Zero(t, id)
	}

	inner := mustNew(t, 5, func(ctx context.Context, i int) (int, error) {
		id, _ := WorkerID(ctx)
		return id, nil
	}, WithLoadEstimate(false)) // its workers take turns, so most IDs are not the outer's
	defer inner.Close()
	// The outer Func passes its context on as it is, or with its
	// cancellation taken off, which leaves only values, the outer
	// worker's ID among them.
	keep := func(ctx context.Context) context.Context { return ctx }
	for _, pass := range []func(context.Context) context.Context{keep, context.WithoutCancel} {
		outer := mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
			res := <-must(inner.Submit(pass(ctx), i))
			return res.Value*10 + res.Worker, res.Err
		})
		defer outer.Close()
		for range 20 {
			v, err := outer.Do(cancellable, 0)
			require.NoError(t, err)
			assert.Equal(t, v/10, v%10, "the inner Func sees its own worker's ID")
		}
	}
}

// A consumer that cancels FanIn's ctx and stops reading leaves no
// goroutine behind, though every input still has values to give.
func TestFanInConsumerWalksAway(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ctx, cancel := context.WithCancel(context.Background())
		var ins []<-chan int
		for range 4 {
			c := make(chan int, 8)
			for j := range 8 {
				c <- j
			}
			ins = append(ins, c) // never closed
		}
		out := FanIn(ctx, ins...)
		for range 3 {
			<-out
		}
		cancel()
		synctest.Wait()
		// Every forwarder has seen ctx end and returned; the last closed
		// out without sending it anything more.
		n := 0
		for range out {
			n++
		}
		assert.Zero(t, n, "values sent after the consumer stopped reading")
		// synctest.Test fails if a FanIn goroutine is left behind.
	})
}

// A caller that abandons a Do (its ctx ends while the Func runs) and calls
// Do again gets its new request's result, never the old one's.
func TestAbandonedDoDoesNotLeakIntoTheNext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		g := newGates(200)
		b := mustNew(t, 1, g.fn)
		defer b.Close()
		for i := 0; i < 200; i += 2 {
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				synctest.Wait() // the Func is running
				cancel()
			}()
			_, err := b.Do(ctx, i)
			assert.ErrorIs(t, err, context.Canceled)
			g.open(i) // the abandoned request finishes and delivers
			synctest.Wait()
			g.open(i + 1)
			v, err := b.Do(context.Background(), i+1)
			require.NoError(t, err)
			require.Equal(t, i+1, v, "request %d got another's result", i+1)
		}
	})
}

// Every method called from many goroutines while Close is in progress
// returns its documented result, and nothing is accepted that Close does
// not finish.
func TestMethodsDuringClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		b := mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
			<-release // ignores ctx, so even Shutdown giving up waits for it
			return i, nil
		})
		running, err := b.Submit(context.Background(), 1)
		require.NoError(t, err)
		closed := make(chan error, 1)
		go func() { closed <- b.Close() }()
		synctest.Wait()
		require.Empty(t, closed, "Close waits for the running request")

		ctx := context.Background()
		calls := map[string]func() error{
			"Do":           func() error { _, err := b.Do(ctx, 2); return err },
			"Submit":       func() error { _, err := b.Submit(ctx, 2); return err },
			"TrySubmit":    func() error { _, err := b.TrySubmit(ctx, 2); return err },
			"AddWorker":    func() error { _, err := b.AddWorker(square); return err },
			"RemoveWorker": func() error { return b.RemoveWorker(ctx, 1) },
		}
		var wg sync.WaitGroup
		for name, call := range calls {
			for range 8 {
				wg.Go(func() { assert.ErrorIs(t, call(), ErrClosed, name) })
			}
		}
		for range 4 {
			wg.Go(func() {
				s := b.Stats()
				assert.Equal(t, uint64(1), s.Accepted)
				assert.Equal(t, 1, s.Pending)
			})
			wg.Go(func() {
				ctx, cancel := context.WithTimeout(context.Background(), time.Second)
				defer cancel()
				assert.ErrorIs(t, b.Shutdown(ctx), context.DeadlineExceeded)
			})
		}
		wg.Wait()
		assert.Empty(t, closed)
		var closers sync.WaitGroup
		for range 4 {
			closers.Go(func() { assert.NoError(t, b.Close()) })
		}
		close(release)
		assert.NoError(t, <-closed)
		closers.Wait()
		assert.Equal(t, Result[int, int]{Req: 1, Value: 1, Worker: 0, Attempts: 1}, <-running)
		s := b.Stats()
		assert.Equal(t, s.Accepted, s.Completed, "everything accepted finished")
	})
}

// Close's promise, exactly: when it returns, every Func has returned, every
// accepted request has its outcome, and every goroutine the balancer
// started has made its last call (a deferred WaitGroup.Done); the runtime
// may still be reaping the last of them, which synctest.Wait waits out.
func TestCloseReturnsWhenEverythingEnded(t *testing.T) {
	var inside atomic.Int64
	fn := func(ctx context.Context, i int) (int, error) {
		inside.Add(1)
		defer inside.Add(-1)
		time.Sleep(time.Duration(i) * time.Millisecond)
		if i%5 == 0 {
			runtime.Goexit() // its slot gets a new goroutine
		}
		return i, nil
	}
	frames := []string{"balancer.(*worker[...]).run", "balancer.(*Balancer[...]).loop"}
	// waiting is how a stack shows a worker goroutine at the range over
	// its queue: the file and line of that statement.
	src, err := os.ReadFile("worker.go")
	require.NoError(t, err)
	waiting := ""
	for i, line := range strings.Split(string(src), "\n") {
		if strings.Contains(line, "for t.r = range w.reqs") {
			waiting = fmt.Sprintf("/worker.go:%d ", i+1)
		}
	}
	require.NotEmpty(t, waiting)
	for round := range 10 { // each round has a chance to catch a Close that returns early
		synctest.Test(t, func(t *testing.T) {
			b := mustNew(t, 3, fn, WithConcurrency(2), WithQueueDepth(3))
			var cs []<-chan Result[int, int]
			for i := range 18 {
				c, err := b.Submit(context.Background(), i)
				require.NoError(t, err)
				cs = append(cs, c)
			}
			synctest.Wait()
			for _, frame := range frames {
				require.Contains(t, allStacks(), frame, "before Close")
			}
			require.NoError(t, b.Close())
			// Checked at once: no worker goroutine may still be at the
			// range over its queue. (One may still be returning from run
			// after its last call.)
			require.NotContains(t, allStacks(), waiting, "round %d: a worker goroutine had not ended", round)
			assert.Zero(t, inside.Load(), "a Func still running")
			for i, c := range cs {
				select {
				case r := <-c:
					assert.Equal(t, i, r.Req)
				default:
					t.Errorf("request %d has no outcome yet", i)
				}
			}
			synctest.Wait()
			for _, frame := range frames {
				assert.NotContains(t, allStacks(), frame)
			}
		})
	}
}

// allStacks returns the stacks of all goroutines.
func allStacks() string {
	buf := make([]byte, 1<<20)
	return string(buf[:runtime.Stack(buf, true)])
}

// 11. All, and Stats for people.

// All yields every request's place and outcome, keeps every worker busy,
// and stops cleanly when the caller breaks out.
func TestAll(t *testing.T) {
	ctx := context.Background()
	t.Run("every result, each with its place", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var running, most atomic.Int64
			b := mustNew(t, 3, func(ctx context.Context, i int) (int, error) {
				n := running.Add(1)
				for m := most.Load(); n > m && !most.CompareAndSwap(m, n); m = most.Load() {
				}
				time.Sleep(time.Duration(1+i%3) * time.Millisecond)
				running.Add(-1)
				return i * i, nil
			}, WithConcurrency(2))
			defer b.Close()
			got := make([]int, 60)
			start := time.Now()
			for i, r := range b.All(ctx, slices.Values(upTo(60))) {
				require.NoError(t, r.Err)
				assert.Equal(t, i, r.Req)
				got[i] = r.Value
			}
			for i, v := range got {
				assert.Equal(t, i*i, v)
			}
			assert.Equal(t, int64(6), most.Load(), "every slot was busy")
			assert.LessOrEqual(t, time.Since(start), 23*time.Millisecond, "60 requests of 2 ms on average over 6 slots: 20 ms, and at most one request more")
		})
	})
	t.Run("breaking out cancels what is in flight", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			errOdd := errors.New("odd")
			var ran atomic.Int64
			b := mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
				ran.Add(1)
				if i == 3 {
					return 0, errOdd
				}
				<-ctx.Done() // the others run until All cancels them
				return 0, ctx.Err()
			}, WithConcurrency(2))
			defer b.Close()
			var first error
			for _, r := range b.All(ctx, slices.Values(upTo(100))) {
				if r.Err != nil {
					first = r.Err
					break
				}
			}
			assert.ErrorIs(t, first, errOdd)
			synctest.Wait()
			assert.Zero(t, b.Stats().Pending, "the rest were cancelled")
			assert.LessOrEqual(t, ran.Load(), int64(4), "nothing submitted after the break")
		})
	})
	t.Run("a refused request ends it", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			b := mustNew(t, 1, square)
			require.NoError(t, b.Close())
			var got []Result[int, int]
			for _, r := range b.All(ctx, slices.Values(upTo(3))) {
				got = append(got, r)
			}
			require.Len(t, got, 1)
			assert.ErrorIs(t, got[0].Err, ErrClosed)
			var nilCtx context.Context
			b = mustNew(t, 1, square)
			defer b.Close()
			for i, r := range b.All(nilCtx, slices.Values(upTo(3))) {
				assert.Equal(t, 0, i)
				assert.ErrorIs(t, r.Err, ErrInvalidArgument)
			}
		})
	})
}

// upTo returns 0, 1, ..., n-1.
func upTo(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = i
	}
	return s
}

func TestStatsForPeople(t *testing.T) {
	s := Stats{
		Accepted: 10, Pending: 2, Completed: 8, Failed: 1, Waiting: 3, MeanWait: time.Millisecond, TotalWait: time.Second,
		Workers: []WorkerStats{
			{ID: 0, Concurrency: 4, Pending: 2, Running: 2, Completed: 5, Failed: 1, MeanService: 2 * time.Millisecond, MeanWait: time.Millisecond, Weight: 1},
			{ID: 3, Concurrency: 1, Completed: 3, Weight: 2, Removed: true},
		},
	}
	assert.Equal(t, "accepted 10, pending 2, completed 8 (1 failed, 0 panicked), waiting 3, wait 1ms; "+
		"worker 0: 2/4 running, 0 queued, 5 completed (1 failed, 0 panicked), service 2ms, wait 1ms; "+
		"worker 3: 0/1 running, 0 queued, 3 completed (0 failed, 0 panicked), service 0s, wait 0s, weight 2, removed", s.String())
	faults := Stats{Ejections: 3, Probes: 2, ProbeFailures: 1, Ejected: 2, Workers: []WorkerStats{
		{ID: 1, Concurrency: 1, Weight: 1, FailureRate: 0.25, Streak: 2},
		{ID: 2, Concurrency: 1, Weight: 1, FailureRate: 1, Streak: 5, Ejected: true,
			EjectedUntil: time.Date(2026, 1, 2, 3, 4, 5, 6e6, time.UTC), Ejections: 1},
		{ID: 4, Concurrency: 1, Weight: 1, Ejected: true, Probing: true, Ejections: 2},
	}}
	assert.Equal(t, "accepted 0, pending 0, completed 0 (0 failed, 0 panicked), waiting 0, wait 0s, "+
		"2 ejected now, 3 ejections, 2 probes (1 failed); "+
		"worker 1: 0/1 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s, failure rate 0.25, streak 2; "+
		"worker 2: 0/1 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s, failure rate 1.00, streak 5, "+
		"ejected until 03:04:05.006, 1 ejections; "+
		"worker 4: 0/1 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s, ejected, probing, 2 ejections",
		faults.String())
	assert.Equal(t, "[concurrency=1 running=0 queued=0 completed=0 failed=0 panics=0 mean_service=0s mean_wait=0s total_wait=0s "+
		"weight=1 removed=false failure_rate=1 streak=5 ejected=true ejected_until=2026-01-02 03:04:05.006 +0000 UTC probing=false ejections=1 retries=0 hedges=0]",
		faults.Workers[1].LogValue().String())
	var buf strings.Builder
	slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
		if len(groups) == 0 && (a.Key == slog.TimeKey || a.Key == slog.LevelKey) {
			return slog.Attr{}
		}
		return a
	}})).Info("balancer", "stats", s)
	assert.Equal(t, "msg=balancer stats.accepted=10 stats.pending=2 stats.completed=8 stats.failed=1 stats.panics=0 "+
		"stats.waiting=3 stats.mean_wait=1ms stats.total_wait=1s "+
		"stats.ejected=0 stats.ejections=0 stats.probes=0 stats.probe_failures=0 stats.retries=0 stats.hedges=0 stats.hedge_wins=0 stats.budget_refusals=0 "+
		"stats.workers.0.concurrency=4 stats.workers.0.running=2 stats.workers.0.queued=0 stats.workers.0.completed=5 "+
		"stats.workers.0.failed=1 stats.workers.0.panics=0 stats.workers.0.mean_service=2ms stats.workers.0.mean_wait=1ms "+
		"stats.workers.0.total_wait=0s stats.workers.0.weight=1 stats.workers.0.removed=false "+
		"stats.workers.0.failure_rate=0 stats.workers.0.streak=0 stats.workers.0.ejected=false stats.workers.0.ejections=0 stats.workers.0.retries=0 stats.workers.0.hedges=0 "+
		"stats.workers.3.concurrency=1 stats.workers.3.running=0 stats.workers.3.queued=0 stats.workers.3.completed=3 "+
		"stats.workers.3.failed=0 stats.workers.3.panics=0 stats.workers.3.mean_service=0s stats.workers.3.mean_wait=0s "+
		"stats.workers.3.total_wait=0s stats.workers.3.weight=2 stats.workers.3.removed=true "+
		"stats.workers.3.failure_rate=0 stats.workers.3.streak=0 stats.workers.3.ejected=false stats.workers.3.ejections=0 stats.workers.3.retries=0 stats.workers.3.hedges=0\n", buf.String())
}

// 12. Documentation that cannot drift.

// Every exported type, function and method has an example that go test
// runs, and every Go block in the README is the text of one.
func TestDocsAreExamples(t *testing.T) {
	fset := token.NewFileSet()
	var files []*ast.File
	for _, name := range []string{"balancer.go", "pool.go", "worker.go", "fanin.go", "example_test.go"} {
		f, err := parser.ParseFile(fset, name, nil, parser.ParseComments)
		require.NoError(t, err)
		files = append(files, f)
	}
	p, err := doc.NewFromFiles(fset, files, "github.com/leastload/balancer")
	require.NoError(t, err)
	has := func(name string, examples []*doc.Example) {
		t.Helper()
		assert.NotEmpty(t, examples, "%s has no example", name)
	}
	for _, f := range p.Funcs {
		has(f.Name, f.Examples)
	}
	for _, typ := range p.Types {
		has(typ.Name, typ.Examples)
		for _, f := range typ.Funcs {
			has(f.Name, f.Examples)
		}
		for _, m := range typ.Methods {
			has(typ.Name+"."+m.Name, m.Examples)
		}
	}

	readme, err := os.ReadFile("README.md")
	require.NoError(t, err)
	examples, err := os.ReadFile("example_test.go")
	require.NoError(t, err)
	blocks := strings.Split(string(readme), "```go\n")[1:]
	require.NotEmpty(t, blocks)
	for _, block := range blocks {
		block = block[:strings.Index(block, "```")]
		indented := "\t" + strings.ReplaceAll(strings.TrimSuffix(block, "\n"), "\n", "\n\t")
		indented = strings.ReplaceAll(indented, "\n\t\n", "\n\n") // blank lines carry no tab
		assert.True(t, strings.Contains(string(examples), indented+"\n"), "this README block is not an example's text:\n%s", block)
	}
}

// 13. The traps of a batched loop, pinned on today's loop: each must keep
// passing when the loop takes requests in batches.

// A Func is stuck while Close waits and 64 callers wait in Do: every
// caller gets ErrClosed exactly once (none of them was accepted), Close
// returns once the Func does, and the stuck request gets its own result.
func TestTrapStuckFuncWhileCloseWaits(t *testing.T) {
	const callers = 64
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var ran atomic.Int64
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			ran.Add(1)
			if i == 0 {
				<-release
			}
			return i, nil
		})
		stuck, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		errs := make(chan error, callers)
		for i := range callers {
			go func() {
				_, err := b.Do(context.Background(), 1+i)
				errs <- err
			}()
		}
		synctest.Wait()
		require.Equal(t, callers, b.Stats().Waiting)
		require.Equal(t, int64(callers), b.queued.Load())
		closed := make(chan error, 1)
		go func() { closed <- b.Close() }()
		synctest.Wait()
		for range callers {
			assert.ErrorIs(t, <-errs, ErrClosed)
		}
		assert.Empty(t, closed, "Close waits for the stuck Func")
		close(release)
		assert.NoError(t, <-closed)
		assert.Equal(t, Result[int, int]{Req: 0, Value: 0, Worker: 0, Attempts: 1}, <-stuck)
		assert.Equal(t, int64(1), ran.Load(), "only the accepted request ran")
		s := b.Stats()
		assert.Equal(t, uint64(1), s.Accepted)
		assert.Equal(t, uint64(1), s.Completed)
	})
}

// A Do whose ctx ends while its request is queued at a worker returns at
// once; the request is then not run, and is counted once, as failed.
func TestTrapDoCancelledWhileQueued(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var ran atomic.Int64
		b := mustNew(t, 1, gated(&ran, release), WithQueueDepth(2))
		defer b.Close()
		running, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		_, err = b.Do(ctx, 1) // queued behind request 0
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, time.Second, time.Since(start))
		close(release)
		<-running
		synctest.Wait()
		assert.Equal(t, int64(1), ran.Load(), "the cancelled request did not run")
		s := b.Stats()
		assert.Equal(t, uint64(2), s.Accepted)
		assert.Equal(t, uint64(2), s.Completed)
		assert.Equal(t, uint64(1), s.Failed)
	})
}

// Close while the loop sleeps on an empty queue returns, and the balancer
// then refuses everything and has no goroutine left.
func TestTrapCloseWhileLoopIdle(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 4, square, WithConcurrency(2))
		_, err := b.Do(context.Background(), 3)
		require.NoError(t, err)
		synctest.Wait() // the loop sleeps, waiting for requests
		require.NoError(t, b.Close())
		_, err = b.Do(context.Background(), 4)
		assert.ErrorIs(t, err, ErrClosed)
		_, err = b.TrySubmit(context.Background(), 4)
		assert.ErrorIs(t, err, ErrClosed)
		synctest.Wait()
		assert.NotContains(t, allStacks(), "balancer.(*Balancer[...]).loop")
	})
}

// Submit returns once its request is accepted and is not starved by a
// stream of Do calls: with 64 callers keeping one worker busy, a Submit
// is accepted within about as many requests as there are callers ahead.
func TestTrapSubmitNotStarvedByDo(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			time.Sleep(time.Millisecond)
			return i, nil
		})
		defer b.Close()
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		var wg sync.WaitGroup
		for range 64 {
			wg.Go(func() {
				for ctx.Err() == nil {
					b.Do(ctx, 1)
				}
			})
		}
		time.Sleep(10 * time.Millisecond) // the stream is flowing
		start := time.Now()
		c, err := b.Submit(context.Background(), 2)
		require.NoError(t, err)
		accepted := time.Since(start)
		assert.LessOrEqual(t, accepted, 66*time.Millisecond, "accepted after at most the 64 callers ahead")
		assert.Equal(t, 2, (<-c).Value)
		wg.Wait()
	})
}

// Misuse that other pools hang or panic on.
func TestMisuse(t *testing.T) {
	t.Run("Close from inside a Func returns", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			closed := make(chan error, 1)
			b = mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
				closed <- b.Close()
				return i, nil
			})
			v, err := b.Do(context.Background(), 3)
			assert.NoError(t, err)
			assert.Equal(t, 3, v)
			assert.NoError(t, <-closed)
			require.NoError(t, b.Close(), "from outside it waits for the goroutines")
			_, err = b.Do(context.Background(), 3)
			assert.ErrorIs(t, err, ErrClosed)
		})
	})
	t.Run("Shutdown from inside a Func returns", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			b = mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
				return i, b.Shutdown(context.Background())
			})
			_, err := b.Do(context.Background(), 1)
			assert.NoError(t, err)
			require.NoError(t, b.Close())
		})
	})
	t.Run("Submit from inside a Func on a full balancer", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var b *Balancer[int, int]
			b = mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
				if i > 0 {
					return b.Do(ctx, i-1) // the only worker is this one: it waits for ctx
				}
				return 0, nil
			}, WithQueueDepth(1))
			defer b.Close()
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			start := time.Now()
			_, err := b.Do(ctx, 1)
			assert.ErrorIs(t, err, context.DeadlineExceeded)
			assert.Equal(t, time.Second, time.Since(start))
		})
	})
	t.Run("Close racing 10000 Submits", func(t *testing.T) {
		b := mustNew(t, 4, square, WithQueueDepth(1))
		var wg sync.WaitGroup
		var outcomes, refused atomic.Int64
		start := make(chan struct{})
		for i := range 10_000 {
			wg.Go(func() {
				<-start
				submitOne(t, b, i, &outcomes, &refused)
			})
		}
		close(start)
		require.NoError(t, b.Close())
		wg.Wait()
		assert.Equal(t, int64(10_000), outcomes.Load()+refused.Load())
		assert.Equal(t, int64(b.Stats().Completed), outcomes.Load())
	})
	t.Run("2000 New and Close cycles leave no goroutine", func(t *testing.T) {
		for range 2000 {
			b := mustNew(t, 3, square)
			_, err := b.Do(context.Background(), 2)
			require.NoError(t, err)
			require.NoError(t, b.Close())
		}
		goleak.VerifyNone(t)
	})
}

// FuzzPool drives the heap the way the loop does, with random dispatches,
// completions, additions and removals, with and without load estimates,
// on workers of concurrency 1 to 3 and weights 1 to 4, and checks its
// invariants after every step: heap order, each worker's index equal to
// its slot, each slot's cost current, pending within [0, concurrency ×
// depth], and the root the cheapest worker.
func FuzzPool(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 1, 2, 0, 0})
	f.Add([]byte{2, 0, 2, 0, 0, 0, 3, 1, 0, 0, 1, 0, 3, 0})
	f.Fuzz(func(t *testing.T, ops []byte) {
		h := newHeapHarness(3, len(ops)%2 == 1)
		for range 4 {
			h.add(1)
		}
		for i := 0; i+1 < min(len(ops), 1024); i += 2 { // bounded, so each run stays fast
			arg := int(ops[i+1])
			switch ops[i] % 6 {
			case 0:
				h.dispatch(t)
			case 1: // a worker with work completes one request
				if h.p.Len() == 0 {
					continue
				}
				if w := h.p.slots[arg%h.p.Len()].w; w.pending > 0 {
					h.complete(w, time.Duration(arg+1)*time.Microsecond)
				}
			case 2:
				if h.p.Len() < 64 {
					h.addWorker(workerOptions{concurrency: 1 + arg%3, weight: float64(1 + arg/3%4)})
				}
			case 3:
				if h.p.Len() == 0 {
					continue
				}
				h.remove(t, arg%h.p.Len())
			case 4: // eject a worker in the heap, or remove an ejected one; time passes
				h.now += int64(arg) * int64(50*time.Millisecond)
				switch {
				case arg%2 == 0 && h.p.Len() > 0 && h.s.ejectable():
					h.s.ejectWorker(h.p.slots[arg%h.p.Len()].w) // full or not: the loop ejects at its next look
				case arg%2 == 1 && len(h.s.out) > 0:
					h.s.remove(h.s.out[arg%len(h.s.out)])
				}
			case 5: // an ejected worker with work completes one request, its probe with any outcome
				if len(h.s.out) == 0 {
					continue
				}
				if w := h.s.out[arg%len(h.s.out)]; w.pending > 0 {
					if w.trial && arg%3 != 0 {
						w.probeClass.Store(uint32(arg%4) + 1)
					}
					h.s.complete(w)
				}
			}
			checkHeap(t, h)
			checkOut(t, h)
			for _, s := range h.p.slots {
				require.True(t, s.w.pending >= 0 && s.w.pending <= s.w.limit, "pending %d", s.w.pending)
			}
		}
	})
}

// A finished request must not be kept alive by the balancer: not by the
// pooled reply channels, the workers' queues, the done channel or the heap.
func TestFinishedRequestsAreNotRetained(t *testing.T) {
	type big struct{ buf [1 << 16]byte }
	b, err := New(2, func(ctx context.Context, p *big) (int, error) { return len(p.buf), nil }, WithQueueDepth(2))
	require.NoError(t, err)
	defer b.Close()
	var refs []weak.Pointer[big]
	for range 20 {
		p, q := &big{}, &big{}
		refs = append(refs, weak.Make(p), weak.Make(q))
		_, err := b.Do(context.Background(), p)
		require.NoError(t, err)
		c, err := b.Submit(context.Background(), q)
		require.NoError(t, err)
		require.NoError(t, (<-c).Err)
	}
	runtime.GC()
	runtime.GC()
	for i, r := range refs {
		assert.Nil(t, r.Value(), "request %d is still reachable", i)
	}
}

// The protocol of Do's queue. A request in the queue is not yet accepted:
// whatever the interleaving, it is dispatched, answered with its ctx's
// error, or refused with ErrClosed, exactly once.

// A Do that passed its checks before Close began but puts its request in
// the queue only after the loop has exited gets ErrClosed, not a hang.
func TestDoQueuedAfterTheLoopExited(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release, closing := make(chan struct{}), make(chan struct{})
		var b *Balancer[int, int]
		late := true
		b = mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			<-release
			return i, nil
		}, &withHooks{queue: func() {
			if late {
				late = false
				close(closing)
				require.NoError(t, b.Close()) // the loop exits before the request goes in
			}
		}})
		running, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		synctest.Wait() // the loop sleeps, its worker full: Do cannot hand its request over
		go func() {
			<-closing
			close(release) // the Close in the hook waits for request 0
		}()
		_, err = b.Do(context.Background(), 1)
		assert.ErrorIs(t, err, ErrClosed)
		assert.Equal(t, 0, (<-running).Value)
		assert.Zero(t, b.queued.Load())
		assert.Nil(t, b.queue.Load())
		s := b.Stats()
		assert.Equal(t, uint64(1), s.Accepted, "the late request was not accepted")
		assert.Equal(t, uint64(1), s.Completed)
	})
}

// A Do that queues its request while the loop goes idle is served,
// whether the loop parks on hand-offs alone (after lone requests) or also
// sleeps on completions (in a burst): just before the loop says it is
// idle, Do does not poke it, and the loop's last look at the queue finds
// the request; just after that look, before the loop parks, Do sees it
// idle and pokes it.
func TestDoQueuesWhileTheLoopGoesIdle(t *testing.T) {
	for _, tt := range []struct {
		name string
		lone bool
		at   func(func()) *withHooks
	}{
		{"lone, before the loop says it is idle", true, func(h func()) *withHooks { return &withHooks{idle: h} }},
		{"lone, after its last look, before it parks", true, func(h func()) *withHooks { return &withHooks{park: h} }},
		{"burst, before the loop says it is idle", false, func(h func()) *withHooks { return &withHooks{sleep: h} }},
		{"burst, after its last look, before it parks", false, func(h func()) *withHooks { return &withHooks{park: h} }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				inHook, proceed := make(chan struct{}), make(chan struct{})
				var armed atomic.Bool
				b := mustNew(t, 1, square, tt.at(func() {
					if armed.CompareAndSwap(true, false) {
						close(inHook)
						<-proceed // meanwhile Do finds the loop not parked, and queues
					}
				}))
				defer b.Close()
				if tt.lone {
					doLone(t, b) // so that the loop parks on hand-offs alone
				}
				synctest.Wait() // the loop is parked, before the hook is armed
				require.Equal(t, tt.lone, b.lone >= loneRounds)
				armed.Store(true)
				_, err := b.AddWorker(square) // a command wakes the loop; it comes back to park
				require.NoError(t, err)
				<-inHook
				got := make(chan int, 1)
				go func() {
					v, err := b.Do(context.Background(), 5)
					assert.NoError(t, err)
					got <- v
				}()
				synctest.Wait()
				require.Equal(t, 1, int(b.queued.Load()), "Do queued its request")
				close(proceed)
				assert.Equal(t, 25, <-got)
			})
		})
	}
}

// A Do whose ctx ends while its request waits in the queue, behind full
// workers, returns ctx.Err() at once; the loop later drops the request
// without running it or counting it as accepted.
func TestDoCancelledInTheQueue(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var ran atomic.Int64
		b := mustNew(t, 1, gated(&ran, release))
		defer b.Close()
		running, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		start := time.Now()
		_, err = b.Do(ctx, 1)
		assert.ErrorIs(t, err, context.DeadlineExceeded)
		assert.Equal(t, time.Second, time.Since(start))
		assert.Equal(t, 1, int(b.queued.Load()), "the request waits in the queue")
		close(release)
		<-running
		v, err := b.Do(context.Background(), 2) // the loop takes the dropped request on its way
		require.NoError(t, err)
		assert.Equal(t, 2, v)
		assert.Equal(t, int64(2), ran.Load(), "the cancelled request did not run")
		s := b.Stats()
		assert.Equal(t, uint64(2), s.Accepted)
		assert.Equal(t, uint64(2), s.Completed)
		assert.Zero(t, s.Failed)
		assert.Zero(t, s.Waiting)
	})
}

// With no worker, Do's requests wait in the queue; Close then has nothing
// pending, so the loop exits at once, and refuses them as it goes.
func TestQueueRefusedAtCloseWithNoWorkers(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 0, square)
		errs := make(chan error, 3)
		for i := range 3 {
			go func() {
				_, err := b.Do(context.Background(), i)
				errs <- err
			}()
		}
		synctest.Wait()
		require.Equal(t, 3, int(b.queued.Load()))
		require.NoError(t, b.Close())
		for range 3 {
			assert.ErrorIs(t, <-errs, ErrClosed)
		}
		assert.Zero(t, b.Stats().Accepted)
	})
}

// A completion that a worker reports just before the loop prepares to
// sleep on completions is seen: the loop looks at the stack a last time
// after it says it sleeps, so the freed slot takes the next request.
func TestCompletionJustBeforeTheLoopSleeps(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		inHook, proceed := make(chan struct{}), make(chan struct{})
		var armed atomic.Bool
		var ran atomic.Int64
		release := make(chan struct{})
		b := mustNew(t, 1, gated(&ran, release), &withHooks{sleep: func() {
			if armed.CompareAndSwap(true, false) {
				close(inHook)
				<-proceed // meanwhile the worker completes, and finds the loop awake
			}
		}})
		defer b.Close()
		first, err := b.Submit(context.Background(), 1)
		require.NoError(t, err)
		synctest.Wait() // the loop sleeps: its one worker is full
		armed.Store(true)
		_, err = b.TrySubmit(context.Background(), 2) // a command wakes the loop; it comes back to sleep
		require.ErrorIs(t, err, ErrFull)
		<-inHook
		close(release)
		assert.Equal(t, 1, (<-first).Value)
		synctest.Wait() // the completion is on the stack, and nobody woke the loop
		close(proceed)
		v, err := b.Do(context.Background(), 3)
		require.NoError(t, err)
		assert.Equal(t, 3, v)
	})
}

// doLone makes loneRounds requests one at a time, which makes the loop
// stop sleeping on completions while a worker has room (see loop). Each
// waits until the loop is parked again: with two Ps, a request made while
// the loop still drains would join the previous one's round, a burst.
// Call it inside synctest.Test.
func doLone(t *testing.T, b *Balancer[int, int]) {
	t.Helper()
	for i := range loneRounds {
		synctest.Wait()
		v, err := b.Do(context.Background(), i)
		require.NoError(t, err)
		require.Equal(t, i*i, v)
	}
}

// While a worker has room, the loop sleeps on completions until
// loneRounds rounds in a row have each taken one request; from then on it
// parks on hand-offs alone, until a round takes two.
func TestLoopSleepsOnCompletionsInBursts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var idles, sleeps atomic.Int64
		var holding atomic.Bool
		hold := make(chan struct{})
		b := mustNew(t, 3, square, &withHooks{
			idle: func() {
				idles.Add(1)
				if holding.CompareAndSwap(true, false) {
					<-hold // meanwhile two Do calls queue
				}
			},
			sleep: func() { sleeps.Add(1) },
		})
		defer b.Close()
		// parks reports, once the balancer is still, how the loop has
		// waited since the last call: on hand-offs alone, or also on
		// completions.
		parks := func() (idle, sleep int64) {
			synctest.Wait()
			return idles.Swap(0), sleeps.Swap(0)
		}
		do := func(i int) {
			v, err := b.Do(context.Background(), i)
			assert.NoError(t, err)
			assert.Equal(t, i*i, v)
		}
		try := func(i int) { // a command that dispatches counts as a request
			c, err := b.TrySubmit(context.Background(), i)
			require.NoError(t, err)
			assert.Equal(t, i*i, (<-c).Value)
		}
		parks()
		for i := range loneRounds {
			if i%2 == 0 {
				do(i)
			} else {
				try(i)
			}
			idle, sleep := parks()
			if i < loneRounds-1 {
				assert.Zero(t, idle, "round %d", i)
				// After the request, and after its completion unless
				// the loop took it before it slept.
				assert.Positive(t, sleep, "round %d", i)
			} else {
				assert.Equal(t, int64(1), idle, "round %d", i)
				assert.Zero(t, sleep, "round %d", i)
			}
		}
		do(3)
		idle, sleep := parks()
		assert.Equal(t, int64(1), idle, "the completion did not wake the loop")
		assert.Zero(t, sleep)

		holding.Store(true)
		go do(4) // the loop takes it alone, then stops in the hook
		synctest.Wait()
		go do(5)
		go do(6)
		synctest.Wait()
		require.Equal(t, 2, int(b.queued.Load()))
		close(hold) // the loop takes both in one round
		_, sleep = parks()
		assert.Positive(t, sleep, "a burst: the loop sleeps on completions again")
		do(7)
		idle, sleep = parks()
		assert.Zero(t, idle)
		assert.Positive(t, sleep)
	})
}

// Do calls that queue while every worker is full are served oldest
// first: the loop takes the queue, a stack, whole and reverses it.
func TestQueuedDoServedOldestFirst(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		var order []int // written by the one worker, read after it is done
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			order = append(order, i)
			if i == 0 {
				<-release
			}
			return i, nil
		})
		defer b.Close()
		first, err := b.Submit(context.Background(), 0)
		require.NoError(t, err)
		synctest.Wait()
		var wg sync.WaitGroup
		for i := 1; i <= 5; i++ {
			wg.Go(func() {
				_, err := b.Do(context.Background(), i)
				assert.NoError(t, err)
			})
			synctest.Wait() // i is queued before i+1
		}
		require.Equal(t, int64(5), b.queued.Load())
		close(release)
		<-first
		wg.Wait()
		assert.Equal(t, []int{0, 1, 2, 3, 4, 5}, order)
	})
}

// Requests the loop took from the queue but could not dispatch yet, its
// line, are refused when Close begins, as those still in the queue are.
func TestLineRefusedAtClose(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var ran atomic.Int64
		release, inHook, hold := make(chan struct{}), make(chan struct{}), make(chan struct{})
		var holding atomic.Bool
		b := mustNew(t, 1, gated(&ran, release), &withHooks{sleep: func() {
			if holding.CompareAndSwap(true, false) {
				close(inHook)
				<-hold // meanwhile three Do calls queue
			}
		}})
		synctest.Wait()
		holding.Store(true)
		require.ErrorIs(t, b.RemoveWorker(context.Background(), 9), ErrUnknownWorker) // a command wakes the loop; it comes back to sleep
		<-inHook
		results := make([]chan error, 3)
		for i := range results {
			results[i] = make(chan error, 1)
			go func() {
				_, err := b.Do(context.Background(), i)
				results[i] <- err
			}()
			synctest.Wait() // i is queued before i+1
		}
		require.Equal(t, int64(3), b.queued.Load())
		close(hold) // the loop takes all three, dispatches the oldest, and keeps two in line
		synctest.Wait()
		require.Equal(t, int64(2), b.queued.Load())
		require.NotNil(t, b.line)
		closed := make(chan error, 1)
		go func() { closed <- b.Close() }()
		synctest.Wait()
		assert.ErrorIs(t, <-results[1], ErrClosed)
		assert.ErrorIs(t, <-results[2], ErrClosed)
		assert.Empty(t, closed, "Close waits for the running request")
		close(release)
		assert.NoError(t, <-results[0])
		assert.NoError(t, <-closed)
		assert.Equal(t, int64(1), ran.Load())
		assert.Equal(t, uint64(1), b.Stats().Accepted)
	})
}

// 14. Faults: classification, the failure rate, ejection and its probe.

// errDown is a failing backend's error.
var errDown = errors.New("down")

// exactJitter makes every ejection exactly its nominal length.
var exactJitter = &withHooks{jitter: func() float64 { return 0.5 }}

// rateAfter is the failure rate after the given outcomes, 1 a Failure or
// Overload and 0 a Success, with no time passing.
func rateAfter(outcomes ...float64) float64 {
	var e float64
	for _, x := range outcomes {
		e += (x - e) / failSmoothing
	}
	return e
}

func TestOutcomesAreClassified(t *testing.T) {
	type status int // a Res that says what happened, as an HTTP status does
	httpClass := func(s status, err error) Class {
		switch {
		case err != nil || s >= 500:
			return Failure
		case s == 429:
			return Overload
		}
		return Success // other 4xx are the caller's
	}
	tests := []struct {
		name     string
		fn       Func[int, status]
		opts     []Option
		cancel   bool // the caller's ctx ends while the Func runs
		streak   int
		rate     float64
		panicErr bool
	}{
		{name: "nil error", fn: func(context.Context, int) (status, error) { return 200, nil }},
		{name: "an error", fn: func(context.Context, int) (status, error) { return 0, errDown }, streak: 1, rate: rateAfter(1)},
		{name: "the caller's fault", fn: func(context.Context, int) (status, error) { return 0, CallersFault(errDown) }},
		{name: "overload", fn: func(context.Context, int) (status, error) { return 0, Overloaded(errDown) }, rate: rateAfter(1)},
		{name: "the caller gave up", cancel: true, fn: func(ctx context.Context, _ int) (status, error) {
			<-ctx.Done()
			return 0, ctx.Err()
		}},
		{name: "panic", fn: func(context.Context, int) (status, error) { panic("boom") }, streak: 1, rate: rateAfter(1), panicErr: true},
		{name: "Goexit", fn: func(context.Context, int) (status, error) { runtime.Goexit(); return 0, nil }, streak: 1, rate: rateAfter(1)},
		{name: "classifier: 503", fn: func(context.Context, int) (status, error) { return 503, nil },
			opts: []Option{WithClassifier(httpClass)}, streak: 1, rate: rateAfter(1)},
		{name: "classifier: 429", fn: func(context.Context, int) (status, error) { return 429, nil },
			opts: []Option{WithClassifier(httpClass)}, rate: rateAfter(1)},
		{name: "classifier: 404", fn: func(context.Context, int) (status, error) { return 404, nil },
			opts: []Option{WithClassifier(httpClass)}},
		{name: "classifier panics", fn: func(context.Context, int) (status, error) { return 200, nil },
			opts: []Option{WithClassifier(func(status, error) Class { panic("classifier") })}, streak: 1, rate: rateAfter(1), panicErr: true},
		{name: "classifier falls back to ClassOf", fn: func(context.Context, int) (status, error) { return 0, Overloaded(errDown) },
			opts: []Option{WithClassifier(func(_ status, err error) Class { return ClassOf(err) })}, rate: rateAfter(1)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b, err := New(1, tt.fn, tt.opts...)
				require.NoError(t, err)
				defer b.Close()
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				c, err := b.Submit(ctx, 0)
				require.NoError(t, err)
				if tt.cancel {
					synctest.Wait()
					cancel()
				}
				res := <-c
				if tt.panicErr {
					var pe *PanicError
					assert.ErrorAs(t, res.Err, &pe)
				}
				synctest.Wait()
				w := b.Stats().Workers[0]
				assert.Equal(t, tt.streak, w.Streak, "streak")
				assert.InDelta(t, tt.rate, w.FailureRate, 1.0/rateOne, "failure rate")
			})
		})
	}
}

func TestClassMarksAndNames(t *testing.T) {
	assert.Equal(t, Success, ClassOf(nil))
	assert.Equal(t, Failure, ClassOf(errDown))
	assert.Equal(t, Failure, ClassOf(&PanicError{Value: "x"}))
	assert.Equal(t, Failure, ClassOf(ErrGoexit))
	assert.Equal(t, Success, ClassOf(fmt.Errorf("wrapped: %w", CallersFault(errDown))))
	assert.Equal(t, Overload, ClassOf(fmt.Errorf("wrapped: %w", Overloaded(errDown))))
	assert.Equal(t, Overload, ClassOf(Overloaded(CallersFault(errDown))), "the outermost mark counts")
	assert.ErrorIs(t, Overloaded(errDown), errDown)
	assert.Equal(t, "down", CallersFault(errDown).Error())
	assert.NoError(t, Overloaded(nil))
	assert.NoError(t, CallersFault(nil))
	assert.Equal(t, Unavailable, ClassOf(fmt.Errorf("dial: %w", Unprocessed(errDown))))
	assert.Equal(t, []string{"success", "failure", "overload", "ignore", "unavailable", "Class(9)"},
		[]string{Success.String(), Failure.String(), Overload.String(), Ignore.String(), Unavailable.String(), Class(9).String()})
}

func TestClassifierMustFit(t *testing.T) {
	_, err := New(1, square, WithClassifier[int](nil))
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.ErrorContains(t, err, "nil classifier")
	_, err = New(1, square, WithClassifier(func(string, error) Class { return Success }))
	assert.ErrorIs(t, err, ErrInvalidArgument)
	assert.ErrorContains(t, err, "want func(int, error) Class")
}

// A failure never makes a worker look faster, and a slow one makes it
// look slower.
func TestFailuresNeverLookFaster(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var took atomic.Int64
		var fail atomic.Bool
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			time.Sleep(time.Duration(took.Load()))
			if fail.Load() {
				return 0, errDown
			}
			return i, nil
		})
		defer b.Close()
		took.Store(int64(2 * time.Millisecond))
		_, err := b.Do(context.Background(), 1)
		require.NoError(t, err)
		synctest.Wait()
		assert.Equal(t, 2*time.Millisecond, b.Stats().Workers[0].MeanService)
		fail.Store(true)
		took.Store(int64(50 * time.Microsecond))
		for range 4 {
			_, err := b.Do(context.Background(), 1)
			require.ErrorIs(t, err, errDown)
		}
		synctest.Wait()
		assert.Equal(t, 2*time.Millisecond, b.Stats().Workers[0].MeanService, "fast failures leave the mean")
		took.Store(int64(6 * time.Millisecond))
		_, err = b.Do(context.Background(), 1)
		require.ErrorIs(t, err, errDown)
		synctest.Wait()
		assert.Equal(t, 3*time.Millisecond, b.Stats().Workers[0].MeanService, "a slow failure rises it a quarter of the way")
	})
}

func TestFailureRateRaisesCost(t *testing.T) {
	for _, estimate := range []bool{true, false} {
		t.Run(fmt.Sprint("estimate ", estimate), func(t *testing.T) {
			h := newHeapHarness(4, estimate)
			h.fixRef(time.Millisecond)
			ok, bad := h.add(1), h.add(1)
			for _, w := range []*worker[int, int]{ok, bad} {
				w.observe(time.Millisecond, 0)
				h.s.touch(w)
			}
			for range 6 { // a rate of 1 − (7/8)^6 ≈ 0.55: 2.23 times the cost
				bad.foldHealth(1)
			}
			h.s.now = int64(bad.health.Load()>>16) << tickShift // the loop's time is the rate's
			e := failRate(bad.health.Load(), h.s.now)
			assert.InDelta(t, rateAfter(1, 1, 1, 1, 1, 1), e, 1.0/rateOne)
			assert.Equal(t, 1/(1-e), h.s.penalty(bad))
			h.s.touch(bad)
			if estimate {
				// 2.23 ms is two steps above the centre: 2.25 ms.
				assert.Equal(t, 2.25*float64(time.Millisecond), h.s.cost(bad))
				assert.Equal(t, float64(time.Millisecond), h.s.cost(ok))
			} else {
				assert.Equal(t, 1/(1-e), h.s.cost(bad))
				assert.Equal(t, 1.0, h.s.cost(ok))
			}
			assert.Same(t, ok, h.p.root())
			// A rate of noise stays on the centre step: equal. So does
			// one of 0.41 (1.71 ms), below the centre step's top.
			if estimate {
				for _, n := range []int{1, 4} { // 1/8: 1.14 ms; 0.41: 1.71 ms
					bad.health.Store(0)
					for range n {
						bad.foldHealth(1)
					}
					h.s.touch(bad)
					assert.Equal(t, h.s.cost(ok), h.s.cost(bad), "%d failures", n)
				}
			}
			// The rate decays with time: after 10 s it is e^-1 of itself.
			v := bad.health.Load()
			h.s.now += int64(decay)
			assert.InDelta(t, failRate(v, h.s.now-int64(decay))/math.E, failRate(v, h.s.now), 1e-9)
		})
	}
}

// newFailing starts a balancer of workers that run fn, worker 0 failing
// while down is set, each at once; exactJitter makes ejections exact.
func newFailing(t *testing.T, n int, down *atomic.Bool, fn Func[int, int], opts ...Option) *Balancer[int, int] {
	specs := []WorkerSpec[int, int]{{Func: func(ctx context.Context, i int) (int, error) {
		if down.Load() {
			return 0, errDown
		}
		return i, nil
	}}}
	for range n - 1 {
		specs = append(specs, WorkerSpec[int, int]{Func: fn})
	}
	b, err := NewFrom(specs, append([]Option{exactJitter, WithLoadEstimate(false)}, opts...)...)
	require.NoError(t, err)
	return b
}

// failTo fails requests on worker 0 of b, whose worker 1 is held busy,
// until it is ejected, and returns how many failed.
func failTo(t *testing.T, b *Balancer[int, int]) int {
	t.Helper()
	n := 0
	for !b.Stats().Workers[0].Ejected {
		require.Less(t, n, 2*ejectAfter, "not ejected")
		res := <-mustSubmit(t, b, 0)
		require.Equal(t, 0, res.Worker)
		require.ErrorIs(t, res.Err, errDown)
		n++
		synctest.Wait()
	}
	return n
}

// holdWorker1 makes worker 0 of b fail once, so that it costs more, and
// then has the next request hold worker 1, whose Func holds request 1.
func holdWorker1(t *testing.T, b *Balancer[int, int]) <-chan Result[int, int] {
	t.Helper()
	for n := 0; (<-mustSubmit(t, b, 2)).Worker != 0; n++ {
		require.Less(t, n, 8, "worker 0 is never next")
	}
	held := mustSubmit(t, b, 1)
	synctest.Wait()
	running, _ := loads(b)
	require.Equal(t, []int{0, 1}, running)
	return held
}

func mustSubmit(t *testing.T, b *Balancer[int, int], i int) <-chan Result[int, int] {
	t.Helper()
	c, err := b.Submit(context.Background(), i)
	require.NoError(t, err)
	return c
}

func mustSubmitCtx(t *testing.T, b *Balancer[int, int], ctx context.Context, i int) <-chan Result[int, int] {
	t.Helper()
	c, err := b.Submit(ctx, i)
	require.NoError(t, err)
	return c
}

func TestEjectionAndProbe(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var down atomic.Bool
		down.Store(true)
		g := newGates(1)
		b := newFailing(t, 2, &down, func(ctx context.Context, i int) (int, error) {
			if i == 1 {
				return g.fn(ctx, 0)
			}
			return i, nil
		})
		defer b.Close()
		start := time.Now()
		at := func(d time.Duration) time.Time { return b.epoch.Add(time.Since(start) + d) }
		// The first request fails on worker 0, which then costs more:
		// the second goes to worker 1 and holds it, the next fail on 0.
		require.ErrorIs(t, (<-mustSubmit(t, b, 0)).Err, errDown)
		held := mustSubmit(t, b, 1)
		synctest.Wait()
		assert.Equal(t, 4, failTo(t, b), "ejected at its fifth failure in a row (the first failed above)")
		s := b.Stats()
		assert.Equal(t, at(time.Second), s.Workers[0].EjectedUntil)
		assert.Equal(t, uint64(1), s.Ejections)
		assert.Equal(t, 1, s.Ejected)
		_, err := b.TrySubmit(context.Background(), 2)
		assert.ErrorIs(t, err, ErrFull, "an ejected worker is not capacity")

		g.openAll()
		require.NoError(t, (<-held).Err)
		// Until the ejection ends, worker 1 serves everything.
		time.Sleep(time.Second - time.Nanosecond)
		assert.Equal(t, 1, (<-mustSubmit(t, b, 2)).Worker)
		time.Sleep(time.Nanosecond)
		// Then the next request is the probe: it fails, and the worker is
		// out for twice as long.
		res := <-mustSubmit(t, b, 2)
		assert.Equal(t, 0, res.Worker)
		assert.ErrorIs(t, res.Err, errDown)
		// The loop takes a completion before its next dispatch, at the
		// latest: Stats says what it did then.
		assert.Equal(t, 1, (<-mustSubmit(t, b, 2)).Worker)
		s = b.Stats()
		assert.Equal(t, at(2*time.Second), s.Workers[0].EjectedUntil)
		assert.Equal(t, [3]uint64{2, 1, 1}, [3]uint64{s.Ejections, s.Probes, s.ProbeFailures})

		// It heals; its next probe succeeds and returns it, its failure
		// rate cleared.
		down.Store(false)
		time.Sleep(2 * time.Second)
		res = <-mustSubmit(t, b, 2)
		assert.Equal(t, 0, res.Worker)
		assert.NoError(t, res.Err)
		got := map[int]int{}
		for range 4 {
			got[(<-mustSubmit(t, b, 2)).Worker]++
		}
		assert.Equal(t, map[int]int{0: 2, 1: 2}, got, "back in turn")
		s = b.Stats()
		assert.False(t, s.Workers[0].Ejected)
		assert.Zero(t, s.Workers[0].FailureRate)
		assert.Equal(t, [4]uint64{2, 2, 1, 0}, [4]uint64{s.Ejections, s.Probes, s.ProbeFailures, uint64(s.Ejected)})

		// Failing again within 10 s of its return is an ejection in a row:
		// 4 s. After 10 s back, it is a first one again: 1 s.
		down.Store(true)
		g = newGates(1)
		held = holdWorker1(t, b)
		failTo(t, b)
		assert.Equal(t, at(4*time.Second), b.Stats().Workers[0].EjectedUntil)
		g.openAll()
		require.NoError(t, (<-held).Err)
		down.Store(false)
		time.Sleep(4 * time.Second)
		res = <-mustSubmit(t, b, 0)
		require.Equal(t, 0, res.Worker, "the probe")
		require.NoError(t, res.Err)
		<-mustSubmit(t, b, 0)
		require.False(t, b.Stats().Workers[0].Ejected)
		time.Sleep(time.Duration(inRowWithin) + 1)
		down.Store(true)
		g = newGates(1)
		held = holdWorker1(t, b)
		failTo(t, b)
		assert.Equal(t, at(time.Second), b.Stats().Workers[0].EjectedUntil)
		g.openAll()
		require.NoError(t, (<-held).Err)
	})
}

// ejectedWorker0 returns a balancer of two workers, worker 0 failing
// while down and ejected already, worker 1 serving at once, and a func
// returning b's clock in time.Time as of now plus d.
func ejectedWorker0(t *testing.T, down *atomic.Bool, opts ...Option) (b *Balancer[int, int], at func(time.Duration) time.Time) {
	down.Store(true)
	g := newGates(1)
	b = newFailing(t, 2, down, func(ctx context.Context, i int) (int, error) {
		if i == 1 {
			return g.fn(ctx, 0)
		}
		return i, nil
	}, opts...)
	start := time.Now()
	at = func(d time.Duration) time.Time { return b.epoch.Add(time.Since(start) + d) }
	held := holdWorker1(t, b)
	failTo(t, b)
	g.openAll()
	require.NoError(t, (<-held).Err)
	return b, at
}

func TestEjectionsDoubleUpTo30s(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var down atomic.Bool
		b, at := ejectedWorker0(t, &down)
		defer b.Close()
		for _, d := range []time.Duration{2, 4, 8, 16, 30, 30} {
			time.Sleep(time.Until(b.Stats().Workers[0].EjectedUntil))
			res := <-mustSubmit(t, b, 0)
			require.Equal(t, 0, res.Worker, "the probe")
			require.ErrorIs(t, res.Err, errDown)
			require.Equal(t, 1, (<-mustSubmit(t, b, 0)).Worker)
			assert.Equal(t, at(d*time.Second), b.Stats().Workers[0].EjectedUntil, "after %v", d)
		}
		s := b.Stats()
		assert.Equal(t, [3]uint64{7, 6, 6}, [3]uint64{s.Ejections, s.Probes, s.ProbeFailures})
		assert.Equal(t, uint64(7), s.Workers[0].Ejections)
	})
}

func TestEjectionJitter(t *testing.T) {
	for _, tt := range []struct {
		draw float64
		want time.Duration
	}{{0, 500 * time.Millisecond}, {0.25, 750 * time.Millisecond}, {0.999, 1499 * time.Millisecond}} {
		t.Run(fmt.Sprint(tt.draw), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				var down atomic.Bool
				b, at := ejectedWorker0(t, &down, &withHooks{jitter: func() float64 { return tt.draw }})
				defer b.Close()
				assert.Equal(t, at(tt.want), b.Stats().Workers[0].EjectedUntil)
			})
		})
	}
}

func TestProbeOutcomes(t *testing.T) {
	t.Run("the caller gave up: the next request probes", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var down atomic.Bool
			var hang atomic.Bool
			b, _ := ejectedWorker0(t, &down)
			defer b.Close()
			// The probe's Func runs until its caller gives up.
			b.workers[0].fn = func(ctx context.Context, i int) (int, error) {
				if hang.Load() {
					<-ctx.Done()
					return 0, ctx.Err()
				}
				return i, nil
			}
			hang.Store(true)
			time.Sleep(time.Until(b.Stats().Workers[0].EjectedUntil))
			ctx, cancel := context.WithCancel(context.Background())
			c, err := b.Submit(ctx, 0)
			require.NoError(t, err)
			synctest.Wait()
			s := b.Stats()
			assert.True(t, s.Workers[0].Probing)
			assert.Equal(t, uint64(1), s.Probes)
			cancel()
			assert.Equal(t, 0, (<-c).Worker)
			hang.Store(false)
			res := <-mustSubmit(t, b, 0)
			assert.Equal(t, 0, res.Worker, "its outcome said nothing: the next request is the second probe")
			assert.NoError(t, res.Err)
			<-mustSubmit(t, b, 0)
			s = b.Stats()
			assert.False(t, s.Workers[0].Ejected)
			assert.Equal(t, [3]uint64{1, 2, 0}, [3]uint64{s.Ejections, s.Probes, s.ProbeFailures})
		})
	})
	t.Run("Close waits for a probe", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var down atomic.Bool
			b, _ := ejectedWorker0(t, &down)
			release := make(chan struct{})
			b.workers[0].fn = func(ctx context.Context, i int) (int, error) {
				<-release
				return i, nil
			}
			time.Sleep(time.Until(b.Stats().Workers[0].EjectedUntil))
			c := mustSubmit(t, b, 0)
			closed := make(chan struct{})
			go func() {
				b.Close()
				close(closed)
			}()
			synctest.Wait()
			select {
			case <-closed:
				t.Fatal("Close returned while the probe ran")
			default:
			}
			close(release)
			<-closed
			res := <-c
			assert.Equal(t, 0, res.Worker)
			assert.NoError(t, res.Err)
		})
	})
}

func TestEjectionLimits(t *testing.T) {
	t.Run("at most half, at least one, never the last", func(t *testing.T) {
		h := newHeapHarness(1, true)
		var got []int
		for range 9 {
			h.add(1)
			got = append(got, h.s.maxOut())
		}
		assert.Equal(t, []int{0, 1, 1, 2, 2, 3, 3, 4, 4}, got)
	})
	// Two workers failing every request, 20 requests: never ejected.
	for _, tt := range []struct {
		name  string
		err   error
		opts  []Option
		check func(t *testing.T, w WorkerStats)
	}{
		{"overload never ejects", Overloaded(errDown), nil, func(t *testing.T, w WorkerStats) {
			assert.Greater(t, w.FailureRate, 0.5, "it costs more")
			assert.Zero(t, w.Streak)
		}},
		{"WithEjection(false)", errDown, []Option{WithEjection(false)}, func(t *testing.T, w WorkerStats) {
			assert.Equal(t, 10, w.Streak)
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				b := mustNew(t, 2, func(ctx context.Context, i int) (int, error) { return 0, tt.err }, tt.opts...)
				defer b.Close()
				for range 20 {
					_, err := b.Do(context.Background(), 0)
					require.ErrorIs(t, err, errDown)
				}
				s := b.Stats()
				assert.Zero(t, s.Ejections)
				tt.check(t, s.Workers[0])
			})
		})
	}
	t.Run("removing the last in service returns an ejected one", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var down atomic.Bool
			b, _ := ejectedWorker0(t, &down)
			defer b.Close()
			require.NoError(t, b.RemoveWorker(context.Background(), 1))
			<-mustSubmit(t, b, 0)
			s := b.Stats()
			assert.False(t, s.Workers[0].Ejected, "it is the last worker")
			assert.Zero(t, s.Ejected)
			res := <-mustSubmit(t, b, 0)
			assert.Equal(t, 0, res.Worker)
			assert.ErrorIs(t, res.Err, errDown, "it fails, and gets every request")
		})
	})
	t.Run("an ejected worker is removed", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var down atomic.Bool
			b, _ := ejectedWorker0(t, &down)
			defer b.Close()
			require.NoError(t, b.RemoveWorker(context.Background(), 0))
			s := b.Stats()
			assert.Len(t, s.Workers, 1)
			assert.Zero(t, s.Ejected)
			time.Sleep(time.Minute)
			for range 4 {
				assert.Equal(t, 1, (<-mustSubmit(t, b, 0)).Worker, "no probe goes to a removed worker")
			}
		})
	})
	t.Run("All counts only workers in service", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			var down atomic.Bool
			b, _ := ejectedWorker0(t, &down, WithQueueDepth(3))
			defer b.Close()
			assert.Equal(t, 3, b.capacity())
		})
	})
}

// The failure rate, as Stats shows it: an eighth of the way at each
// outcome, and e^-1 of itself after 10 s without one.
func TestFailureRateMovesAndDecays(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var fail atomic.Bool
		b := mustNew(t, 1, func(ctx context.Context, i int) (int, error) {
			if fail.Load() {
				return 0, errDown
			}
			return i, nil
		})
		defer b.Close()
		rate := func() float64 { return b.Stats().Workers[0].FailureRate }
		fail.Store(true)
		for range 3 {
			b.Do(context.Background(), 0)
		}
		assert.InDelta(t, rateAfter(1, 1, 1), rate(), 1.0/rateOne)
		time.Sleep(decay)
		assert.InDelta(t, rateAfter(1, 1, 1)/math.E, rate(), 1.0/rateOne)
		fail.Store(false)
		b.Do(context.Background(), 0)
		assert.InDelta(t, rateAfter(1, 1, 1)/math.E*7/8, rate(), 2.0/rateOne, "a success moves the decayed rate")
		for range 30 {
			b.Do(context.Background(), 0)
		}
		assert.Zero(t, rate(), "a rate of noise is cleared")
	})
}

// The hold-back counts the root's failures: a free worker that fails half
// its requests is expected to take twice its time for a success.
func TestHoldBackCountsFailures(t *testing.T) {
	h := newHeapHarness(1, true)
	h.fixRef(time.Millisecond)
	w := h.add(1)
	w.observe(time.Millisecond, 0)
	h.s.touch(w)
	before := h.s.rootTime()
	w.health.Store(uint64(rateOne / 2)) // a rate of 1/2, moved at time 0
	h.s.now = 0
	assert.InDelta(t, 2*before, h.s.rootTime(), before/rateOne*4)
}

// 15. Retries on another worker.

// retryPool starts n workers, count rule, no ejection: worker i runs
// fns[i] if there is one, else it returns its request; ran counts each
// worker's runs of each request.
type retryPool struct {
	b   *Balancer[int, int]
	mu  sync.Mutex
	ran map[[2]int]int // {worker, request} → runs
}

func newRetryPool(t *testing.T, n int, fns map[int]Func[int, int], opts ...Option) *retryPool {
	p := &retryPool{ran: map[[2]int]int{}}
	var specs []WorkerSpec[int, int]
	for i := range n {
		fn := fns[i]
		specs = append(specs, WorkerSpec[int, int]{Func: func(ctx context.Context, req int) (int, error) {
			p.mu.Lock()
			p.ran[[2]int{i, req}]++
			p.mu.Unlock()
			if fn != nil {
				return fn(ctx, req)
			}
			return req, nil
		}})
	}
	b, err := NewFrom(specs, append([]Option{WithLoadEstimate(false), WithEjection(false)}, opts...)...)
	require.NoError(t, err)
	p.b = b
	return p
}

func unavailable(context.Context, int) (int, error) { return 0, Unprocessed(errDown) }

func TestRetryGoesElsewhere(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newRetryPool(t, 3, map[int]Func[int, int]{0: unavailable}, WithRetry(3))
		defer p.b.Close()
		res := <-mustSubmit(t, p.b, 7) // first to worker 0, which has waited longest
		assert.NoError(t, res.Err)
		assert.Equal(t, 7, res.Value)
		assert.Equal(t, 2, res.Attempts)
		assert.Equal(t, 1, res.Worker, "the least loaded of the workers it has not tried")
		s := p.b.Stats()
		assert.Equal(t, uint64(1), s.Retries)
		assert.Equal(t, uint64(1), s.Workers[1].Retries)
		assert.Equal(t, [2]uint64{1, 1}, [2]uint64{s.Accepted, s.Workers[1].Completed})
	})
}

func TestRetryNeverTwiceOnOneWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newRetryPool(t, 3, map[int]Func[int, int]{0: unavailable, 1: unavailable, 2: unavailable}, WithRetry(MaxAttempts))
		defer p.b.Close()
		res := <-mustSubmit(t, p.b, 1)
		assert.ErrorIs(t, res.Err, errDown, "every worker tried: the last outcome stands")
		assert.Equal(t, 3, res.Attempts)
		assert.Equal(t, map[[2]int]int{{0, 1}: 1, {1, 1}: 1, {2, 1}: 1}, p.ran)
		assert.Equal(t, uint64(2), p.b.Stats().Retries)
	})
}

func TestRetryWhatIsRetryable(t *testing.T) {
	failing := func(context.Context, int) (int, error) { return 0, errDown }
	overloaded := func(context.Context, int) (int, error) { return 0, Overloaded(errDown) }
	tests := []struct {
		name     string
		fn       Func[int, int]
		opts     []Option
		attempts int
		panicErr bool
	}{
		{name: "unavailable", fn: unavailable, attempts: 2},
		{name: "overload", fn: overloaded, attempts: 2},
		{name: "a failure: not by default", fn: failing, attempts: 1},
		{name: "a failure the predicate accepts", fn: failing, attempts: 2,
			opts: []Option{WithRetryOn(func(_ int, err error) bool { return errors.Is(err, errDown) })}},
		{name: "a failure the predicate refuses", fn: failing, attempts: 1,
			opts: []Option{WithRetryOn(func(int, error) bool { return false })}},
		{name: "a predicate that panics", fn: failing, attempts: 1, panicErr: true,
			opts: []Option{WithRetryOn(func(int, error) bool { panic("predicate") })}},
		{name: "a success", fn: square, attempts: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := newRetryPool(t, 2, map[int]Func[int, int]{0: tt.fn}, append([]Option{WithRetry(2)}, tt.opts...)...)
				defer p.b.Close()
				res := <-mustSubmit(t, p.b, 3)
				assert.Equal(t, tt.attempts, res.Attempts)
				if tt.panicErr {
					var pe *PanicError
					assert.ErrorAs(t, res.Err, &pe)
					assert.Equal(t, uint64(1), p.b.Stats().Panics)
				}
				if tt.attempts == 2 {
					assert.NoError(t, res.Err)
					assert.Equal(t, 1, res.Worker)
				}
			})
		})
	}
}

// WithRetryOn's predicate is asked only while the request has attempts
// left: after the last one, its outcome stands as the Func gave it, and a
// predicate that would panic cannot turn it into a *PanicError.
func TestRetryOnIsNotAskedAfterTheLastAttempt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		failing := func(context.Context, int) (int, error) { return 0, errDown }
		var asked atomic.Int64
		p := newRetryPool(t, 2, map[int]Func[int, int]{0: failing, 1: failing}, WithRetry(2),
			WithRetryOn(func(int, error) bool { asked.Add(1); return true }))
		defer p.b.Close()
		res := <-mustSubmit(t, p.b, 3)
		assert.Equal(t, 2, res.Attempts)
		assert.ErrorIs(t, res.Err, errDown)
		assert.Equal(t, int64(1), asked.Load(), "asked after the first attempt only")
	})
}

// holdOne returns a Func that holds request 100 until release is closed,
// and otherwise returns its request.
func holdOne(release <-chan struct{}) Func[int, int] {
	return func(ctx context.Context, i int) (int, error) {
		if i == 100 {
			<-release
		}
		return i, nil
	}
}

func TestRetryWaitsForAnUntriedWorker(t *testing.T) {
	t.Run("then runs there", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			release := make(chan struct{})
			p := newRetryPool(t, 2, map[int]Func[int, int]{0: unavailable, 1: holdOne(release)}, WithRetry(2))
			defer p.b.Close()
			<-mustSubmit(t, p.b, 0) // worker 0 fails it, worker 1 serves it
			held := mustSubmit(t, p.b, 100)
			synctest.Wait()
			c := mustSubmit(t, p.b, 5) // worker 0, then it waits for worker 1
			synctest.Wait()
			assert.Empty(t, c)
			assert.Equal(t, 1, p.b.Stats().Pending, "worker 1's held request; the retry waits, pending")
			close(release)
			<-held
			res := <-c
			assert.NoError(t, res.Err)
			assert.Equal(t, [2]int{1, 2}, [2]int{res.Worker, res.Attempts})
		})
	})
	t.Run("its ctx ends: ctx.Err() and no new attempt", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			release := make(chan struct{})
			p := newRetryPool(t, 2, map[int]Func[int, int]{0: unavailable, 1: holdOne(release)}, WithRetry(2))
			defer p.b.Close()
			<-mustSubmit(t, p.b, 0)
			held := mustSubmit(t, p.b, 100)
			ctx, cancel := context.WithCancel(context.Background())
			c, err := p.b.Submit(ctx, 5)
			require.NoError(t, err)
			synctest.Wait()
			cancel()
			close(release)
			<-held
			res := <-c
			assert.ErrorIs(t, res.Err, context.Canceled)
			assert.Equal(t, 1, res.Attempts)
			assert.Zero(t, p.ran[[2]int{1, 5}], "no attempt after the ctx ended")
			assert.Equal(t, uint64(1), p.b.Stats().Retries, "request 0's; 5's was not even sent")
		})
	})
	t.Run("TrySubmit's does not wait", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			release := make(chan struct{})
			p := newRetryPool(t, 2, map[int]Func[int, int]{0: unavailable, 1: holdOne(release)}, WithRetry(2))
			defer p.b.Close()
			<-mustSubmit(t, p.b, 0)
			held := mustSubmit(t, p.b, 100)
			synctest.Wait()
			c, err := p.b.TrySubmit(context.Background(), 5)
			require.NoError(t, err)
			res := <-c
			assert.ErrorIs(t, res.Err, errDown, "its last outcome")
			close(release)
			<-held
		})
	})
	t.Run("Close gives a waiting retry its last outcome", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			release := make(chan struct{})
			p := newRetryPool(t, 2, map[int]Func[int, int]{0: unavailable, 1: holdOne(release)}, WithRetry(2))
			<-mustSubmit(t, p.b, 0)
			held := mustSubmit(t, p.b, 100)
			c := mustSubmit(t, p.b, 5)
			synctest.Wait()
			closed := make(chan struct{})
			go func() {
				p.b.Close()
				close(closed)
			}()
			res := <-c
			assert.ErrorIs(t, res.Err, errDown)
			close(release)
			<-held
			<-closed
		})
	})
}

func TestRetryBudget(t *testing.T) {
	// Worker 0 fails every request, and its weight makes it first for
	// each, despite its failure rate: each request asks for one retry.
	newBudgeted := func(ratio, perSecond float64) *Balancer[int, int] {
		b, err := NewFrom([]WorkerSpec[int, int]{
			{Func: unavailable, Options: []WorkerOption{WithWeight(100)}},
			{Func: square},
		}, WithLoadEstimate(false), WithEjection(false), WithRetry(2), WithRetryBudget(ratio, perSecond))
		require.NoError(t, err)
		return b
	}
	retried := func(b *Balancer[int, int], n int) (k int) {
		for range n {
			if res := <-mustSubmit(t, b, 1); res.Attempts == 2 {
				require.NoError(t, res.Err)
				k++
			} else {
				require.ErrorIs(t, res.Err, errDown)
			}
		}
		return k
	}
	synctest.Test(t, func(t *testing.T) {
		// 2 extra attempts a second and nothing in proportion.
		b := newBudgeted(0, 2)
		defer b.Close()
		assert.Equal(t, 2, retried(b, 10))
		s := b.Stats()
		assert.Equal(t, [2]uint64{2, 8}, [2]uint64{s.Retries, s.BudgetRefusals})
		time.Sleep(time.Second)
		assert.Zero(t, retried(b, 1), "a second later, the slot of the first two still overlaps the last second")
		time.Sleep(time.Duration(budgetSlot))
		assert.Equal(t, 2, retried(b, 10), "a slot later, two more")
		time.Sleep(10 * time.Second)
		// 10 % of the requests of the last second (and of the last 10 s),
		// nothing more: of 20 requests, the 10th and 20th.
		c := newBudgeted(0.1, 0)
		defer c.Close()
		assert.Equal(t, 2, retried(c, 20))
		assert.Equal(t, uint64(18), c.Stats().BudgetRefusals)
	})
}

func TestRetryOptionsMustFit(t *testing.T) {
	for _, opt := range []Option{WithRetry(0), WithRetry(MaxAttempts + 1), WithRetryBudget(-1, 0), WithRetryBudget(0, math.NaN()),
		WithRetryBudget(math.Inf(1), 1), WithRetryOn[int](nil), WithRetryOn(func(string, error) bool { return true })} {
		_, err := New(1, square, opt)
		assert.ErrorIs(t, err, ErrInvalidArgument)
	}
}

// A retry never takes the room the loop found for the request it is
// dispatching. Here worker 0, ejected, fails its probe as the loop is about
// to take request 60 for worker 1's one slot: worker 0 is out of the heap,
// so the probe's completion frees no room there, and the probe's retry,
// for worker 1 too, must wait. The loop's select picks the request or the
// completion's wake at random, so the race is run 20 times.
func TestRetryTakesNoRoomPromised(t *testing.T) {
	for range 20 {
		synctest.Test(t, func(t *testing.T) {
			probe, hold1 := make(chan struct{}), make(chan struct{})
			var holding atomic.Bool
			gate := newLoopGate(12) // 1 to 5 go out twice each, 6 once, then the probe
			b, err := NewFrom([]WorkerSpec[int, int]{
				{Func: func(ctx context.Context, i int) (int, error) {
					if i == 50 {
						<-probe
					}
					return 0, Unprocessed(errDown)
				}, Options: []WorkerOption{WithWeight(100)}}, // first for every request
				{Func: func(ctx context.Context, i int) (int, error) {
					if holding.Load() {
						<-hold1
					}
					return i, nil
				}},
			}, WithLoadEstimate(false), WithRetry(2), exactJitter, gate.hooks())
			require.NoError(t, err)
			defer b.Close()
			for i := range 5 {
				res := <-mustSubmit(t, b, i+1) // fails on worker 0, served by worker 1
				require.Equal(t, [2]int{1, 2}, [2]int{res.Worker, res.Attempts})
			}
			require.Equal(t, 1, (<-mustSubmit(t, b, 6)).Worker, "worker 0 is ejected")
			time.Sleep(time.Until(b.Stats().Workers[0].EjectedUntil))
			holding.Store(true)
			fifty := mustSubmit(t, b, 50) // worker 0's probe, until probe
			sixty := gate.race(t, b, 60, func() { close(probe) })
			assert.LessOrEqual(t, b.Stats().Workers[1].Pending, 1, "worker 1 holds more than its one slot")
			close(hold1)
			assert.NoError(t, (<-fifty).Err, "retried on worker 1")
			assert.NoError(t, (<-sixty).Err)
		})
	}
}

// The roster marks retired workers and compacts when half are marked:
// Stats lists exactly the workers not retired and counts every retired
// worker's outcomes once, through every compaction.
func TestRosterCompacts(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 10, square)
		defer b.Close()
		for i := range 10 {
			_, err := b.Do(context.Background(), i)
			require.NoError(t, err)
		}
		want := []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}
		for _, id := range []int{3, 0, 7, 9, 1, 5, 8} {
			require.NoError(t, b.RemoveWorker(context.Background(), id))
			want = slices.DeleteFunc(want, func(x int) bool { return x == id })
			s := b.Stats()
			var ids []int
			for _, w := range s.Workers {
				ids = append(ids, w.ID)
			}
			assert.Equal(t, want, ids, "after removing %d", id)
			assert.Equal(t, uint64(10), s.Completed, "every outcome counted once")
			r := b.roster.Load()
			assert.LessOrEqual(t, r.dead, len(r.workers)/2, "compacted once half are retired")
			assert.Equal(t, len(want), len(r.workers)-r.dead, "the marked are the retired")
		}
		id, err := b.AddWorker(square)
		require.NoError(t, err)
		assert.Equal(t, 10, id)
		assert.Len(t, b.Stats().Workers, 4)
	})
}

// A nil or zero Balancer fails at once, from every method, with one
// message that names the mistake.
func TestNilAndZeroBalancerSayUseNew(t *testing.T) {
	ctx := context.Background()
	for name, b := range map[string]*Balancer[int, int]{"nil": nil, "zero": {}} {
		for method, call := range map[string]func(){
			"Do":           func() { b.Do(ctx, 1) },
			"Submit":       func() { b.Submit(ctx, 1) },
			"TrySubmit":    func() { b.TrySubmit(ctx, 1) },
			"All":          func() { b.All(ctx, slices.Values([]int{1})) },
			"AddWorker":    func() { b.AddWorker(square) },
			"RemoveWorker": func() { b.RemoveWorker(ctx, 0) },
			"Close":        func() { b.Close() },
			"Shutdown":     func() { b.Shutdown(ctx) },
			"Stats":        func() { b.Stats() },
		} {
			assert.PanicsWithValue(t, errUseNew, call, "%s Balancer, %s", name, method)
		}
	}
}

// Among workers whose costs are equal, one that fails more loses the
// ties: its penalty weighs its pending count. Light load (each request
// done before the next) then goes to the healthy worker, where without
// the penalty the two would take turns.
func TestFailuresWeighTies(t *testing.T) {
	h := newHeapHarness(4, true)
	h.fixRef(time.Millisecond)
	bad, ok := h.add(1), h.add(1) // bad first: it would win the first tie
	for _, w := range []*worker[int, int]{ok, bad} {
		w.observe(time.Millisecond, 0)
	}
	bad.health.Store(uint64(rateOne / 5)) // 0.2: ×1.25, within the centre step
	h.s.now = 0
	h.s.touch(ok)
	h.s.touch(bad)
	require.Equal(t, h.s.cost(ok), h.s.cost(bad), "equal costs")
	var got []int
	for range 4 {
		w := h.p.root()
		got = append(got, w.id)
		require.True(t, h.dispatch(t))
		h.complete(w, time.Millisecond)
	}
	assert.Equal(t, []int{ok.id, ok.id, ok.id, ok.id}, got)
	assert.InDelta(t, 1.25, h.s.perSlot(bad), 1e-3)
}

// A worker ejected with requests queued behind its failures serves them
// while ejected; their successes can clear its failure rate and streak.
// Its probe must still be recorded: the worker comes back.
func TestProbeAfterTheRateWasCleared(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var fail atomic.Bool
		fail.Store(true)
		first, rest := make(chan struct{}), make(chan struct{})
		b, err := NewFrom([]WorkerSpec[int, int]{
			{Func: func(ctx context.Context, i int) (int, error) {
				switch {
				case i == 1:
					<-first
				case i == ejectAfter+1:
					<-rest
				}
				if i <= ejectAfter && fail.Load() {
					return 0, errDown
				}
				return i, nil
			}, Options: []WorkerOption{WithWeight(100)}}, // first for every request
			{Func: square}, // a second worker, so that one may be ejected
		}, WithLoadEstimate(false), WithQueueDepth(64), exactJitter)
		require.NoError(t, err)
		defer b.Close()
		var cs []<-chan Result[int, int]
		for i := range 45 { // all queue at worker 0 behind request 1
			cs = append(cs, mustSubmit(t, b, i+1))
		}
		synctest.Wait()
		close(first) // 1 to 5 fail; 6 waits
		synctest.Wait()
		c, err := b.TrySubmit(context.Background(), 99) // the loop takes the failures, then this
		require.NoError(t, err)
		assert.Equal(t, 1, (<-c).Worker)
		require.True(t, b.Stats().Workers[0].Ejected, "ejected at its fifth failure")
		close(rest) // 6 to 45 succeed while it is ejected
		for _, c := range cs {
			<-c
		}
		fail.Store(false)
		s := b.Stats()
		require.True(t, s.Workers[0].Ejected)
		require.Zero(t, s.Workers[0].Streak)
		require.Zero(t, s.Workers[0].FailureRate, "40 successes cleared it")
		time.Sleep(time.Until(s.Workers[0].EjectedUntil))
		res := <-mustSubmit(t, b, 1)
		assert.Equal(t, 0, res.Worker, "the probe")
		<-mustSubmit(t, b, 2)
		assert.False(t, b.Stats().Workers[0].Ejected, "the probe's success was recorded")
	})
}

// slotGoroutines counts the goroutines serving as b's slots.
func slotGoroutines(b *Balancer[int, int]) int {
	n := 0
	b.slots.Range(func(any, any) bool { n++; return true })
	return n
}

// Slot goroutines start when the load needs them, and stay: never more
// than the most requests a worker had pending, never more than its
// concurrency.
func TestSlotsStartWhenNeeded(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		b := mustNew(t, 2, func(ctx context.Context, i int) (int, error) {
			if i > 0 {
				<-release
			}
			return i, nil
		}, WithConcurrency(MaxConcurrency))
		synctest.Wait()
		assert.Zero(t, slotGoroutines(b), "a declared concurrency costs nothing before requests")
		var cs []<-chan Result[int, int]
		for i := range 3 {
			cs = append(cs, mustSubmit(t, b, i+1))
		}
		synctest.Wait()
		assert.Equal(t, 3, slotGoroutines(b), "one per request running")
		close(release)
		for _, c := range cs {
			require.NoError(t, (<-c).Err)
		}
		for range 20 {
			_, err := b.Do(context.Background(), 0)
			require.NoError(t, err)
		}
		assert.Equal(t, 3, slotGoroutines(b), "kept, and enough for one at a time")
		require.NoError(t, b.Close())
		assert.Zero(t, slotGoroutines(b))

		// At most the concurrency, however deep the queue.
		g := newGates(8)
		c := mustNew(t, 1, g.fn, WithConcurrency(2), WithQueueDepth(4))
		for i := range 8 {
			cs[i%3] = mustSubmit(t, c, i)
		}
		synctest.Wait()
		assert.Equal(t, 2, slotGoroutines(c))
		g.openAll()
		require.NoError(t, c.Close())
	})
}

// A worker that never had a request has no goroutine: removing it, and
// closing, still wait for nothing and leave nothing.
func TestWorkerWithoutGoroutines(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		b := mustNew(t, 3, square, WithConcurrency(4))
		require.NoError(t, b.RemoveWorker(context.Background(), 1))
		_, err := b.Do(context.Background(), 2)
		require.NoError(t, err)
		require.NoError(t, b.Close())
		assert.Zero(t, slotGoroutines(b))
	})
}

// A worker can be full when it is ejected (it took a request between its
// fifth failure and the loop's next look): its probe waits until it has
// room, and goes as soon as it has.
func TestProbeWaitsForRoom(t *testing.T) {
	h := newHeapHarness(1, false)
	full, other := h.add(1), h.add(1)
	_ = other
	require.True(t, h.dispatch(t)) // to full, which has waited longest
	require.Equal(t, 1, full.pending)
	h.s.ejectWorker(full)
	h.now += 2 * ejectBase // the ejection is over
	w, probe := h.s.dispatch()
	assert.False(t, probe, "no probe for a full worker")
	assert.Same(t, other, w)
	h.s.complete(other)
	h.s.complete(full) // an old request: now it has room
	w, probe = h.s.dispatch()
	assert.True(t, probe)
	assert.Same(t, full, w)
}

// Of two ejected workers whose ejections are over, the full one is passed
// over: the probe goes to the one with room.
func TestProbePassesOverAFullWorker(t *testing.T) {
	h := newHeapHarness(1, false)
	full, roomy, _, _ := h.add(1), h.add(1), h.add(1), h.add(1)
	require.True(t, h.dispatch(t)) // to full, which has waited longest
	require.Equal(t, 1, full.pending)
	h.s.ejectWorker(full)
	h.s.ejectWorker(roomy)
	h.now += 2 * ejectBase // both ejections are over
	w, probe := h.s.dispatch()
	require.True(t, probe)
	assert.Same(t, roomy, w)
	assert.Equal(t, 1, full.pending, "nothing more for the full worker")
}

// A worker is never ejected between the loop's look for room and the
// dispatch it allowed: here the fifth failure of worker 1, the root with
// room, is taken as the loop takes request 6, and request 6 must still
// find room (at worker 1, ejected after), not land on worker 0, which is
// full. The loop's select picks the request or the completion's wake at
// random, so the race is run 20 times.
func TestEjectionTakesNoRoomPromised(t *testing.T) {
	for range 20 {
		synctest.Test(t, func(t *testing.T) {
			fail5, hold1 := make(chan struct{}), make(chan struct{})
			gate := newLoopGate(6) // 100, 1 to 4, then 5
			b, err := NewFrom([]WorkerSpec[int, int]{
				{Func: holdOne(hold1), Options: []WorkerOption{WithWeight(100)}}, // first while it has room
				{Func: func(ctx context.Context, i int) (int, error) {
					if i == 5 {
						<-fail5
					}
					return 0, errDown
				}, Options: []WorkerOption{WithConcurrency(2)}},
			}, WithLoadEstimate(false), gate.hooks())
			require.NoError(t, err)
			defer b.Close()
			held := mustSubmit(t, b, 100) // holds worker 0, which is then full
			synctest.Wait()
			for i := range 4 {
				require.ErrorIs(t, (<-mustSubmit(t, b, i+1)).Err, errDown)
			}
			five := mustSubmit(t, b, 5) // on worker 1, until fail5; worker 1 keeps a free slot
			six := gate.race(t, b, 6, func() { close(fail5) })
			assert.LessOrEqual(t, b.Stats().Workers[0].Pending, 1, "worker 0 holds more than its one slot")
			close(hold1)
			<-held
			assert.ErrorIs(t, (<-five).Err, errDown)
			<-six
		})
	}
}

// A request through Do costs no allocation with a context that is never
// done, whether or not it carries values, and 1 with one that can be done:
// the context the Func runs under, which Shutdown's cancellation reaches it
// through. A fresh values context per request costs its valuesCtx too (the
// other allocation is the caller's WithValue). Submit adds only the channel
// it returns, and All no more per request than Do.
func TestRequestAllocations(t *testing.T) {
	type key struct{}
	b := mustNew(t, 2, square)
	defer b.Close()
	cancellable, cancel := context.WithCancel(context.Background())
	defer cancel()
	deadline, cancelDeadline := context.WithTimeout(context.Background(), time.Hour)
	defer cancelDeadline()
	values := context.WithValue(context.Background(), key{}, 1)
	submitted := testing.AllocsPerRun(1000, func() { <-must(b.Submit(context.Background(), 3)) })
	for _, tt := range []struct {
		name string
		ctx  func() context.Context
		max  float64
	}{
		{"Background", context.Background, 0},
		{"WithValue", func() context.Context { return values }, 0},
		{"WithValue, fresh", func() context.Context { return context.WithValue(context.Background(), key{}, 1) }, 2},
		{"WithCancel", func() context.Context { return cancellable }, 1},
		{"WithTimeout", func() context.Context { return deadline }, 1},
	} {
		allocs := testing.AllocsPerRun(1000, func() {
			if _, err := b.Do(tt.ctx(), 3); err != nil {
				t.Fatal(err)
			}
		})
		assert.LessOrEqual(t, allocs, tt.max, "%s: allocations per Do", tt.name)
		allocs = testing.AllocsPerRun(1000, func() { <-must(b.Submit(tt.ctx(), 3)) })
		assert.LessOrEqual(t, allocs, submitted+tt.max, "%s: allocations per Submit", tt.name)
		batch := func(n int) float64 {
			xs := make([]int, n)
			return testing.AllocsPerRun(20, func() {
				for range b.All(tt.ctx(), slices.Values(xs)) {
				}
			})
		}
		perRequest := (batch(300) - batch(100)) / 200
		assert.LessOrEqual(t, perRequest, max(tt.max, 1), "%s: allocations per request of All (its own context can be done)", tt.name)
	}
}

// A request whose slot passed its check for Shutdown just before Shutdown
// gave up, and stored its cancel only after Shutdown looked at the slots,
// is still cancelled with cause ErrClosed: the slot looks again.
func TestShutdownCancelsARequestStartingThen(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		starting, proceed := make(chan struct{}), make(chan struct{})
		b, err := New(1, func(ctx context.Context, i int) (int, error) {
			<-ctx.Done()
			return 0, context.Cause(ctx)
		}, &withHooks{run: func() {
			close(starting)
			<-proceed
		}})
		require.NoError(t, err)
		req, cancelReq := context.WithCancel(context.Background()) // a context of its own, kept by the slot
		defer cancelReq()
		c, err := b.Submit(req, 1)
		require.NoError(t, err)
		<-starting
		ctx, cancel := context.WithCancel(context.Background())
		cancel() // Shutdown gives up at once
		assert.ErrorIs(t, b.Shutdown(ctx), context.Canceled)
		close(proceed)
		assert.ErrorIs(t, (<-c).Err, ErrClosed, "the Func saw Shutdown's cause")
		require.NoError(t, b.Close())
	})
}

// loopGate stops the loop once, where it parks after handing its n-th
// request to a worker, so that a test can make a request and a completion
// wait for it together (see race). Call it inside synctest.Test.
type loopGate struct {
	n              int64
	sent           atomic.Int64
	parked, resume chan struct{}
}

func newLoopGate(n int64) *loopGate {
	return &loopGate{n: n, parked: make(chan struct{}), resume: make(chan struct{})}
}

func (g *loopGate) hooks() *withHooks {
	return &withHooks{
		send: func() { g.sent.Add(1) },
		park: func() {
			if g.sent.Load() == g.n && g.sent.CompareAndSwap(g.n, g.n+1) {
				g.parked <- struct{}{}
				<-g.resume
			}
		},
	}
}

// race waits for the loop to stop, submits req from a goroutine, calls
// complete (which lets a request finish), and lets the loop go on once
// both wait: its select takes the request or the completion's wake first,
// at random. It returns req's result, once it has one.
func (g *loopGate) race(t *testing.T, b *Balancer[int, int], req int, complete func()) <-chan Result[int, int] {
	t.Helper()
	<-g.parked
	res := make(chan Result[int, int], 1)
	go func() { res <- <-mustSubmit(t, b, req) }()
	complete()
	synctest.Wait()
	close(g.resume)
	synctest.Wait()
	return res
}

// hedgePool is a balancer with WithHedge(0.95, 0) whose Funcs take 10 ms,
// but for the attempts stall picks, which run until stall returns or
// their ctx ends, and which it records. warm gives it its 100 successes.
type hedgePool struct {
	b     *Balancer[int, int]
	mu    sync.Mutex
	stall func(worker, req, n int) (hang bool, err error) // the n-th run of req (from 1)
	runs  map[int]int                                     // per request
	log   []string                                        // what the hung attempts saw, in order
	epoch time.Time                                       // the log's times count from it
	size  func(req int) time.Duration                     // how long req takes, if not 10 ms; then its Func honours its ctx
}

func newHedgePool(t *testing.T, workers int, opts ...Option) *hedgePool {
	p := &hedgePool{runs: map[int]int{}, stall: func(int, int, int) (bool, error) { return false, nil }}
	var specs []WorkerSpec[int, int]
	for i := range workers {
		specs = append(specs, WorkerSpec[int, int]{Func: func(ctx context.Context, req int) (int, error) {
			p.mu.Lock()
			p.runs[req]++
			hang, err := p.stall(i, req, p.runs[req])
			p.mu.Unlock()
			if hang {
				<-ctx.Done()
				p.mu.Lock()
				p.log = append(p.log, fmt.Sprintf("worker %d, request %d: %v after %v", i, req, context.Cause(ctx), time.Since(p.epoch)))
				p.mu.Unlock()
				return 0, ctx.Err()
			}
			if p.size != nil { // sized requests honour their ctx
				select {
				case <-time.After(p.size(req)):
				case <-ctx.Done():
					return 0, ctx.Err()
				}
				return req, err
			}
			time.Sleep(10 * time.Millisecond)
			return req, err
		}})
	}
	b, err := NewFrom(specs, append([]Option{WithLoadEstimate(false), WithEjection(false), WithHedge(0.95, 0)}, opts...)...)
	require.NoError(t, err)
	p.b = b
	return p
}

// warm runs n requests one after another: n successes of 10 ms.
func (p *hedgePool) warm(t *testing.T, n int) {
	for i := range n {
		_, err := p.b.Do(context.Background(), -1-i)
		require.NoError(t, err)
	}
}

func TestHedgeGoesAtTheQuantileAndTheFirstSuccessWins(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 2)
		defer p.b.Close()
		p.warm(t, 100) // p95 = 10 ms
		p.stall = func(w, req, n int) (bool, error) { return req == 7 && n == 1, nil }
		p.mu.Lock()
		p.epoch = time.Now()
		p.mu.Unlock()
		res := <-mustSubmit(t, p.b, 7)
		took := time.Since(p.epoch)
		require.NoError(t, res.Err)
		assert.Equal(t, 7, res.Value)
		assert.Equal(t, 2, res.Attempts)
		// Hedged 1 ns past 10 ms (longer than the quantile), done 10 ms later.
		assert.Equal(t, 20*time.Millisecond+time.Nanosecond, took)
		first := 0 // the hung attempt's worker: the one the hedge did not go to
		if res.Worker == 0 {
			first = 1
		}
		synctest.Wait()
		assert.Equal(t, []string{fmt.Sprintf("worker %d, request 7: %v after %v", first, ErrHedgeLost, took)}, p.log,
			"the loser is cancelled with ErrHedgeLost as the winner ends")
		s := p.b.Stats()
		assert.Equal(t, [3]uint64{1, 1, 0}, [3]uint64{s.Hedges, s.HedgeWins, s.Retries})
		assert.Equal(t, uint64(1), s.Workers[res.Worker].Hedges)
		assert.Equal(t, s.Accepted+s.Hedges, s.Completed, "both attempts completed")
		assert.Zero(t, s.Failed, "the loser's error is not a failure")
		lost := s.Workers[first]
		assert.Zero(t, lost.FailureRate)
		assert.Zero(t, lost.Streak)
		assert.Equal(t, 10*time.Millisecond, lost.MeanService, "nor a sample of its speed")
	})
}

// Hedges that do not pay back off: once fewer than 4 of the latest 32
// hedges won, a request waits for the window's 99.9th percentile before
// its hedge, and 4 wins among the latest 32 bring the quantile back.
func TestHedgesThatDoNotPayBackOff(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 2, WithRetryBudget(1, 0)) // a hedge for every request
		defer p.b.Close()
		// 98 successes of 10 ms and 2 of 40: p95 10 ms, p99.9 40 ms.
		p.size = func(req int) time.Duration {
			switch {
			case req == -1 || req == -2:
				return 40 * time.Millisecond
			case req >= 1000: // merely big: as long on any worker
				return 15 * time.Millisecond
			}
			return 10 * time.Millisecond
		}
		p.warm(t, 100)
		hedged := func(req int) time.Duration {
			start := time.Now()
			res := <-mustSubmit(t, p.b, req)
			require.NoError(t, res.Err)
			return time.Since(start)
		}
		for i := range hedgeJudged {
			// Hedged past 10 ms; the copy cannot win.
			require.Equal(t, 15*time.Millisecond, hedged(1000+i))
		}
		s := p.b.Stats()
		require.Equal(t, [2]uint64{hedgeJudged, 0}, [2]uint64{s.Hedges, s.HedgeWins})
		assert.Equal(t, 15*time.Millisecond, hedged(2000))
		assert.Equal(t, uint64(hedgeJudged), p.b.Stats().Hedges, "no hedge before 40 ms now")

		// Hung attempts: each hedged past 40 ms wins 10 ms later, until
		// 4 of the latest 32 have won.
		p.stall = func(w, req, n int) (bool, error) { return req < 100 && n == 1, nil }
		for i := range hedgeJudged / hedgePaid {
			assert.Equal(t, 50*time.Millisecond+time.Nanosecond, hedged(i), "hung request %d", i)
		}
		assert.Equal(t, 20*time.Millisecond+time.Nanosecond, hedged(99), "hedges pay again: past 10 ms")
		s = p.b.Stats()
		assert.Equal(t, [2]uint64{hedgeJudged + hedgeJudged/hedgePaid + 1, hedgeJudged/hedgePaid + 1}, [2]uint64{s.Hedges, s.HedgeWins})
	})
}

// A worker whose estimate is more than two steps of the scale slower than
// its prior is slow by as many times as the estimate says; one of the usual
// speed, one not measured or whose estimate expired, and every worker
// without the load estimate, are not.
func TestSlowness(t *testing.T) {
	h := newHeapHarness(1, true)
	h.fixRef(10 * time.Millisecond)
	slow := func(weight float64, level time.Duration) *worker[int, int] {
		w := h.add(weight)
		w.level.Store(int64(level))
		w.service.Store(int64(level))
		return w
	}
	assert.Equal(t, 1.0, h.s.slowness(h.add(1)), "not measured")
	assert.Equal(t, 1.0, h.s.slowness(slow(1, 10*time.Millisecond)), "the usual speed")
	assert.Equal(t, 1.0, h.s.slowness(slow(1, 22*time.Millisecond)), "within two steps: noise")
	assert.Equal(t, 4.0, h.s.slowness(slow(1, 40*time.Millisecond)))
	assert.Equal(t, 4.0, h.s.slowness(slow(2, 20*time.Millisecond)), "at its weight: its prior is 5 ms")
	assert.Equal(t, 1.0, h.s.slowness(slow(2, 10*time.Millisecond)), "twice the prior of its weight, but within two steps")
	straggled := slow(1, 40*time.Millisecond)
	straggled.service.Store(int64(17500 * time.Microsecond)) // one run 20×: the peak counts 4× itself at most
	assert.Equal(t, 1.0, h.s.slowness(straggled), "the level two steps up after one slow run, the peak not")
	peaked := slow(1, 40*time.Millisecond)
	peaked.service.Store(int64(60 * time.Millisecond))
	assert.Equal(t, 4.0, h.s.slowness(peaked), "the lesser of the two")
	lapsed := slow(1, 40*time.Millisecond)
	lapsed.lapsed = true
	assert.Equal(t, 1.0, h.s.slowness(lapsed), "its estimate expired: it counts as its prior")
	h.s.estimate = false
	assert.Equal(t, 1.0, h.s.slowness(slow(1, 40*time.Millisecond)), "without the load estimate")
}

// An attempt sent to a worker 4 times slower than its peers gets its hedge
// deadline 4 delays after it was sent, one to a worker 8 times slower 8
// delays after, and each comes due in its place among the deadlines set
// after it.
func TestHedgeWaitsLongerAtASlowWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		h := newHeapHarness(1, true)
		h.fixRef(10 * time.Millisecond)
		fast, slow, slower := h.add(1), h.add(1), h.add(1)
		for w, d := range map[*worker[int, int]]time.Duration{fast: 10 * time.Millisecond, slow: 40 * time.Millisecond, slower: 80 * time.Millisecond} {
			w.level.Store(int64(d))
			w.service.Store(int64(d))
		}
		b := h.b
		b.epoch = time.Now()
		b.hedging = newHedger[int, int](hedgeOption{true, 0.95, 0}, 1)
		defer b.hedging.timer.Stop()
		b.hedging.delay = int64(10 * time.Millisecond)
		send := func(w *worker[int, int]) *flight[int, int] {
			f := &flight[int, int]{}
			f.state.Store(flightLive)
			f.tried = f.buf[:0]
			b.attempt(f, w)
			time.Sleep(time.Millisecond)
			return f
		}
		start := b.now()
		sent := []*flight[int, int]{send(slower), send(fast), send(slow), send(fast), send(fast), send(slow)}
		time.Sleep(30 * time.Millisecond)
		sent = append(sent, send(fast))
		at := func(d deadline[int, int]) string {
			return fmt.Sprintf("attempt %d at %v", slices.Index(sent, d.f), time.Duration(d.at-start))
		}
		var due []string
		for _, d := range append(b.hedging.due[b.hedging.head:], b.hedging.slow...) {
			due = append(due, at(d))
		}
		assert.Equal(t, []string{"attempt 1 at 11ms", "attempt 3 at 13ms", "attempt 4 at 14ms", "attempt 6 at 46ms", "attempt 2 at 42ms", "attempt 5 at 45ms", "attempt 0 at 80ms"}, due)
		assert.Equal(t, start+int64(11*time.Millisecond), b.hedging.armed, "the timer is for the first")
		var popped []string
		for d, ok := b.hedging.pop(start + int64(time.Second)); ok; d, ok = b.hedging.pop(start + int64(time.Second)) {
			popped = append(popped, at(d))
		}
		assert.Equal(t, []string{"attempt 1 at 11ms", "attempt 3 at 13ms", "attempt 4 at 14ms", "attempt 2 at 42ms", "attempt 5 at 45ms", "attempt 6 at 46ms", "attempt 0 at 80ms"}, popped,
			"they come due in the order of their times")

		b.hedging.armed = 0
		f := send(slow)
		assert.Equal(t, f.sentAt[0]+int64(40*time.Millisecond), b.hedging.armed, "the timer is for the slow worker's attempt, the only one")
		f.state.Store(flightDone)
		for range 15 {
			send(slow).state.Store(flightDone)
		}
		send(slow)
		assert.Len(t, b.hedging.slow, 1, "the settled are dropped")
	})
}

// Hedges pay while 4 of the latest 32 won: wins older than that do not
// count.
func TestHedgePaysOverTheLatest(t *testing.T) {
	var h hedger[int, int]
	for range hedgeJudged - 1 {
		h.sending(0)
	}
	assert.True(t, h.pays(0), "fewer than 32 hedges sent")
	h.sending(0)
	assert.False(t, h.pays(0), "32 hedges, none won")
	assert.False(t, h.pays(hedgeJudged/hedgePaid-1))
	assert.True(t, h.pays(hedgeJudged/hedgePaid), "4 of the latest 32 won")
	for range hedgeJudged - 1 {
		h.sending(hedgeJudged / hedgePaid)
	}
	assert.True(t, h.pays(hedgeJudged/hedgePaid), "the 4 wins came after the 32nd oldest hedge")
	h.sending(hedgeJudged / hedgePaid)
	assert.False(t, h.pays(hedgeJudged/hedgePaid), "the 4 wins are older than the latest 32")
}

// An attempt that fails decides whether its request is tried again by the
// runs as of its end, not as of its look at them before: with WithRetry(3),
// a retry's hedge may start, fail and end between the retry's look (2
// runs) and its end (3 runs). The stress test found that interleaving: the
// request then ran a fourth time.
func TestFlightRetriesWithinTheAttemptsAsOfItsEnd(t *testing.T) {
	var f flight[int, int]
	f.state.Store(3*flightRun + flightLive) // 3 runs; the retry, the last live attempt, ends
	v, runs := f.end(false, true, 3)        // its caller counted 2 runs and would try again
	assert.Equal(t, deliver, v, "the third run's outcome stands")
	assert.Equal(t, 3, runs)
	assert.True(t, f.done())

	f.state.Store(2*flightRun + flightLive)
	v, _ = f.end(false, true, 3)
	assert.Equal(t, handBack, v, "2 runs of 3: tried again")
	assert.False(t, f.done())
}

func TestHedgeNeedsHundredSuccesses(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 2)
		defer p.b.Close()
		p.warm(t, 99)
		p.stall = func(w, req, n int) (bool, error) { return req == 7 && n == 1, nil }
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		res := <-mustSubmitCtx(t, p.b, ctx, 7)
		assert.ErrorIs(t, res.Err, context.DeadlineExceeded, "not hedged: it hung until its ctx ended")
		assert.Zero(t, p.b.Stats().Hedges)
		p.warm(t, 1) // the 100th
		p.stall = func(w, req, n int) (bool, error) { return req == 8 && n == 1, nil }
		res = <-mustSubmit(t, p.b, 8)
		assert.NoError(t, res.Err)
		assert.Equal(t, uint64(1), p.b.Stats().Hedges)
	})
}

func TestHedgeErrorWaitsForTheOtherCopy(t *testing.T) {
	errCopy := errors.New("copy failed")
	for _, tc := range []struct {
		name   string
		second error // the hung attempt's outcome once released
		want   error
	}{
		{"the first succeeds after the copy failed", nil, nil},
		{"both fail: the last outcome stands", errDown, errDown},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				release := make(chan struct{})
				p := newHedgePool(t, 2)
				defer p.b.Close()
				p.warm(t, 100)
				var hungOn int
				// The first attempt waits for release, then takes its 10
				// ms; the copy fails after its 10 ms.
				p.stall = func(w, req, n int) (bool, error) {
					switch {
					case req != 7:
						return false, nil
					case n == 2:
						return false, errCopy
					}
					hungOn = w
					p.mu.Unlock()
					<-release
					p.mu.Lock()
					return false, tc.second
				}
				c := mustSubmit(t, p.b, 7)
				time.Sleep(25 * time.Millisecond) // the copy went at 10 ms and failed at 20
				synctest.Wait()
				select {
				case res := <-c:
					t.Fatalf("outcome %v before the first attempt ended", res)
				default:
				}
				close(release)
				res := <-c
				assert.Equal(t, 2, res.Attempts)
				assert.Equal(t, hungOn, res.Worker, "the first attempt's outcome")
				if tc.want == nil {
					assert.NoError(t, res.Err)
				} else {
					assert.ErrorIs(t, res.Err, tc.want)
				}
			})
		})
	}
}

func TestHedgeTakesSpareCapacityOnly(t *testing.T) {
	for _, depth := range []int{1, 2} { // at depth 2 the busy worker has room in its queue, which a hedge must not take
		t.Run(fmt.Sprint("depth ", depth), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				busy := make(chan struct{})
				p := newHedgePool(t, 2, WithQueueDepth(depth))
				defer p.b.Close()
				p.warm(t, 100)
				p.stall = func(w, req, n int) (bool, error) {
					if req == 9 { // holds the other worker until busy is closed
						p.mu.Unlock()
						<-busy
						p.mu.Lock()
					}
					return req == 7 && n == 1, nil
				}
				c9 := mustSubmit(t, p.b, 9)
				start := time.Now()
				c7 := mustSubmit(t, p.b, 7)
				time.Sleep(30 * time.Millisecond)
				synctest.Wait()
				assert.Zero(t, p.b.Stats().Hedges, "past its deadline, but no worker has a free slot")
				close(busy) // request 9 then takes its 10 ms
				res := <-c7
				require.NoError(t, res.Err)
				assert.Equal(t, 2, res.Attempts)
				assert.Equal(t, 50*time.Millisecond, time.Since(start), "hedged as request 9's slot freed at 40 ms")
				assert.NoError(t, (<-c9).Err)
			})
		})
	}
}

func TestHedgeCountsAmongTheAttempts(t *testing.T) {
	for _, tc := range []struct {
		name            string
		workers, limit  int
		hedges, retries uint64
	}{
		// The first attempt fails at once and its retry hangs for 30 ms:
		// with 2 attempts in all, the retry is not hedged.
		{"no hedge past the limit", 3, 2, 0, 1},
		// The same with 3 attempts: the retry is hedged, once.
		{"a hedge within it", 4, 3, 1, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := newHedgePool(t, tc.workers, WithRetry(tc.limit))
				defer p.b.Close()
				p.warm(t, 100)
				p.stall = func(w, req, n int) (bool, error) {
					switch {
					case req != 7:
					case n == 1:
						return false, Unprocessed(errDown) // after its 10 ms
					case n == 2:
						p.mu.Unlock()
						time.Sleep(20 * time.Millisecond) // 30 ms in all, ignoring its ctx
						p.mu.Lock()
					}
					return false, nil
				}
				res := <-mustSubmit(t, p.b, 7)
				require.NoError(t, res.Err)
				synctest.Wait()
				s := p.b.Stats()
				assert.Equal(t, [2]uint64{tc.hedges, tc.retries}, [2]uint64{s.Hedges, s.Retries}, "hedges, retries")
				assert.Equal(t, 2+int(tc.hedges), res.Attempts)
				p.mu.Lock()
				assert.Equal(t, 2+int(tc.hedges), p.runs[7])
				p.mu.Unlock()
			})
		})
	}
}

func TestHedgeLoserKeepsItsWorkersAge(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 3, WithLoadEstimate(true))
		defer p.b.Close()
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) { return w == 0 && req >= 0, nil } // worker 0 stops
		for i := range 30 {
			res := <-mustSubmit(t, p.b, i)
			require.NoError(t, res.Err)
			require.NotEqual(t, 0, res.Worker)
		}
		p.mu.Lock()
		defer p.mu.Unlock()
		// The first request that went to worker 0 lost to its hedge; its
		// cancellation left worker 0 idle, but not fresh: nothing more
		// went there within its patience (2 s).
		assert.Len(t, p.log, 1, "requests stuck on worker 0")
	})
}

func TestHedgeWithinTheBudget(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 2, WithRetryBudget(0, 0))
		defer p.b.Close()
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) { return req == 7 && n == 1, nil }
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		res := <-mustSubmitCtx(t, p.b, ctx, 7)
		assert.ErrorIs(t, res.Err, context.DeadlineExceeded)
		s := p.b.Stats()
		assert.Equal(t, [2]uint64{0, 1}, [2]uint64{s.Hedges, s.BudgetRefusals})
	})
}

func TestHedgeShutdownCancelsEveryAttempt(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 2)
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) { return req == 7, nil } // both attempts hang
		c := mustSubmit(t, p.b, 7)
		time.Sleep(15 * time.Millisecond)
		synctest.Wait()
		require.Equal(t, uint64(1), p.b.Stats().Hedges)
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		assert.ErrorIs(t, p.b.Shutdown(ctx), context.Canceled)
		res := <-c
		assert.ErrorIs(t, res.Err, context.Canceled, "the last attempt's outcome")
		synctest.Wait()
		p.mu.Lock()
		defer p.mu.Unlock()
		assert.Len(t, p.log, 2)
		for _, l := range p.log {
			assert.Contains(t, l, ErrClosed.Error())
		}
		_, open := <-c
		assert.False(t, open, "one outcome")
	})
}

func TestHedgeOptionsMustFit(t *testing.T) {
	for _, o := range []Option{WithHedge(0.4, 0), WithHedge(1, 0), WithHedge(math.NaN(), 0), WithHedge(0.95, -time.Nanosecond)} {
		_, err := New(1, square, o)
		assert.ErrorIs(t, err, ErrInvalidArgument)
	}
	_, err := New(1, square, WithHedge(0.4, 0))
	assert.ErrorContains(t, err, "0.4")
}

func TestHedgeCloseWaitsForALoserThatIgnoresItsCtx(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		p := newHedgePool(t, 2)
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) {
			if req == 7 && n == 1 { // deaf to its ctx: it ends when released
				p.mu.Unlock()
				<-release
				p.mu.Lock()
			}
			return false, nil
		}
		res := <-mustSubmit(t, p.b, 7)
		require.NoError(t, res.Err)
		assert.Equal(t, 2, res.Attempts)
		closed := make(chan error)
		go func() { closed <- p.b.Close() }()
		synctest.Wait()
		select {
		case <-closed:
			t.Fatal("Close returned while the losing attempt still ran")
		default:
		}
		assert.Equal(t, 1, p.b.Stats().Pending, "the loser is pending")
		close(release)
		assert.NoError(t, <-closed)
		s := p.b.Stats()
		assert.Equal(t, s.Accepted+s.Hedges, s.Completed)
		assert.Zero(t, s.Failed)
	})
}

func TestHedgeThroughEveryEntry(t *testing.T) {
	entries := map[string]func(t *testing.T, b *Balancer[int, int]) Result[int, int]{
		"Do": func(t *testing.T, b *Balancer[int, int]) Result[int, int] {
			v, err := b.Do(context.Background(), 7)
			return Result[int, int]{Value: v, Err: err, Attempts: -1}
		},
		"Submit": func(t *testing.T, b *Balancer[int, int]) Result[int, int] { return <-mustSubmit(t, b, 7) },
		"TrySubmit": func(t *testing.T, b *Balancer[int, int]) Result[int, int] {
			c, err := b.TrySubmit(context.Background(), 7)
			require.NoError(t, err)
			return <-c
		},
		"All": func(t *testing.T, b *Balancer[int, int]) Result[int, int] {
			var last Result[int, int]
			n := 0
			for _, r := range b.All(context.Background(), slices.Values([]int{7})) {
				last = r
				n++
			}
			assert.Equal(t, 1, n, "one outcome")
			return last
		},
	}
	for name, entry := range entries {
		t.Run(name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				p := newHedgePool(t, 2)
				defer p.b.Close()
				p.warm(t, 100)
				p.stall = func(w, req, n int) (bool, error) { return req == 7 && n == 1, nil }
				start := time.Now()
				res := entry(t, p.b)
				require.NoError(t, res.Err)
				assert.Equal(t, 7, res.Value)
				if res.Attempts != -1 {
					assert.Equal(t, 2, res.Attempts)
				}
				assert.Equal(t, 20*time.Millisecond+time.Nanosecond, time.Since(start))
				assert.Equal(t, uint64(1), p.b.Stats().HedgeWins)
			})
		})
	}
}

func TestHedgeRetriesAfterBothCopiesFail(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 3, WithRetry(3))
		defer p.b.Close()
		p.warm(t, 100)
		var on []int
		// The first attempt takes 15 ms, so that its hedge goes at 10 ms;
		// both fail, Unprocessed, and the third attempt succeeds.
		p.stall = func(w, req, n int) (bool, error) {
			if req != 7 {
				return false, nil
			}
			on = append(on, w)
			if n == 1 {
				p.mu.Unlock()
				time.Sleep(5 * time.Millisecond) // 15 ms in all
				p.mu.Lock()
			}
			if n <= 2 {
				return false, Unprocessed(errDown)
			}
			return false, nil
		}
		start := time.Now()
		res := <-mustSubmit(t, p.b, 7)
		require.NoError(t, res.Err)
		assert.Equal(t, 3, res.Attempts)
		// The first fails at 15 ms while its hedge (from 10 ms) runs, and
		// waits; the hedge fails at 20 ms and the retry, on the third
		// worker, succeeds at 30 ms.
		assert.Equal(t, 30*time.Millisecond+time.Nanosecond, time.Since(start))
		require.Len(t, on, 3)
		assert.ElementsMatch(t, []int{0, 1, 2}, on, "no worker twice")
		s := p.b.Stats()
		assert.Equal(t, [2]uint64{1, 1}, [2]uint64{s.Hedges, s.Retries})
	})
}

func TestHedgeCloseWhileBothCopiesRun(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		release := make(chan struct{})
		p := newHedgePool(t, 3, WithRetry(3))
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) {
			if req != 7 {
				return false, nil
			}
			p.mu.Unlock()
			<-release // both copies, deaf to their ctx
			p.mu.Lock()
			return false, Unprocessed(errDown)
		}
		c := mustSubmit(t, p.b, 7)
		time.Sleep(15 * time.Millisecond)
		synctest.Wait()
		require.Equal(t, uint64(1), p.b.Stats().Hedges)
		closed := make(chan error)
		go func() { closed <- p.b.Close() }()
		synctest.Wait()
		close(release)
		res := <-c
		assert.ErrorIs(t, res.Err, errDown, "closing: no retry, and the last outcome stands")
		assert.Equal(t, 2, res.Attempts)
		assert.NoError(t, <-closed)
	})
}

func TestHedgeOncePerRequest(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		p := newHedgePool(t, 5, WithRetry(4))
		defer p.b.Close()
		p.warm(t, 100)
		p.stall = func(w, req, n int) (bool, error) {
			if req != 7 {
				return false, nil
			}
			p.mu.Unlock()
			defer p.mu.Lock()
			switch n {
			case 1: // 15 ms, hedged at 10
				time.Sleep(5 * time.Millisecond)
				return false, Unprocessed(errDown)
			case 2: // the hedge fails after its 10 ms, at 20
				return false, Unprocessed(errDown)
			}
			time.Sleep(20 * time.Millisecond) // the retry takes 30 ms: past a deadline, but it had its hedge
			return false, nil
		}
		start := time.Now()
		res := <-mustSubmit(t, p.b, 7)
		require.NoError(t, res.Err)
		assert.Equal(t, 3, res.Attempts)
		assert.Equal(t, 50*time.Millisecond+time.Nanosecond, time.Since(start))
		s := p.b.Stats()
		assert.Equal(t, [2]uint64{1, 1}, [2]uint64{s.Hedges, s.Retries}, "hedges, retries")
	})
}

func TestHedgeNeverJoinsItsOwnWorker(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var hung atomic.Bool
		fn := func(ctx context.Context, req int) (int, error) {
			if req == 7 && hung.CompareAndSwap(false, true) {
				<-ctx.Done()
				return 0, ctx.Err()
			}
			time.Sleep(10 * time.Millisecond)
			return req, nil
		}
		// Worker 0 weighs four times as much: with a slot free beside the hung
		// attempt it is still the cheapest, but the hedge must go
		// elsewhere.
		b, err := NewFrom([]WorkerSpec[int, int]{{Func: fn, Options: []WorkerOption{WithWeight(4)}}, {Func: fn}},
			WithConcurrency(2), WithLoadEstimate(false), WithEjection(false), WithHedge(0.95, 0))
		require.NoError(t, err)
		defer b.Close()
		for i := range 100 {
			_, err := b.Do(context.Background(), -1-i)
			require.NoError(t, err)
		}
		res := <-mustSubmit(t, b, 7)
		require.NoError(t, res.Err)
		assert.Equal(t, 1, res.Worker, "the hedge went to the other worker")
		assert.Equal(t, 2, res.Attempts)
		assert.Equal(t, uint64(1), b.Stats().Workers[1].Hedges)
	})
}
