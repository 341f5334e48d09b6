package balancer

import "container/heap"

// pool is a min-heap of workers ordered by load, the priority queue of the
// select loop. The loop owns it outright: no other goroutine reads or writes
// it, or the loop-owned fields of its workers.
//
// Each slot holds its worker's sort key beside the pointer, so comparisons
// read one contiguous slice instead of chasing a pointer per worker; with
// thousands of workers that is most of the cost of a dispatch.
//
// Invariant: for every i > 0, p.Less(i, (i-1)/2) is false, and
// p[i].w.index == i. So p[0] is the worker with the lowest cost (expected
// wait for one more request) and, among equals, the one whose last dispatch
// is oldest. Reading p[0] is O(1); Push, Pop, Fix and Remove through
// container/heap are O(log n).
type pool[Req, Res any] []slot[Req, Res]

type slot[Req, Res any] struct {
	cost float64 // w.cost() when last set
	last int64   // dispatch sequence number of w's latest request
	w    *worker[Req, Res]
}

var _ heap.Interface = (*pool[int, int])(nil)

// Len is the number of workers in the heap.
func (p pool[Req, Res]) Len() int { return len(p) }

// Less orders by cost, then by the sequence number of the last dispatch, so
// equally loaded workers take turns instead of the root taking every
// request while the load is light.
func (p pool[Req, Res]) Less(i, j int) bool {
	if p[i].cost != p[j].cost {
		return p[i].cost < p[j].cost
	}
	return p[i].last < p[j].last
}

// Swap exchanges two slots and keeps each worker's index equal to its slot,
// which heap.Fix and heap.Remove depend on.
func (p pool[Req, Res]) Swap(i, j int) {
	p[i], p[j] = p[j], p[i]
	p[i].w.index = i
	p[j].w.index = j
}

// Push appends a slot; call it through heap.Push.
func (p *pool[Req, Res]) Push(x any) {
	s := x.(slot[Req, Res])
	s.w.index = len(*p)
	*p = append(*p, s)
}

// Pop removes the last slot and returns its worker; call it through
// heap.Pop or heap.Remove.
func (p *pool[Req, Res]) Pop() any {
	old := *p
	n := len(old)
	w := old[n-1].w
	old[n-1] = slot[Req, Res]{} // let the slice not keep a removed worker alive
	w.index = -1                // the worker is out of the heap; heap.Fix on it would be a bug
	*p = old[:n-1]
	return w
}

// touch restores the heap order after w's load changed: it refreshes w's
// cost in its slot and moves the slot. O(log n).
func (p pool[Req, Res]) touch(w *worker[Req, Res]) {
	p[w.index].cost = w.cost()
	heap.Fix(&p, w.index)
}
