package balancer_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/leastload/balancer"
)

// ExampleNew is the quick start: a balancer of four workers that upper-case
// strings, called through Do.
func ExampleNew() {
	upper := func(ctx context.Context, s string) (string, error) {
		return strings.ToUpper(s), nil
	}
	b, err := balancer.New(4, upper)
	if err != nil {
		panic(err)
	}
	defer b.Close()

	s, err := b.Do(context.Background(), "hello, balancer")
	fmt.Println(s, err)
	// Output: HELLO, BALANCER <nil>
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
// of which serves four requests at once. Each backend is one worker of
// concurrency 4, whose Func forwards over a transport of four connections,
// so the balancer compares backends, not connections. WithLoadEstimate
// sends each request where it is expected to finish first, so the fast
// backend serves the most. A backend is removed while requests are in
// flight (none fails) and added back.
func Example_reverseProxy() {
	const perBackend = 4 // requests each backend serves at once
	delays := []time.Duration{time.Millisecond, 4 * time.Millisecond, 16 * time.Millisecond}
	var served [3]atomic.Int64
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

	// A worker's request is an HTTP exchange to forward to its backend.
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
	backend := func(u *url.URL) balancer.WorkerSpec[exchange, struct{}] {
		transport := &http.Transport{MaxConnsPerHost: perBackend, MaxIdleConnsPerHost: perBackend}
		transports = append(transports, transport)
		proxy := httputil.NewSingleHostReverseProxy(u)
		proxy.Transport = transport
		return balancer.WorkerSpec[exchange, struct{}]{
			Func: func(ctx context.Context, x exchange) (struct{}, error) {
				proxy.ServeHTTP(x.w, x.r)
				return struct{}{}, nil
			},
			Options: []balancer.WorkerOption{balancer.WithConcurrency(perBackend)},
		}
	}
	lb, err := balancer.NewFrom([]balancer.WorkerSpec[exchange, struct{}]{
		backend(urls[0]), backend(urls[1]), backend(urls[2]), // IDs 0, 1, 2
	}, balancer.WithLoadEstimate(true))
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
						continue
					}
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
				}
			})
		}
		wg.Wait()
		return failed.Load()
	}

	send(480)
	fmt.Println("fast served more than medium:", served[0].Load() > served[1].Load())
	fmt.Println("medium served more than slow:", served[1].Load() > served[2].Load())

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
	// requests failed while a backend was removed: 0
	// re-added backend 3 served requests: true
}
