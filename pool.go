package balancer

import (
	"container/heap"
	"math"
	"slices"
	"sync/atomic"
	"time"
)

// This file is the scheduler: the heap that orders the workers and the
// policy that decides their order (what a worker costs, how its speed is
// learned) and when a request is better held back. balancer.go is the API
// and the loop that applies it.

// sched is the scheduler's state: the heap and what the policy keeps
// beside it. The loop owns it outright; its decisions are functions of
// this state, of the workers' figures and of the clock it is given, so a
// test can drive it without goroutines. The Balancer is the mechanism
// that applies them: channels, atomics for the callers, the hold timer.
type sched[Req, Res any] struct {
	pool     pool[Req, Res]
	estimate bool         // WithLoadEstimate, on by default
	eject    bool         // WithEjection, on by default
	hedging  bool         // WithHedge: an attempt that lost to its hedge counts in its worker's cost (see lost)
	clock    func() int64 // b.now: read only when a decision needs the time
	seq      int64        // dispatch sequence number

	// Ejections (see eject). The counters are written by the loop, read
	// by Stats.
	out                              []*worker[Req, Res] // the ejected workers, out of the heap
	doomed                           []*worker[Req, Res] // to be ejected at the next look (see settle)
	due                              int64               // the earliest until in out of a worker that may take its probe; 0 if none
	jitter                           func() float64      // uniform in [0, 1): rand.Float64, or a test's
	ejections, probes, probeFailures atomic.Uint64

	// The estimates' common ground, with the load estimate only (see
	// expect and key).
	now       int64         // the latest completion's clock reading: the loop's time without reading the clock
	ref       float64       // the workers' median service time × weight, in ns; 0 before any observation
	published *atomic.Int64 // ref, for the slots (see observe); nil in tests that need none
	refreshed int64         // now at the last reckon
	completed int64         // completions taken
	reckonAt  int64         // the next count of completions at which to reckon (see complete)
	scratch   []float64     // reckon's, kept to spare an allocation each time

	// Holding back, with the load estimate only (see holdBack).
	busy     int     // full workers with a mean service time
	busyRate float64 // the sum of their service rates (c/s each), in requests per ns
	busyHeld int     // the sum of their limits (c × depth each)
	held     bool    // the last decision was to hold
	expired  bool    // a hold ran out: the next request goes to the root
}

// pool is a min-heap of workers ordered by cost, the priority queue of the
// select loop. The loop owns it outright: no other goroutine reads or writes
// it, or the loop-owned fields of its workers.
//
// Unlike container/heap's example, the heap does not write each moved
// item's index into the item: a worker's slot is found through at, indexed
// by a small handle the pool gives each worker, and each slot holds its
// worker's sort key beside the pointer. A dispatch sifts the root through
// log n levels; this way it touches one contiguous slice and one small
// table instead of n scattered worker structs, which with thousands of
// workers was most of the cost of a dispatch.
//
// Invariant: for every i > 0, p.Less(i, (i-1)/2) is false; for every slot i,
// at[slots[i].h] == i and slots[i].w.handle == slots[i].h; at[h] == -1 for
// a handle in free. So slots[0] is the worker with the lowest cost
// (expected wait for one more request) and, among equals, the one whose
// last dispatch is oldest. Reading the root is O(1); add, remove and touch
// are O(log n).
type pool[Req, Res any] struct {
	slots []slot[Req, Res]
	at    []int // at[h] is the slot of the worker with handle h, or -1
	free  []int // handles of workers that left, for reuse
}

type slot[Req, Res any] struct {
	cost float64 // sched.cost(w) as of the last touch
	load float64 // s.perSlot(w) as of the last touch: the count rule, for ties
	last int64   // dispatch sequence number of w's latest request
	h    int     // w.handle
	w    *worker[Req, Res]
}

var _ heap.Interface = (*pool[int, int])(nil)

// Len is the number of workers in the heap.
func (p *pool[Req, Res]) Len() int { return len(p.slots) }

// Less orders by cost, then by the count rule (pending per slot and
// weight), then by the sequence number of the last dispatch, so that
// workers of equal cost are least-pending among themselves and equally
// loaded ones take turns instead of the root taking every request while
// the load is light.
func (p *pool[Req, Res]) Less(i, j int) bool { return p.slots[i].before(&p.slots[j]) }

// before is Less on two slots.
func (s *slot[Req, Res]) before(t *slot[Req, Res]) bool {
	if s.cost != t.cost {
		return s.cost < t.cost
	}
	if s.load != t.load {
		return s.load < t.load
	}
	return s.last < t.last
}

// Swap exchanges two slots and keeps at right, which touch and remove
// depend on.
func (p *pool[Req, Res]) Swap(i, j int) {
	p.slots[i], p.slots[j] = p.slots[j], p.slots[i]
	p.at[p.slots[i].h] = i
	p.at[p.slots[j].h] = j
}

// Push appends a slot; call it through heap.Push (add does).
func (p *pool[Req, Res]) Push(x any) {
	s := x.(slot[Req, Res])
	p.at[s.h] = len(p.slots)
	p.slots = append(p.slots, s)
}

// Pop removes the last slot and returns its worker; call it through
// heap.Remove (remove does).
func (p *pool[Req, Res]) Pop() any {
	n := len(p.slots) - 1
	s := p.slots[n]
	p.slots[n] = slot[Req, Res]{} // let the slice not keep a removed worker alive
	p.slots = p.slots[:n]
	p.at[s.h] = -1 // the worker is out of the heap; touching it would be a bug
	return s.w
}

// root returns the cheapest worker. The pool must not be empty.
func (p *pool[Req, Res]) root() *worker[Req, Res] { return p.slots[0].w }

// add puts w in the heap at cost and load; last orders it among workers
// of equal cost and load.
func (p *pool[Req, Res]) add(w *worker[Req, Res], cost, load float64, last int64) {
	if n := len(p.free); n > 0 {
		w.handle = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		w.handle = len(p.at)
		p.at = append(p.at, -1)
	}
	heap.Push(p, slot[Req, Res]{cost: cost, load: load, last: last, h: w.handle, w: w})
}

// remove takes w out of the heap.
func (p *pool[Req, Res]) remove(w *worker[Req, Res]) {
	heap.Remove(p, p.at[w.handle])
	p.free = append(p.free, w.handle)
}

