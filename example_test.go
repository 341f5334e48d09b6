package balancer_test

import (
	"context"
	"encoding/json"
	"errors"
	"expvar"
	"fmt"
	"io"
	"log"
	"log/slog"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/leastload/balancer"
)

// ExampleNew is the README's quick start: a balancer of four workers that
// upper-case strings, called through Do.
func ExampleNew() {
	upper := func(ctx context.Context, s string) (string, error) {
		return strings.ToUpper(s), nil
	}
	b, err := balancer.New(4, upper) // 4 workers, each running upper
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	s, err := b.Do(context.Background(), "hello, balancer") // on the least-loaded worker
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(s)
	// Output: HELLO, BALANCER
}

// ExampleBalancer shows the whole life of a balancer: create, serve
// requests while adding a worker, read the figures, close.
func ExampleBalancer() {
	double := func(ctx context.Context, x int) (int, error) { return 2 * x, nil }
	b, err := balancer.New(2, double)
	if err != nil {
		log.Fatal(err)
	}
	v, _ := b.Do(context.Background(), 21)
	fmt.Println(v)
	if _, err := b.AddWorker(double); err != nil {
		log.Fatal(err)
	}
	v, _ = b.Do(context.Background(), 50)
	fmt.Println(v)
	if err := b.Close(); err != nil {
		log.Fatal(err)
	}
	s := b.Stats() // still readable after Close
	fmt.Println(len(s.Workers), "workers,", s.Completed, "completed")
	// Output:
	// 42
	// 100
	// 3 workers, 2 completed
}

// ExampleFunc is a Func that honours its context: it stops when the caller
// gives up, or when Shutdown gives up waiting for it, and can tell which.
func ExampleFunc() {
	var slow balancer.Func[string, string] = func(ctx context.Context, q string) (string, error) {
		select {
		case <-time.After(time.Hour): // the work
			return "answer to " + q, nil
		case <-ctx.Done():
			return "", context.Cause(ctx) // ErrClosed if Shutdown gave up
		}
	}
	b, err := balancer.New(1, slow)
	if err != nil {
		log.Fatal(err)
	}
	c, _ := b.Submit(context.Background(), "q")
	for b.Stats().Workers[0].Running == 0 {
		runtime.Gosched()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	b.Shutdown(ctx)
	fmt.Println((<-c).Err)
	b.Close()
	// Output: balancer: closed
}

// ExampleResult reads a Result from Submit: the request it answers, the
// value or error, and the worker that ran it.
func ExampleResult() {
	b, err := balancer.New(1, func(ctx context.Context, s string) (int, error) { return len(s), nil })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	c, err := b.Submit(context.Background(), "hello")
	if err != nil {
		log.Fatal(err)
	}
	r := <-c
	fmt.Printf("%q: %d, err %v, on worker %d\n", r.Req, r.Value, r.Err, r.Worker)
	// Output: "hello": 5, err <nil>, on worker 0
}

// ExampleWorkerSpec builds one worker per backend, each with the
// concurrency its backend allows.
func ExampleWorkerSpec() {
	backends := map[string]int{"db-1": 8, "db-2": 2} // name: connections
	var specs []balancer.WorkerSpec[string, string]
	for _, name := range slices.Sorted(maps.Keys(backends)) {
		specs = append(specs, balancer.WorkerSpec[string, string]{
			Func:    func(ctx context.Context, q string) (string, error) { return name + ": " + q, nil },
			Options: []balancer.WorkerOption{balancer.WithConcurrency(backends[name])},
		})
	}
	b, err := balancer.NewFrom(specs)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	for _, w := range b.Stats().Workers {
		fmt.Println("worker", w.ID, "runs", w.Concurrency, "at once")
	}
	// Output:
	// worker 0 runs 8 at once
	// worker 1 runs 2 at once
}

// ExampleOption combines options: a balancer-wide queue depth, the plain
// count instead of the load estimate, and a worker option that every
// worker New starts takes.
func ExampleOption() {
	opts := []balancer.Option{
		balancer.WithQueueDepth(2),
		balancer.WithLoadEstimate(false),
		balancer.WithConcurrency(3), // a WorkerOption is an Option too
	}
	b, err := balancer.New(2, func(ctx context.Context, s string) (string, error) { return s, nil }, opts...)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	fmt.Println(b.Stats().Workers[1].Concurrency)
	_, err = balancer.New(2, func(ctx context.Context, s string) (string, error) { return s, nil },
		balancer.WithQueueDepth(0))
	fmt.Println(err)
	// Output:
	// 3
	// balancer: invalid argument: queue depth 0, want 1 to 65536
}

// ExampleWorkerOption gives one worker options of its own when it is added.
func ExampleWorkerOption() {
	b, err := balancer.New(1, func(ctx context.Context, s string) (string, error) { return s, nil })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	_, err = b.AddWorker(func(ctx context.Context, s string) (string, error) { return s, nil },
		balancer.WithConcurrency(4), balancer.WithWeight(2))
	fmt.Println(err, b.Stats().Workers[1].Concurrency, b.Stats().Workers[1].Weight)
	_, err = b.AddWorker(func(ctx context.Context, s string) (string, error) { return s, nil },
		balancer.WithConcurrency(0))
	fmt.Println(err)
	// Output:
	// <nil> 4 2
	// balancer: invalid argument: concurrency 0, want 1 to 65536
}

// ExampleStats reads the figures an operator watches: what is running and
// queued, what waits in front of the balancer, and what has failed.
func ExampleStats() {
	release := make(chan struct{})
	b, err := balancer.New(1, func(ctx context.Context, i int) (int, error) { <-release; return i, nil })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	for i := range 3 {
		go b.Do(context.Background(), i) // one runs, two wait
	}
	s := b.Stats()
	for s.Workers[0].Running != 1 || s.Waiting != 2 { // a caller counts itself waiting until its hand-off returns
		runtime.Gosched()
		s = b.Stats()
	}
	fmt.Println("running:", s.Workers[0].Running, "waiting:", s.Waiting, "failed:", s.Failed)
	close(release)
	// Output: running: 1 waiting: 2 failed: 0
}

// ExampleWorkerStats finds the busiest worker: of a worker of concurrency
// 4 and one of concurrency 1, ordered by the count, the first takes three
// requests before the second costs as little.
func ExampleWorkerStats() {
	release := make(chan struct{})
	work := func(ctx context.Context, i int) (int, error) { <-release; return i, nil }
	b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
		{Func: work, Options: []balancer.WorkerOption{balancer.WithConcurrency(4)}},
		{Func: work},
	}, balancer.WithLoadEstimate(false))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	defer close(release) // before Close, which waits for the requests
	for i := range 3 {
		if _, err := b.TrySubmit(context.Background(), i); err != nil {
			log.Fatal(err)
		}
	}
	for b.Stats().Workers[0].Running < 3 {
		runtime.Gosched()
	}
	busiest := slices.MaxFunc(b.Stats().Workers, func(x, y balancer.WorkerStats) int { return x.Running - y.Running })
	fmt.Println("busiest: worker", busiest.ID)
	// Output: busiest: worker 0
}

