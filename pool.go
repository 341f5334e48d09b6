package balancer

import "container/heap"

// pool is a min-heap of workers ordered by load, the priority queue of the
// select loop. The loop owns it outright: no other goroutine reads or writes
// it, or the loop-owned fields of its workers.
//
// Invariant: for every i > 0, p.Less(i, (i-1)/2) is false, and p[i].index == i.
// So p[0] is the worker with the fewest pending requests and, among those,
// the one whose last dispatch is oldest. Reading p[0] is O(1); Push, Pop,
// Fix and Remove through container/heap are O(log n).
type pool[Req, Res any] []*worker[Req, Res]

var _ heap.Interface = (*pool[int, int])(nil)

// Len is the number of workers in the heap.
func (p pool[Req, Res]) Len() int { return len(p) }

// Less orders by pending requests, then by the sequence number of the last
// dispatch, so equally loaded workers take turns instead of the root taking
// every request while the load is light.
func (p pool[Req, Res]) Less(i, j int) bool {
	if p[i].pending != p[j].pending {
		return p[i].pending < p[j].pending
	}
	return p[i].last < p[j].last
}

// Swap exchanges two workers and keeps each one's index equal to its slot,
// which heap.Fix and heap.Remove depend on.
func (p pool[Req, Res]) Swap(i, j int) {
	p[i], p[j] = p[j], p[i]
	p[i].index = i
	p[j].index = j
}

// Push appends a worker; call it through heap.Push.
func (p *pool[Req, Res]) Push(x any) {
	w := x.(*worker[Req, Res])
	w.index = len(*p)
	*p = append(*p, w)
}

// Pop removes the last worker; call it through heap.Pop or heap.Remove.
func (p *pool[Req, Res]) Pop() any {
	old := *p
	n := len(old)
	w := old[n-1]
	old[n-1] = nil // let the slice not keep a removed worker alive
	w.index = -1   // the worker is out of the heap; heap.Fix on it would be a bug
	*p = old[:n-1]
	return w
}
