// Package balancer dispatches requests to a set of workers so that each
// request goes to the worker where it is expected to finish first: the
// worker with the fewest requests pending (queued or running) per request
// it can run at once, weighed by its measured speed. Speeds within noise
// of each other compare as equal; among equally loaded workers the one
// that has waited longest since its last request wins, so light load
// spreads over all of them. With [WithLoadEstimate](false) the rule is the
// plain count, which [WithWeight] can weigh by known speeds.
//
// A [Balancer] is a worker pool with a scheduler in front: like a pool it
// runs a [Func] per worker on goroutines of its own, but each worker has a
// short queue of its own and one select loop keeps the workers in a heap
// ordered by load. A worker is the unit a caller has, a connection, a GPU
// or a remote backend: [WithConcurrency] says how many requests it serves
// at once, and [NewFrom] builds a balancer of workers that differ. Workers
// can be added and removed while requests flow. [FanIn] merges the result
// channels that [Balancer.Submit] returns.
//
// Every request the balancer accepts gets exactly one outcome: its result,
// or an error saying why it did not run. Outcomes are classified (see
// [Class]): a worker that fails, such as one whose backend died and
// answers every request at once with an error, costs more for it and is
// ejected for a while ([WithEjection]), instead of drawing the load with
// its fast answers. Close and Shutdown stop every
// goroutine the package started, like [sync.WaitGroup.Wait] on a pool.
package balancer

import (
	"context"
	"errors"
	"fmt"
	"iter"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
)

// Func is the work a worker does for one request. ctx is the request's
// context, with its values and deadline, also cancelled if
// [Balancer.Shutdown] gives up waiting; then context.Cause(ctx) is
// [ErrClosed], and otherwise the cause the caller's context ended with;
// with [WithHedge], also when the request's other copy succeeded first,
// with cause [ErrHedgeLost]. [WorkerID](ctx) is the ID of the worker
// running it. If the request's context can be done, ctx is done once the
// Func has returned, as a context derived for the call and cancelled after
// it would be.
type Func[Req, Res any] func(ctx context.Context, req Req) (Res, error)

// Result is the outcome of one request.
type Result[Req, Res any] struct {
	Req    Req   // the request this is the outcome of
	Value  Res   // what the Func returned; the zero value if Err is from the balancer
	Err    error // the Func's error unchanged, a *PanicError, ErrGoexit, ErrClosed or the request's ctx.Err()
	Worker int   // ID of the worker that ran it, or was to run it
	// Attempts counts the runs of the request on workers, 1 unless it was
	// tried again on another worker (see WithRetry) or hedged (see
	// WithHedge), losing copies included; 0 if it never ran.
	Attempts int
}

// Errors returned by the balancer. Each is returned as is or wrapped with the
// offending value; test with errors.Is.
var (
	// ErrClosed reports that Close or Shutdown has begun: the request was
	// not accepted, or (from Shutdown giving up) was accepted but not run.
	ErrClosed = errors.New("balancer: closed")
	// ErrInvalidArgument reports a bad argument: a negative worker count,
	// a queue depth, concurrency, weight, attempts, retry budget, hedge
	// quantile or hedge delay out of range, a nil Func, classifier or
	// retry predicate (or one for another Res), or a nil context.
	ErrInvalidArgument = errors.New("balancer: invalid argument")
	// ErrFull reports that TrySubmit found every worker full, or none.
	ErrFull = errors.New("balancer: every worker is full")
	// ErrUnknownWorker reports a worker ID that was never issued or whose
	// worker was already removed.
	ErrUnknownWorker = errors.New("balancer: unknown worker")
	// ErrGoexit is the outcome of a request whose Func called
	// runtime.Goexit. The worker goes on serving.
	ErrGoexit = errors.New("balancer: Func called runtime.Goexit")
	// ErrHedgeLost is the cause (context.Cause) of the cancellation of an
	// attempt whose other copy succeeded first (see WithHedge). The
	// caller never sees it: the winner's outcome is the request's.
	ErrHedgeLost = errors.New("balancer: another copy of the request succeeded first")
)

var errNilContext = fmt.Errorf("%w: nil Context", ErrInvalidArgument)

// PanicError is the outcome of a request whose Func panicked. The worker
// recovers, goes on serving and frees the request's slot.
type PanicError struct {
	Value any    // the value passed to panic
	Stack []byte // the panicking goroutine's stack, from runtime/debug.Stack
}

// Error names the panic value.
func (e *PanicError) Error() string {
	return fmt.Sprintf("balancer: Func panicked: %v", e.Value)
}

// Unwrap returns the panic value if it is an error, so errors.Is and
// errors.As see through the panic.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// A Class is what an outcome says about the worker that produced it: the
// balancer routes around workers whose outcomes say they fail (see
// WithClassifier and WithEjection).
type Class uint8

// The classes of outcomes.
const (
	// Success: the worker did its part. An error that is the caller's
	// own (a bad request, a 4xx, not found) is a Success too: the worker
	// served it. It resets the worker's run of failures.
	Success Class = iota
	// Failure: the worker failed (a 5xx, a refused connection, a panic).
	// It raises the worker's failure rate, which raises its cost, and
	// lengthens its run of failures, which ejects it (see WithEjection).
	Failure
	// Overload: the worker refused the request for load (429,
	// RESOURCE_EXHAUSTED). It raises the failure rate, as Failure does,
	// but never ejects the worker and does not end a run of failures.
	Overload
	// Ignore: the outcome says nothing about the worker (the caller gave
	// up). It changes neither the worker's health nor its speed.
	Ignore
	// Unavailable: the worker did not process the request (a refused
	// connection, a 503 from a proxy in front of a dead service, gRPC
	// UNAVAILABLE). A Failure for the worker's health, and one that is
	// safe to try again on another worker (see WithRetry).
	Unavailable
)

// String is the class's name.
func (c Class) String() string {
	switch c {
	case Success:
		return "success"
	case Failure:
		return "failure"
	case Overload:
		return "overload"
	case Ignore:
		return "ignore"
	case Unavailable:
		return "unavailable"
	}
	return "Class(" + strconv.Itoa(int(c)) + ")"
}

// classed is an error marked with the class of the outcome it ends.
type classed struct {
	err   error
	class Class
}

func (e *classed) Error() string { return e.err.Error() }
func (e *classed) Unwrap() error { return e.err }

// CallersFault marks err as the caller's own (a bad request, not found):
// its outcome is a Success for the worker's health. errors.Is and
// errors.As see through the mark; CallersFault(nil) is nil.
func CallersFault(err error) error { return mark(err, Success) }

// Unprocessed marks err as saying that the worker did not process the
// request (a refused connection, a 503 from a proxy whose service is
// gone): its outcome is Unavailable. errors.Is and errors.As see through
// the mark; Unprocessed(nil) is nil.
func Unprocessed(err error) error { return mark(err, Unavailable) }

// Overloaded marks err as the worker's refusal for load (429,
// RESOURCE_EXHAUSTED): its outcome is an Overload. errors.Is and errors.As
// see through the mark; Overloaded(nil) is nil.
func Overloaded(err error) error { return mark(err, Overload) }

func mark(err error, c Class) error {
	if err == nil {
		return nil
	}
	return &classed{err, c}
}

// ClassOf is the default classification of a Func's error: Success for
// nil, the mark of CallersFault, Overloaded or Unprocessed if err carries
// one (the outermost), and Failure for any other error, a *PanicError and
// ErrGoexit included. A classifier given to WithClassifier can fall back
// to it.
func ClassOf(err error) Class {
	if err == nil {
		return Success
	}
	var c *classed
	if errors.As(err, &c) {
		return c.class
	}
	return Failure
}

// Bounds on a worker's queue depth and concurrency, see [WithQueueDepth]
// and [WithConcurrency].
const (
	DefaultQueueDepth = 1
	MaxQueueDepth     = 1 << 16 // also bounds concurrency × depth: the requests one worker may hold
	MaxConcurrency    = 1 << 16
)

// An Option configures New or NewFrom. Every WorkerOption is also an
// Option: given to New or NewFrom it applies to every worker they start.
type Option interface {
	apply(*options)
}

// A WorkerOption configures one worker: given to AddWorker or in a
// WorkerSpec it applies to that worker.
type WorkerOption interface {
	Option
	applyWorker(*workerOptions)
}

type options struct {
	depth    int
	estimate bool
	eject    bool
	classify any // a func(Res, error) Class, checked by newBalancer
	attempts int
	retryOn  any // a func(Res, error) bool, checked by newBalancer
	budget   budgetOption
	hedge    hedgeOption
	worker   workerOptions // defaults for every worker New or NewFrom starts
	hooks    *hooks        // tests only
}

type workerOptions struct {
	concurrency int
	weight      float64
}

// with returns o changed by opts.
func (o workerOptions) with(opts []WorkerOption) workerOptions {
	for _, opt := range opts {
		if opt != nil {
			opt.applyWorker(&o)
		}
	}
	return o
}

// defaultOptions is the one place the defaults are set.
func defaultOptions() options {
	return options{depth: DefaultQueueDepth, estimate: true, eject: true, attempts: 1, budget: budgetOption{0.2, 10}, worker: workerOptions{concurrency: 1, weight: 1}}
}

// check reports the first option out of range for a worker of a balancer
// with queue depth depth.
func (o *workerOptions) check(depth int) error {
	switch {
	case o.concurrency < 1 || o.concurrency > MaxConcurrency:
		return fmt.Errorf("%w: concurrency %d, want 1 to %d", ErrInvalidArgument, o.concurrency, MaxConcurrency)
	case o.concurrency*depth > MaxQueueDepth:
		return fmt.Errorf("%w: concurrency %d × queue depth %d, want at most %d", ErrInvalidArgument, o.concurrency, depth, MaxQueueDepth)
	case !(o.weight > 0 && o.weight <= math.MaxFloat64):
		return fmt.Errorf("%w: weight %v, want positive and finite", ErrInvalidArgument, o.weight)
	}
	return nil
}

// withHooks is the tests' option that sets hooks before anything starts.
type withHooks hooks

func (h *withHooks) apply(o *options) { o.hooks = (*hooks)(h) }

type depthOption int

func (d depthOption) apply(o *options) { o.depth = int(d) }

// WithQueueDepth sets how many requests a worker may hold per request it
// runs at once: a worker of concurrency c holds at most c × n requests
// pending (running or queued), the capacity of its buffered request
// channel. The default, DefaultQueueDepth (1), queues nothing at a worker:
// each request waits in Do or Submit until some worker has a free slot, so
// it goes to the worker that really frees first, which gives the best tail
// latency. A deeper queue commits requests to a worker early; it pays when
// a Func takes about as long as a dispatch, so that a worker can start its
// next request without waiting for the loop, and it lets the load estimate
// queue work behind fast workers. New rejects n outside [1,
// MaxQueueDepth], and any worker whose c × n exceeds MaxQueueDepth, with
// ErrInvalidArgument.
func WithQueueDepth(n int) Option { return depthOption(n) }

type estimateOption bool

func (e estimateOption) apply(o *options) { o.estimate = bool(e) }

