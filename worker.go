package balancer

import (
	"context"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// request is one accepted call on its way to, or waiting at, a worker.
type request[Req, Res any] struct {
	ctx   context.Context
	req   Req
	reply chan<- Result[Req, Res]  // capacity 1 and sent to once, so the send never blocks
	keep  bool                     // reply is Do's pooled channel: leave it open for reuse
	probe bool                     // the request is its ejected worker's probe (see sched.eject)
	eager bool                     // it came through TrySubmit: a retry of it never waits for room
	hedge bool                     // it is its flight's hedge: a copy sent while another attempt runs (see WithHedge)
	fl    *flight[Req, Res]        // what its attempts share, if it may have more than one at a time or has had one
	cmd   *command[Req, Res]       // not a request but a command for the loop (see Balancer.command)
	at    int64                    // b.now() when it started to wait for a slot; 0 if it has not waited
	batch chan<- indexed[Req, Res] // instead of reply, for All: shared, with room for every request in flight
	index int                      // r's place in its batch
}

// indexed is an outcome on its way to All, with its request's place.
type indexed[Req, Res any] struct {
	i   int
	res Result[Req, Res]
}

// deliver sends r's one outcome. Whoever ends a request (its worker, or the
// loop when Shutdown gives up) is the reply channel's only sender.
func (r *request[Req, Res]) deliver(res *Result[Req, Res]) {
	if r.batch != nil {
		r.batch <- indexed[Req, Res]{r.index, *res}
		return
	}
	r.reply <- *res
	if !r.keep {
		close(r.reply)
	}
}

// runner is what others may read of one slot of a worker.
type runner struct {
	since atomic.Int64           // b.now() when the request it runs started; 0 while idle
	ctx   atomic.Pointer[runCtx] // the runCtx of the request it runs, if it has one, for Shutdown to end (see runContext)
	// values is the slot's own: the valuesCtx of the latest request it ran
	// with one, for the next with the same context (see runContext). It
	// keeps that context's values alive until the slot's next such request.
	values *valuesCtx
}

// worker serves requests from its queue on concurrency goroutines, its
// slots, each taking the next request in the order the loop queued them.
type worker[Req, Res any] struct {
	b   *Balancer[Req, Res]
	id  int
	fn  Func[Req, Res]
	ctx workerCtx // the context of its requests that come with context.Background (see runContext)
	// Set at creation and only read after.
	concurrency int
	limit       int // concurrency × depth: the most requests it may hold
	weight      float64

	// reqs is sent to and closed only by the loop. Its capacity is limit
	// and the loop never lets pending exceed it, so a send never blocks:
	// the channel holds at most pending requests.
	reqs chan request[Req, Res]
	// exited is closed when the last of the worker's goroutines ends.
	exited chan struct{}
	// retired is closed by the loop once a removed worker has nothing
	// pending and Stats counts it in the totals.
	retired chan struct{}
	// live counts the slots' goroutines that have not ended; the last to
	// end closes exited. started counts the goroutines the loop started
	// (see grow); the loop owns it.
	live    atomic.Int64
	started int
	// untaken counts the completions the loop has not taken; next links
	// w in b.finished while it is there, written by the slot that pushes
	// it (see report).
	untaken atomic.Int64
	next    *worker[Req, Res]

	// Owned by the loop.
	pending int     // requests queued or running, as of the completions taken
	unit    float64 // 1/(concurrency × weight): a request's share of the cost without the load estimate
	handle  int     // the pool's name for it while it is in the heap
	rate    float64 // concurrency / mean service time while counted in the scheduler's busyRate, else 0
	silent  int     // requests dispatched to it since it last completed one (see freshen)
	removed bool
	// key's cache: the step of the scale for expected times in [keyLo,
	// keyHi), with the common ground at keyRef.
	keyRef, keyLo, keyHi, key float64
	lastKey                   float64 // the step its last cost was computed with (see dispatch)
	mult                      float64 // its failure penalty when its cost was last computed (see costAt)
	impatience                int     // the loop's patience with its estimate doubled this many times (see stale)
	lapsed                    bool    // its estimate had expired when its cost was last computed (see expect)
	probing                   bool    // it was given a request because its estimate had expired
	probeSeen                 int64   // seen when that probe was dispatched
	inLine                    int     // completions in a row with an estimate in line with its prior (see trusted)
	// Ejection (see sched.eject): out of the heap until until, then
	// given one probe (trial); inRow counts its ejections in a row, back
	// is when it last returned.
	ejected, trial bool
	doomed         bool // in sched.doomed
	until, back    int64
	inRow          int

	// runners[i] describes slot i to the other goroutines; the slot's
	// goroutine writes it.
	runners []runner

	// Written by their single owner, read by Stats.
	assigned  atomic.Int64  // requests the loop gave it and did not take back; the loop writes it
	gone      atomic.Bool   // stored by the loop on RemoveWorker
	completed atomic.Uint64 // outcomes this worker delivered; its slots write the rest
	running   atomic.Int64  // requests a slot has taken and not finished
	service   atomic.Int64  // moving average of the Func's run time, in ns; 0 before the first
	probeRun  atomic.Int64  // the latest run after its estimate expired (a probe's), in ns; its slots write it
	wait      atomic.Int64  // moving average of the waits of the requests it started, in ns
	waited    atomic.Int64  // the sum of those waits, in ns
	failed    atomic.Uint64
	panics    atomic.Uint64
	ejections atomic.Uint64 // written by the loop
	ranAgain  atomic.Uint64 // attempts it took that another worker had run before (see WithRetry)
	hedges    atomic.Uint64 // hedges it took: copies of requests another worker was running (see WithHedge)
	retiredAt atomic.Uint64 // the generation of the roster that retired it; 0 before (see roster)
	outUntil  atomic.Int64  // while ejected, when its ejection ends; 0 in service; the loop writes it
	onTrial   atomic.Bool   // its probe is out; the loop writes it

	// With WithHedge, the run time and end of its latest attempt that lost
	// to its hedge after the hedge delay, since it last ended an attempt
	// that counts; lostAge is 0 if none (see sched.lost). Its slots write
	// them.
	lostAge, lostAt atomic.Int64

	// Its health, written by its slots (see account), read by the loop.
	streak     atomic.Int64  // Failures in a row
	health     atomic.Uint64 // the failure rate and when it moved (see foldHealth)
	probeClass atomic.Uint32 // 1 + the Class of its probe's outcome, 0 before

	// The rest of the estimate: written by its slots (see observe), read
	// by the loop.
	seen        atomic.Int64 // b.now() when the latest run folded into service ended
	level       atomic.Int64 // a calmer moving average of the same runs, for the scale (see levelRise)
	observed    atomic.Int64 // runs folded into service, counted up to fallSmoothing
	provisional atomic.Bool  // service is the first run's, capped (see observe)
	early       sync.Mutex   // orders the observations off observe's common path
}

func newWorker[Req, Res any](b *Balancer[Req, Res], id int, fn Func[Req, Res], o workerOptions) *worker[Req, Res] {
	limit := o.concurrency * b.depth
	return &worker[Req, Res]{
		b:           b,
		id:          id,
		fn:          fn,
		ctx:         workerCtx{abort: b.abortCtx, id: id},
		concurrency: o.concurrency,
		limit:       limit,
		weight:      o.weight,
		reqs:        make(chan request[Req, Res], limit),
		exited:      make(chan struct{}),
		retired:     make(chan struct{}),
		unit:        1 / (float64(o.concurrency) * o.weight),
		mult:        1,
		runners:     make([]runner, o.concurrency),
	}
}

// grow starts one more slot goroutine for w, which the loop has just
// given a request, when w has more requests pending than goroutines to
// serve them and fewer goroutines than its concurrency: the loop tests
// that before the call, which the hot path cannot afford. So a worker has
// no more goroutines than the most requests it ever had pending, as the
// loop counts them, and keeps those it started: a declared concurrency
// costs goroutines only when the load uses it.
func (w *worker[Req, Res]) grow() {
	w.live.Add(1)
	w.b.wg.Add(1)
	go w.run(w.started)
	w.started++
}

// close closes w's queue, which the loop alone sends to; the goroutines
// drain it and end, and the last closes exited, or close does if w never
// started one. The loop calls it.
func (w *worker[Req, Res]) close() {
	close(w.reqs)
	if w.started == 0 {
		close(w.exited)
	}
}

// task is the request a slot's goroutine serves and its outcome so far,
// kept in run's frame, where rescue finds them if the Func does not
// return.
type task[Req, Res any] struct {
	r   request[Req, Res]
	res Result[Req, Res]
	// calling is set while the Func or the classifier runs (see call): a
	// panic then, or runtime.Goexit, is the request's outcome.
	calling bool
}

// run serves requests on slot i until the loop closes reqs. The caller has
// done b.wg.Add(1) for it, and counted it in live.
func (w *worker[Req, Res]) run(i int) {
	defer w.b.wg.Done()
	id := goid()
	w.b.slots.Store(id, struct{}{}) // so that Close can tell when a Func calls it
	defer w.b.slots.Delete(id)
	var t task[Req, Res]
	// One deferred rescue for the goroutine's life, not one per request:
	// a defer per call cost about 40 instructions a request (callgrind).
	defer w.rescue(i, &t)
	for t.r = range w.reqs {
		w.serve(i, &t)
		t = task[Req, Res]{} // keep no request or result alive while idle
	}
	if w.live.Add(-1) == 0 {
		close(w.exited)
	}
}

// rescue runs when slot i's goroutine ends. If the Func or the classifier
// of t's request panicked or called runtime.Goexit, the goroutine cannot
// go on serving: rescue makes the request's outcome a *PanicError or
// ErrGoexit, a Failure, delivers it and frees the slot, and starts a
// replacement goroutine for the slot, which takes over this one's count
// in live. A panic anywhere else is this package's bug and goes on.
func (w *worker[Req, Res]) rescue(i int, t *task[Req, Res]) {
	if !t.calling {
		return
	}
	t.calling = false
	w.endRun(i, w.runners[i].ctx.Load())
	if v := recover(); v != nil {
		w.panics.Add(1)
		t.res.Value, t.res.Err = *new(Res), &PanicError{Value: v, Stack: debug.Stack()}
	} else {
		t.res.Value, t.res.Err = *new(Res), ErrGoexit
	}
	w.finish(i, &t.r, &t.res, Failure)
	w.b.wg.Add(1) // this goroutine's deferred Done follows; the count stays positive
	go w.run(i)
}

// endRun ends rc, the context of the request that slot i ran, if it had
// one, and clears the runner, so that no request's context is kept alive.
func (w *worker[Req, Res]) endRun(i int, rc *runCtx) {
	if rc != nil {
		rc.end(nil)
		w.runners[i].ctx.Store(nil)
	}
}

// serve delivers exactly one outcome for t's request and then reports the
// freed slot.
func (w *worker[Req, Res]) serve(slot int, t *task[Req, Res]) {
	r, res := &t.r, &t.res
	w.running.Add(1)
	start := w.b.now()
	var wait time.Duration
	if r.at != 0 {
		wait = time.Duration(start - r.at)
	}
	observeWait(w, wait)
	*res = Result[Req, Res]{Req: r.req, Worker: w.id}
	class := Ignore // not run: the outcome says nothing about the worker
	switch {
	case w.b.aborted.Load():
		res.Err = ErrClosed // Shutdown gave up waiting before r started
	case r.ctx.Err() != nil:
		res.Err = r.ctx.Err() // its caller no longer wants it
	case r.fl == nil:
		res.Attempts = 1
		class = w.call(slot, start, t)
	default:
		before, ok := r.fl.start()
		if !ok { // another attempt won before this one started
			break
		}
		switch {
		case r.hedge:
			w.hedges.Add(1)
		case before > 0:
			w.ranAgain.Add(1)
		}
		class = w.call(slot, start, t)
	}
	w.finish(slot, r, res, class)
}

// call runs the Func for t's request on slot i, puts its result in t and
// returns the outcome's class (see classify). If the Func or the
// classifier panics or calls runtime.Goexit, call does not return: the
// goroutine ends and rescue delivers the outcome.
func (w *worker[Req, Res]) call(i int, start int64, t *task[Req, Res]) Class {
	r, res := &t.r, &t.res
	if w.b.hooks != nil && w.b.hooks.run != nil {
		w.b.hooks.run()
	}
	var ctx context.Context
	var rc *runCtx
	if h := w.b.hedging; h != nil {
		// Every attempt has a context of its own, which the attempt
		// that wins ends (see finish).
		rc = newRunCtx(r.ctx, &w.ctx)
		ctx = rc
		r.fl.ctxs[r.copy()].Store(rc)
	} else {
		ctx, rc = w.runContext(i, r.ctx)
	}
	if rc != nil {
		w.runners[i].ctx.Store(rc)
		if w.b.aborted.Load() { // Shutdown may have looked at the runner before the store
			rc.end(ErrClosed)
		}
		if r.fl != nil && r.fl.done() { // the winner may have looked before the store
			rc.end(ErrHedgeLost)
		}
	}
	w.runners[i].since.Store(start)
	t.calling = true
	res.Value, res.Err = w.fn(ctx, r.req)
	end := w.b.now()
	class := Success
	if res.Err != nil || w.b.classify != nil { // the common case without a call
		class = w.b.classOf(r.ctx, res.Value, res.Err)
	}
	t.calling = false
	w.endRun(i, rc)
	if h := w.b.hedging; h != nil {
		at := end - r.fl.sentAt[r.copy()] // its time at this worker
		switch {
		case r.fl.done(): // it lost: neither a failure nor a speed
			class = Ignore
			if at >= r.fl.delay {
				// Cancelled past the hedge's delay, it took at least
				// that: for the quantile, all that counts.
				h.record(at)
				w.lostAge.Store(end - start)
				w.lostAt.Store(end)
			}
		case class == Success:
			h.record(at)
			fallthrough
		default:
			if w.lostAge.Load() != 0 {
				w.lostAge.Store(0)
			}
		}
	}
	switch class {
	case Success:
		w.observe(time.Duration(end-start), end)
	case Failure, Overload, Unavailable:
		w.observeFailure(time.Duration(end-start), end)
	}
	return class
}

// classOf classifies an outcome of a Func that returned (see
// WithClassifier): an error after the request's ctx ended, or after
// Shutdown gave up, is Ignore; then the user's classifier decides, or
// ClassOf.
func (b *Balancer[Req, Res]) classOf(ctx context.Context, v Res, err error) Class {
	if err != nil && (ctx.Err() != nil || b.abortCtx.Err() != nil) {
		return Ignore
	}
	if b.classify != nil {
		return b.classify(v, err)
	}
	if err == nil {
		return Success
	}
	return ClassOf(err)
}

// finish hands res, of class c, to the caller and the freed slot to the
// loop. The counters and the worker's health are written before the
// completion is reported, so once the loop has seen every completion they
// are final, and the loop sees the health each completion left.
func (w *worker[Req, Res]) finish(slot int, r *request[Req, Res], res *Result[Req, Res], c Class) {
	w.runners[slot].since.Store(0)
	v := deliver
	if f := r.fl; f != nil {
		res.Attempts = f.runs()
		again := w.b.attempts > 1 && w.retries(r, res, c)
		v, res.Attempts = f.end(c == Success, again, w.b.attempts)
	} else if w.b.attempts > 1 && w.retries(r, res, c) {
		v = handBack
	}
	if res.Err != nil && v != lost {
		w.failed.Add(1)
	}
	if c != Success || r.probe || w.streak.Load() != 0 || w.health.Load() != 0 { // a healthy worker's success changes nothing
		w.account(r.probe, c)
	}
	w.completed.Add(1)
	w.running.Add(-1)
	// The slot is reported before the result is delivered, so a caller
	// who has its result and submits again finds the slot free; and a
	// loop woken by the report runs after the caller (see loop).
	switch v {
	case handBack:
		w.handBack(*r, *res) // before the report: the loop takes it with the completion
		w.b.report(w)
	case lost, wait:
		w.b.report(w)
	case win: // another copy still runs: it lost
		if c := r.fl.ctxs[1-r.copy()].Load(); c != nil {
			c.end(ErrHedgeLost)
		}
		fallthrough
	default:
		if r.hedge && c == Success {
			w.b.hedgeWins.Add(1)
		}
		w.b.report(w)
		r.deliver(res)
	}
}

// retries reports whether r, whose attempt here ended with res of class
// c, is to be tried again on another worker (see WithRetry): it has
// attempts left, its ctx lives, and the outcome is Unavailable, Overload,
// or one that WithRetryOn accepts. A panic in WithRetryOn's predicate
// becomes r's outcome, a *PanicError, which is not retried.
func (w *worker[Req, Res]) retries(r *request[Req, Res], res *Result[Req, Res], c Class) (again bool) {
	if res.Attempts >= w.b.attempts || res.Attempts == 0 || r.ctx.Err() != nil {
		return false
	}
	switch c {
	case Unavailable, Overload:
		return true
	case Failure:
		if w.b.retryOn == nil {
			return false
		}
		defer func() {
			if v := recover(); v != nil {
				w.panics.Add(1)
				res.Value, res.Err, again = *new(Res), &PanicError{Value: v, Stack: debug.Stack()}, false
			}
		}()
		return w.b.retryOn(res.Value, res.Err)
	}
	return false
}

// handBack gives r, whose attempt here ended with res, to the loop to try
// again elsewhere.
func (w *worker[Req, Res]) handBack(r request[Req, Res], res Result[Req, Res]) {
	f := r.fl
	if f == nil { // its first attempt had none: make it, as the loop would have (see flight)
		f = &flight[Req, Res]{}
		f.state.Store(flightRun) // one run, none live
		r.fl = f
		f.r = r
		f.tried = append(f.buf[:0], w.id)
	}
	f.last = res
	for {
		top := w.b.retried.Load()
		f.next = top
		if w.b.retried.CompareAndSwap(top, f) {
			return
		}
	}
}

// flight is what the attempts of one request share when it may have
// more than one: with WithHedge, the loop makes it at the first dispatch;
// with WithRetry alone, the first attempt's worker makes it when it hands
// the request back (see handBack). Its state is one atomic word, which the
// slots and the loop change with compare-and-swap: the runs started, the
// attempts live (sent and not ended) and whether the outcome is decided.
// At most two attempts are live at once, the request's latest (copy 0) and
// its hedge (copy 1), so each has a place in sentAt and ctxs.
type flight[Req, Res any] struct {
	r     request[Req, Res] // the request as first sent, fl included; the loop sends copies of it
	state atomic.Uint32
	// Written by a slot as it hands the request back (see handBack),
	// read by the loop after it takes it from b.retried.
	last Result[Req, Res]  // the latest attempt's outcome
	next *flight[Req, Res] // link in b.retried
	// ctxs holds each copy's context, stored by its slot as it starts,
	// for the winner to end the other's (see finish).
	ctxs [2]atomic.Pointer[runCtx]
	// Written by the loop before it sends an attempt, read by that
	// attempt's slot: when each copy was sent (b.now()), and the hedge
	// delay when the hedge went.
	sentAt [2]int64
	delay  int64
	// The loop's.
	tried  []int  // the workers it was sent to, by ID
	buf    [2]int // tried's first array
	sends  int    // attempts sent, to tell a hedge deadline from an older one's (see hedger)
	hedged bool   // its hedge was sent: it gets one
}

// The fields of flight.state.
const (
	flightRun   = 1                 // one run started; the runs are the low byte
	flightRuns  = 0xff              // the runs' mask
	flightLive  = 1 << 8            // one attempt live; they are the next byte
	flightLives = 0xff * flightLive // the live attempts' mask
	flightDone  = 1 << 16           // the outcome is decided: the request has it or is getting it
)

// runs returns the runs started so far.
func (f *flight[Req, Res]) runs() int { return int(f.state.Load() & flightRuns) }

// done reports whether the request's outcome is decided.
func (f *flight[Req, Res]) done() bool { return f.state.Load()&flightDone != 0 }

// start counts one more run and returns the runs before it, unless the
// outcome is decided: then the attempt must not run.
func (f *flight[Req, Res]) start() (before int, ok bool) {
	for {
		s := f.state.Load()
		if s&flightDone != 0 {
			return 0, false
		}
		if f.state.CompareAndSwap(s, s+flightRun) {
			return int(s & flightRuns), true
		}
	}
}

// join counts a hedge live, unless the outcome is decided or no attempt is
// live (it is between attempts, or its last is being handed back): a
// hedge joins a running attempt or none. The loop calls it.
func (f *flight[Req, Res]) join() bool {
	for {
		s := f.state.Load()
		if s&flightDone != 0 || s&flightLives == 0 {
			return false
		}
		if f.state.CompareAndSwap(s, s+flightLive) {
			return true
		}
	}
}

// A verdict is what an attempt's end does with its outcome (see end).
type verdict uint8

const (
	deliver  verdict = iota // the request's outcome
	win                     // the request's outcome, and the other copy lost: cancel it
	wait                    // dropped: the other copy, still live, decides
	lost                    // dropped: the outcome was decided before
	handBack                // the request goes to the loop to be tried again
)

// end ends one live attempt, which succeeded or not and which the
// retry rules would try again, and returns the verdict on its outcome and
// the runs as of the verdict. The first success decides; a failure waits
// for the other copy if it is live, and otherwise decides, unless it is
// tried again, which it is only while fewer than attempts runs started.
// The caller's count of runs may be stale: the other copy may have
// started, and ended, since. At the verdict nothing is live, so no run
// can start any more and the count in s is final.
func (f *flight[Req, Res]) end(success, again bool, attempts int) (verdict, int) {
	for {
		s := f.state.Load()
		if s&flightDone != 0 {
			return lost, int(s & flightRuns)
		}
		v, next := deliver, s-flightLive
		switch {
		case success && next&flightLives != 0:
			v, next = win, next|flightDone
		case next&flightLives != 0:
			v = wait
		case again && int(s&flightRuns) < attempts:
			v = handBack
		default:
			next |= flightDone
		}
		if f.state.CompareAndSwap(s, next) {
			return v, int(s & flightRuns)
		}
	}
}

// copy is r's place in its flight: 1 for the hedge, 0 for the rest.
func (r request[Req, Res]) copy() int {
	if r.hedge {
		return 1
	}
	return 0
}

// Stats is a snapshot of a Balancer's load and history. Each figure is read
// atomically; figures of different workers may be a moment apart.
type Stats struct {
	// Workers lists the workers not yet retired, by ID: every worker
	// added, and a removed one until its queue has drained.
	Workers []WorkerStats
	// Accepted counts requests accepted since New.
	Accepted uint64
	// Pending counts the requests at workers, queued or running: with
	// WithRetry or WithHedge, each attempt of a request counts.
	Pending int
	// Completed counts outcomes delivered, over all workers ever and
	// including requests that ended without running (ctx done, ErrClosed).
	Completed uint64
	// Failed counts the Completed outcomes with a non-nil Err.
	Failed uint64
	// Panics counts Funcs that panicked (each also counts as Failed).
	Panics uint64
	// Ejections counts workers ejected since New, each time (see
	// WithEjection); Probes the probes sent to ejected workers, and
	// ProbeFailures those that ejected their worker again. Ejected counts
	// the workers ejected now.
	Ejections, Probes, ProbeFailures uint64
	Ejected                          int
	// Retries counts the extra attempts sent to another worker (see
	// WithRetry), Hedges the copies sent while an attempt ran (see
	// WithHedge) and HedgeWins the hedges whose success was the request's
	// outcome; BudgetRefusals the retries and hedges the budget refused.
	// Each attempt counts in Completed at its worker, and in Failed if it
	// failed, unless it lost to its other copy.
	Retries, Hedges, HedgeWins, BudgetRefusals uint64
	// Waiting counts the requests in front of the balancer, not yet
	// given to a worker: callers waiting in Do or Submit because every
	// worker is full (or held back for a faster one, see
	// WithLoadEstimate), or for the loop to take their request. A Do
	// whose ctx ended while it waited counts until the loop drops its
	// request, which it does when a worker has room.
	Waiting int
	// MeanWait is how long requests waited for a slot lately, from the
	// call (Do, Submit, TrySubmit) to a slot starting them (a request
	// that found a free slot at once counts as no wait): the workers'
	// MeanWait averaged, each weighted by the requests it completed. 0
	// before the first.
	MeanWait time.Duration
	// TotalWait is the sum of those waits over all requests started, for
	// rates: TotalWait's rise over Completed's is the mean wait in a
	// window.
	TotalWait time.Duration
}

// WorkerStats describes one worker.
type WorkerStats struct {
	ID          int
	Concurrency int // requests it runs at once (WithConcurrency)
	Pending     int // requests queued or running on it: Running + Queued
	// Running counts the requests its slots have taken and not finished,
	// at most Concurrency.
	Running int
	Queued  int // requests waiting in its queue for a slot

	Completed uint64 // outcomes it delivered, whether or not the Func ran
	Failed    uint64 // of those, outcomes with a non-nil Err
	Panics    uint64 // of those, Func panics
	// MeanService is a moving average of the Func's run time on this
	// worker (see WithLoadEstimate for how it moves); 0 before it first
	// ran. It is kept with or without the load estimate.
	MeanService time.Duration
	// MeanWait is a moving average of the waits of the requests this
	// worker started, from the call to the start, each moving it 1/16 of
	// the way; TotalWait is their sum.
	MeanWait  time.Duration
	TotalWait time.Duration
	Weight    float64 // as given by WithWeight; 1 by default
	Removed   bool    // RemoveWorker was called; it is finishing its queue

	// FailureRate is a moving average of its outcomes' classes, a Failure
	// or Overload counting 1 and a Success 0, each moving it an eighth of
	// the way, decayed toward 0 with time (e^(−t/10 s)): its cost is
	// 1/(1 − FailureRate) times its speed's, up to 20 times. Streak counts
	// its latest outcomes that were each a Failure (see WithEjection).
	FailureRate float64
	Streak      int
	// Ejected reports that it gets no requests but its probe: until
	// EjectedUntil, and then while Probing, its probe is out. Ejections
	// counts its ejections since it was added.
	Ejected      bool
	EjectedUntil time.Time
	Probing      bool
	Ejections    uint64
	// Retries counts the attempts it ran of requests another worker had
	// run before (see WithRetry), and Hedges the copies it ran of
	// requests another worker was running (see WithHedge).
	Retries, Hedges uint64
}

// Stats returns a snapshot of the balancer's figures. It never blocks, and
// after Close it returns the final figures. Its cost is linear in the number
// of workers.
func (b *Balancer[Req, Res]) Stats() Stats {
	b.made()
	r := b.roster.Load()
	s := Stats{
		Workers:   make([]WorkerStats, 0, len(r.workers)-r.dead),
		Completed: r.retired.completed,
		Failed:    r.retired.failed,
		Panics:    r.retired.panics,
		TotalWait: time.Duration(r.retired.waited),
	}
	var weighted, weights float64
	for _, w := range r.workers {
		if !r.holds(w) {
			continue
		}
		pending, completed := w.load()
		c := counts{completed, w.failed.Load(), w.panics.Load(), w.waited.Load()}
		// A slot counts a request as completed before it stops counting
		// it as running, so running may be one ahead of pending here.
		running := min(int(w.running.Load()), pending)
		ws := WorkerStats{
			ID:          w.id,
			Concurrency: w.concurrency,
			Pending:     pending,
			Running:     running,
			Queued:      pending - running,
			Completed:   c.completed,
			Failed:      c.failed,
			Panics:      c.panics,
			MeanService: time.Duration(w.service.Load()),
			MeanWait:    time.Duration(w.wait.Load()),
			TotalWait:   time.Duration(c.waited),
			Weight:      w.weight,
			Removed:     w.gone.Load(),
			FailureRate: failRate(w.health.Load(), b.now()),
			Streak:      int(w.streak.Load()),
			Probing:     w.onTrial.Load(),
			Ejections:   w.ejections.Load(),
			Retries:     w.ranAgain.Load(),
			Hedges:      w.hedges.Load(),
		}
		if until := w.outUntil.Load(); until != 0 {
			ws.Ejected, ws.EjectedUntil = true, b.epoch.Add(time.Duration(until-1))
			s.Ejected++
		}
		s.Workers = append(s.Workers, ws)
		s.Pending += ws.Pending
		s.Completed += c.completed
		s.Failed += c.failed
		s.Panics += c.panics
		s.TotalWait += ws.TotalWait
		weighted += float64(ws.MeanWait) * float64(ws.Completed)
		weights += float64(ws.Completed)
	}
	if weights > 0 {
		s.MeanWait = time.Duration(weighted / weights)
	}
	// Read after the completions it must not be less than: a request is
	// accepted before it can complete.
	s.Accepted = b.accepted.Load()
	s.Waiting = int(b.waiting.Load() + b.queued.Load())
	s.Ejections, s.Probes, s.ProbeFailures = b.sched.ejections.Load(), b.sched.probes.Load(), b.sched.probeFailures.Load()
	s.Retries, s.BudgetRefusals = b.retries.Load(), b.refusals.Load()
	s.Hedges, s.HedgeWins = b.hedges.Load(), b.hedgeWins.Load()
	return s
}

// String is one line for people: the totals, then each worker.
func (s Stats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "accepted %d, pending %d, completed %d (%d failed, %d panicked), waiting %d, wait %v",
		s.Accepted, s.Pending, s.Completed, s.Failed, s.Panics, s.Waiting, s.MeanWait)
	if s.Ejections > 0 {
		fmt.Fprintf(&b, ", %d ejected now, %d ejections, %d probes (%d failed)", s.Ejected, s.Ejections, s.Probes, s.ProbeFailures)
	}
	if s.Retries > 0 || s.Hedges > 0 || s.BudgetRefusals > 0 {
		fmt.Fprintf(&b, ", %d retries, %d hedges (%d won), %d refused by the budget", s.Retries, s.Hedges, s.HedgeWins, s.BudgetRefusals)
	}
	for _, w := range s.Workers {
		b.WriteString("; ")
		b.WriteString(w.String())
	}
	return b.String()
}

