package balancer_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	b, _ := balancer.New(1, slow)
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