// ExampleBalancer_Do bounds a request with a deadline: Do returns the
// Func's result, or ctx's error as soon as ctx ends.
func ExampleBalancer_Do() {
	length := func(ctx context.Context, host string) (int, error) { return len(host), nil }
	b, err := balancer.New(2, length)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	n, err := b.Do(ctx, "example.com")
	fmt.Println(n, err)
	// Output: 11 <nil>
}

// ExampleBalancer_TrySubmit sheds load: an HTTP handler answers 503 at
// once when every worker is busy, instead of queueing the request. The
// request's context reaches the Func as with Submit.
func ExampleBalancer_TrySubmit() {
	release := make(chan struct{})
	render := func(ctx context.Context, path string) (string, error) {
		<-release // a slow page
		return "rendered " + path, nil
	}
	b, err := balancer.New(1, render) // one worker, nothing queued
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c, err := b.TrySubmit(r.Context(), r.URL.Path)
		if err != nil { // ErrFull, or ErrClosed while shutting down
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprint(w, (<-c).Value)
	})

	first := httptest.NewRecorder()
	served := make(chan struct{})
	go func() {
		handler.ServeHTTP(first, httptest.NewRequest("GET", "/a", nil))
		close(served)
	}()
	for b.Stats().Pending == 0 { // wait until /a holds the worker
		runtime.Gosched()
	}
	second := httptest.NewRecorder()
	handler.ServeHTTP(second, httptest.NewRequest("GET", "/b", nil))
	fmt.Print(second.Code, " ", second.Body.String())
	close(release)
	<-served
	fmt.Println(first.Code, first.Body.String())
	// Output:
	// 503 balancer: every worker is full
	// 200 rendered /a
}

// ExampleBalancer_AddWorker scales out while requests flow: a worker added
// later gets the next request, and takes the balancer's worker options
// unless given its own.
func ExampleBalancer_AddWorker() {
	echo := func(ctx context.Context, s string) (string, error) { return s, nil }
	b, err := balancer.New(1, echo, balancer.WithConcurrency(4))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	id, err := b.AddWorker(echo) // concurrency 4, like New's
	fmt.Println("added worker", id, err)
	id, err = b.AddWorker(echo, balancer.WithConcurrency(16)) // a bigger backend
	fmt.Println("added worker", id, err)
	for _, w := range b.Stats().Workers {
		fmt.Printf("worker %d serves %d at once\n", w.ID, w.Concurrency)
	}
	// Output:
	// added worker 1 <nil>
	// added worker 2 <nil>
	// worker 0 serves 4 at once
	// worker 1 serves 4 at once
	// worker 2 serves 16 at once
}

// ExampleBalancer_RemoveWorker retires a backend that died: its own Func
// removes its worker and fails the request, and the rest go to the
// backends that are left. From inside a Func, RemoveWorker returns as soon
// as the removal stands.
func ExampleBalancer_RemoveWorker() {
	var b *balancer.Balancer[string, string]
	backend := func(id int, alive bool) balancer.WorkerSpec[string, string] {
		return balancer.WorkerSpec[string, string]{Func: func(ctx context.Context, q string) (string, error) {
			if !alive {
				b.RemoveWorker(ctx, id) // retire myself
				return "", fmt.Errorf("backend %d is down", id)
			}
			return fmt.Sprintf("backend %d: %s", id, q), nil
		}}
	}
	b, err := balancer.NewFrom([]balancer.WorkerSpec[string, string]{backend(0, true), backend(1, false)})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	for _, q := range []string{"a", "b", "c", "d"} {
		s, err := b.Do(context.Background(), q)
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		fmt.Println(s)
	}
	fmt.Println("workers left:", len(b.Stats().Workers))
	// Output:
	// backend 0: a
	// error: backend 1 is down
	// backend 0: c
	// backend 0: d
	// workers left: 1
}