// String is one line for people, such as "worker 2: 3/4 running, 1
// queued, 120 completed (2 failed, 0 panicked), service 2ms, wait 150µs".
// Weight appears if it is not 1; the failure rate and streak if either is
// not 0; "ejected until" a time, or "probing", if it is ejected; its
// ejections if any; and "removed" if RemoveWorker was called.
func (w WorkerStats) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "worker %d: %d/%d running, %d queued, %d completed (%d failed, %d panicked), service %v, wait %v",
		w.ID, w.Running, w.Concurrency, w.Queued, w.Completed, w.Failed, w.Panics, w.MeanService, w.MeanWait)
	if w.Weight != 1 {
		fmt.Fprintf(&b, ", weight %v", w.Weight)
	}
	if w.FailureRate != 0 || w.Streak != 0 {
		fmt.Fprintf(&b, ", failure rate %.2f, streak %d", w.FailureRate, w.Streak)
	}
	switch {
	case w.Probing:
		b.WriteString(", ejected, probing")
	case w.Ejected:
		fmt.Fprintf(&b, ", ejected until %s", w.EjectedUntil.Format("15:04:05.000"))
	}
	if w.Ejections > 0 {
		fmt.Fprintf(&b, ", %d ejections", w.Ejections)
	}
	if w.Retries > 0 {
		fmt.Fprintf(&b, ", %d retries", w.Retries)
	}
	if w.Hedges > 0 {
		fmt.Fprintf(&b, ", %d hedges", w.Hedges)
	}
	if w.Removed {
		b.WriteString(", removed")
	}
	return b.String()
}

