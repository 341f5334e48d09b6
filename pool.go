package balancer

import (
	"container/heap"
	"math"
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
	clock    func() int64 // b.now: read only when a decision needs the time
	seq      int64        // dispatch sequence number

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
	cost float64 // w.cost() as of the last touch
	last int64   // dispatch sequence number of w's latest request
	h    int     // w.handle
	w    *worker[Req, Res]
}

var _ heap.Interface = (*pool[int, int])(nil)

// Len is the number of workers in the heap.
func (p *pool[Req, Res]) Len() int { return len(p.slots) }

// Less orders by cost, then by the sequence number of the last dispatch, so
// equally loaded workers take turns instead of the root taking every
// request while the load is light.
func (p *pool[Req, Res]) Less(i, j int) bool { return p.slots[i].before(&p.slots[j]) }

// before is Less on two slots.
func (s *slot[Req, Res]) before(t *slot[Req, Res]) bool {
	if s.cost != t.cost {
		return s.cost < t.cost
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

// add puts w in the heap at cost; last orders it among workers of equal
// cost.
func (p *pool[Req, Res]) add(w *worker[Req, Res], cost float64, last int64) {
	if n := len(p.free); n > 0 {
		w.handle = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		w.handle = len(p.at)
		p.at = append(p.at, -1)
	}
	heap.Push(p, slot[Req, Res]{cost: cost, last: last, h: w.handle, w: w})
}

// remove takes w out of the heap.
func (p *pool[Req, Res]) remove(w *worker[Req, Res]) {
	heap.Remove(p, p.at[w.handle])
	p.free = append(p.free, w.handle)
}

// touch restores the heap order after w's cost changed: it puts the new
// cost in w's slot and moves the slot.
func (p *pool[Req, Res]) touch(w *worker[Req, Res], cost float64) {
	i := p.at[w.handle]
	p.slots[i].cost = cost
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
	s := p.slots[i]
	j := i
	for j > 0 { // up, past every parent that s sorts before
		up := (j - 1) / 2
		if !s.before(&p.slots[up]) {
			break
		}
		p.move(up, j)
		j = up
	}
	if j == i { // it did not go up, so it may go down
		for n := len(p.slots); ; {
			c := 2*j + 1
			if c >= n {
				break
			}
			if r := c + 1; r < n && p.slots[r].before(&p.slots[c]) {
				c = r
			}
			if !p.slots[c].before(&s) {
				break
			}
			p.move(c, j)
			j = c
		}
	}
	p.slots[j] = s
	p.at[s.h] = j
}

// move copies slot from to slot to, keeping at right.
func (p *pool[Req, Res]) move(from, to int) {
	p.slots[to] = p.slots[from]
	p.at[p.slots[to].h] = to
}

// dispatched records a dispatch to the root, whose cost is now cost,
// which then sorts after every worker of equal cost.
func (p *pool[Req, Res]) dispatched(cost float64, seq int64) {
	p.slots[0].last = seq
	p.slots[0].cost = cost
	p.fix(0)
}

// cost is the pool's sort key: the expected wait for one more request at w,
// in units that only need to compare. With the load estimate (the default)
// it is the expected time to finish one more request: the worker's service
// time s if a slot is free, else s × (pending+1)/concurrency, the time for
// the requests ahead to drain through all slots. s is the observed mean,
// zero before the first observation so that a new worker is tried first,
// or the age of the oldest request running if that is more (see freshen).
// Without the estimate it is the requests w would then have per slot,
// divided by its weight. A full worker costs +Inf: the root has room
// whenever any worker has.
func (s *sched[Req, Res]) cost(w *worker[Req, Res]) float64 { return s.costAt(w, 0) }

// costAt is cost counting the running requests' ages as of now, a clock
// reading; 0 leaves them out.
func (s *sched[Req, Res]) costAt(w *worker[Req, Res], now int64) float64 {
	if w.pending >= w.limit {
		return math.Inf(1)
	}
	if !s.estimate {
		return float64(w.pending+1) * w.unit
	}
	t := w.service.Load()
	if now != 0 {
		t = max(t, w.oldest(now))
	}
	n := max(w.pending+1, w.concurrency)
	return float64(n) * float64(t) / float64(w.concurrency)
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
	s.pool.add(w, s.cost(w), minSeq+int64(w.id))
}

// remove takes w out of the heap and out of the hold-back's count.
func (s *sched[Req, Res]) remove(w *worker[Req, Res]) {
	s.pool.remove(w)
	s.uncountBusy(w)
}

// hasRoom reports whether some worker can take a request. Looking at the
// root is enough: a full worker costs +Inf, so it is the root only if
// every worker is full.
func (s *sched[Req, Res]) hasRoom() bool {
	s.freshen()
	return s.pool.Len() > 0 && s.pool.root().pending < s.pool.root().limit
}

// dispatch records one more request at the cheapest worker, which has
// room, and returns that worker.
func (s *sched[Req, Res]) dispatch() *worker[Req, Res] {
	w := s.pool.root()
	w.pending++
	w.silent++
	if w.pending == w.limit {
		s.countBusy(w)
	}
	s.expired = false
	s.pool.dispatched(s.cost(w), s.seq)
	s.seq++
	return w
}

// complete records that w finished a request.
func (s *sched[Req, Res]) complete(w *worker[Req, Res]) {
	s.uncountBusy(w)
	w.pending--
	w.silent = 0
	if !w.removed {
		s.touch(w)
	}
}

// touch restores the heap order after w's cost changed.
func (s *sched[Req, Res]) touch(w *worker[Req, Res]) { s.pool.touch(w, s.cost(w)) }

// refresh recomputes every cost and re-sorts, after many changed at once.
// O(n).
func (s *sched[Req, Res]) refresh() {
	for i := range s.pool.slots {
		s.pool.slots[i].cost = s.cost(s.pool.slots[i].w)
	}
	heap.Init(&s.pool)
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

// observe folds one run time of the Func into w's moving average. w's
// slots call it concurrently; each observation counts once.
func (w *worker[Req, Res]) observe(d time.Duration) {
	d = max(d, 1) // zero means "no observation"
	for {
		old := w.service.Load()
		next := int64(d)
		switch {
		case old == 0:
		case next > old:
			next = old + (min(next, 4*old)-old)/riseSmoothing
		default:
			next = old + (next-old)/fallSmoothing
		}
		if w.service.CompareAndSwap(old, next) {
			return
		}
	}
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
	return s.busy > 0 && !s.expired && s.pool.slots[0].cost >= holdFloor
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
	return s.pool.slots[0].cost*s.busyRate > holdMargin*float64(k+int64(s.busyHeld))
}

// holdFor is how long callers may be held: the root's expected time for
// one more request. Once they have been held that long, the next request
// goes to the root (see expire), so a stalled worker cannot strand them.
func (s *sched[Req, Res]) holdFor() time.Duration {
	return time.Duration(s.pool.slots[0].cost)
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
	if t := w.service.Load(); t > 0 {
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