// ExampleWorkerID retires a worker whose backend died from inside its
// Func, which learns its worker's ID from its ctx: one Func serves every
// worker, with no closure per worker.
func ExampleWorkerID() {
	down := map[int]bool{1: true} // backend 1 died
	var b *balancer.Balancer[string, string]
	b, err := balancer.New(2, func(ctx context.Context, q string) (string, error) {
		id, _ := balancer.WorkerID(ctx)
		if down[id] {
			b.RemoveWorker(ctx, id) // retire myself
			return "", fmt.Errorf("backend %d is down", id)
		}
		return fmt.Sprintf("backend %d: %s", id, q), nil
	})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	for _, q := range []string{"a", "b", "c", "d"} {
		s, err := b.Do(context.Background(), q)
		if err != nil {
			fmt.Println("error:", err)
			continue
		}
		fmt.Println(s)
	}
	fmt.Println("workers left:", len(b.Stats().Workers))
	// Output:
	// backend 0: a
	// error: backend 1 is down
	// backend 0: c
	// backend 0: d
	// workers left: 1
}

// ExampleBalancer_All runs a batch and keeps the results in the order of
// the requests; breaking out of the loop at the first error would cancel
// the rest.
func ExampleBalancer_All() {
	square := func(ctx context.Context, x int) (int, error) { return x * x, nil }
	b, err := balancer.New(3, square)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	xs := []int{1, 2, 3, 4, 5}
	squares := make([]int, len(xs))
	for i, r := range b.All(context.Background(), slices.Values(xs)) {
		if r.Err != nil {
			log.Fatal(r.Err)
		}
		squares[i] = r.Value
	}
	fmt.Println(squares)
	// Output: [1 4 9 16 25]
}

// ExampleBalancer_Stats publishes the balancer's figures with expvar, at
// /debug/vars of the default HTTP mux. A Prometheus collector has the same
// shape: Collect calls Stats once and sends a gauge or counter per figure,
// labelled by worker ID:
//
//	func (c collector) Collect(ch chan<- prometheus.Metric) {
//		s := c.b.Stats()
//		ch <- prometheus.MustNewConstMetric(c.completed, prometheus.CounterValue, float64(s.Completed))
//		ch <- prometheus.MustNewConstMetric(c.waitSeconds, prometheus.CounterValue, s.TotalWait.Seconds())
//		for _, w := range s.Workers {
//			id := strconv.Itoa(w.ID)
//			ch <- prometheus.MustNewConstMetric(c.running, prometheus.GaugeValue, float64(w.Running), id)
//			ch <- prometheus.MustNewConstMetric(c.queued, prometheus.GaugeValue, float64(w.Queued), id)
//		}
//	}
func ExampleBalancer_Stats() {
	echo := func(ctx context.Context, s string) (string, error) { return s, nil }
	b, err := balancer.New(2, echo)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	expvar.Publish("balancer", expvar.Func(func() any { return b.Stats() }))

	for _, s := range []string{"a", "b", "c"} {
		b.Do(context.Background(), s)
	}
	var vars struct{ Accepted, Completed, Pending int }
	json.Unmarshal([]byte(expvar.Get("balancer").String()), &vars)
	fmt.Printf("%+v\n", vars)
	// Output: {Accepted:3 Completed:3 Pending:0}
}

// ExampleStats_String prints a balancer's figures on one line for people,
// here before any request.
func ExampleStats_String() {
	b, err := balancer.New(2, func(ctx context.Context, s string) (string, error) { return s, nil },
		balancer.WithConcurrency(4))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	fmt.Println(b.Stats())
	// Output: accepted 0, pending 0, completed 0 (0 failed, 0 panicked), waiting 0, wait 0s; worker 0: 0/4 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s; worker 1: 0/4 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s
}

// ExampleWorkerStats_String prints one worker's figures.
func ExampleWorkerStats_String() {
	b, err := balancer.New(1, func(ctx context.Context, s string) (string, error) { return s, nil },
		balancer.WithLoadEstimate(false), balancer.WithWeight(2))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	fmt.Println(b.Stats().Workers[0])
	// Output: worker 0: 0/1 running, 0 queued, 0 completed (0 failed, 0 panicked), service 0s, wait 0s, weight 2
}

// ExampleStats_LogValue logs the figures as structured attributes.
func ExampleStats_LogValue() {
	b, err := balancer.New(1, func(ctx context.Context, s string) (string, error) { return s, nil })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: withoutTime}))
	logger.Info("pool", "stats", b.Stats())
	// Output: level=INFO msg=pool stats.accepted=0 stats.pending=0 stats.completed=0 stats.failed=0 stats.panics=0 stats.waiting=0 stats.mean_wait=0s stats.total_wait=0s stats.ejected=0 stats.ejections=0 stats.probes=0 stats.probe_failures=0 stats.retries=0 stats.hedges=0 stats.hedge_wins=0 stats.budget_refusals=0 stats.workers.0.concurrency=1 stats.workers.0.running=0 stats.workers.0.queued=0 stats.workers.0.completed=0 stats.workers.0.failed=0 stats.workers.0.panics=0 stats.workers.0.mean_service=0s stats.workers.0.mean_wait=0s stats.workers.0.total_wait=0s stats.workers.0.weight=1 stats.workers.0.removed=false stats.workers.0.failure_rate=0 stats.workers.0.streak=0 stats.workers.0.ejected=false stats.workers.0.ejections=0 stats.workers.0.retries=0 stats.workers.0.hedges=0
}

// ExampleWorkerStats_LogValue logs one worker's figures.
func ExampleWorkerStats_LogValue() {
	b, err := balancer.New(1, func(ctx context.Context, s string) (string, error) { return s, nil })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	logger := slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{ReplaceAttr: withoutTime}))
	logger.Info("worker", "w", b.Stats().Workers[0])
	// Output: level=INFO msg=worker w.concurrency=1 w.running=0 w.queued=0 w.completed=0 w.failed=0 w.panics=0 w.mean_service=0s w.mean_wait=0s w.total_wait=0s w.weight=1 w.removed=false w.failure_rate=0 w.streak=0 w.ejected=false w.ejections=0 w.retries=0 w.hedges=0
}