// LogValue makes Stats a structured slog group: the totals, and a group
// "workers" with one group per worker, keyed by ID.
func (s Stats) LogValue() slog.Value {
	workers := make([]slog.Attr, len(s.Workers))
	for i, w := range s.Workers {
		workers[i] = slog.Any(strconv.Itoa(w.ID), w)
	}
	return slog.GroupValue(
		slog.Uint64("accepted", s.Accepted),
		slog.Int("pending", s.Pending),
		slog.Uint64("completed", s.Completed),
		slog.Uint64("failed", s.Failed),
		slog.Uint64("panics", s.Panics),
		slog.Int("waiting", s.Waiting),
		slog.Duration("mean_wait", s.MeanWait),
		slog.Duration("total_wait", s.TotalWait),
		slog.Int("ejected", s.Ejected),
		slog.Uint64("ejections", s.Ejections),
		slog.Uint64("probes", s.Probes),
		slog.Uint64("probe_failures", s.ProbeFailures),
		slog.Uint64("retries", s.Retries),
		slog.Uint64("hedges", s.Hedges),
		slog.Uint64("hedge_wins", s.HedgeWins),
		slog.Uint64("budget_refusals", s.BudgetRefusals),
		slog.Attr{Key: "workers", Value: slog.GroupValue(workers...)},
	)
}