// WithLoadEstimate turns the load estimate on (the default) or off. Off,
// workers are ordered by pending requests per slot and weight alone: the
// plain least-pending rule, which is all a pool of equal workers needs.
//
// With the estimate, a request goes to the worker where it is expected to
// finish first, judged by each worker's measured service time: for a
// worker of concurrency c with p requests pending and expected service
// time s, (p+c)/c × s, which is s while a slot is free, plus s/c for each
// request pending there (a hedge against load the balancer cannot see,
// such as other clients of the same backend). So workers that differ in
// speed, or whose speed changes (remote backends that brown out, shared
// GPUs), need no configuration.
//
// Equal means equal. The estimates compare on a scale of steps a factor
// 1.5 apart, centred on the median worker's, whose centre step reaches a
// step down and one and a half up, as run times stray more to the slow
// side: workers from 1/1.5 to 1.84 times the median are on it, compare as
// equal and are ordered by the count rule, so light load spreads over all
// of them although their measured means differ by noise, and so do
// clients that share a backend whose queue the others' load lengthens.
// Workers twice as fast or slow as the median, or more, are told apart by
// their second run.
//
// The service time is learned as two moving averages over the worker's
// recent requests, from all its slots. The first runs make a plain mean,
// and the very first counts 1.5 times the worker's prior at most until
// the second replaces it, so one cold first call does not exile a worker.
// After that a faster run moves both a sixteenth of the way; a slower one
// moves the peak average a quarter (it notices a slowdown within a few
// requests: the hold-back reads it) and the level an eighth (it places
// the worker on the scale, where the noise of run times should not carry
// an equal worker off the centre step). A run counts four times the peak
// average at most, and eight times the level, which a run that slow moves
// a quarter of the way, off the centre step at once: so a backend that
// browns out to a tenth of its speed is known from its first answer,
// unless that request was among the shortest. A run after a gap g
// moves both at least 1 − e^(−g/10 s) of the way. A request running
// longer than its worker's level counts its age instead, so a worker that
// stalls stops getting requests.
//
// Until it has run, a worker is expected to serve as its peers' median
// does, divided by its weight (WithWeight): its prior. Before any worker
// has run, dispatch is the count rule exactly, weights included.
//
// Estimates expire. One slower than the centre step that no run has
// refreshed for 2 s counts as the worker's prior (from the
// loop's next look at every worker, at most a quarter second later) for
// one request, a probe, so a worker that looked slow and was not tried
// since (it recovered) is tried again at any load; its probe starts new
// averages. Each probe that takes over 2.25 times the prior doubles the
// wait before the next, up to 32 s, so a worker that is slow for good
// costs one slow request that often at most; eight runs in a row in line
// set it back. Trying a worker again has its price where it browns out
// again: healed and back in turn, it takes about as many slow requests at
// each new brownout as at its first. In TestBalanceQuality's "2 of 8 at
// 1/10 for 2 s of 10 s" (seed 41) the two slow workers took 8 requests
// in the first brownout and 6–10 in each later one; estimates that never
// expired kept them to 0–3, but then a worker that recovered got nothing
// (0.00 of its share in the recovery rows).
//
// The balancer also holds requests back: when every fast worker is full
// and only a slow one has room, a request waits in Do or Submit for a fast
// worker to free a slot if, counting the callers already waiting, that is
// expected to finish it in two thirds of the slow worker's time or less.
// As callers pile up the slow worker gets its share. While callers are
// held, at least one goes to the slow worker per its expected time for a
// request, so a stalled fast worker cannot strand them; TrySubmit never
// holds back. With two of eight workers four times slower at half load,
// the p99 latency is less than half a shared channel's; at 90 % load the
// slow workers' capacity is needed, and no policy that cannot see request
// sizes does much better than a shared channel.
func WithLoadEstimate(on bool) Option { return estimateOption(on) }

type ejectOption bool

func (e ejectOption) apply(o *options) { o.eject = bool(e) }

// WithEjection turns ejection on (the default) or off. On, a worker whose
// last 5 outcomes were each a Failure (see Class) is ejected: it gets no
// requests for 1 s, twice as long for each ejection in a row (one that
// comes within 10 s of the worker's return, or at its probe) up to 30 s,
// each time ±50 % at random. Then it gets exactly one request, its probe,
// the next one the balancer dispatches: a Success or an Overload returns
// it to service with its failure rate cleared and its speed estimate
// kept, a Failure ejects it again, and an outcome that says nothing
// (Ignore) makes the next request its probe. While ejected it is not
// capacity: the hold-back, TrySubmit and All ignore it. At most half the
// workers are ejected at once, never the last one, and always one may
// be; above that cap, failing workers keep only the cost of their failure
// rate. Off, the failure rate alone steers load away from failing
// workers: a worker that fails a share e of its requests costs 1/(1 − e)
// times as much, up to 20 times, with or without ejection.
func WithEjection(on bool) Option { return ejectOption(on) }

type retryOption int

func (a retryOption) apply(o *options) { o.attempts = int(a) }

// MaxAttempts bounds WithRetry's attempts.
const MaxAttempts = 16

// WithRetry lets a request run up to attempts times (default 1: no
// retry), each time on a worker it has not run on: when an attempt's
// outcome is Unavailable or Overload (see Class), or one WithRetryOn
// accepts, the request goes at once to the least-loaded worker it has not
// tried, waiting like a new request if each is full (TrySubmit's never
// wait: its last outcome stands). It is not tried again when its ctx has
// ended (its outcome is then ctx.Err()), when every worker has run it,
// when Close began, or when the retry budget (WithRetryBudget) is spent:
// then the last attempt's outcome stands. Either way the caller gets one
// outcome, whose Worker and Attempts say where and how often it ran. A
// Failure is not retried unless WithRetryOn says so: only the caller knows
// whether its work is safe to run twice. New returns ErrInvalidArgument
// for attempts outside [1, MaxAttempts].
func WithRetry(attempts int) Option { return retryOption(attempts) }

type retryOnOption struct{ f any }

func (r retryOnOption) apply(o *options) { o.retryOn = r.f }

// WithRetryOn sets which outcomes, besides Unavailable and Overload, are
// tried again on another worker (see WithRetry): those for which f
// reports true, such as any Failure of an idempotent request. f runs on
// the worker's goroutine after the classifier; a panic in f gives the
// request a *PanicError. New returns ErrInvalidArgument if f is nil or its
// Res is not the Balancer's.
func WithRetryOn[Res any](f func(Res, error) bool) Option {
	if f == nil {
		return retryOnOption{f: (func(Res, error) bool)(nil)}
	}
	return retryOnOption{f: f}
}

type budgetOption struct{ ratio, perSecond float64 }

func (b budgetOption) apply(o *options) { o.budget = b }

// WithRetryBudget bounds the extra attempts of WithRetry: at most ratio of
// the requests accepted plus perSecond a second (default 0.2 and 10, as
// Finagle's and tower's budgets), over the last 10 s and over the last
// second alike, so that when everything fails at once retries do not
// multiply the load. The account keeps slots of 100 ms; a window's extra
// attempts are counted over every slot it overlaps and its requests over
// the slots it covers, the last second's over its last 0.9 s only, so
// that no second of real time sees more than its share. A retry the budget refuses leaves the request with
// its last outcome, counted in Stats.BudgetRefusals. New returns
// ErrInvalidArgument for a negative or non-finite ratio or perSecond.
func WithRetryBudget(ratio, perSecond float64) Option { return budgetOption{ratio, perSecond} }

type hedgeOption struct {
	on       bool
	quantile float64
	minDelay time.Duration
}

func (h hedgeOption) apply(o *options) { o.hedge = h }

// WithHedge sends a copy of a request that has been at its worker longer
// than the quantile (such as 0.95) of the times successful attempts took at
// theirs, and at least minDelay, to the least-loaded other worker with a
// free slot: the first copy to succeed gives the request its outcome, and
// the other's ctx is cancelled with cause ErrHedgeLost; it counts neither
// as a failure of its worker nor as a sample of its speed. An error from
// one copy waits for the other's outcome. The times are from the balancer
// handing the attempt to its worker to its end, over the latest 1 024
// successes at every worker, so a slow worker's requests, a stalled
// worker's and those stuck in a worker's queue are all stragglers against
// the rest; there is no hedging before 100 successes.
//
// Hedges that do not pay back off. A copy of a request that is merely big
// cannot win: it takes as long, from later. So while fewer than 4 of the
// latest 32 hedges won, a request waits for the window's 99.9th percentile
// (or the quantile, if higher) before its hedge; hedges that win there, as
// a stalled worker's requests' do, bring the quantile back.
//
// With the load estimate, a request at a worker measured more than 2.25
// times as slow as the median worker, at its weight (1.5², beyond what
// noise makes of a worker of the usual speed; see WithLoadEstimate), by
// both its averages (so one straggler does not make its worker slow),
// waits that many times as long before its hedge: its worker is slow, not
// the request, and the estimate already steers work off it. A copy
// elsewhere would often win, but it takes a faster worker's slot from the
// requests that would go there: with 2 of 8 workers 4 times slower at load
// 0.7, hedging their requests at the common delay raised the p99 by 1 %.
//
// A hedge uses spare capacity only: it never queues at a worker, and none
// is sent while callers wait for capacity, so hedging backs off by itself
// as the load rises; a request past its deadline keeps its claim and gets
// its hedge when a slot frees, if it still runs. A worker whose attempt
// lost to a hedge past the delay keeps that attempt's run time in its cost
// until it next ends an attempt that counts, for as long as an estimate is
// trusted without a refresh at most (see WithLoadEstimate): cancelling a
// stalled worker's requests must not make it look idle. Each request gets
// at most one hedge, which counts against the budget of WithRetryBudget
// (with retries, if any) and, with WithRetry, among its attempts. Hedge
// only work that is safe to run twice. With it, every request costs 2
// allocations whatever its context (what its attempts share, and each
// attempt's own context). New returns ErrInvalidArgument for a quantile
// outside [0.5, 1) or a negative minDelay.
func WithHedge(quantile float64, minDelay time.Duration) Option {
	return hedgeOption{true, quantile, minDelay}
}

type classifierOption struct{ f any }

func (c classifierOption) apply(o *options) { o.classify = c.f }

// WithClassifier sets how the outcomes of the Funcs are classified, for
// errors that cannot be marked with CallersFault or Overloaded (a
// *url.Error, a gRPC status) and outcomes whose Res says what happened (an
// *http.Response). f sees the Value and Err of every outcome of a Func
// that returned, except that an error after the request's ctx ended is
// Ignore without asking (the caller gave up, not the worker), and a panic
// is a Failure; it may call ClassOf, the default. A panic in f gives the
// request a *PanicError and counts as a Failure. New returns
// ErrInvalidArgument if f is nil or its Res is not the Balancer's.
func WithClassifier[Res any](f func(Res, error) Class) Option {
	if f == nil {
		return classifierOption{f: (func(Res, error) Class)(nil)}
	}
	return classifierOption{f: f}
}

type concurrencyOption int

func (c concurrencyOption) apply(o *options)             { o.worker.concurrency = int(c) }
func (c concurrencyOption) applyWorker(o *workerOptions) { o.concurrency = int(c) }

// WithConcurrency sets how many requests a worker runs at once (default
// 1): it gets n goroutines that serve its one request channel. Give a
// worker that fronts a resource serving several requests at once (a
// backend's connection pool, a batching device) its real concurrency, not
// n workers: the balancer then compares resources, not slots, and a
// worker's load is its pending requests per slot. Rejected with
// ErrInvalidArgument outside [1, MaxConcurrency].
func WithConcurrency(n int) WorkerOption { return concurrencyOption(n) }

type weightOption float64

func (w weightOption) apply(o *options)             { o.worker.weight = float64(w) }
func (w weightOption) applyWorker(o *workerOptions) { o.weight = float64(w) }

// WithWeight gives a worker a speed relative to the others (default 1): a
// worker of weight 2 is taken to serve each request twice as fast. With
// WithLoadEstimate(false), which does not measure speeds, it is preferred
// while it has up to twice the pending requests per slot of a weight-1
// worker. With the load estimate, the default, the weight is the speed
// assumed until the worker has run (its expected service time is its
// peers' median ÷ weight), and it breaks ties among workers that have not
// run; after that the measured speed decides. (A worker that serves more
// requests at once, rather than each faster, wants WithConcurrency.)
// Rejected with ErrInvalidArgument unless positive and finite.
func WithWeight(w float64) WorkerOption { return weightOption(w) }