// withoutTime drops slog's time attribute, so that the output repeats.
func withoutTime(groups []string, a slog.Attr) slog.Attr {
	if len(groups) == 0 && a.Key == slog.TimeKey {
		return slog.Attr{}
	}
	return a
}

// ExampleWithQueueDepth lets each worker queue requests behind its running
// one: two workers of depth 3 hold six requests, and TrySubmit refuses a
// seventh.
func ExampleWithQueueDepth() {
	release := make(chan struct{})
	work := func(ctx context.Context, i int) (int, error) { <-release; return i, nil }
	b, err := balancer.New(2, work, balancer.WithQueueDepth(3))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	defer close(release)

	for i := range 6 {
		if _, err := b.Submit(context.Background(), i); err != nil {
			log.Fatal(err)
		}
	}
	_, err = b.TrySubmit(context.Background(), 6)
	fmt.Println(err)
	for s := b.Stats(); s.Pending < 6 || s.Workers[0].Running+s.Workers[1].Running < 2; s = b.Stats() {
		runtime.Gosched() // Stats may lag Submit, and the slots their queues, by a moment
	}
	for _, w := range b.Stats().Workers {
		fmt.Printf("worker %d: %d running, %d queued\n", w.ID, w.Running, w.Queued)
	}
	// Output:
	// balancer: every worker is full
	// worker 0: 1 running, 2 queued
	// worker 1: 1 running, 2 queued
}

// ExampleWithLoadEstimate compares the default, which measures each
// worker's speed, with the plain count: ten requests one after another to
// a fast worker and a slow one. Measuring, each new worker is tried once,
// then the fast one serves the rest; counting, they take turns.
func ExampleWithLoadEstimate() {
	sleeper := func(d time.Duration) balancer.Func[int, int] {
		return func(ctx context.Context, i int) (int, error) {
			time.Sleep(d)
			return i, nil
		}
	}
	for _, estimate := range []bool{true, false} {
		b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
			{Func: sleeper(time.Millisecond)},      // fast
			{Func: sleeper(50 * time.Millisecond)}, // slow
		}, balancer.WithLoadEstimate(estimate))
		if err != nil {
			log.Fatal(err)
		}
		served := make([]int, 2)
		for i := range 10 {
			if _, err := b.Do(context.Background(), i); err != nil {
				log.Fatal(err)
			}
		}
		for _, w := range b.Stats().Workers {
			served[w.ID] = int(w.Completed)
		}
		b.Close()
		if estimate {
			// The estimate tries the slow worker once or twice (its first
			// run may count as a cold call), then sends the rest to fast.
			fmt.Printf("estimate true: fast served at least 8: %v\n", served[0] >= 8)
		} else {
			fmt.Printf("estimate false: fast served %d, slow %d\n", served[0], served[1])
		}
	}
	// Output:
	// estimate true: fast served at least 8: true
	// estimate false: fast served 5, slow 5
}

// ExampleWithWeight declares known speeds instead of measuring them: with
// the load estimate off, a worker of weight 3 is preferred until it has
// three times the pending requests of a weight-1 worker.
func ExampleWithWeight() {
	release := make(chan struct{})
	work := func(ctx context.Context, i int) (int, error) { <-release; return i, nil }
	b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
		{Func: work, Options: []balancer.WorkerOption{balancer.WithWeight(3)}},
		{Func: work},
	}, balancer.WithLoadEstimate(false), balancer.WithQueueDepth(8))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	defer close(release)

	for i := range 8 {
		if _, err := b.Submit(context.Background(), i); err != nil {
			log.Fatal(err)
		}
	}
	for b.Stats().Pending < 8 { // Stats may lag Submit by a moment
		runtime.Gosched()
	}
	for _, w := range b.Stats().Workers {
		fmt.Printf("weight %v: %d pending\n", w.Weight, w.Pending)
	}
	// Output:
	// weight 3: 6 pending
	// weight 1: 2 pending
}

// ExamplePanicError recovers a Func's panic as an error: the worker lives
// on, and errors.As finds the panic value and stack.
func ExamplePanicError() {
	b, err := balancer.New(1, func(ctx context.Context, key string) (int, error) {
		var seen []int
		return seen[len(key)], nil // out of range: panics
	})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	_, err = b.Do(context.Background(), "k")
	var pe *balancer.PanicError
	if errors.As(err, &pe) {
		fmt.Println("recovered:", pe.Value)
		fmt.Println("stack recorded:", len(pe.Stack) > 0)
	}
	// Output:
	// recovered: runtime error: index out of range [1] with length 0
	// stack recorded: true
}

// ExamplePanicError_Unwrap sees through a panic with an error value.
func ExamplePanicError_Unwrap() {
	errGone := errors.New("backend gone")
	b, err := balancer.New(1, func(ctx context.Context, q string) (string, error) { panic(errGone) })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	_, err = b.Do(context.Background(), "q")
	fmt.Println(errors.Is(err, errGone))
	// Output: true
}

// ExamplePanicError_Error shows the message of a recovered panic.
func ExamplePanicError_Error() {
	b, err := balancer.New(1, func(ctx context.Context, q string) (string, error) { panic("out of cheese") })
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	_, err = b.Do(context.Background(), "q")
	fmt.Println(err)
	// Output: balancer: Func panicked: out of cheese
}