// touch restores the heap order after w's cost changed: it puts the new
// cost and load in w's slot and moves the slot.
func (p *pool[Req, Res]) touch(w *worker[Req, Res], cost, load float64) {
	i := p.at[w.handle]
	p.slots[i].cost, p.slots[i].load = cost, load
	p.fix(i)
}

// fix restores the heap order after slot i's key changed, as heap.Fix
// would, moving the same slots. It runs twice a request (a dispatch sinks
// the root, a completion raises its worker), so it moves a hole instead of
// swapping: each level copies one slot and writes one entry of at, with no
// calls through heap.Interface. In callgrind on BenchmarkDo with 4096
// workers and 64 callers, it took a request from 8 900 instructions with
// heap.Fix to 7 500.
func (p *pool[Req, Res]) fix(i int) {
	slots, at := p.slots, p.at // locals: the loop need not reload the fields after each write
	s := slots[i]
	j := i
	for j > 0 { // up, past every parent that s sorts before
		up := (j - 1) / 2
		if !s.before(&slots[up]) {
			break
		}
		slots[j] = slots[up]
		at[slots[j].h] = j
		j = up
	}
	if j == i { // it did not go up, so it may go down
		for n := len(slots); ; {
			c := 2*j + 1
			if c >= n {
				break
			}
			if r := c + 1; r < n && slots[r].before(&slots[c]) {
				c = r
			}
			if !slots[c].before(&s) {
				break
			}
			slots[j] = slots[c]
			at[slots[j].h] = j
			j = c
		}
	}
	slots[j] = s
	at[s.h] = j
}

// dispatched records a dispatch to the root, whose cost and load are now
// cost and load, which then sorts after every worker equal to it.
func (p *pool[Req, Res]) dispatched(cost, load float64, seq int64) {
	p.slots[0].last = seq
	p.slots[0].cost, p.slots[0].load = cost, load
	p.fix(0)
}

// cost is the pool's sort key: the expected wait for one more request at w,
// in units that only need to compare. With the load estimate (the default)
// it is (pending+concurrency)/concurrency × t, t the worker's expected
// service time (see expect): t while a slot is free, plus t/concurrency
// for each request pending, so that of two workers with free slots the
// less loaded wins, a hedge against load the balancer cannot see (other
// clients of the same backend); t is the age of the oldest request
// running instead if that is more (see freshen), and rounded so that
// workers whose speeds differ by noise compare equal (see key). Without
// the estimate it is the requests w would then have per slot, divided by
// its weight. Either way, workers of equal cost are ordered by that count
// (see Less). A full worker costs +Inf: the root has room whenever any
// worker has.
func (s *sched[Req, Res]) cost(w *worker[Req, Res]) float64 { return s.costAt(w, 0) }

// costAt is cost counting the running requests' ages as of now, a clock
// reading; 0 leaves them out.
func (s *sched[Req, Res]) costAt(w *worker[Req, Res], now int64) float64 {
	if w.pending >= w.limit {
		return math.Inf(1)
	}
	w.mult = 1
	if w.health.Load() != 0 {
		w.mult = s.penalty(w)
	}
	if !s.estimate {
		return s.perSlot(w)
	}
	t := s.expect(w)
	if now != 0 && t > 0 { // with no estimate at all, the count rule stands
		t = max(t, float64(w.oldest(now)))
	}
	if s.hedging && t > 0 {
		t = max(t, s.lost(w))
	}
	t *= w.mult // before key rounds it: a few failures are noise too
	w.lastKey = s.key(w, t)
	return float64(w.pending+w.concurrency) * w.lastKey / float64(w.concurrency)
}

// penalty is the factor by which w's failures raise its cost: 1/(1 − e)
// for a failure rate e (see foldHealth) decayed to the loop's time, so a
// worker that fails a share e of its requests costs what it would take to
// get one success from it, up to 1/(1 − maxFailRate).
func (s *sched[Req, Res]) penalty(w *worker[Req, Res]) float64 {
	e := failRate(w.health.Load(), s.now)
	return 1 / (1 - min(e, maxFailRate))
}

// expect is w's expected service time in ns as of the loop's time. A
// worker with no observation is expected to serve as its peers do, scaled
// by its weight: its prior, ref / weight (0 before any worker has an
// observation, so that cold workers follow the count rule exactly). An
// observed worker's moving average stands until it has not been refreshed
// for the worker's patience (see stale); then the worker counts as its
// prior, so that a worker that looked slow and was not tried since (it
// recovered, or its first call was slow) gets one request, its probe, and
// its run starts a new average (see observe). While the probe runs, the
// old average stands, so an expired worker takes one request, not as many
// as it can hold.
func (s *sched[Req, Res]) expect(w *worker[Req, Res]) float64 {
	prior := s.ref / w.weight
	t := float64(w.level.Load())
	if t == 0 || prior == 0 {
		return max(t, prior)
	}
	// Only an estimate off the centre step on the slow side can keep a
	// worker from being tried; at or below it, expiring changes little,
	// and skipping the check keeps it off the common path.
	w.lapsed = t > centreTop*prior && !w.probing && s.stale(w)
	if w.lapsed {
		return prior
	}
	return t
}

// stale reports whether w's estimate is older than its patience: how
// long the loop trusts an estimate nobody refreshes. Patience is
// staleAfter, doubled impatience times: each probe that finds the worker
// still slow doubles it, up to maxImpatience times, so a worker that is
// slow for good costs one slow request that often at most, and
// trustAfter runs in line in a row set it back (see probed and trusted).
// It does not depend on the worker's concurrency: how long a backend stays
// slow, or how soon it recovers, has nothing to do with how many requests
// it serves at once.
func (s *sched[Req, Res]) stale(w *worker[Req, Res]) bool {
	return s.now-w.seen.Load() > staleAfter<<w.impatience
}

// slowness is how many times as long as its prior w's estimate is, as of
// its cost's last computation, if that is more than bucket² (as in
// probed: a worker of the usual speed seldom looks that slow); 1 if not,
// if its estimate expired or there is none, or without the load estimate.
// It stretches the hedge delay of w's attempts (see Balancer.attempt): a
// request at a worker known to be slow is not a straggler, and the
// estimate already steers work off that worker. The estimate here is the
// lesser of the level and the peak average: one run 8× the level moves
// the level two steps up (see levelMost) but the peak, which counts 4×
// itself at most, less than that, and a worker whose one slow run was a
// straggler is no slower for it. With the level alone, in
// TestHedgeQuality's stragglers row (seed 41) the p99.9 with hedging was
// 0.30× the p99.9 without; with the lesser of the two, 0.16×.
func (s *sched[Req, Res]) slowness(w *worker[Req, Res]) float64 {
	prior := s.ref / w.weight
	t := float64(min(w.level.Load(), w.service.Load()))
	if !s.estimate || prior == 0 || w.lapsed || t <= bucket*bucket*prior {
		return 1
	}
	return t / prior
}