// A Balancer sends each request to the worker where it is expected to
// finish first. Create one with New or NewFrom: every method of a nil or
// zero Balancer panics with a message that says so.
//
// The model: a worker runs up to its concurrency c requests at once
// (WithConcurrency, default 1) and holds at most c × depth pending, running
// or queued (WithQueueDepth, default 1: nothing queued at the worker). Its
// load is the expected time to finish one more request there, from its
// measured service time and pending requests (or, with
// WithLoadEstimate(false), pending ÷ (c × weight)); an estimate that no
// run has refreshed for a while expires, and the worker is tried again.
// When every worker is at its limit, requests wait in front of the
// balancer, in Do or Submit. A worker that fails costs more the more it
// fails, and five failures in a row eject it until a probe request finds
// it healthy again (see Class and WithEjection).
//
// Most callers want Do, which runs one request and returns its result.
// Submit returns at once with a channel for the result, for callers that
// keep several requests in flight; TrySubmit never waits for capacity.
// When every worker is at its limit, Do and Submit wait until a slot frees
// or their ctx is done. They also wait, briefly, while a busy worker is
// expected to serve them much sooner than a free slow one (see
// WithLoadEstimate).
//
// Every accepted request gets exactly one outcome: the Func's result, its
// error unchanged, a *PanicError, ErrGoexit, the request's ctx.Err() if it
// ended before a worker started the request, or ErrClosed if Shutdown gave
// up on it; with WithRetry, that of its last attempt, and with WithHedge,
// that of the first copy to succeed, or of the last to end. A Func panic
// or runtime.Goexit never kills a worker.
//
// A Func may call Do or Submit on its own balancer, but if every worker is
// busy doing that, nothing can free a slot: such calls wait until their ctx
// ends. Pass them the Func's ctx, with a deadline.
//
// A Balancer is safe for concurrent use. After Close or Shutdown begins it
// accepts nothing (ErrClosed) but finishes what it accepted; Stats keeps
// working. A lone caller's request costs three goroutine hand-offs (0.6
// to 1 µs on a 2-core machine, about twice a plain shared-channel pool);
// under load the loop takes requests in batches, and a request costs less.
// Through Do it allocates nothing with a context that can never be done
// (context.Background(), or one that carries values and is used again), and
// once with one that can be done or carries values new to the worker's
// slot.
type Balancer[Req, Res any] struct {
	depth    int
	defaults workerOptions                    // for AddWorker, from New's options
	requests chan request[Req, Res]           // unbuffered: a send succeeds only if the loop takes it, so nothing is stranded at Close
	queue    atomic.Pointer[waiter[Req, Res]] // Do's requests not taken yet: a stack (see enqueue)
	queued   atomic.Int64                     // requests in the queue, and in line
	cmds     chan *command[Req, Res]          // unbuffered: the loop always receives commands until it exits
	quit     chan struct{}                    // closed once, by the first Close or Shutdown
	exited   chan struct{}                    // closed by the loop as it returns
	quitOnce sync.Once
	epoch    time.Time       // New's time: now counts from it
	abortCtx context.Context // cancelled, with cause ErrClosed, when a Shutdown's ctx ends first
	abort    context.CancelCauseFunc
	// aborted is set just before abortCtx is cancelled, for the check each
	// slot makes before it runs a request: abortCtx.Err() cost about 20
	// instructions a request there (callgrind), the load 2.
	aborted  atomic.Bool
	wg       sync.WaitGroup // the worker goroutines
	waiters  sync.Pool      // *waiter[Req, Res], for Do
	slots    sync.Map       // the IDs of the goroutines serving as slots (see inFunc)
	accepted atomic.Uint64  // written by the loop
	waiting  atomic.Int64   // callers blocked in submit; each adds and removes itself
	idle     atomic.Bool    // the loop is parked, or about to park, with room: a Do that clears it pokes the loop (see Do)
	holding  atomic.Bool    // the loop is holding requests back and wants a nudge when one more waits
	nudge    chan struct{}  // capacity 1: wakes a loop that holds back (see holdBack)
	// finished is a stack of the workers with completions the loop has
	// not taken (see report): workers push, the loop takes it whole.
	finished atomic.Pointer[worker[Req, Res]]
	sleeping atomic.Bool   // the loop waits for completions, among other things, and wants a wake
	wake     chan struct{} // capacity 1: wakes a sleeping loop (see report)
	roster   atomic.Pointer[roster[Req, Res]]
	ref      atomic.Int64           // the scheduler's ref, published for the slots (see observe)
	classify func(Res, error) Class // WithClassifier's, or nil for ClassOf
	attempts int                    // WithRetry's
	retryOn  func(Res, error) bool  // WithRetryOn's, or nil
	// retried is a stack of the requests whose attempt a slot handed back
	// for the loop to try again (see worker.handBack); the loop takes it
	// whole, after the completions (see takeCompletions).
	retried atomic.Pointer[flight[Req, Res]]
	// Retries and hedges counters, written by the loop; hedge wins by the
	// slots.
	retries, refusals, hedges, hedgeWins atomic.Uint64
	hedging                              *hedger[Req, Res] // WithHedge's; nil without
	spends                               bool              // some attempts are extra: WithRetry or WithHedge
	hooks                                *hooks            // nil outside tests

	// Owned by the select loop once it starts; New sets them up before.
	sched    sched[Req, Res]
	workers  map[int]*worker[Req, Res] // every worker not yet retired, removed ones included
	nextID   int
	closing  bool                // Close or Shutdown began
	pending  int                 // over all workers, as of the completions taken
	draining int                 // removed workers not yet retired
	line     *waiter[Req, Res]   // taken from the queue, oldest first, not dispatched yet
	took     int                 // requests dispatched in this round: since the loop last woke
	again    []*flight[Req, Res] // retries waiting for room at a worker they have not tried
	budget   budget              // WithRetryBudget's
	lone     int                 // rounds in a row, up to loneRounds, that dispatched one request each

	// Holding back, with the load estimate only (see holdBack); owned by
	// the loop.
	timing bool        // timer runs: a caller is being held
	timer  *time.Timer // bounds a hold (see sched.holdFor)
}

// hooks let a test stop a goroutine at a point where the interleaving
// matters. Each is nil unless a test sets it before the balancer runs.
type hooks struct {
	queue func() // in Do, after its checks, before its request goes into the queue
	idle  func() // in the loop, before it says it is idle
	park  func() // in the loop, after its last look at the queue, before it parks
	sleep func() // in the loop, before it prepares to sleep on completions
	// report is called by a slot as it reports a finished request, after
	// its counters and before its outcome (see finish).
	report func()
	// send is called by the loop as it hands a request to its worker,
	// after counting it as accepted (see dispatch).
	send func()
	// jitter replaces rand.Float64 in the ejections' lengths.
	jitter func() float64
	// run is called by a slot about to run a Func, after its check that
	// Shutdown has not given up (see call).
	run func()
}

// minSeq is below every dispatch sequence number: a worker that was never
// dispatched to sorts before all that were.
const minSeq = math.MinInt64

// command asks the loop to do something only the owner of the pool can.
type command[Req, Res any] struct {
	op    op
	fn    Func[Req, Res]    // opAdd
	wo    workerOptions     // opAdd
	id    int               // opRemove
	req   request[Req, Res] // opTry
	reply chan commandReply // capacity 1: the loop never blocks answering
}

type op int

const (
	opAdd    op = iota // start a worker running fn
	opRemove           // remove worker id
	opTry              // dispatch req if some worker has room
	opQuit             // Close began: accept nothing more
	opAbort            // Shutdown gave up: end the requests still queued
)

type commandReply struct {
	id     int             // opAdd: the new worker's ID
	exited <-chan struct{} // opRemove: closed when the worker's goroutine ends
	// opRemove: closed when the loop has taken the worker's last
	// completion and folded its counts into the totals
	retired <-chan struct{}
	ok      bool // opTry: whether req was dispatched
	err     error
}

// New starts a Balancer with workers workers, IDs 0 to workers-1, each
// running fn; WorkerOptions among opts apply to each of them. Zero workers
// is allowed: requests wait for AddWorker. New returns an error wrapping
// ErrInvalidArgument if workers is negative, fn is nil or an option is out
// of range. Call Close to stop its goroutines.
func New[Req, Res any](workers int, fn Func[Req, Res], opts ...Option) (*Balancer[Req, Res], error) {
	if workers < 0 {
		return nil, fmt.Errorf("%w: %d workers", ErrInvalidArgument, workers)
	}
	if fn == nil {
		return nil, fmt.Errorf("%w: nil Func", ErrInvalidArgument)
	}
	return newBalancer(workers, func(int) WorkerSpec[Req, Res] { return WorkerSpec[Req, Res]{Func: fn} }, opts)
}

// A WorkerSpec describes one worker for NewFrom: the Func it runs and the
// options that set it apart from the others.
type WorkerSpec[Req, Res any] struct {
	Func    Func[Req, Res]
	Options []WorkerOption
}

// NewFrom starts a Balancer with one worker per spec, IDs in the order
// given, for workers that differ: each its own Func, concurrency or
// weight. WorkerOptions among opts are defaults that a spec's own Options
// override. NewFrom returns an error wrapping ErrInvalidArgument, naming
// the spec, if a Func is nil or an option is out of range. Call Close to
// stop its goroutines.
func NewFrom[Req, Res any](workers []WorkerSpec[Req, Res], opts ...Option) (*Balancer[Req, Res], error) {
	return newBalancer(len(workers), func(i int) WorkerSpec[Req, Res] { return workers[i] }, opts)
}