// ExampleNewFrom builds a balancer of workers that differ and whose speeds
// are known: a GPU that runs four jobs at once and a CPU fallback that runs
// one, at a quarter of the speed of a GPU slot. With the load estimate off,
// the declared weights order them: jobs go to the GPU while it has a free
// slot (its cost is at most 4/4 against the idle CPU's 1/0.25); at the
// default queue depth nothing queues behind a busy slot, so the fifth job
// goes to the CPU.
func ExampleNewFrom() {
	started, release := make(chan struct{}), make(chan struct{})
	gpu := func(ctx context.Context, job string) (string, error) {
		started <- struct{}{}
		<-release
		return "gpu: " + job, nil
	}
	cpu := func(ctx context.Context, job string) (string, error) { return "cpu: " + job, nil }
	b, err := balancer.NewFrom([]balancer.WorkerSpec[string, string]{
		{Func: gpu, Options: []balancer.WorkerOption{balancer.WithConcurrency(4)}},
		{Func: cpu, Options: []balancer.WorkerOption{balancer.WithWeight(0.25)}},
	}, balancer.WithLoadEstimate(false))
	if err != nil {
		panic(err)
	}
	defer b.Close()
	for _, w := range b.Stats().Workers {
		fmt.Printf("worker %d: concurrency %d, weight %v\n", w.ID, w.Concurrency, w.Weight)
	}

	ctx := context.Background()
	var jobs []<-chan balancer.Result[string, string]
	for i := range 4 {
		c, _ := b.Submit(ctx, fmt.Sprint("job ", i))
		jobs = append(jobs, c)
		<-started
	}
	s, _ := b.Do(ctx, "job 4") // the GPU is full
	fmt.Println(s)
	close(release)
	for _, c := range jobs {
		fmt.Println((<-c).Value)
	}
	// Output:
	// worker 0: concurrency 4, weight 1
	// worker 1: concurrency 1, weight 0.25
	// cpu: job 4
	// gpu: job 0
	// gpu: job 1
	// gpu: job 2
	// gpu: job 3
}

// ExampleWithConcurrency gives one worker the capacity of the resource it
// fronts: a database that allows three connections. The worker runs three
// queries at once, never a fourth, and Stats shows its slots in use.
func ExampleWithConcurrency() {
	conns := make(chan int, 3) // the database's connections
	for i := range 3 {
		conns <- i
	}
	started, release := make(chan struct{}), make(chan struct{})
	query := func(ctx context.Context, q string) (string, error) {
		c := <-conns // never waits: at most three queries run at once
		defer func() { conns <- c }()
		started <- struct{}{}
		<-release
		return "rows for " + q, nil
	}
	b, err := balancer.New(1, query, balancer.WithConcurrency(3))
	if err != nil {
		panic(err)
	}
	defer b.Close()

	var results []<-chan balancer.Result[string, string]
	for _, q := range []string{"a", "b", "c"} {
		c, _ := b.Submit(context.Background(), q)
		results = append(results, c)
		<-started
	}
	w := b.Stats().Workers[0]
	fmt.Println("running", w.Running, "of", w.Concurrency, "queued", w.Queued)
	_, err = b.TrySubmit(context.Background(), "d")
	fmt.Println("a fourth:", err)
	close(release)
	for _, c := range results {
		fmt.Println((<-c).Value)
	}
	// Output:
	// running 3 of 3 queued 0
	// a fourth: balancer: every worker is full
	// rows for a
	// rows for b
	// rows for c
}

// ExampleBalancer_Submit is the scenario of the talk's sketch made sound:
// two workers square ten numbers, and FanIn merges the ten result channels.
func ExampleBalancer_Submit() {
	square := func(ctx context.Context, x int) (int, error) { return x * x, nil }
	b, err := balancer.New(2, square, balancer.WithQueueDepth(10))
	if err != nil {
		panic(err)
	}
	defer b.Close()

	ctx := context.Background()
	var results []<-chan balancer.Result[int, int]
	for i := range 10 {
		c, err := b.Submit(ctx, 100+i)
		if err != nil {
			panic(err)
		}
		results = append(results, c)
	}
	for r := range balancer.FanIn(ctx, results...) {
		fmt.Println(r.Req, r.Value)
	}
	// Unordered output:
	// 100 10000
	// 101 10201
	// 102 10404
	// 103 10609
	// 104 10816
	// 105 11025
	// 106 11236
	// 107 11449
	// 108 11664
	// 109 11881
}

// ExampleBalancer_Close shows that Close finishes what was accepted and
// refuses what comes after.
func ExampleBalancer_Close() {
	echo := func(ctx context.Context, s string) (string, error) { return s, nil }
	b, _ := balancer.New(1, echo)

	c, _ := b.Submit(context.Background(), "accepted before Close")
	b.Close()
	fmt.Println((<-c).Value)

	_, err := b.Do(context.Background(), "too late")
	fmt.Println(errors.Is(err, balancer.ErrClosed))
	// Output:
	// accepted before Close
	// true
}

// ExampleBalancer_Shutdown bounds the wait for a request that runs too long:
// Shutdown cancels it through its context and reports the deadline, and a
// request still queued behind it gets ErrClosed without running.
func ExampleBalancer_Shutdown() {
	started := make(chan struct{})
	slow := func(ctx context.Context, n int) (int, error) {
		if n == 1 {
			close(started)
		}
		<-ctx.Done() // a long job that honours cancellation
		return 0, ctx.Err()
	}
	b, _ := balancer.New(1, slow, balancer.WithQueueDepth(2))
	running, _ := b.Submit(context.Background(), 1)
	queued, _ := b.Submit(context.Background(), 2)
	<-started

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	fmt.Println(b.Shutdown(ctx))
	fmt.Println((<-running).Err)
	fmt.Println((<-queued).Err)
	b.Close() // waits for the goroutines
	// Output:
	// context deadline exceeded
	// context canceled
	// balancer: closed
}