// probed records that w's probe completed, once the loop has taken its
// completion. If its run took more than two steps' worth of the worker's
// prior (bucket²), the loop becomes twice as patient with the worker
// (see stale); otherwise patience stands until regular use confirms the
// worker (see trusted): one run of a Func says little, and a worker of the
// usual speed seldom takes that long. The run decides, not the averages
// it folded into: a worker 10× slower for 2 s leaves the centre step after
// one run (see levelMost), and a long request of its first probe after it
// healed was taken for still slow (see stillSlow); judged by the averages,
// that doubled the wait for the next probe, and in "1 of 8 10× slower for
// 2 s of 40 s" at load 0.2 the worker's share in the 8 s after it healed
// was 0.50–1.04 of fair over seeds 41–60; judged by the run, 0.65–1.04.
// If the probe did not run, the estimate is still expired and the next
// dispatch to the worker probes again.
func (s *sched[Req, Res]) probed(w *worker[Req, Res]) {
	w.probing = false
	if w.seen.Load() != w.probeSeen && float64(w.probeRun.Load()) > bucket*bucket*s.ref/w.weight {
		w.impatience = min(w.impatience+1, maxImpatience)
	}
}

// trusted counts w's completions in regular use with an estimate in line,
// and after trustAfter in a row makes the loop as patient with it as with
// any worker.
func (s *sched[Req, Res]) trusted(w *worker[Req, Res]) {
	if !s.inLine(w) {
		w.inLine = 0
		return
	}
	if w.inLine++; w.inLine >= trustAfter {
		w.impatience, w.inLine = 0, 0
	}
}

// inLine reports whether w's moving average is on the centre step of the
// scale, with the workers of the usual speed (see key).
func (s *sched[Req, Res]) inLine(w *worker[Req, Res]) bool {
	return float64(w.level.Load()) <= centreTop*s.ref/w.weight
}

// key rounds t, an expected time of w, to a step of a logarithmic scale
// centred on ref: the steps are bucket apart (a factor), so two workers
// whose estimates differ by less than noise usually fall on the same step
// and compare equal, and workers that really differ (2× and more) never
// do. Centred on the median, the scale keeps the many workers of the
// usual speed on one step, which reaches a step down and one and a half
// up, to centreTop × ref: the noise of run times is on the slow side (a
// run can take many times the mean, never less than nothing; and behind a
// server that other clients load too, every run carries their queue).
// Times under equalFloor count as equalFloor: there the loop's own cost is
// most of a request's. Off the centre, the step and the range of times it
// covers are cached per worker, so a cost costs a logarithm only when t
// leaves its step or ref changes.
func (s *sched[Req, Res]) key(w *worker[Req, Res], t float64) float64 {
	if t == 0 {
		return 0
	}
	t0, r := t, s.ref
	if t0 < equalFloor {
		t0 = equalFloor
	}
	if r < equalFloor {
		r = equalFloor
	}
	if t0*bucket >= r && t0 <= r*centreTop {
		return r // the centre step, the usual case, without a logarithm
	}
	if s.ref == w.keyRef && t0 >= w.keyLo && t0 < w.keyHi {
		return w.key
	}
	k := math.Round(math.Log(t0/r) / math.Log(bucket)) // off the centre: k ≤ -1 or k ≥ 2
	if k == 1 {
		k = 2 // t0 is at centreTop to rounding
	}
	lo, hi := math.Pow(bucket, k-0.5), math.Pow(bucket, k+0.5)
	if k > 0 {
		lo = max(lo, centreTop)
	} else {
		hi = min(hi, 1/bucket)
	}
	w.keyRef, w.keyLo, w.keyHi, w.key = s.ref, r*lo, r*hi, r*math.Pow(bucket, k)
	return w.key
}

// The estimates' constants (see observe, expect, stale, key and
// reckon). A run after a gap g since the worker's last moves its average
// at least 1 − e^(-g/decay) of the way, the time decay of peak-EWMA
// balancers (10 s there too). An estimate not refreshed for staleAfter <<
// impatience expires, whatever the worker's concurrency (see stale). The
// scale's steps are bucket apart. Measured in
// TestBalanceQuality at 50 000 requests a row, seeds 1 and 2: a patience
// of 1 s probed the workers of the 400 ms-of-2 s brownout between
// brownouts, p99 10.0 ms in both against 8.3 and 8.0 at 2 s, while the
// recovered worker's share in the 8 s after was 0.91–0.97 of fair at 1 s
// and 0.59–0.95 at 2 s. Steps of 2 let a worker 4× slower, whose average
// settles near 2.3× the median's, share the centre step with the fast
// ones (p99 of two such of eight at load 0.5: 8.0 ms in both, against 7.5
// and 7.2 with steps of 1.5). Without the centre step reaching a step
// either way, the least of eight equal workers' shares at load 0.1 was
// 0.80–0.82 of fair in two headline runs; with it 0.91–0.95 in three.
// With the centre's top at bucket^1.5 rather than bucket, that least share
// was 0.99–1.00 on six seeds (0.91–0.97 before), and four balancers in
// front of the same eight equal backends at load 0.8 (TestFleetQuality)
// had a p99 1.05–1.06× one balancer's on three seeds, against 1.07–1.08×.
// Behind a shared backend every run carries the other clients' queue: the
// slowest of a balancer's eight estimates there was above 1.5× the median
// at 39 % of its reckonings (above 1.84× at about 10 %), and the clients
// took turns to shun that backend. A worker 4× slower, at 2.3×, is still
// two steps up.
const (
	decay         = 10 * time.Second
	decayFrom     = int64(decay / 256) // shorter gaps are not weighed: e^(-1/256) > 0.996
	staleAfter    = int64(2 * time.Second)
	maxImpatience = 4 // patience up to 32 s
	trustAfter    = fallSmoothing / 2
	reckonEvery   = staleAfter / 8
	bucket        = 1.5
	centreTop     = bucket * 1.224744871391589 // bucket^1.5: the centre step's top
	equalFloor    = holdFloor
)