// LogValue makes WorkerStats a structured slog group of its figures;
// ejected_until and probing only while it is ejected.
func (w WorkerStats) LogValue() slog.Value {
	attrs := []slog.Attr{
		slog.Int("concurrency", w.Concurrency),
		slog.Int("running", w.Running),
		slog.Int("queued", w.Queued),
		slog.Uint64("completed", w.Completed),
		slog.Uint64("failed", w.Failed),
		slog.Uint64("panics", w.Panics),
		slog.Duration("mean_service", w.MeanService),
		slog.Duration("mean_wait", w.MeanWait),
		slog.Duration("total_wait", w.TotalWait),
		slog.Float64("weight", w.Weight),
		slog.Bool("removed", w.Removed),
		slog.Float64("failure_rate", w.FailureRate),
		slog.Int("streak", w.Streak),
		slog.Bool("ejected", w.Ejected),
	}
	if w.Ejected {
		attrs = append(attrs, slog.Time("ejected_until", w.EjectedUntil), slog.Bool("probing", w.Probing))
	}
	return slog.GroupValue(append(attrs, slog.Uint64("ejections", w.Ejections), slog.Uint64("retries", w.Retries), slog.Uint64("hedges", w.Hedges))...)
}

var (
	_ slog.LogValuer = Stats{}
	_ slog.LogValuer = WorkerStats{}
)