// ExampleFanIn merges channels until they are all closed.
func ExampleFanIn() {
	a, b := make(chan string, 1), make(chan string, 1)
	a <- "from a"
	b <- "from b"
	close(a)
	close(b)
	for s := range balancer.FanIn(context.Background(), a, b) {
		fmt.Println(s)
	}
	// Unordered output:
	// from a
	// from b
}

// Example_reverseProxy puts the balancer in front of real HTTP services: a
// least-loaded reverse proxy over three backends of different speeds, each
// of which serves four requests at once, and a fourth whose service died
// behind a live port: it answers 503 at once. Each backend is one worker of
// concurrency 4, whose Func forwards over a transport of four connections
// and returns the status it got, so the balancer compares backends, not
// connections; a classifier reads the status: a 5xx or a transport error
// fails the worker, a 429 is overload, another 4xx the caller's. The load
// estimate (on by default) sends each request where it is expected to
// finish first, so the fast backend serves the most, and the dead one is
// ejected after five failures in a row instead of drawing the load with
// its fast answers. A backend is removed while requests are in flight
// (none fails) and added back.
func Example_reverseProxy() {
	const perBackend = 4 // requests each backend serves at once
	delays := []time.Duration{time.Millisecond, 4 * time.Millisecond, 16 * time.Millisecond}
	var served [4]atomic.Int64
	var urls []*url.URL
	for i, delay := range delays {
		slots := make(chan struct{}, perBackend)
		backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			slots <- struct{}{} // a fifth request would wait here: the balancer never sends one
			defer func() { <-slots }()
			time.Sleep(delay)
			served[i].Add(1)
			fmt.Fprint(w, "ok")
		}))
		defer backend.Close()
		u, _ := url.Parse(backend.URL)
		urls = append(urls, u)
	}
	dead := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		served[3].Add(1)
		http.Error(w, "no service", http.StatusServiceUnavailable)
	}))
	defer dead.Close()
	deadURL, _ := url.Parse(dead.URL)
	urls = append(urls, deadURL)

	// A worker's request is an HTTP exchange to forward to its backend,
	// and its result the status the backend answered.
	type exchange struct {
		w http.ResponseWriter
		r *http.Request
	}
	var transports []*http.Transport
	defer func() {
		for _, t := range transports {
			t.CloseIdleConnections()
		}
	}()
	backend := func(u *url.URL) balancer.WorkerSpec[exchange, int] {
		transport := &http.Transport{MaxConnsPerHost: perBackend, MaxIdleConnsPerHost: perBackend}
		transports = append(transports, transport)
		proxy := httputil.NewSingleHostReverseProxy(u)
		proxy.Transport = transport
		proxy.ErrorHandler = func(w http.ResponseWriter, r *http.Request, err error) {
			w.(*recorder).err = err // a transport error: no answer at all
			w.WriteHeader(http.StatusBadGateway)
		}
		return balancer.WorkerSpec[exchange, int]{
			Func: func(ctx context.Context, x exchange) (int, error) {
				rec := &recorder{ResponseWriter: x.w, status: http.StatusOK}
				proxy.ServeHTTP(rec, x.r)
				return rec.status, rec.err
			},
			Options: []balancer.WorkerOption{balancer.WithConcurrency(perBackend)},
		}
	}
	byStatus := func(status int, err error) balancer.Class {
		switch {
		case err != nil || status >= 500:
			return balancer.Failure
		case status == http.StatusTooManyRequests:
			return balancer.Overload
		}
		return balancer.Success // another 4xx: the caller's
	}
	lb, err := balancer.NewFrom([]balancer.WorkerSpec[exchange, int]{
		backend(urls[0]), backend(urls[1]), backend(urls[2]), backend(urls[3]), // IDs 0 to 3
	}, balancer.WithClassifier(byStatus))
	if err != nil {
		panic(err)
	}
	defer lb.Close()

	front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		done, err := lb.Submit(r.Context(), exchange{w, r})
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		<-done // the worker writes the response; wait for it before returning
	}))
	defer front.Close()

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}}
	defer client.CloseIdleConnections()
	// send makes n requests from 16 concurrent clients and counts failures.
	send := func(n int) int64 {
		var failed atomic.Int64
		var wg sync.WaitGroup
		for range 16 {
			wg.Go(func() {
				for range n / 16 {
					resp, err := client.Get(front.URL)
					if err != nil || resp.StatusCode != http.StatusOK {
						failed.Add(1)
					}
					if err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
					}
				}
			})
		}
		wg.Wait()
		return failed.Load()
	}

	failed := send(480)
	fmt.Println("fast served more than medium:", served[0].Load() > served[1].Load())
	fmt.Println("medium served more than slow:", served[1].Load() > served[2].Load())
	fmt.Println("dead backend ejected:", lb.Stats().Workers[3].Ejected)
	fmt.Println("fewer than 3 % failed:", failed < 480*3/100, failed == served[3].Load())
	lb.RemoveWorker(context.Background(), 3) // retire it: no probe will find it back

	// Remove the medium backend while requests flow, then add it back.
	flowing := make(chan int64)
	go func() { flowing <- send(320) }()
	for served[0].Load()+served[1].Load()+served[2].Load() < 520 {
		time.Sleep(time.Millisecond) // wait until the second batch is under way
	}
	lb.RemoveWorker(context.Background(), 1)
	fmt.Println("requests failed while a backend was removed:", <-flowing)

	before := served[1].Load()
	spec := backend(urls[1])
	id, _ := lb.AddWorker(spec.Func, spec.Options...)
	send(160)
	fmt.Println("re-added backend", id, "served requests:", served[1].Load() > before)
	// Output:
	// fast served more than medium: true
	// medium served more than slow: true
	// dead backend ejected: true
	// fewer than 3 % failed: true true
	// requests failed while a backend was removed: 0
	// re-added backend 4 served requests: true
}