// lost returns, with WithHedge, the age of w's latest attempt that was
// cancelled because its hedge won, past the hedge delay, if w has ended no
// attempt that counts since, within staleAfter; else 0. Its cost counts
// it as a time w takes at least: cancelling a straggler says nothing of
// its worker's speed, so it is no sample of it, but it must not make a
// stalled worker look idle and fast, and win it the next request.
func (s *sched[Req, Res]) lost(w *worker[Req, Res]) float64 {
	age := w.lostAge.Load()
	if age == 0 || s.now-w.lostAt.Load() > staleAfter {
		return 0
	}
	return float64(age)
}

// oldest returns the age at now of the oldest request w's slots are
// running, or 0.
func (w *worker[Req, Res]) oldest(now int64) int64 {
	var age int64
	for i := range w.runners {
		if since := w.runners[i].since.Load(); since != 0 {
			age = max(age, now-since)
		}
	}
	return age
}

// add puts a new worker in the heap, first among equals: never
// dispatched to, it has waited longest of all, ties by ID.
func (s *sched[Req, Res]) add(w *worker[Req, Res]) {
	s.pool.add(w, s.cost(w), s.perSlot(w), minSeq+int64(w.id))
}

// remove takes w out of the heap and out of the hold-back's count, or out
// of the ejected; it may have to return an ejected worker (see ejectable).
func (s *sched[Req, Res]) remove(w *worker[Req, Res]) {
	if w.ejected {
		s.leave(w)
		w.ejected, w.trial = false, false
		w.outUntil.Store(0)
		w.onTrial.Store(false)
	} else {
		s.pool.remove(w)
		s.uncountBusy(w)
	}
	for len(s.out) > s.maxOut() { // never the last worker
		s.restore(s.out[0])
	}
}

// hasRoom reports whether some worker can take a request. Looking at the
// root is enough: a full worker costs +Inf, so it is the root only if
// every worker is full.
func (s *sched[Req, Res]) hasRoom() bool {
	if len(s.doomed) > 0 {
		s.settle()
	}
	s.freshen()
	return s.pool.Len() > 0 && s.pool.root().pending < s.pool.root().limit
}

// dispatch records one more request at the cheapest worker, which has
// room, and returns that worker, or an ejected worker whose probe is due
// (see eject), and whether the request is that probe.
func (s *sched[Req, Res]) dispatch() (*worker[Req, Res], bool) {
	if s.due != 0 {
		if w := s.probeDue(); w != nil {
			return w, true
		}
	}
	w := s.pool.root()
	kept, probe := s.pool.slots[0].cost, w.lapsed && !w.probing
	if probe { // its kept cost is its prior's: its estimate expired (see expect)
		w.probing, w.probeSeen = true, w.seen.Load()
	}
	w.pending++
	w.silent++
	if w.pending == w.limit {
		s.countBusy(w)
	}
	s.expired = false
	var cost float64
	if !s.estimate || w.pending == w.limit || probe || kept == 0 {
		cost = s.cost(w)
	} else {
		// The step its kept cost was computed with stands (costAt's
		// formula, so the result is the same to the last bit), unless
		// the worker is now full, its probe brings back its old
		// estimate, or there was no estimate.
		cost = float64(w.pending+w.concurrency) * w.lastKey / float64(w.concurrency)
	}
	s.pool.dispatched(cost, s.perSlot(w), s.seq)
	s.seq++
	return w, false
}

// complete records that w finished a request. With the load estimate it
// also keeps the estimates' common ground current (see reckon): at the
// first observation of any worker, and every reckonEvery of the clock.
func (s *sched[Req, Res]) complete(w *worker[Req, Res]) {
	s.uncountBusy(w)
	w.pending--
	w.silent = 0
	if w.probing {
		s.probed(w)
	} else if w.impatience > 0 {
		s.trusted(w)
	}
	s.now = max(s.now, w.seen.Load())
	switch {
	case w.ejected:
		s.completeOut(w)
	case w.removed:
	default:
		if s.eject && !w.doomed && w.streak.Load() >= ejectAfter {
			w.doomed = true // ejected at the loop's next look (see settle)
			s.doomed = append(s.doomed, w)
		}
		s.touch(w)
	}
	if !s.estimate {
		return
	}
	if s.completed++; s.completed >= s.reckonAt || s.now-s.refreshed >= reckonEvery {
		s.reckon()
	}
}

// touch restores the heap order after w's cost changed.
func (s *sched[Req, Res]) touch(w *worker[Req, Res]) { s.pool.touch(w, s.cost(w), s.perSlot(w)) }

// perSlot is the count rule's cost for w: pending per slot, divided by
// weight, counting one more request, times w's failure penalty as of its
// cost's last computation (mult). With the
// load estimate the weight stands for a speed not yet measured, so it
// counts only until the first run; the penalty counts there too, so that
// among workers whose costs are equal (a failure rate under a third keeps
// a worker on its step of the scale, see key) one that fails more gets
// fewer requests.
func (s *sched[Req, Res]) perSlot(w *worker[Req, Res]) float64 {
	if s.estimate && w.service.Load() != 0 {
		return float64(w.pending+1) / float64(w.concurrency) * w.mult
	}
	return float64(w.pending+1) * w.unit * w.mult
}

// refresh recomputes every cost and re-sorts, after many changed at once.
// O(n).
func (s *sched[Req, Res]) refresh() {
	for i := range s.pool.slots {
		w := s.pool.slots[i].w
		s.pool.slots[i].cost, s.pool.slots[i].load = s.cost(w), s.perSlot(w)
	}
	heap.Init(&s.pool)
}

