package balancer

import "container/heap"

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
func (p *pool[Req, Res]) Less(i, j int) bool {
	a, b := &p.slots[i], &p.slots[j]
	if a.cost != b.cost {
		return a.cost < b.cost
	}
	return a.last < b.last
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

// add puts w in the heap; last orders it among workers of equal cost.
func (p *pool[Req, Res]) add(w *worker[Req, Res], last int64) {
	if n := len(p.free); n > 0 {
		w.handle = p.free[n-1]
		p.free = p.free[:n-1]
	} else {
		w.handle = len(p.at)
		p.at = append(p.at, -1)
	}
	heap.Push(p, slot[Req, Res]{cost: w.cost(), last: last, h: w.handle, w: w})
}

// remove takes w out of the heap.
func (p *pool[Req, Res]) remove(w *worker[Req, Res]) {
	heap.Remove(p, p.at[w.handle])
	p.free = append(p.free, w.handle)
}

// touch restores the heap order after w's load changed: it refreshes w's
// cost in its slot and moves the slot.
func (p *pool[Req, Res]) touch(w *worker[Req, Res]) {
	i := p.at[w.handle]
	p.slots[i].cost = w.cost()
	heap.Fix(p, i)
}

// dispatched records a dispatch to the root, which then sorts after every
// worker of equal cost.
func (p *pool[Req, Res]) dispatched(seq int64) {
	p.slots[0].last = seq
	p.touch(p.slots[0].w)
}

// refresh recomputes every cost and re-sorts, after many changed at once.
// O(n).
func (p *pool[Req, Res]) refresh() {
	for i := range p.slots {
		p.slots[i].cost = p.slots[i].w.cost()
	}
	heap.Init(p)
}