// recorder is a ResponseWriter that keeps the status written through it,
// and the transport error that replaced an answer.
type recorder struct {
	http.ResponseWriter
	status int
	err    error
}

func (r *recorder) WriteHeader(status int) {
	r.status = status
	r.ResponseWriter.WriteHeader(status)
}

// ExampleClass shows how the default classification reads a Func's
// errors, ClassOf: nil is a Success, an error marked with CallersFault is
// the caller's (a Success for the worker), one marked with Overloaded is an
// Overload, and any other error a Failure.
func ExampleClass() {
	errNotFound := errors.New("not found")
	for _, err := range []error{
		nil,
		balancer.CallersFault(errNotFound),
		balancer.Overloaded(errors.New("429 too many requests")),
		errors.New("connection refused"),
	} {
		fmt.Printf("%v: %v\n", err, balancer.ClassOf(err))
	}
	// Output:
	// <nil>: success
	// not found: success
	// 429 too many requests: overload
	// connection refused: failure
}

// ExampleClassOf falls back to the default for errors a classifier does
// not know.
func ExampleClassOf() {
	errValidation := errors.New("invalid input")
	classify := func(_ string, err error) balancer.Class {
		if errors.Is(err, errValidation) {
			return balancer.Success // the caller's fault: the worker is fine
		}
		return balancer.ClassOf(err)
	}
	fmt.Println(classify("", fmt.Errorf("field x: %w", errValidation)))
	fmt.Println(classify("", errors.New("timeout")))
	// Output:
	// success
	// failure
}

// ExampleClass_String prints every class.
func ExampleClass_String() {
	for _, c := range []balancer.Class{balancer.Success, balancer.Failure, balancer.Overload, balancer.Ignore} {
		fmt.Println(c)
	}
	// Output:
	// success
	// failure
	// overload
	// ignore
}

// ExampleCallersFault marks a validation error as the caller's: the worker
// that returned it keeps a clean record.
func ExampleCallersFault() {
	b, err := balancer.New(1, func(ctx context.Context, n int) (int, error) {
		if n < 0 {
			return 0, balancer.CallersFault(fmt.Errorf("negative input %d", n))
		}
		return n, nil
	})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	_, err = b.Do(context.Background(), -1)
	fmt.Println(err)
	w := b.Stats().Workers[0]
	fmt.Println("failure rate:", w.FailureRate, "streak:", w.Streak)
	// Output:
	// negative input -1
	// failure rate: 0 streak: 0
}

// ExampleOverloaded marks a backend's refusal for load: the worker costs
// more for a while, but is never ejected for it.
func ExampleOverloaded() {
	errBusy := errors.New("429 too many requests")
	b, err := balancer.New(1, func(ctx context.Context, n int) (int, error) {
		return 0, balancer.Overloaded(errBusy)
	})
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	_, err = b.Do(context.Background(), 1)
	fmt.Println(errors.Is(err, errBusy))
	w := b.Stats().Workers[0]
	fmt.Println("failure rate over 0:", w.FailureRate > 0, "streak:", w.Streak)
	// Output:
	// true
	// failure rate over 0: true streak: 0
}

// ExampleWithClassifier classifies outcomes by the HTTP status a Func
// returns as its Res: 5xx and transport errors fail the worker, 429 is
// overload, other 4xx are the caller's.
func ExampleWithClassifier() {
	byStatus := func(status int, err error) balancer.Class {
		switch {
		case err != nil || status >= 500:
			return balancer.Failure
		case status == http.StatusTooManyRequests:
			return balancer.Overload
		}
		return balancer.Success
	}
	statuses := []int{http.StatusOK, http.StatusNotFound, http.StatusTooManyRequests, http.StatusServiceUnavailable}
	b, err := balancer.New(1, func(ctx context.Context, i int) (int, error) { return statuses[i], nil },
		balancer.WithClassifier(byStatus))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	for i, s := range statuses {
		b.Do(context.Background(), i)
		fmt.Printf("%d: streak %d\n", s, b.Stats().Workers[0].Streak)
	}
	// Output:
	// 200: streak 0
	// 404: streak 0
	// 429: streak 0
	// 503: streak 1
}