// reckon sets ref to the median of the workers' estimates, each as a
// worker of weight 1 would serve, and brings every cost up to date with it
// and with the estimates' decay. O(n log n), at most once per reckonEvery
// of time with completions (and once at the first observation).
func (s *sched[Req, Res]) reckon() {
	s.refreshed = s.now
	if s.ref == 0 || s.completed >= s.reckonAt {
		// Until the estimates are many, ref follows them closely:
		// reckon at the 1st, 2nd, 4th, … completion, O(n log n) in
		// all, the last once every worker could have a few runs.
		if s.reckonAt = 2 * max(s.completed, 1); s.reckonAt > 8*int64(s.pool.Len()) {
			s.reckonAt = math.MaxInt64
		}
	}
	xs := s.scratch[:0]
	for i := range s.pool.slots {
		w := s.pool.slots[i].w
		if w.service.Load() != 0 {
			xs = append(xs, s.expect(w)*w.weight)
		}
	}
	if len(xs) > 0 {
		slices.Sort(xs)
		s.ref = xs[(len(xs)-1)/2] // the lower median: of two, the faster
		if s.published != nil {
			s.published.Store(int64(s.ref))
		}
	}
	s.scratch = xs
	s.refresh()
}

// freshen brings the root's cost up to date with the age of the requests
// it runs, with the load estimate: a request running far longer than its
// worker's mean raises that worker's cost, so a worker that stalls stops
// getting requests without any ejection machinery, and gets them again as
// soon as it completes one. Between a worker's completions its cost only
// grows with age, so the cost kept in each slot is a lower bound, and a
// root whose kept cost is current is the cheapest worker. freshen raises
// roots until one is current: each worker at most once, and only a root
// with room that has completed nothing since it took as many requests as
// it has slots (a worker that completes requests is not stalling), so a
// healthy worker costs a few comparisons and no reading of the clock.
func (s *sched[Req, Res]) freshen() {
	if !s.estimate {
		return
	}
	var now int64
	for s.pool.Len() > 0 {
		r := &s.pool.slots[0]
		if r.w.pending == 0 || r.w.pending >= r.w.limit || r.w.silent < r.w.concurrency {
			return
		}
		if now == 0 {
			now = s.clock()
			s.now = max(s.now, now)
		}
		c := s.costAt(r.w, now)
		if c <= r.cost {
			return
		}
		r.cost = c
		s.pool.fix(0)
	}
}

// Service times are learned as a moving average that rises fast and falls
// slowly, the idea of peak-EWMA load balancers: a run slower than the
// average moves it 1/riseSmoothing of the way, a faster one
// 1/fallSmoothing, and a run counts four times the average at most, so
// one stall moves it little. Run times vary a lot from one request to the
// next; the slow fall keeps equal workers from looking different by
// accident, the fast rise notices a slowdown within a few requests. In
// TestBalanceQuality, with two of eight workers at a tenth of their speed
// for 400 ms of every 2 s, the p99 of requests arriving then was 1.2× an
// oracle that knows every speed with 1/16 either way, and 0.95× with 1/4
// up; equal workers did not change (1/2 up costs them 1 %).
const (
	riseSmoothing = 4
	fallSmoothing = 16
)

// levelRise is how far a slower run moves a worker's level, the second,
// calmer average that places it on the scale (see expect and key): an
// eighth of the way, so that the noise of run times, which the peak
// average follows closely, rarely carries an equal worker off the centre
// step. A run counts levelMost times the level at most, and one that slow
// moves it a quarter of the way, to 2.75 times itself: off the centre step
// at once. Of geometric run times with a mean of 2 ms, one in 2^15 is that
// far above it; of a worker ten times slower, every one whose request
// takes more than the shortest time is, and so is nearly every answer of a
// backend that browns out under several clients' load, whose queue grows.
// (The peak average counts peakMost times itself at most: it reacts to
// every slow run, and one stall should move it little.)
const (
	levelRise = 8
	levelMost = 8
	peakMost  = 4
)

// observeWait folds the wait of a request that w's slot starts into w's
// total and moving average, 1/fallSmoothing of the way either way: a wait
// is for the operator, not for the policy, and an average that steps
// evenly reads best. w's slots call it concurrently; each wait counts
// once. (The balancer-wide average is computed by Stats from the workers',
// which keeps a line of memory shared by every worker off the hot path.)
func observeWait[Req, Res any](w *worker[Req, Res], d time.Duration) {
	if a := w.wait.Load(); d == 0 && a > 0 && a <= fallSmoothing {
		return // a step of 1/fallSmoothing from here to no wait rounds to nothing
	}
	w.waited.Add(int64(d))
	ewma(&w.wait, int64(max(d, 1))) // zero means "no observation"
}

// ewma moves the average a 1/fallSmoothing of the way to d, or sets it
// to d if it has none yet.
func ewma(a *atomic.Int64, d int64) {
	for {
		old := a.Load()
		next := d
		if old != 0 {
			next = old + (d-old)/fallSmoothing
		}
		if a.CompareAndSwap(old, next) {
			return
		}
	}
}

// observe folds one run time d of the Func, which ended at end (a clock
// reading), into w's moving average. The first runs make a plain running
// mean (the n-th moves it 1/n of the way), and the first of all counts
// bucket times the worker's prior at most, until the second replaces it,
// so that one slow first call does not set a worker's estimate. From the
// riseSmoothing-th run on a slower run moves it 1/riseSmoothing, and from
// the fallSmoothing-th on a faster one 1/fallSmoothing. A run after a gap
// g since the worker's last moves it at least 1 − e^(-g/decay) of the
// way: the older the average, the less it counts. After a gap of more
// than staleAfter the estimate had expired (see stale), and the run
// starts a new mean, unless it finds the worker as slow as the estimate
// said (see stillSlow). w's slots call it concurrently; each observation
// counts once.
func (w *worker[Req, Res]) observe(d time.Duration, end int64) {
	d = max(d, 1) // zero means "no observation"
	n := w.observed.Load()
	prev := w.seen.Swap(end)
	gap := end - prev
	if n >= fallSmoothing && (prev == 0 || gap <= decayFrom) { // the common case, kept short
		step(&w.service, int64(d), riseSmoothing, peakMost)
		step(&w.level, int64(d), levelRise, levelMost)
		return
	}
	// The first runs depend on each other (the running mean, the capped
	// first run and the second that replaces it), and so does a restart:
	// slots that finish at once take their turns. They are rare, and the
	// common case above never waits.
	w.early.Lock()
	defer w.early.Unlock()
	if n < fallSmoothing { // past it, n is not read
		n = w.observed.Add(1)
	}
	var fresh float64 // the least share of the way the observation moves the average, for its gap
	if prev != 0 && gap > decayFrom {
		if gap > staleAfter { // the estimate had expired: a probe's run
			w.probeRun.Store(int64(d))
			if !w.stillSlow(d) {
				w.restart(d)
				return
			}
		}
		fresh = -math.Expm1(-float64(gap) / float64(decay))
	}
	// A worker's first run counts as bucket times its prior at most, and
	// then only until its second: a cold first call (a new connection, a
	// GPU warming up) leaves it on the centre step (see key), and its next
	// run says what it is worth.
	var first int64
	if w.service.Load() == 0 {
		if prior := float64(w.b.ref.Load()) / w.weight; prior > 0 {
			first = int64(bucket * prior)
		}
	}
	replace := n == 2 && w.provisional.Load() && w.provisional.CompareAndSwap(true, false)
	if fold(&w.service, int64(d), first, replace, min(n, riseSmoothing), min(n, fallSmoothing), peakMost, fresh) {
		w.provisional.Store(true)
	}
	fold(&w.level, int64(d), first, replace, min(n, levelRise), min(n, fallSmoothing), levelMost, fresh)
}