// newBalancer checks every option and spec, then starts a balancer of n
// workers, worker i as spec(i) describes.
func newBalancer[Req, Res any](n int, spec func(i int) WorkerSpec[Req, Res], opts []Option) (*Balancer[Req, Res], error) {
	o := defaultOptions()
	for _, opt := range opts {
		if opt != nil {
			opt.apply(&o)
		}
	}
	if o.depth < 1 || o.depth > MaxQueueDepth {
		return nil, fmt.Errorf("%w: queue depth %d, want 1 to %d", ErrInvalidArgument, o.depth, MaxQueueDepth)
	}
	if err := o.worker.check(o.depth); err != nil {
		return nil, err
	}
	var classify func(Res, error) Class
	if o.classify != nil {
		f, ok := o.classify.(func(Res, error) Class)
		switch {
		case !ok:
			return nil, fmt.Errorf("%w: classifier %T, want func(%T, error) Class", ErrInvalidArgument, o.classify, *new(Res))
		case f == nil:
			return nil, fmt.Errorf("%w: nil classifier", ErrInvalidArgument)
		}
		classify = f
	}
	var retryOn func(Res, error) bool
	if o.retryOn != nil {
		f, ok := o.retryOn.(func(Res, error) bool)
		switch {
		case !ok:
			return nil, fmt.Errorf("%w: retry predicate %T, want func(%T, error) bool", ErrInvalidArgument, o.retryOn, *new(Res))
		case f == nil:
			return nil, fmt.Errorf("%w: nil retry predicate", ErrInvalidArgument)
		}
		retryOn = f
	}
	switch {
	case o.attempts < 1 || o.attempts > MaxAttempts:
		return nil, fmt.Errorf("%w: %d attempts, want 1 to %d", ErrInvalidArgument, o.attempts, MaxAttempts)
	case !(o.budget.ratio >= 0 && o.budget.ratio <= math.MaxFloat64):
		return nil, fmt.Errorf("%w: retry budget ratio %v, want non-negative and finite", ErrInvalidArgument, o.budget.ratio)
	case !(o.budget.perSecond >= 0 && o.budget.perSecond <= math.MaxFloat64):
		return nil, fmt.Errorf("%w: retry budget %v a second, want non-negative and finite", ErrInvalidArgument, o.budget.perSecond)
	case o.hedge.on && !(o.hedge.quantile >= 0.5 && o.hedge.quantile < 1):
		return nil, fmt.Errorf("%w: hedge quantile %v, want 0.5 to 1 (not included)", ErrInvalidArgument, o.hedge.quantile)
	case o.hedge.minDelay < 0:
		return nil, fmt.Errorf("%w: hedge delay %v, want at least 0", ErrInvalidArgument, o.hedge.minDelay)
	}
	wos := make([]workerOptions, n) // checked before anything starts
	for i := range n {
		s := spec(i)
		if s.Func == nil {
			return nil, fmt.Errorf("%w: worker %d: nil Func", ErrInvalidArgument, i)
		}
		wos[i] = o.worker.with(s.Options)
		if err := wos[i].check(o.depth); err != nil {
			return nil, fmt.Errorf("worker %d: %w", i, err)
		}
	}
	b := &Balancer[Req, Res]{
		depth:    o.depth,
		defaults: o.worker,
		requests: make(chan request[Req, Res]),
		wake:     make(chan struct{}, 1),
		cmds:     make(chan *command[Req, Res]),
		quit:     make(chan struct{}),
		exited:   make(chan struct{}),
		workers:  make(map[int]*worker[Req, Res]),
		classify: classify,
		attempts: o.attempts,
		retryOn:  retryOn,
		budget:   budget{ratio: o.budget.ratio, perSecond: o.budget.perSecond},
		hooks:    o.hooks,
	}
	if o.hedge.on {
		b.hedging = newHedger[Req, Res](o.hedge, o.attempts)
	}
	b.spends = o.attempts > 1 || b.hedging != nil
	b.sched = sched[Req, Res]{estimate: o.estimate, eject: o.eject, hedging: o.hedge.on, clock: b.now, published: &b.ref, jitter: rand.Float64}
	if o.hooks != nil && o.hooks.jitter != nil {
		b.sched.jitter = o.hooks.jitter
	}
	if o.estimate {
		b.nudge = make(chan struct{}, 1)
		b.timer = time.NewTimer(time.Hour)
		b.timer.Stop()
	}
	b.epoch = time.Now()
	b.abortCtx, b.abort = context.WithCancelCause(context.Background())
	b.waiters.New = func() any { return &waiter[Req, Res]{reply: make(chan Result[Req, Res], 1)} }
	b.roster.Store(&roster[Req, Res]{})
	for i, wo := range wos {
		b.addWorker(spec(i).Func, wo)
	}
	go b.loop()
	return b, nil
}

// Do runs req on the least-loaded worker and returns its outcome (see
// Balancer). It waits for capacity if every worker is full, or while the
// load estimate holds it back for a faster worker. If ctx ends
// first, Do returns ctx.Err() at once, even while the Func runs; the request
// then still runs to completion unless it had not started. Do returns
// ErrClosed after Close or Shutdown began, and ErrInvalidArgument for a nil
// ctx.
func (b *Balancer[Req, Res]) Do(ctx context.Context, req Req) (Res, error) {
	b.made()
	var zero Res
	if err := b.check(ctx); err != nil {
		return zero, err
	}
	w := b.waiters.Get().(*waiter[Req, Res])
	w.r = request[Req, Res]{ctx: ctx, req: req, reply: w.reply, keep: true}
	var poke chan request[Req, Res]
	select {
	case b.requests <- w.r: // the loop is parked waiting: hand r over
	default:
		w.r.at = b.now() // it waits, so its wait is timed from here (see submit)
		if b.hooks != nil && b.hooks.queue != nil {
			b.hooks.queue()
		}
		b.enqueue(w)
		b.nudgeHold()
		// The loop sets idle before it looks at the queue a last time
		// and parks; this reads idle after r went in. So either the loop
		// finds r, or this sees idle and pokes the loop with an empty
		// request. Only the caller that clears idle pokes.
		if b.idle.Load() && b.idle.CompareAndSwap(true, false) {
			poke = b.requests
		}
		// A request in the queue is not yet accepted, so it must not be
		// stranded there when the loop ends. The loop refuses the whole
		// queue when Close begins, after Close closed quit. If quit was
		// still open after r went in, the loop will find r. Otherwise r
		// may have come too late: whoever takes the queue now refuses
		// what is in it, so take it.
		select {
		case <-b.quit:
			b.refuseQueued()
		default:
		}
	}
	done := ctx.Done()
	if done == nil && poke == nil { // nothing else can end the wait: a plain receive skips the select
		res := <-w.reply
		b.release(w)
		return res.Value, res.Err
	}
	for {
		select {
		case poke <- request[Req, Res]{}:
			poke = nil
		case res := <-w.reply:
			b.release(w)
			return res.Value, res.Err
		case <-done:
			// The loop may still hold w, and the outcome will land in
			// its buffer: w is left to the garbage collector instead of
			// going back to the pool.
			return zero, ctx.Err()
		}
	}
}

// waiter is a Do call's request, its reply channel and its link in the
// queue. Do calls reuse them through a sync.Pool.
type waiter[Req, Res any] struct {
	r     request[Req, Res]
	reply chan Result[Req, Res] // capacity 1
	next  *waiter[Req, Res]
}

// release returns w to the pool once its outcome is received: nobody
// refers to it any more.
func (b *Balancer[Req, Res]) release(w *waiter[Req, Res]) {
	w.r = request[Req, Res]{} // keep no ctx or request alive
	b.waiters.Put(w)
}

// enqueue puts w on the queue: a stack that Do calls push on and that the
// loop, or a late Do, takes whole (see nextQueued and refuseQueued).
// Taking it whole, never one at a time, is what makes a plain
// compare-and-swap safe here.
func (b *Balancer[Req, Res]) enqueue(w *waiter[Req, Res]) {
	b.queued.Add(1)
	for {
		top := b.queue.Load()
		w.next = top
		if b.queue.CompareAndSwap(top, w) {
			return
		}
	}
}

// nudgeHold tells a loop that holds back that one more request waits,
// which may end the hold. The loop sets holding before it counts the
// callers waiting and the requests queued, and a caller reads holding
// after it counted itself or queued its request, so either the loop counts
// it or it gets a nudge.
func (b *Balancer[Req, Res]) nudgeHold() {
	if b.holding.Load() {
		select {
		case b.nudge <- struct{}{}:
		default: // a nudge is pending already
		}
	}
}

// refuseQueued gives every request in the queue the outcome ErrClosed. The
// loop calls it when Close begins, and so does a Do whose request went
// into the queue after Close began. Each takes the queue whole, so each
// request gets one outcome.
func (b *Balancer[Req, Res]) refuseQueued() {
	for w := b.queue.Swap(nil); w != nil; {
		next, r := w.next, w.r // once r has its outcome, w may be reused
		b.queued.Add(-1)
		r.deliver(&Result[Req, Res]{Req: r.req, Err: ErrClosed})
		w = next
	}
}

// Submit hands req to the least-loaded worker and returns a channel that
// yields its one Result and is then closed. Nobody blocks if the caller never
// reads it. Submit waits for capacity if every worker is full, or while
// the load estimate holds it back for a faster worker; it returns
// ctx.Err() if ctx ends first, ErrClosed after Close or Shutdown began, and
// ErrInvalidArgument for a nil ctx. If ctx ends after Submit returns but
// before a worker starts the request, the request is not run and its
// Result carries ctx.Err().
func (b *Balancer[Req, Res]) Submit(ctx context.Context, req Req) (<-chan Result[Req, Res], error) {
	b.made()
	reply := make(chan Result[Req, Res], 1)
	if err := b.submit(request[Req, Res]{ctx: ctx, req: req, reply: reply}); err != nil {
		return nil, err
	}
	return reply, nil
}