// ExampleWithEjection shows a worker whose backend died being ejected,
// and taken back by its probe once the backend is back.
func ExampleWithEjection() {
	var down atomic.Bool
	down.Store(true)
	b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
		{Func: func(ctx context.Context, n int) (int, error) { // worker 0: its backend died
			if down.Load() {
				return 0, errors.New("503 service unavailable")
			}
			return n, nil
		}},
		{Func: func(ctx context.Context, n int) (int, error) { // worker 1: healthy, a little slow
			time.Sleep(time.Millisecond)
			return n, nil
		}},
	}) // WithEjection(true) is the default
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()

	// Four callers keep worker 1 busy, so worker 0 gets requests too
	// until its fifth failure in a row ejects it.
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			for !b.Stats().Workers[0].Ejected {
				b.Do(context.Background(), 1)
			}
		})
	}
	wg.Wait()
	w := b.Stats().Workers[0]
	fmt.Println("ejected:", w.Ejected, "ejections:", w.Ejections)

	// It gets nothing until its ejection ends (0.5 to 1.5 s); then the
	// next request is its probe, and a success takes it back.
	down.Store(false)
	time.Sleep(time.Until(w.EjectedUntil))
	res := <-must(b.Submit(context.Background(), 2))
	fmt.Println("probe served by worker", res.Worker, "error:", res.Err)
	b.Do(context.Background(), 3) // the loop takes the probe's outcome before it dispatches this
	s := b.Stats()
	fmt.Println("ejected:", s.Workers[0].Ejected, "probes:", s.Probes, "failure rate:", s.Workers[0].FailureRate)
	// Output:
	// ejected: true ejections: 1
	// probe served by worker 0 error: <nil>
	// ejected: false probes: 1 failure rate: 0
}

// must returns v, or exits on err.
func must[T any](v T, err error) T {
	if err != nil {
		log.Fatal(err)
	}
	return v
}

// ExampleUnprocessed marks a refused connection: the worker did not
// process the request, so it is safe to run elsewhere (see WithRetry).
func ExampleUnprocessed() {
	err := balancer.Unprocessed(errors.New("dial tcp 10.0.0.7:80: connection refused"))
	fmt.Println(balancer.ClassOf(err), err)
	// Output: unavailable dial tcp 10.0.0.7:80: connection refused
}

// ExampleWithRetry runs a dead backend's requests again on a live one:
// worker 0 refuses every connection, and every request still succeeds.
func ExampleWithRetry() {
	b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
		{Func: func(ctx context.Context, n int) (int, error) {
			return 0, balancer.Unprocessed(errors.New("connection refused"))
		}},
		{Func: func(ctx context.Context, n int) (int, error) { return n * n, nil }},
	}, balancer.WithRetry(2))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	res := <-must(b.Submit(context.Background(), 3)) // worker 0 first: neither has run yet
	fmt.Println(res.Value, res.Err, "from worker", res.Worker, "after", res.Attempts, "attempts")
	fmt.Println("retries:", b.Stats().Retries)
	// Output:
	// 9 <nil> from worker 1 after 2 attempts
	// retries: 1
}

// ExampleWithRetryOn retries any failure of an idempotent request, not only
// those where the worker did not process it.
func ExampleWithRetryOn() {
	errTimeout := errors.New("read timeout")
	b, err := balancer.NewFrom([]balancer.WorkerSpec[string, string]{
		{Func: func(ctx context.Context, key string) (string, error) { return "", errTimeout }},
		{Func: func(ctx context.Context, key string) (string, error) { return "value of " + key, nil }},
	}, balancer.WithRetry(2), balancer.WithRetryOn(func(_ string, err error) bool {
		return errors.Is(err, errTimeout) // a read: safe to run twice
	}))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	v, err := b.Do(context.Background(), "k")
	fmt.Println(v, err)
	// Output: value of k <nil>
}

// ExampleWithRetryBudget allows one extra attempt a second and nothing in
// proportion to the load: of three requests that fail on worker 0, one is
// retried, and the other two keep their error.
func ExampleWithRetryBudget() {
	b, err := balancer.NewFrom([]balancer.WorkerSpec[int, int]{
		{Func: func(ctx context.Context, n int) (int, error) {
			return 0, balancer.Unprocessed(errors.New("connection refused"))
		}, Options: []balancer.WorkerOption{balancer.WithWeight(100)}}, // first for every request
		{Func: func(ctx context.Context, n int) (int, error) { return n, nil }},
	}, balancer.WithLoadEstimate(false), balancer.WithRetry(2), balancer.WithRetryBudget(0, 1))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	for i := range 3 {
		_, err := b.Do(context.Background(), i)
		fmt.Println(i, err)
	}
	s := b.Stats()
	fmt.Println("retries:", s.Retries, "refused:", s.BudgetRefusals)
	// Output:
	// 0 <nil>
	// 1 connection refused
	// 2 connection refused
	// retries: 1 refused: 2
}

// ExampleWithHedge copies a straggler to another worker: the first
// attempt of request 1000 hangs, the copy answers, and the hung attempt
// is cancelled with cause ErrHedgeLost. The hedge goes once the request
// has been at its worker longer than 95 % of the first 100 successes
// took, and at least 50 ms.
func ExampleWithHedge() {
	var hung atomic.Bool
	lost := make(chan error, 1)
	work := func(ctx context.Context, req int) (int, error) {
		if req == 1000 && hung.CompareAndSwap(false, true) { // its first attempt hangs
			<-ctx.Done()
			lost <- context.Cause(ctx)
			return 0, ctx.Err()
		}
		time.Sleep(100 * time.Microsecond)
		return req, nil
	}
	b, err := balancer.New(2, work, balancer.WithHedge(0.95, 50*time.Millisecond))
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	ctx := context.Background()
	for i := range 100 { // no hedging before 100 successes
		if _, err := b.Do(ctx, i); err != nil {
			log.Fatal(err)
		}
	}
	c, err := b.Submit(ctx, 1000)
	if err != nil {
		log.Fatal(err)
	}
	res := <-c
	fmt.Println(res.Value, res.Err, "after", res.Attempts, "attempts")
	fmt.Println("the hung attempt:", <-lost)
	s := b.Stats()
	fmt.Println("hedges:", s.Hedges, "won:", s.HedgeWins)
	// Output:
	// 1000 <nil> after 2 attempts
	// the hung attempt: balancer: another copy of the request succeeded first
	// hedges: 1 won: 1
}