// step is fold for an established average and a run with no gap before
// it: 1/rise of the way up, or 1/fallSmoothing down; a run most times a
// or slower counts as most times a and moves it 1/riseSmoothing.
func step(a *atomic.Int64, d, rise, most int64) {
	for {
		old := a.Load()
		next := old + (d-old)/fallSmoothing
		switch {
		case d >= most*old:
			next = old + (most-1)*old/riseSmoothing
		case d > old:
			next = old + (d-old)/rise
		}
		if a.CompareAndSwap(old, next) {
			return
		}
	}
}

// fold moves the moving average a toward a run of d, 1/rise of the way
// if it is slower, 1/fall if faster, or fresh of the way if that is more;
// a run most times a or slower counts as most times a, and moves it
// 1/riseSmoothing of the way if rise is more. An average with no run yet
// takes d, or first if d is more and first is not 0, and then reports
// that it capped it; replace takes d whole. Slots call it concurrently;
// each run counts once.
func fold(a *atomic.Int64, d, first int64, replace bool, rise, fall, most int64, fresh float64) (capped bool) {
	for {
		old := a.Load()
		next := d
		capped = false
		switch {
		case old == 0:
			if first > 0 && next > first {
				next, capped = first, true
			}
		case replace:
		default:
			k := fall
			switch {
			case next >= most*old:
				next, k = most*old, min(rise, riseSmoothing)
			case next > old:
				k = rise
			}
			if fresh > 0 && fresh > 1/float64(k) {
				next = old + int64(fresh*float64(next-old))
			} else {
				next = old + (next-old)/k
			}
		}
		if a.CompareAndSwap(old, next) {
			return capped
		}
	}
}

// stillSlow reports whether a run of d after w's estimate expired
// confirms that estimate: the level is more than bucket² times the
// worker's prior (as in probed) and the run more than bucket times, off
// the centre step (see key). Then the old averages, many runs deep, say
// more than the one run does, which folds into them for its gap instead
// of starting them anew (see restart). Started anew, the level of a
// worker 10× slower was 3× after a short request (half of it the
// prior's), and the hold-back sent it requests whenever the others were
// busy: in TestBalanceQuality's "4 of capacity 4, 1 10× slower" at 0.5,
// 9–12 requests in 100 000 went to it (seeds 21–30), 9–10 with this.
// A worker 4× slower, whose short requests take 2–2.25× the prior, went
// back to the centre step after half its probes; with the run's line at
// bucket rather than bucket², the p99 of "2 of 8 4× slower" at 0.5 over
// 18 seeds went from 7.0–7.3 ms to 7.0–7.1 (the balancer before estimates
// expired: 7.0), and at load 0.05 the recovered worker's share 22–30 s
// after it healed stayed at 0.91–1.07 of fair over five seeds.
func (w *worker[Req, Res]) stillSlow(d time.Duration) bool {
	prior := float64(w.b.ref.Load()) / w.weight
	return prior > 0 && float64(d) > bucket*prior && float64(w.level.Load()) > bucket*bucket*prior
}

// restart starts w's moving averages anew with a run of d, after its
// estimate expired: the peak average takes d, which the hold-back and
// probed read; the level, which places the worker on the scale, takes the
// mean of d and the worker's prior, so that one unlucky run does not put
// a worker of the usual speed off the centre step again.
func (w *worker[Req, Res]) restart(d time.Duration) {
	level := int64(d)
	if prior := float64(w.b.ref.Load()) / w.weight; prior > 0 {
		level = (int64(prior) + int64(d)) / 2
	}
	w.service.Store(int64(d))
	w.level.Store(level)
	w.observed.Store(1)
}

// holdMargin is how much sooner waiting must be expected to finish a
// request before holdBack holds it. Holding at the break-even point (1)
// ignores that a request sent to the root also shortens the wait of every
// request behind it. In TestBalanceQuality (100 000 requests a row, two of
// eight workers four times slower), p99 ÷ shared channel at loads 0.5, 0.7,
// 0.8 and 0.9 is 0.44, 0.54, 0.66, 0.96 at margin 2; 0.44, 0.50, 0.62,
// 0.95 at 1.5; 0.44, 0.50, 0.62, 0.97 at 1.25; and 1 starts to cost equal
// workers (1.02 at 0.7).
const holdMargin = 1.5

// holdFloor is the least expected time at the root for which holdBack
// holds a request: holding costs a wake-up of the loop and of the caller,
// a microsecond or two, so when the root is expected to finish a request
// in less than this, sending it there is as good as any wait. It also
// keeps a pool of sub-microsecond Funcs, whose measured times are mostly
// noise, from holding back at random.
const holdFloor = float64(10 * time.Microsecond)

// mayHold reports whether the loop may hold back at all, before it reads
// the callers waiting: with the load estimate, a full worker to wait for,
// no hold just run out, and a root slow enough to be worth it.
func (s *sched[Req, Res]) mayHold() bool {
	return s.busy > 0 && !s.expired && s.pool.slots[0].cost > holdFloor
}

// rootTime is the root's expected time for one more request: its cost
// before key rounds it (see costAt), its failures counted, and with
// WithHedge the age of an attempt of it that lost to its hedge (see
// lost).
func (s *sched[Req, Res]) rootTime() float64 {
	w := s.pool.root()
	t := float64(w.service.Load()) // the peak average: the hold-back reacts to a slowdown at once
	if t == 0 {
		t = s.ref / w.weight
	}
	if s.hedging {
		t = max(t, s.lost(w))
	}
	if w.health.Load() != 0 {
		t *= s.penalty(w)
	}
	n := max(w.pending+1, w.concurrency)
	return float64(n) * t / float64(w.concurrency)
}