// roster is what Stats reads: the workers in ID order, and the final
// counts of those retired. The loop replaces it whole and never changes a
// roster it published: adding a worker appends to the workers' array past
// every published length (a retire never shortens it), so it costs O(1)
// amortised; a retire marks the worker with the new roster's generation
// instead of copying the rest, and the workers are compacted when half of
// them are marked, O(1) amortised too.
type roster[Req, Res any] struct {
	workers []*worker[Req, Res] // those that hold(w) and, until compacted, some retired
	retired counts
	gen     uint64 // retires so far
	dead    int    // retired workers still in workers
}

// holds reports whether w, one of r.workers, is not retired as of r: its
// counts are not in r.retired yet.
func (r *roster[Req, Res]) holds(w *worker[Req, Res]) bool {
	at := w.retiredAt.Load()
	return at == 0 || at > r.gen
}

type counts struct {
	completed, failed, panics uint64
	waited                    int64 // ns
}

func (c counts) plus(d counts) counts {
	return counts{c.completed + d.completed, c.failed + d.failed, c.panics + d.panics, c.waited + d.waited}
}

// load returns the worker's pending and completed requests at one instant:
// completed did not change while assigned was read.
func (w *worker[Req, Res]) load() (pending int, completed uint64) {
	for {
		c := w.completed.Load()
		a := w.assigned.Load()
		if w.completed.Load() == c {
			return int(a - int64(c)), c
		}
	}
}

func (w *worker[Req, Res]) counts() counts {
	return counts{w.completed.Load(), w.failed.Load(), w.panics.Load(), w.waited.Load()}
}

// goid returns the ID of the calling goroutine, read from the header of its
// stack trace ("goroutine 42 [running]:"). It costs a stack walk, so it is
// called only when a worker goroutine starts and in Close.
func goid() int64 {
	var buf [64]byte
	n := runtime.Stack(buf[:], false)
	var id int64
	for _, c := range buf[len("goroutine "):n] {
		if c < '0' || c > '9' {
			break
		}
		id = id*10 + int64(c-'0')
	}
	return id
}

// inFunc reports whether the caller is one of b's workers, running a Func.
func (b *Balancer[Req, Res]) inFunc() bool {
	_, ok := b.slots.Load(goid())
	return ok
}