// TrySubmit is Submit without waiting for capacity, for load shedding: it
// accepts req whenever some worker is below its limit of concurrency ×
// depth pending requests, slow or not (it never holds back), and the
// request then runs under ctx exactly as with Submit. Otherwise it returns
// ErrFull: every worker is full or there are none. It also returns
// ctx.Err() if ctx is already done, ErrClosed after Close or Shutdown
// began, and ErrInvalidArgument for a nil ctx. It waits only for the loop
// to answer, never for capacity or for a request to finish.
func (b *Balancer[Req, Res]) TrySubmit(ctx context.Context, req Req) (<-chan Result[Req, Res], error) {
	b.made()
	if ctx == nil {
		return nil, errNilContext
	}
	select {
	case <-b.quit:
		return nil, ErrClosed
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	reply := make(chan Result[Req, Res], 1)
	r := request[Req, Res]{ctx: ctx, req: req, reply: reply, eager: true}
	rep, err := b.command(&command[Req, Res]{op: opTry, req: r})
	switch {
	case err != nil:
		return nil, err
	case !rep.ok:
		return nil, ErrFull
	}
	return reply, nil
}

// All runs every request reqs yields (slices.Values turns a slice into
// one) and yields each one's place in reqs and Result as it finishes, in no
// set order: put Value at results[i] to keep the order of reqs. It keeps
// as many requests in flight as the workers can hold when All starts
// (concurrency × depth each, at least 1), submitting while it collects, so
// every worker stays busy; when they are all full, it waits like Submit.
//
// Breaking out of the loop, say at the first error, stops All: it submits
// no more, and cancels the ctx of the requests in flight, whose outcomes
// are dropped. If a request is refused (ErrClosed after Close began,
// ctx.Err() once ctx ends, ErrInvalidArgument for a nil ctx), All yields
// it with that error, submits no more and yields the outcomes of those in
// flight. All starts no goroutine.
func (b *Balancer[Req, Res]) All(ctx context.Context, reqs iter.Seq[Req]) iter.Seq2[int, Result[Req, Res]] {
	b.made()
	return func(yield func(int, Result[Req, Res]) bool) {
		run, cancel := ctx, context.CancelFunc(noCancel)
		if ctx != nil {
			run, cancel = context.WithCancel(ctx)
		}
		defer cancel()
		limit := max(b.capacity(), 1)
		// Every request in flight has room in done, so no worker waits
		// to deliver even when the loop below does not collect.
		done := make(chan indexed[Req, Res], limit)
		inflight, i := 0, 0
		collect := func() bool {
			x := <-done
			inflight--
			return yield(x.i, x.res)
		}
		for req := range reqs {
			for inflight == limit {
				if !collect() {
					return
				}
			}
			if err := b.submit(request[Req, Res]{ctx: run, req: req, batch: done, index: i}); err != nil {
				if !yield(i, Result[Req, Res]{Req: req, Err: err}) {
					return
				}
				break
			}
			inflight++
			i++
			for len(done) > 0 { // what finished meanwhile, without waiting
				if !collect() {
					return
				}
			}
		}
		for inflight > 0 {
			if !collect() {
				return
			}
		}
	}
}

// capacity returns how many requests the workers not removed or ejected
// can hold.
func (b *Balancer[Req, Res]) capacity() int {
	n := 0
	r := b.roster.Load()
	for _, w := range r.workers {
		if r.holds(w) && !w.gone.Load() && w.outUntil.Load() == 0 {
			n += w.limit
		}
	}
	return n
}

// AddWorker starts a worker running fn and returns its ID, which no other
// worker has had or will have. Options not given default to the
// WorkerOptions given to New or NewFrom. The new worker has nothing
// pending, so it is next in line for work. AddWorker returns
// ErrInvalidArgument for a nil fn or a bad option, and ErrClosed after
// Close or Shutdown began.
func (b *Balancer[Req, Res]) AddWorker(fn Func[Req, Res], opts ...WorkerOption) (id int, err error) {
	b.made()
	if fn == nil {
		return 0, fmt.Errorf("%w: nil Func", ErrInvalidArgument)
	}
	o := b.defaults.with(opts)
	if err := o.check(b.depth); err != nil {
		return 0, err
	}
	rep, err := b.command(&command[Req, Res]{op: opAdd, fn: fn, wo: o})
	return rep.id, err
}

// RemoveWorker stops dispatching to worker id at once, lets it finish the
// requests it has queued or running, and waits for its goroutines to end.
// If ctx ends first it returns ctx.Err(), but the removal stands and the
// worker still drains. Removing the last worker is allowed: requests then
// wait for AddWorker. RemoveWorker returns an error wrapping
// ErrUnknownWorker for an ID never issued or already removed, ErrClosed
// after Close or Shutdown began, and ErrInvalidArgument for a nil ctx.
//
// Called from inside one of the balancer's own Funcs (a worker retiring
// itself because its backend died, or another), RemoveWorker returns nil
// as soon as the removal stands, without waiting: the wait could include
// the caller, or a worker waiting for the caller's.
func (b *Balancer[Req, Res]) RemoveWorker(ctx context.Context, id int) error {
	b.made()
	if ctx == nil {
		return errNilContext
	}
	rep, err := b.command(&command[Req, Res]{op: opRemove, id: id})
	if err != nil || b.inFunc() {
		return err
	}
	for _, c := range []<-chan struct{}{rep.retired, rep.exited} {
		select {
		case <-c:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

// Close stops accepting requests and waits until every accepted request
// has finished: when it returns, every Func has returned, every accepted
// request has its outcome, and every goroutine the Balancer started has
// made its last call (the runtime may still be reaping the last of them).
// It is idempotent, safe to call concurrently with any method, and
// returns nil.
//
// Called from inside one of the balancer's own Funcs, Close and Shutdown
// begin closing and return nil at once, because the wait would include the
// caller; the balancer finishes closing after that Func returns. (A Func
// that waits for another goroutine calling Close is not detected: give
// that goroutine Shutdown with a deadline.)
func (b *Balancer[Req, Res]) Close() error {
	return b.Shutdown(context.Background())
}

// Shutdown is Close with a bound on the wait. If ctx ends before the
// accepted requests finish, Shutdown cancels the contexts of the requests
// running, with cause ErrClosed (see Func), gives every request not yet
// started the outcome ErrClosed and returns ctx.Err() without waiting for
// Funcs that ignore their ctx; a later Close waits for them. Shutdown
// returns ErrInvalidArgument for a nil ctx.
func (b *Balancer[Req, Res]) Shutdown(ctx context.Context) error {
	b.made()
	if ctx == nil {
		return errNilContext
	}
	b.quitOnce.Do(func() {
		close(b.quit) // for callers waiting in Submit and for new ones
		b.command(&command[Req, Res]{op: opQuit})
	})
	if b.inFunc() {
		return nil
	}
	select {
	case <-b.exited:
	case <-ctx.Done():
		b.aborted.Store(true)
		b.abort(ErrClosed)
		b.cancelRunning()
		b.command(&command[Req, Res]{op: opAbort})
		return ctx.Err()
	}
	// The loop has closed every worker's channel with nothing pending, so
	// the workers are on their way out.
	b.wg.Wait()
	b.abort(ErrClosed) // releases the context's resources; nothing is left to cancel
	return nil
}

// errUseNew is the panic of a method called on a nil or zero Balancer.
const errUseNew = "balancer: use New or NewFrom to make a Balancer (this one is nil or the zero value)"

// made panics with errUseNew unless b was made by New or NewFrom: a nil
// or zero Balancer has no loop, so without it every method would hang or
// fail deep inside.
func (b *Balancer[Req, Res]) made() {
	if b == nil || b.quit == nil {
		panic(errUseNew)
	}
}

// check returns the error a request with ctx gets before it is offered
// to the loop: checked first so that a request made after Close began, or
// with a ctx already done, fails deterministically instead of racing the
// loop.
func (b *Balancer[Req, Res]) check(ctx context.Context) error {
	if ctx == nil {
		return errNilContext
	}
	select {
	case <-b.quit:
		return ErrClosed
	default:
	}
	return ctx.Err()
}

// submit passes r to the loop, waiting while every worker is full or the
// loop holds back.
func (b *Balancer[Req, Res]) submit(r request[Req, Res]) error {
	ctx := r.ctx
	if err := b.check(ctx); err != nil {
		return err
	}
	// If the loop is parked waiting for requests, hand r over without the
	// cost of a select.
	select {
	case b.requests <- r:
		return nil
	default:
	}
	// The caller waits from here, so its wait is timed from here. One
	// handed over at once has waited for nothing yet; the loop times it
	// if it must queue at its worker (see dispatch).
	r.at = b.now()
	b.waiting.Add(1)
	defer b.waiting.Add(-1)
	b.nudgeHold()
	select {
	case b.requests <- r:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-b.quit:
		return ErrClosed
	}
}

// command sends c to the loop and returns its answer, or ErrClosed once
// the loop is gone. Commands other than opAbort are refused after Close
// began, by the loop or here.
func (b *Balancer[Req, Res]) command(c *command[Req, Res]) (commandReply, error) {
	c.reply = make(chan commandReply, 1)
	refuse := b.quit
	if c.op == opQuit || c.op == opAbort {
		refuse = b.exited
	}
	// The loop receives commands on cmds, and also on requests when that
	// is all it waits for.
	select {
	case b.cmds <- c:
	case b.requests <- request[Req, Res]{cmd: c}:
	case <-refuse:
		return commandReply{}, ErrClosed
	}
	rep := <-c.reply // the loop took c, so it answers
	return rep, rep.err
}

// runContext returns the context a Func runs under on w, and the runCtx
// the slot keeps for the balancer to cancel, if any: the request's
// context, also cancelled with cause ErrClosed when Shutdown gives up (if
// the request's own context ends first, its cause stands), carrying w's ID
// (see WorkerID). A context that can never be done and carries no values
// is replaced by w's own workerCtx, made with w, which costs nothing. One
// that can never be done but carries values gets a valuesCtx (1
// allocation), which the slot keeps for the next request with the same
// context. Any other gets a runCtx (1 allocation), which the slot keeps in
// its runner for Shutdown to cancel (see call and cancelRunning), instead
// of registering it with abortCtx, which cost 4 more.
func (w *worker[Req, Res]) runContext(slot int, ctx context.Context) (context.Context, *runCtx) {
	if ctx == context.Background() || ctx == context.TODO() {
		return &w.ctx, nil
	}
	if ctx.Done() == nil {
		r := &w.runners[slot]
		// Only pointers are compared: == on two contexts of one type
		// that is not comparable would panic.
		if v := r.values; v != nil && reflect.TypeOf(ctx).Kind() == reflect.Pointer && v.values == ctx {
			return v, nil
		}
		r.values = &valuesCtx{ctx, &w.ctx}
		return r.values, nil
	}
	c := newRunCtx(ctx, &w.ctx)
	return c, c
}

// workerKey is the key WorkerID looks up: each of the balancer's contexts
// answers it with its *workerCtx.
type workerKey struct{}

// WorkerID returns the ID of the worker whose Func runs under ctx, or
// under a context derived from it, and true; for any other context, 0 and
// false. Where one balancer's Func calls another's, it is the ID of the
// innermost worker. A Func can use it to retire its own worker (see
// Balancer.RemoveWorker) without a closure per worker.
func WorkerID(ctx context.Context) (id int, ok bool) {
	if ctx == nil {
		return 0, false
	}
	if w, ok := ctx.Value(workerKey{}).(*workerCtx); ok {
		return w.id, true
	}
	return 0, false
}

// workerCtx is the context of a request on one worker whose own context
// is context.Background or context.TODO: done when abort is (Shutdown gave
// up), with abort's error and cause, and carrying the worker's ID. It is
// part of its worker and never changes, so every request shares it.
type workerCtx struct {
	abort context.Context
	id    int
}

func (c *workerCtx) Deadline() (time.Time, bool) { return c.abort.Deadline() }
func (c *workerCtx) Done() <-chan struct{}       { return c.abort.Done() }
func (c *workerCtx) Err() error                  { return c.abort.Err() }
func (c *workerCtx) Value(key any) any {
	if key == (workerKey{}) {
		return c
	}
	return c.abort.Value(key)
}

// valuesCtx is the context of a request whose own context can never be
// done: its values are the request context's, and it is done when its
// worker's workerCtx is. context.Cause finds abort's cause through Value,
// which falls back to the workerCtx for every key the request context has
// no value for. It never changes, so requests with the same context may
// share it.
type valuesCtx struct {
	values context.Context // Done() == nil
	w      *workerCtx
}

func (c *valuesCtx) Deadline() (time.Time, bool) { return c.values.Deadline() }
func (c *valuesCtx) Done() <-chan struct{}       { return c.w.Done() }
func (c *valuesCtx) Err() error                  { return c.w.Err() }
func (c *valuesCtx) Value(key any) any {
	if key == (workerKey{}) {
		return c.w
	}
	if v := c.values.Value(key); v != nil {
		return v
	}
	return c.w.Value(key)
}

// runCtx is the context of one attempt whose request context can be
// done, and of every attempt with WithHedge: the request's context,
// also ended by the balancer (with cause ErrClosed when Shutdown gives
// up, ErrHedgeLost when the other copy won), and done once the Func has
// returned. It costs one allocation. The cancellable context that carries
// the cause, inner, is made only when one is needed: at the first Done, or
// at the first read after c has ended. Until then Err and Value read the
// request's context, which is what inner would say.
type runCtx struct {
	parent context.Context
	w      *workerCtx
	made   atomic.Bool // inner is set, and is read without mu from then on
	ended  atomic.Bool // cause is set: the next read makes inner
	mu     sync.Mutex
	cause  error
	first  bool // c ended before its parent: inner is not to take the parent's cause
	inner  context.Context
	cancel context.CancelCauseFunc
}

func newRunCtx(parent context.Context, w *workerCtx) *runCtx {
	return &runCtx{parent: parent, w: w}
}

func (c *runCtx) Deadline() (time.Time, bool) { return c.parent.Deadline() }
func (c *runCtx) Done() <-chan struct{}       { return c.own().Done() }
func (c *runCtx) Err() error {
	if in := c.current(); in != nil {
		return in.Err()
	}
	return c.parent.Err()
}

func (c *runCtx) Value(key any) any {
	if key == (workerKey{}) {
		return c.w
	}
	if in := c.current(); in != nil {
		return in.Value(key) // for context.Cause, inner's cause
	}
	return c.parent.Value(key)
}

// current returns inner if it is made or must be: nil while the attempt
// runs and nobody has asked for Done.
func (c *runCtx) current() context.Context {
	if c.made.Load() {
		return c.inner
	}
	if c.ended.Load() {
		return c.own()
	}
	return nil
}

// own returns inner, making it if needed, ended with cause if c has ended.
func (c *runCtx) own() context.Context {
	if c.made.Load() {
		return c.inner
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inner == nil {
		parent := c.parent
		if c.first {
			parent = context.WithoutCancel(parent) // its values, and c's cause
		}
		c.inner, c.cancel = context.WithCancelCause(parent)
		if c.cause != nil {
			c.cancel(c.cause)
		}
		c.made.Store(true)
	}
	return c.inner
}

// end ends c with cause if it has not ended; nil, for a Func that
// returned, means context.Canceled. It lets inner go from its parent's
// children if inner is made, and leaves inner to be made by the next read
// if not: ending costs nothing until someone looks.
func (c *runCtx) end(cause error) {
	if cause == nil {
		cause = context.Canceled
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.cause != nil {
		return
	}
	c.cause = cause
	c.ended.Store(true)
	if c.cancel != nil {
		c.cancel(cause)
	} else {
		c.first = c.parent.Err() == nil
	}
}

// cancelRunning ends, with cause ErrClosed, the contexts of the requests
// the slots run, after Shutdown aborted. Each slot stores its request's
// runCtx before it checks abortCtx, so each is ended here or by its slot.
func (b *Balancer[Req, Res]) cancelRunning() {
	r := b.roster.Load()
	for _, w := range r.workers {
		for i := range w.runners {
			if c := w.runners[i].ctx.Load(); c != nil {
				c.end(ErrClosed)
			}
		}
	}
}

// now is the time since New on the monotonic clock, in ns, and never 0 (a
// runner's zero since means idle).
func (b *Balancer[Req, Res]) now() int64 {
	return int64(time.Since(b.epoch)) + 1
}

// noCancel is All's cancel when there is nothing to cancel. A
// package-level func, unlike a literal in a generic method, costs no
// allocation.
func noCancel() {}

// loop is the select loop. It owns the pool and runs until Close or
// Shutdown has begun and nothing is pending, blocking only in its select.
//
// Requests come two ways: Do's through the queue, a stack that callers
// push on and the loop takes whole, in batches (see enqueue and
// nextQueued), and Submit's, All's and commands through the unbuffered
// requests channel. While it cannot take requests (every worker is full,
// or it holds back) it leaves both alone, so Do's requests wait in the
// queue and the other callers in their hand-offs. When Close begins it
// refuses what is in the queue and in line, so that Do returns ErrClosed
// promptly (see refuseWaiting).
//
// Completions need not wake it: workers push them on a stack that costs
// them no wait and the loop no wake-up (see report), and the loop takes
// every completion before each dispatch, so each dispatch still sees
// current loads. It sleeps on completions when it needs them: when every
// worker is full or it holds back, while closing, and while a removed
// worker drains.
//
// While a worker has room, how it waits depends on how requests come.
// One at a time (loneRounds rounds in a row that each dispatched one),
// it parks on hand-offs alone, the cheapest wait there is. In bursts, it
// also sleeps on completions. A worker then wakes it before it answers
// its caller, and the runtime runs the caller first: the callers that were
// answered queue their next requests behind the loop, and the loop takes
// them in one round, so that a request costs fewer than three parks. A
// round that dispatches two requests or more counts as a burst.
func (b *Balancer[Req, Res]) loop() {
	defer close(b.exited)
	ready := b.ready()
	for !b.closing || b.pending > 0 {
		// With retries, a completion may bring a request back to
		// dispatch, and hedges have deadlines, so the loop always sleeps
		// on completions and the hedge timer too.
		if ready && b.draining == 0 && b.lone >= loneRounds && !b.spends {
			// Commands come through requests too (see command), and a
			// Do whose request may go unseen pokes there (see Do), so
			// a plain receive, much cheaper than a select, is enough.
			if b.hooks != nil && b.hooks.idle != nil {
				b.hooks.idle()
			}
			b.idle.Store(true)
			if w := b.nextQueued(); w != nil { // the last look
				b.idle.Store(false)
				b.takeQueued(w)
			} else {
				if b.hooks != nil && b.hooks.park != nil {
					b.hooks.park()
				}
				r := <-b.requests
				b.idle.Store(false)
				b.take(&r)
			}
		} else if b.sleep(ready) {
			var requests chan request[Req, Res]
			if ready {
				requests = b.requests
			}
			var nudge chan struct{}
			var expired, hedge <-chan time.Time
			if b.sched.held {
				nudge, expired = b.nudge, b.timer.C
			}
			if b.hedging != nil && b.hedging.armed != 0 {
				hedge = b.hedging.timer.C
			}
			if b.hooks != nil && b.hooks.park != nil {
				b.hooks.park()
			}
			select {
			case r := <-requests:
				b.take(&r)
			case <-b.wake: // a completion: drain takes it
			case c := <-b.cmds:
				b.takeCompletions()
				c.reply <- b.apply(c)
			case <-nudge: // one more caller waits: look again
			case <-expired:
				b.timing = false
				b.sched.expire()
			case <-hedge: // after drain, if it leaves room (see below)
				b.hedging.armed, b.hedging.fired = 0, true
			}
			b.sleeping.Store(false)
			b.idle.Store(false)
		}
		ready = b.drain()
		if h := b.hedging; h != nil {
			if h.armed != 0 { // busy, the loop may not reach its select for a while
				select {
				case <-h.timer.C:
					h.armed, h.fired = 0, true
				default:
				}
			}
			// Only once drain has dispatched every request waiting and
			// left room, or nobody waits: hedges take spare capacity
			// only.
			switch {
			case !h.fired && len(h.late) == 0:
			case ready || b.line == nil && b.waiting.Load()+b.queued.Load() == 0:
				b.hedgeDue()
				ready = b.ready()
			case h.fired:
				b.hedgeLater()
			}
		}
		if b.took > 1 { // a burst
			b.lone = 0
		} else if b.took == 1 && b.lone < loneRounds {
			b.lone++
		}
		b.took = 0
	}
	for _, w := range b.workers { // every worker but those removed, whose channels are closed
		if !w.removed {
			w.close()
		}
	}
	if b.hedging != nil {
		b.hedging.timer.Stop()
	}
}

// loneRounds is how many rounds in a row must each dispatch one request
// before the loop, while a worker has room, stops sleeping on completions
// (see loop). Rounds that dispatched none, woken by a completion or a
// command, do not count either way; TrySubmit's dispatch counts. More
// than one lets a burst survive a round that found a single caller
// queued.
const loneRounds = 8

// drainBatch bounds the requests drain takes between two selects, so that a
// steady stream of them cannot keep the loop from a command.
const drainBatch = 128

// drain dispatches requests that are already waiting, while there is room,
// with a single-channel poll and a look at the queue that cost much less
// than the select, and returns whether the loop may take more (see
// ready). It looks at the hand-offs first, so that a stream of Do calls
// cannot starve Submit.
func (b *Balancer[Req, Res]) drain() bool {
	for range drainBatch {
		b.takeCompletions()
		if len(b.again) > 0 {
			b.retryWaiting()
		}
		if !b.ready() {
			return false
		}
		select {
		case r := <-b.requests:
			b.take(&r)
			continue
		default:
		}
		w := b.nextQueued()
		if w == nil {
			return true
		}
		b.takeQueued(w)
	}
	b.takeCompletions()
	if len(b.again) > 0 {
		b.retryWaiting()
	}
	return b.ready()
}

// nextQueued returns the oldest request in line, or nil if there is none.
// When the line is empty, it takes the queue whole into it, oldest first.
func (b *Balancer[Req, Res]) nextQueued() *waiter[Req, Res] {
	if b.line == nil {
		if b.queue.Load() == nil {
			return nil
		}
		for w := b.queue.Swap(nil); w != nil; {
			next := w.next
			w.next = b.line
			b.line = w
			w = next
		}
	}
	w := b.line
	b.line = w.next
	return w
}

// refuseWaiting is the loop's refuseQueued, when Close begins: it also
// refuses the requests in line. Once is enough. Every request queued
// before Close closed quit is in the queue or in line by now, and a Do
// that queues after that sees quit closed and refuses the queue itself.
// The loop takes nothing from the queue while closing, so nothing goes
// into line again.
func (b *Balancer[Req, Res]) refuseWaiting() {
	for w := b.line; w != nil; w = b.line {
		b.line = w.next
		b.takeQueued(w) // closing: it refuses
	}
	b.refuseQueued()
}

// takeQueued dispatches w's request, taken from the queue, unless Close
// began (ErrClosed) or its caller is gone (Do returned ctx.Err()). Neither
// counts as accepted.
func (b *Balancer[Req, Res]) takeQueued(w *waiter[Req, Res]) {
	r := w.r // once r has its outcome, w may be reused
	b.queued.Add(-1)
	switch {
	case b.closing:
		r.deliver(&Result[Req, Res]{Req: r.req, Err: ErrClosed})
	case r.ctx.Err() != nil:
		r.deliver(&Result[Req, Res]{Req: r.req, Err: r.ctx.Err()})
	default:
		b.take(&r)
	}
}

// take dispatches a request, or carries out a command that came as one,
// or ignores a poke from Do.
func (b *Balancer[Req, Res]) take(r *request[Req, Res]) {
	b.takeCompletions()
	switch {
	case r.cmd != nil:
		r.cmd.reply <- b.apply(r.cmd)
	case r.ctx != nil:
		b.dispatch(r)
	}
}

// sleep prepares the loop to sleep on completions, and on requests too if
// ready, and reports whether it may: not if a completion came in the
// meantime, or, if ready, a request is queued. The loop sets sleeping
// (and idle) before it looks at the stack (and the queue) a last time,
// and a worker (or Do) reads them after it pushed, so either the loop sees
// the push or it gets a wake (or a poke).
func (b *Balancer[Req, Res]) sleep(ready bool) bool {
	if b.hooks != nil && b.hooks.sleep != nil {
		b.hooks.sleep()
	}
	if ready {
		b.idle.Store(true)
	}
	b.sleeping.Store(true)
	if b.finished.Load() != nil || ready && (b.line != nil || b.queue.Load() != nil) {
		b.sleeping.Store(false)
		b.idle.Store(false)
		return false
	}
	return true
}

// takeCompletions records every completion the workers have reported.
func (b *Balancer[Req, Res]) takeCompletions() {
	if b.finished.Load() == nil {
		return
	}
	for w := b.finished.Swap(nil); w != nil; {
		next := w.next // w may be pushed again once its count is taken
		for n := w.untaken.Swap(0); n > 0; n-- {
			b.complete(w)
		}
		w = next
	}
	// A slot hands a request back before it reports the completion, so
	// every retry whose completion was just taken is on the stack now.
	if b.attempts > 1 && b.retried.Load() != nil {
		b.takeRetries()
	}
}

// takeRetries takes the requests handed back to be tried again: each is
// pending again, and waits in again for drain to send it to a worker it
// has not tried (see tryAgain). Not sent here: takeCompletions runs
// between the loop's check for room and its dispatch, which the room is
// for.
func (b *Balancer[Req, Res]) takeRetries() {
	for a := b.retried.Swap(nil); a != nil; {
		next := a.next
		a.next = nil
		b.pending++
		b.again = append(b.again, a)
		a = next
	}
}

// retryWaiting tries again every retry that waits, in the order they came.
func (b *Balancer[Req, Res]) retryWaiting() {
	kept := b.again[:0]
	for _, a := range b.again {
		if !b.tryAgain(a) {
			kept = append(kept, a)
		}
	}
	clear(b.again[len(kept):])
	b.again = kept
}

// tryAgain sends a's request to the least-loaded worker it has not run
// on, within the retry budget, or gives it its final outcome, and reports
// whether it did either; if not, the request waits for such a worker to
// have room.
func (b *Balancer[Req, Res]) tryAgain(f *flight[Req, Res]) bool {
	res := f.last
	switch err := f.r.ctx.Err(); {
	case b.closing:
	case err != nil:
		res.Value, res.Err = *new(Res), err
	default:
		w, any := b.sched.untried(f.tried)
		switch {
		case w == nil && any && !f.r.eager:
			return false
		case w == nil:
		case !b.budget.allow(b.now()):
			b.refusals.Add(1)
		default:
			b.retries.Add(1)
			b.budget.spend()
			f.state.Add(flightLive)
			b.sched.dispatchTo(w)
			b.send(w, b.attempt(f, w))
			return true
		}
	}
	b.pending--
	f.r.deliver(&res)
	return true
}

// attempt counts f's next attempt, copy 0, which the loop is sending to w
// (with WithHedge, giving it a hedge deadline), and returns its request:
// the request as first sent, not a probe, its wait at w to be timed by
// send.
func (b *Balancer[Req, Res]) attempt(f *flight[Req, Res], w *worker[Req, Res]) request[Req, Res] {
	r := f.r
	r.probe, r.at, r.hedge = false, 0, false
	f.tried = append(f.tried, w.id)
	f.sends++
	if h := b.hedging; h != nil {
		now := b.now()
		f.sentAt[0] = now
		if !f.hedged {
			h.expect(f, now, b.hedgeWins.Load(), b.sched.slowness(w))
		}
	}
	return r
}

// report tells the loop that a slot of w finished a request, without a
// channel: the first completion the loop has not taken pushes w on the
// finished stack, later ones only count, and the loop is woken only if it
// sleeps. w's slots call it concurrently.
func (b *Balancer[Req, Res]) report(w *worker[Req, Res]) {
	if b.hooks != nil && b.hooks.report != nil {
		b.hooks.report()
	}
	if w.untaken.Add(1) > 1 {
		return // w is on the stack, or the loop is taking it and will read the count after
	}
	for {
		top := b.finished.Load()
		w.next = top
		if b.finished.CompareAndSwap(top, w) {
			break
		}
	}
	if b.sleeping.Load() {
		select {
		case b.wake <- struct{}{}:
		default: // a wake is pending already
		}
	}
}

// ready reports whether the loop should take the next request: it is not
// closing, some worker has room, and it need not hold back.
func (b *Balancer[Req, Res]) ready() bool {
	return !b.closing && b.sched.hasRoom() && !b.holdBack()
}

// holdBack reports whether the loop holds the next request back for a
// busy worker (see sched.holds), and keeps holding (read by submit),
// timer and the scheduler's held in step.
func (b *Balancer[Req, Res]) holdBack() bool {
	s := &b.sched
	hold, waiting := false, int64(0)
	if s.mayHold() {
		b.holding.Store(true) // before reading waiting: see submit
		waiting = b.waiting.Load() + b.queued.Load()
		hold = s.holds(waiting)
	}
	if !hold && (s.held || s.busy > 0) {
		b.holding.Store(false)
	}
	s.held = hold
	switch {
	case hold && waiting > 0 && !b.timing:
		b.timer.Reset(s.holdFor())
		b.timing = true
	case !hold && b.timing:
		b.timer.Stop()
		b.timing = false
	}
	return hold
}

// dispatch queues r on the least-loaded worker, which has room.
func (b *Balancer[Req, Res]) dispatch(r *request[Req, Res]) {
	b.took++
	w, probe := b.sched.dispatch()
	r.probe = probe
	b.pending++
	// Counted before the send, so Stats never sees a request complete
	// before it was accepted.
	b.accepted.Add(1)
	if b.spends {
		b.budget.deposit(b.sched.now)
	}
	if w.pending > w.concurrency && r.at == 0 { // as send does
		r.at = b.now() // it waits in w's queue for a slot
	}
	w.assigned.Add(1)
	if b.hedging != nil {
		*r = b.fly(*r, w)
	}
	if b.hooks != nil && b.hooks.send != nil {
		b.hooks.send()
	}
	w.reqs <- *r // cannot block: pending was below limit = cap(w.reqs)
	// grow's test, without its call
	if w.pending > w.started && w.started < w.concurrency {
		w.grow()
	}
}

// send hands r, a retry, to w, which the scheduler has counted it at, as
// dispatch does (written out there, where a call costs).
func (b *Balancer[Req, Res]) send(w *worker[Req, Res], r request[Req, Res]) {
	if w.pending > w.concurrency && r.at == 0 {
		r.at = b.now() // it waits in w's queue for a slot
	}
	w.assigned.Add(1)
	if b.hooks != nil && b.hooks.send != nil {
		b.hooks.send()
	}
	w.reqs <- r                                             // cannot block, as in dispatch
	if w.pending > w.started && w.started < w.concurrency { // as dispatch does
		w.grow()
	}
}

// complete records that w finished a request.
func (b *Balancer[Req, Res]) complete(w *worker[Req, Res]) {
	b.sched.complete(w)
	b.pending--
	if w.removed && w.pending == 0 {
		b.retire(w)
	}
}

// apply carries out a command.
func (b *Balancer[Req, Res]) apply(c *command[Req, Res]) commandReply {
	switch {
	case c.op == opQuit:
		b.closing = true
		b.refuseWaiting()
		return commandReply{}
	case c.op == opAbort:
		b.dropQueued()
		return commandReply{}
	case b.closing:
		return commandReply{err: ErrClosed}
	case c.op == opAdd:
		return commandReply{id: b.addWorker(c.fn, c.wo)}
	case c.op == opTry:
		ok := b.sched.hasRoom()
		if ok {
			b.dispatch(&c.req)
		}
		return commandReply{ok: ok}
	}
	w, ok := b.workers[c.id]
	if !ok || w.removed {
		return commandReply{err: fmt.Errorf("%w: %d", ErrUnknownWorker, c.id)}
	}
	b.sched.remove(w)
	w.removed = true
	w.gone.Store(true)
	w.close() // the loop is its only sender and will not send again; queued requests still drain
	b.draining++
	if w.pending == 0 {
		b.retire(w)
	}
	return commandReply{exited: w.exited, retired: w.retired}
}

// addWorker creates and starts a worker. New calls it before the loop
// starts; after that only the loop does.
func (b *Balancer[Req, Res]) addWorker(fn Func[Req, Res], o workerOptions) int {
	w := newWorker(b, b.nextID, fn, o)
	b.nextID++
	b.workers[w.id] = w
	b.sched.add(w)
	r := b.roster.Load()
	next := *r
	next.workers = append(r.workers, w) // past every published length: see roster
	b.roster.Store(&next)
	return w.id
}

// retire forgets a removed worker that has nothing pending, folding its
// final counters into the roster's totals in the same step so that Stats
// never counts them twice or not at all.
func (b *Balancer[Req, Res]) retire(w *worker[Req, Res]) {
	delete(b.workers, w.id)
	b.draining--
	close(w.retired)
	r := b.roster.Load()
	next := &roster[Req, Res]{workers: r.workers, retired: r.retired.plus(w.counts()), gen: r.gen + 1, dead: r.dead + 1}
	w.retiredAt.Store(next.gen) // before next is published: a reader of r still counts w
	if next.dead > len(next.workers)/2 {
		live := make([]*worker[Req, Res], 0, len(next.workers)-next.dead)
		for _, v := range next.workers {
			if next.holds(v) {
				live = append(live, v)
			}
		}
		next.workers, next.dead = live, 0
	}
	b.roster.Store(next)
}

// dropQueued gives every request still queued at a worker the outcome
// ErrClosed, after Shutdown gave up waiting. Workers may be taking requests
// from their queues at the same time; each request is received once, so it
// gets one outcome either way. It visits every worker, but only once.
func (b *Balancer[Req, Res]) dropQueued() {
	var dropped counts
	for _, w := range b.workers {
		b.sched.uncountBusy(w) // it may lose queued requests; closing, it never counts again
		for len(w.reqs) > 0 {
			select {
			case r, ok := <-w.reqs:
				if !ok {
					break // closed by RemoveWorker, and the worker took the rest
				}
				res := Result[Req, Res]{Req: r.req, Err: ErrClosed, Worker: w.id}
				v := deliver
				if r.fl != nil {
					v, res.Attempts = r.fl.end(false, false, b.attempts)
				}
				if v == deliver {
					r.deliver(&res)
				}
				dropped.completed++
				dropped.failed++
				w.pending--
				b.pending--
				w.assigned.Add(-1) // it will never complete at the worker
			default:
			}
		}
		if w.removed && w.pending == 0 {
			b.retire(w)
		}
	}
	b.sched.refresh()
	r := b.roster.Load()
	next := *r
	next.retired = r.retired.plus(dropped)
	b.roster.Store(&next)
}

// budget is WithRetryBudget's account: the requests accepted and the
// extra attempts, in slots of 100 ms. The loop owns it.
type budget struct {
	ratio, perSecond float64
	reqs, extra      [budgetRing]float64
	at               int64 // the slot of the latest figures, in 100 ms since New
}

// The budget's slots: a window of 10 s is budgetWindow slots. The ring
// keeps one slot more than a window, so that the extra attempts are
// counted over every slot a window of that length can overlap.
const (
	budgetSlot   = int64(100 * time.Millisecond)
	budgetWindow = 100
	budgetRing   = budgetWindow + 1
)

// roll moves the account to now, a clock reading, clearing the slots
// that fell out of the ring.
func (g *budget) roll(now int64) {
	slot := now / budgetSlot
	if slot-g.at >= budgetRing {
		g.reqs, g.extra, g.at = [budgetRing]float64{}, [budgetRing]float64{}, slot
	}
	for g.at < slot {
		g.at++
		g.reqs[g.at%budgetRing], g.extra[g.at%budgetRing] = 0, 0
	}
}

// deposit counts one request accepted at about now.
func (g *budget) deposit(now int64) {
	g.roll(now)
	g.reqs[g.at%budgetRing]++
}

// allow reports whether one more extra attempt at now stays within the
// budget over the last 10 s and over the last second: the extra attempts
// of every slot a window overlaps (one more than it covers), the requests
// of the slots it covers, and for the last second of its last 9 only,
// which keeps the noise of arrivals from carrying a second of real time
// over its share (measured: 18.5–18.9 % + 10/s in the fault table's
// outage row, against 20.8 % counting all 10).
func (g *budget) allow(now int64) bool {
	g.roll(now)
	second := int64(time.Second) / budgetSlot
	var reqs, extra, reqs1, extra1 float64
	for k := range int64(budgetRing) {
		i := ((g.at-k)%budgetRing + budgetRing) % budgetRing // slots before New are empty
		if k < budgetWindow {
			reqs += g.reqs[i]
		}
		extra += g.extra[i]
		if k < second-1 {
			reqs1 += g.reqs[i]
		}
		if k <= second {
			extra1 += g.extra[i]
		}
	}
	return extra+1 <= g.ratio*reqs+g.perSecond*float64(budgetWindow*budgetSlot)/float64(time.Second) &&
		extra1+1 <= g.ratio*reqs1+g.perSecond
}

// spend counts one extra attempt, in the slot allow just moved to.
func (g *budget) spend() { g.extra[g.at%budgetRing]++ }

// fly gives r, which the loop is sending to w with WithHedge, its flight
// and its hedge deadline.
func (b *Balancer[Req, Res]) fly(r request[Req, Res], w *worker[Req, Res]) request[Req, Res] {
	f := &flight[Req, Res]{}
	f.state.Store(flightLive)
	f.tried = f.buf[:0]
	r.fl = f
	f.r = r
	b.attempt(f, w) // counts this first attempt; r itself keeps its probe and its wait
	return r
}

// hedger is WithHedge's: the window of successful attempts' times and the
// hedge deadlines of the attempts in flight.
type hedger[Req, Res any] struct {
	quantile float64
	minDelay int64
	// The window: the times of the latest successes, each at
	// samples[i%hedgeWindow], i counted by count. The slots write it
	// (see record).
	samples [hedgeWindow]atomic.Int64
	count   atomic.Uint64
	// The loop's.
	delay   int64   // the hedge delay, in ns; 0 before hedgeMinSamples successes
	tail    int64   // the delay while hedges do not pay (see pays)
	counted uint64  // count when delay was computed
	scratch []int64 // delay's computation's, kept
	// due is a queue, from head, of the deadlines in the order set, which is
	// the order of their times but for a change of delay; slow holds, in
	// the order of their times, those of attempts at slow workers, which
	// are few and come due later than those set after them (see expect).
	due      []deadline[Req, Res]
	head     int
	slow     []deadline[Req, Res]
	slowKept int                  // len(slow) when prune last dropped what is settled
	late     []deadline[Req, Res] // past due, waiting for spare capacity (see hedgeDue)
	kept     int                  // len(late) when it last dropped what is settled
	pruned   int                  // len(due) when it last did (see prune)
	maxSends int                  // attempts a request may be sent: WithRetry's, at least 2
	fired    bool                 // timer fired: some deadline may have passed
	// Whether hedges pay: won[i%hedgeJudged] is b.hedgeWins as the loop
	// sent hedge number i, and sent counts them.
	won   [hedgeJudged]uint64
	sent  uint64
	timer *time.Timer
	armed int64 // what timer is set for, 0 if not set
}

// A deadline is when f's attempt number sends is to be hedged, in b.now()'s
// time.
type deadline[Req, Res any] struct {
	at    int64
	f     *flight[Req, Res]
	sends int
}

// The window's size, the successes before the first hedge, and how many
// new successes make the loop compute the delay again. Hedges pay while at
// least hedgeJudged/hedgePaid of the latest hedgeJudged won; while they do
// not, the delay is the window's hedgeTail quantile.
const (
	hedgeWindow     = 1024
	hedgeMinSamples = 100
	hedgeEvery      = 64
	hedgeJudged     = 32
	hedgePaid       = 8
	hedgeTail       = 0.999
)

func newHedger[Req, Res any](o hedgeOption, attempts int) *hedger[Req, Res] {
	h := &hedger[Req, Res]{quantile: o.quantile, minDelay: int64(o.minDelay), maxSends: max(attempts, 2), timer: time.NewTimer(time.Hour)}
	h.timer.Stop()
	return h
}

// record adds the time at of a successful attempt to the window.
func (h *hedger[Req, Res]) record(at int64) {
	i := h.count.Add(1) - 1
	h.samples[i%hedgeWindow].Store(max(at, 1)) // 0 is a place not yet written
}

// expect sets the hedge deadline of f's latest attempt, sent at now to a
// worker of the given slowness (see sched.slowness), if the window is
// ready, computing the delay again if it has enough new successes; won is
// b.hedgeWins. The deadline is the delay times the slowness from now.
func (h *hedger[Req, Res]) expect(f *flight[Req, Res], now int64, won uint64, slowness float64) {
	if n := h.count.Load(); n >= hedgeMinSamples && n-h.counted >= hedgeEvery {
		h.reckon(n)
	}
	if h.delay == 0 {
		return
	}
	delay := h.delay
	if !h.pays(won) {
		delay = h.tail
	}
	h.prune()
	if slowness == 1 {
		h.due = append(h.due, deadline[Req, Res]{now + delay, f, f.sends})
	} else {
		d := deadline[Req, Res]{now + int64(float64(delay)*slowness), f, f.sends}
		i := len(h.slow)
		for i > 0 && h.slow[i-1].at > d.at {
			i--
		}
		h.slow = slices.Insert(h.slow, i, d)
	}
	h.arm(now)
}

// pays reports whether hedges pay, won being b.hedgeWins: whether at
// least 1 in hedgePaid of the latest hedgeJudged hedges won, or fewer were
// sent. A copy of a request that is merely big cannot win: it takes as
// long, from later. So where slow attempts are big requests, hedges stop
// paying and wait for the tail, and a hedge that wins there (a stalled
// worker's request) brings them back.
func (h *hedger[Req, Res]) pays(won uint64) bool {
	return h.sent < hedgeJudged || won-h.won[h.sent%hedgeJudged] >= hedgeJudged/hedgePaid
}

// sending counts a hedge the loop sends, won being b.hedgeWins.
func (h *hedger[Req, Res]) sending(won uint64) {
	h.won[h.sent%hedgeJudged] = won
	h.sent++
}

// prune drops settled deadlines from due before their time: those at its
// head, which are most, since requests mostly end in the order they were
// sent, and all of them once due has doubled since it last did (amortised
// O(1) a deadline). So due holds about the attempts in flight, not every
// attempt of the last delay, and keeps no finished request alive; slow
// drops what is settled once it has doubled too.
func (h *hedger[Req, Res]) prune() {
	for h.head < len(h.due) && h.settled(h.due[h.head]) {
		h.due[h.head] = deadline[Req, Res]{}
		h.head++
	}
	if len(h.due)-h.head >= 2*h.pruned+64 {
		rest := slices.DeleteFunc(h.due[h.head:], h.settled)
		n := copy(h.due, rest)
		clear(h.due[n:])
		h.due, h.head = h.due[:n], 0
		h.pruned = n
	}
	if len(h.slow) >= 2*h.slowKept+16 {
		h.slow = slices.DeleteFunc(h.slow, h.settled)
		h.slowKept = len(h.slow)
	}
	h.compact()
}

// first returns the earlier of due's head and slow's first, and whether
// it is due's; ok is false if both are empty.
func (h *hedger[Req, Res]) first() (d deadline[Req, Res], inDue, ok bool) {
	switch {
	case h.head < len(h.due) && (len(h.slow) == 0 || h.due[h.head].at <= h.slow[0].at):
		return h.due[h.head], true, true
	case len(h.slow) > 0:
		return h.slow[0], false, true
	}
	return deadline[Req, Res]{}, false, false
}

// pop removes and returns the first deadline that has passed at now, of
// due's and slow's, if one has.
func (h *hedger[Req, Res]) pop(now int64) (deadline[Req, Res], bool) {
	d, inDue, ok := h.first()
	if !ok || d.at >= now {
		return deadline[Req, Res]{}, false
	}
	if inDue {
		h.due[h.head] = deadline[Req, Res]{} // keep no flight alive
		h.head++
	} else {
		n := copy(h.slow, h.slow[1:])
		h.slow[n] = deadline[Req, Res]{}
		h.slow = h.slow[:n]
	}
	return d, true
}

// reckon computes the delay from the window, which has n successes: the
// quantile of the times it holds, at least minDelay.
func (h *hedger[Req, Res]) reckon(n uint64) {
	h.counted = n
	m := int(min(n, hedgeWindow))
	h.scratch = h.scratch[:0]
	for i := range m {
		if v := h.samples[i].Load(); v != 0 {
			h.scratch = append(h.scratch, v)
		}
	}
	if len(h.scratch) == 0 {
		return
	}
	k := int(h.quantile * float64(len(h.scratch)-1))
	h.delay = max(nth(h.scratch, k), h.minDelay, 1)
	// nth left the larger times after k.
	t := int(max(h.quantile, hedgeTail) * float64(len(h.scratch)-1))
	h.tail = max(nth(h.scratch[k:], t-k), h.delay)
}

// nth returns the k-th smallest of xs, reordering them: quickselect.
func nth(xs []int64, k int) int64 {
	lo, hi := 0, len(xs)-1
	for lo < hi {
		p := xs[lo+(hi-lo)/2]
		i, j := lo, hi
		for i <= j {
			for xs[i] < p {
				i++
			}
			for xs[j] > p {
				j--
			}
			if i <= j {
				xs[i], xs[j] = xs[j], xs[i]
				i++
				j--
			}
		}
		switch {
		case k <= j:
			hi = j
		case k >= i:
			lo = i
		default:
			return xs[k]
		}
	}
	return xs[k]
}

// arm sets the timer for the first deadline, if it is not set for one
// before it.
func (h *hedger[Req, Res]) arm(now int64) {
	d, _, ok := h.first()
	if !ok {
		return
	}
	at := d.at
	if h.armed != 0 && h.armed <= at {
		return
	}
	h.timer.Reset(time.Duration(at - now + 1)) // past it: longer than the delay
	h.armed = at
}

// hedgeDue hedges, while there is spare capacity, the attempts whose
// hedge had to wait for some, oldest first, and then each whose deadline
// has passed (see hedge); those left wait in late. Then it sets the timer
// for the next deadline. The loop calls it when no request waits.
func (b *Balancer[Req, Res]) hedgeDue() {
	h := b.hedging
	h.fired = false
	now := b.now()
	spare := true
	kept := h.late[:0]
	for _, d := range h.late {
		if !spare || !b.hedge(d, now) {
			spare = false // the rest would find none either
			kept = append(kept, d)
		}
	}
	clear(h.late[len(kept):])
	h.late = kept
	for d, ok := h.pop(now); ok; d, ok = h.pop(now) {
		if !spare || !b.hedge(d, now) {
			spare = false
			h.late = append(h.late, d)
		}
	}
	h.compact()
	h.kept = len(h.late)
	h.arm(now)
}

// settled reports whether d's attempt needs no hedge any more: the loop
// is closing, or its outcome is decided, no attempt is live, a later
// attempt was sent, it had its hedge, or it may not run again (sends, not
// runs: one may not have started).
func (b *Balancer[Req, Res]) settled(d deadline[Req, Res]) bool {
	return b.closing || b.hedging.settled(d)
}

// settled is Balancer.settled but for the loop's closing.
func (h *hedger[Req, Res]) settled(d deadline[Req, Res]) bool {
	f := d.f
	s := f.state.Load()
	return s&flightDone != 0 || s&flightLives == 0 || d.sends != f.sends || f.hedged || f.sends >= h.maxSends
}

// hedgeLater is hedgeDue when callers wait: the deadlines that passed wait
// in late, and late drops what is settled, once it has doubled since it
// last did (amortised O(1) a deadline), so that neither grows beyond the
// attempts in flight however long callers wait.
func (b *Balancer[Req, Res]) hedgeLater() {
	h := b.hedging
	h.fired = false
	now := b.now()
	for d, ok := h.pop(now); ok; d, ok = h.pop(now) {
		if !b.settled(d) {
			h.late = append(h.late, d)
		}
	}
	h.compact()
	if len(h.late) >= 2*h.kept+16 {
		h.late = slices.DeleteFunc(h.late, b.settled)
		h.kept = len(h.late)
	}
	h.arm(now)
}

// compact drops the deadlines before head from due.
func (h *hedger[Req, Res]) compact() {
	if h.head > len(h.due)/2 { // keep the queue from growing without end
		n := copy(h.due, h.due[h.head:])
		clear(h.due[n:])
		h.due, h.head = h.due[:n], 0
	}
}

// hedge sends a copy of the request of d, whose deadline passed, to the
// least-loaded worker it was not sent to that has a free slot, if the
// attempt is still its latest and live, it has no hedge yet and may run
// again, the loop is not closing and the budget allows; it reports
// whether d is settled: false if the hedge must wait for spare capacity,
// because retries wait for some or no such worker has a free slot.
func (b *Balancer[Req, Res]) hedge(d deadline[Req, Res], now int64) bool {
	if b.settled(d) {
		return true
	}
	f := d.f
	if b.line != nil || len(b.again) > 0 {
		return false
	}
	w := b.sched.spare(f.tried)
	if w == nil {
		return false
	}
	if !b.budget.allow(now) {
		b.refusals.Add(1)
		return true
	}
	f.sentAt[1], f.delay = now, now-f.sentAt[0]
	if !f.join() { // its outcome was decided meanwhile, or it is being handed back
		return true
	}
	f.hedged = true
	f.tried = append(f.tried, w.id)
	b.budget.spend()
	b.hedges.Add(1)
	b.hedging.sending(b.hedgeWins.Load())
	b.pending++
	b.sched.dispatchTo(w)
	r := f.r
	r.probe, r.at, r.hedge = false, 0, true
	b.send(w, r)
	return true
}