// holds reports whether the next request should wait for a busy worker
// rather than go to the root, which has room, while waiting callers wait
// (see Balancer.holdBack); mayHold must be true.
//
// The full workers that have a mean service time s free slots at a
// combined rate R = Σ c/s over their concurrencies c, and hold H = Σ c ×
// depth requests. If k callers are waiting (at least the one the decision
// is for), the last of them is expected to be served by a full worker
// after about (k + H)/R: k slots to free, then the requests ahead of it
// and its own. The loop holds back while holdMargin times that is less
// than the root's cost, its expected time for one more request.
// With equal workers it never is, and as callers pile up behind the full
// workers it stops being so, which sends the root its share.
func (s *sched[Req, Res]) holds(waiting int64) bool {
	k := max(waiting, 1)
	return s.rootTime()*s.busyRate > holdMargin*float64(k+int64(s.busyHeld))
}

// holdFor is how long callers may be held: the root's expected time for
// one more request. Once they have been held that long, the next request
// goes to the root (see expire), so a stalled worker cannot strand them.
func (s *sched[Req, Res]) holdFor() time.Duration {
	return time.Duration(s.rootTime())
}

// expire records that callers were held for holdFor: the next request
// goes to the root, and after it the loop may hold again.
func (s *sched[Req, Res]) expire() { s.expired = true }

// countBusy adds w, which has just become full, to the busy workers
// holds waits for, if it has a mean service time.
func (s *sched[Req, Res]) countBusy(w *worker[Req, Res]) {
	if !s.estimate {
		return
	}
	if t := w.service.Load(); t != 0 {
		w.rate = float64(w.concurrency) / float64(t)
		s.busy++
		s.busyRate += w.rate
		s.busyHeld += w.limit
	}
}

// uncountBusy takes w out of the busy workers, if it is counted there.
func (s *sched[Req, Res]) uncountBusy(w *worker[Req, Res]) {
	if w.rate == 0 {
		return
	}
	s.busy--
	s.busyRate -= w.rate
	s.busyHeld -= w.limit
	w.rate = 0
	if s.busy == 0 {
		s.busyRate = 0 // no rounding error carried over
	}
}

// Ejection. A worker whose last ejectAfter outcomes were Failures leaves
// the heap for ejectBase, doubled for each ejection in a row up to
// ejectMax, and scaled by a random factor in [0.5, 1.5), so that workers
// that failed together do not all come back at once. Then the next
// request dispatched is its probe (see probeDue): its outcome returns the
// worker, ejects it again or, if it says nothing, makes the next request
// its probe. Every step is the loop's, at a completion, a look for room
// (see settle) or a dispatch; the clock is read only while some worker is
// ejected. Five in a row is Envoy's and Finagle's trip; 1 s doubling with
// ±50 % jitter is Linkerd's failure accrual, its 60 s cap halved: an
// in-process pool wants a false ejection to be cheap, and Envoy's and
// gRPC's 30 s to 300 s are made for fleets of hosts.
const (
	ejectAfter  = 5
	ejectBase   = int64(time.Second)
	ejectMax    = int64(30 * time.Second)
	inRowWithin = int64(decay) // an ejection this soon after the worker's return counts as in a row
)

// maxOut is how many workers may be ejected at once: half of them, at
// least one, never the last (Envoy's and Finagle's panic threshold, with
// Envoy's lesson that a bare percentage ejects none of a few workers).
func (s *sched[Req, Res]) maxOut() int {
	live := s.pool.Len() + len(s.out)
	return max(0, min(max(1, live/2), live-1))
}

// ejectable reports whether one more worker may be ejected.
func (s *sched[Req, Res]) ejectable() bool { return len(s.out) < s.maxOut() }

// settle ejects the workers whose failures called for it since the
// loop's last look, as far as the cap allows. It runs when the loop
// looks for room (see hasRoom), never between that look and the dispatch
// it allows: the completions taken there may make a worker doomed, and
// ejecting it then could take away the room the dispatch was promised.
func (s *sched[Req, Res]) settle() {
	for _, w := range s.doomed {
		w.doomed = false
		if !w.removed && !w.ejected && w.streak.Load() >= ejectAfter && s.ejectable() {
			s.ejectWorker(w)
		}
	}
	clear(s.doomed)
	s.doomed = s.doomed[:0]
}

// ejectWorker takes w, which is in the heap, out of it: it gets no
// requests until its probe.
func (s *sched[Req, Res]) ejectWorker(w *worker[Req, Res]) {
	now := s.clock()
	if w.back == 0 || now-w.back > inRowWithin {
		w.inRow = 0
	}
	s.pool.remove(w)
	s.uncountBusy(w)
	w.ejected = true
	s.out = append(s.out, w)
	s.banish(w, now)
}

// banish (re)starts w's ejection at now, for its next length in a row.
func (s *sched[Req, Res]) banish(w *worker[Req, Res], now int64) {
	d := min(ejectBase<<w.inRow, ejectMax)
	w.inRow = min(w.inRow+1, 5) // 1 s << 5 is past ejectMax
	w.until = now + int64(float64(d)*(0.5+s.jitter()))
	w.trial = false
	w.onTrial.Store(false)
	w.outUntil.Store(w.until)
	w.ejections.Add(1)
	s.ejections.Add(1)
	s.setDue()
}

// setDue finds the next probe due: the earliest end of an ejection whose
// worker has room for its probe and none out. (A worker is ejected at the
// loop's next look after its failure, and may have taken a request in
// between, so it can be full.)
func (s *sched[Req, Res]) setDue() {
	s.due = 0
	for _, w := range s.out {
		if !w.trial && w.pending < w.limit && (s.due == 0 || w.until < s.due) {
			s.due = w.until
		}
	}
}

// probeDue returns the ejected worker whose probe is due, if any, and
// records the dispatch of its probe. s.due must not be 0.
func (s *sched[Req, Res]) probeDue() *worker[Req, Res] {
	now := s.clock()
	if now < s.due {
		return nil
	}
	for _, w := range s.out {
		if !w.trial && w.pending < w.limit && w.until <= now {
			w.trial = true
			w.pending++
			w.probeClass.Store(0)
			w.onTrial.Store(true)
			s.probes.Add(1)
			s.setDue()
			return w
		}
	}
	s.setDue() // cannot happen: due is one of out's
	return nil
}

// completeOut records a completion of w, which is ejected: the outcome of
// its probe, if that was it.
func (s *sched[Req, Res]) completeOut(w *worker[Req, Res]) {
	if !w.trial {
		if s.due == 0 || w.until < s.due {
			s.setDue() // it may have room for its probe now
		}
		return
	}
	c := w.probeClass.Load()
	if c == 0 {
		return // an older request
	}
	switch Class(c - 1) {
	case Success, Overload:
		s.restore(w)
	case Failure, Unavailable:
		s.probeFailures.Add(1)
		s.banish(w, s.clock())
	default: // it says nothing: the next request probes again
		w.trial = false
		w.onTrial.Store(false)
		w.until = min(w.until, s.clock())
		s.setDue()
	}
}

// restore returns w, which is ejected, to the heap; it sorts after the
// workers of equal cost.
func (s *sched[Req, Res]) restore(w *worker[Req, Res]) {
	s.leave(w)
	w.ejected, w.trial = false, false
	w.back = s.clock()
	w.outUntil.Store(0)
	w.onTrial.Store(false)
	s.pool.add(w, s.cost(w), s.perSlot(w), s.seq)
	if w.pending == w.limit {
		s.countBusy(w)
	}
}

// leave takes w out of out.
func (s *sched[Req, Res]) leave(w *worker[Req, Res]) {
	i := slices.Index(s.out, w)
	s.out = slices.Delete(s.out, i, i+1)
	s.setDue()
}

// The failure rate: a moving average of a worker's outcomes (1 a Failure
// or Overload, 0 a Success), each moving it 1/failSmoothing of the way,
// that also decays toward 0 with time, e^(−t/decay): an idle or ejected
// worker is not condemned for good. It is kept in one word, health: the
// rate in the low 16 bits (rateOne is 1), and when it last moved in the
// rest, in ticks of 2^20 ns (about 1 ms). A rate under rateOne/128 that a
// Success lowers is cleared, so that a healthy worker's word is 0, which
// costs it nothing. The penalty caps the rate at maxFailRate: a worker
// that fails every request costs 20 times its speed.
const (
	failSmoothing = 8
	rateOne       = 1<<16 - 1
	tickShift     = 20
	maxFailRate   = 0.95
)

// failRate is the rate in health as of now, a clock reading.
func failRate(health uint64, now int64) float64 {
	e := float64(health&rateOne) / rateOne
	if dt := now - int64(health>>16)<<tickShift; e > 0 && dt > 0 {
		e *= math.Exp(-float64(dt) / float64(decay))
	}
	return e
}

// account records the class c of an outcome in w's health: a Success ends
// its run of Failures and lowers its failure rate (a probe's clears it), a
// Failure lengthens the run and raises the rate, an Overload raises the
// rate. The outcome of a probe is also kept for the loop (see
// completeOut). w's slots call it concurrently.
func (w *worker[Req, Res]) account(probe bool, c Class) {
	switch c {
	case Success:
		if w.streak.Load() != 0 {
			w.streak.Store(0)
		}
		if probe {
			w.health.Store(0)
		} else if w.health.Load() != 0 {
			w.foldHealth(0)
		}
	case Failure, Unavailable:
		w.streak.Add(1)
		w.foldHealth(1)
	case Overload:
		w.foldHealth(1)
	}
	if probe {
		w.probeClass.Store(uint32(c) + 1)
	}
}

// foldHealth moves w's failure rate toward x, 1 or 0.
func (w *worker[Req, Res]) foldHealth(x float64) {
	now := w.b.now()
	for {
		old := w.health.Load()
		e := failRate(old, now)
		e += (x - e) / failSmoothing
		next := uint64(0)
		if q := uint64(math.Round(e * rateOne)); x > 0 || q >= rateOne/128 {
			next = uint64(now>>tickShift)<<16 | max(q, 1)
		}
		if w.health.CompareAndSwap(old, next) {
			return
		}
	}
}

// observeFailure folds the run time d of a Failure or Overload that ended
// at end into w's estimate as at least the worker's moving average, or its
// prior before it has one: a failure never makes a worker look faster,
// and a slow one (a timeout) makes it look slower. A worker with neither
// has nothing to keep: a failure does not set its first estimate.
func (w *worker[Req, Res]) observeFailure(d time.Duration, end int64) {
	floor := w.service.Load()
	if floor == 0 {
		floor = int64(float64(w.b.ref.Load()) / w.weight)
	}
	if floor == 0 {
		return
	}
	w.observe(max(d, time.Duration(floor)), end)
}

// untried returns the cheapest worker in the heap with room whose ID is
// not in tried, if any, and whether the heap has a worker not in tried at
// all. O(n): it serves retries only.
func (s *sched[Req, Res]) untried(tried []int) (best *worker[Req, Res], any bool) {
	var at *slot[Req, Res]
	for i := range s.pool.slots {
		sl := &s.pool.slots[i]
		if slices.Contains(tried, sl.w.id) {
			continue
		}
		any = true
		if sl.w.pending < sl.w.limit && (at == nil || sl.before(at)) {
			at = sl
		}
	}
	if at == nil {
		return nil, any
	}
	return at.w, true
}

// spare returns the cheapest worker in the heap with a free slot (fewer
// requests pending than its concurrency) whose ID is not in tried, or nil.
// O(n): it serves hedges only.
func (s *sched[Req, Res]) spare(tried []int) *worker[Req, Res] {
	var at *slot[Req, Res]
	for i := range s.pool.slots {
		sl := &s.pool.slots[i]
		if sl.w.pending < sl.w.concurrency && (at == nil || sl.before(at)) && !slices.Contains(tried, sl.w.id) {
			at = sl
		}
	}
	if at == nil {
		return nil
	}
	return at.w
}

// dispatchTo records one more request at w, which is in the heap and has
// room: a retry, which untried chose, or a hedge, which spare chose.
func (s *sched[Req, Res]) dispatchTo(w *worker[Req, Res]) {
	w.pending++
	w.silent++
	if w.pending == w.limit {
		s.countBusy(w)
	}
	s.pool.slots[s.pool.at[w.handle]].last = s.seq
	s.seq++
	s.touch(w)
}
