#!/usr/bin/env python3
# Defect injection: applies each known defect to the source in turn, runs
# the tests, reports which tests caught it and restores the file.
# Run from the repository root: python3 .ci/mutants.py
# (RUN=regexp limits the tests; naming defects limits the defects).
import os, re, subprocess, sys
muts = {
 "depth ignored": ("pool.go", "return s.pool.Len() > 0 && s.pool.root().pending < s.pool.root().limit", "return s.pool.Len() > 0"),
 "result channel unbuffered": ("balancer.go", "reply := make(chan Result[Req, Res], 1)\n\tif err := b.submit(", "reply := make(chan Result[Req, Res])\n\tif err := b.submit("),
 "no recover": ("worker.go", "if v := recover(); v != nil {", "if v := any(nil); v != nil {"),
 "Swap forgets index": ("pool.go", "\tp.at[p.slots[i].h] = i\n\tp.at[p.slots[j].h] = j\n", ""),
 "Close drops queued": ("balancer.go", "\tcase c.op == opQuit:\n\t\tb.closing = true\n", "\tcase c.op == opQuit:\n\t\tb.closing = true\n\t\tfor _, s := range b.sched.pool.slots {\n\t\t\tfor len(s.w.reqs) > 0 {\n\t\t\t\t<-s.w.reqs\n\t\t\t\ts.w.pending--\n\t\t\t\tb.pending--\n\t\t\t}\n\t\t}\n"),
 "loop exits without draining": ("balancer.go", "for !b.closing || b.pending > 0 {", "for !b.closing {"),
 "recovered panic sends no outcome": ("worker.go", "\tw.finish(slot, r, res)\n}", "\tif _, ok := res.Err.(*PanicError); ok {\n\t\tw.b.report(w)\n\t\treturn\n\t}\n\tw.finish(slot, r, res)\n}"),
 "Goexit loses outcome and slot": ("worker.go", "\t\tres.Value, res.Err = *new(Res), ErrGoexit\n\t\tw.finish(i, r, *res)\n", "\t\tres.Value, res.Err = *new(Res), ErrGoexit\n"),
 "full worker keeps a finite cost": ("pool.go", "\tif w.pending >= w.limit {\n\t\treturn math.Inf(1)", "\tif false {\n\t\treturn math.Inf(1)"),
 "hold never times out": ("balancer.go", "b.timer.Reset(s.holdFor())", "b.timer.Reset(time.Hour)"),
 "waiting callers do not nudge a hold": ("balancer.go", "\tif b.holding.Load() {\n", "\tif false {\n"),
 "a caller waiting in a hand-off does not nudge a hold": ("balancer.go", "\tdefer b.waiting.Add(-1)\n\tb.nudgeHold()\n", "\tdefer b.waiting.Add(-1)\n"),
 "a queued Do does not nudge a hold": ("balancer.go", "\t\tb.enqueue(w)\n\t\tb.nudgeHold()\n", "\t\tb.enqueue(w)\n"),
 "hold ignores the callers waiting": ("pool.go", "k := max(waiting, 1)", "k := int64(1)"),
 "busy workers never uncounted": ("pool.go", "\tif w.rate == 0 {\n\t\treturn\n\t}\n\ts.busy--", "\tif true {\n\t\treturn\n\t}\n\ts.busy--"),
 "cost ignores concurrency": ("worker.go", "unit:        1 / (float64(o.concurrency) * o.weight),", "unit:        1 / o.weight,"),
 "limit ignores concurrency": ("worker.go", "limit := o.concurrency * b.depth", "limit := b.depth"),
 "one goroutine per worker": ("worker.go", "\tw.live.Store(int64(w.concurrency))\n\tw.b.wg.Add(w.concurrency)\n\tfor i := range w.concurrency {", "\tw.live.Store(1)\n\tw.b.wg.Add(1)\n\tfor i := range 1 {"),
 "estimate ignores free slots": ("pool.go", "\treturn float64(w.pending+w.concurrency) * w.lastKey / float64(w.concurrency)\n}", "\treturn float64(w.pending+1) * w.lastKey / float64(w.concurrency)\n}"),
 "hold-back's expected time ignores free slots": ("pool.go", "\tn := max(w.pending+1, w.concurrency)\n\treturn float64(n) * t", "\tn := w.pending + 1\n\treturn float64(n) * t"),
 "busy rate ignores concurrency": ("pool.go", "w.rate = float64(w.concurrency) / float64(t)", "w.rate = 1 / float64(t)"),
 "hold counts one request per busy worker": ("pool.go", "s.busyHeld += w.limit\n", "s.busyHeld += w.limit / w.concurrency\n"),
 "concurrency not checked": ("balancer.go", "\tcase o.concurrency < 1 || o.concurrency > MaxConcurrency:", "\tcase false:"),
 "AddWorker ignores New's worker options": ("balancer.go", "o := b.defaults.with(opts)", "o := defaultOptions().worker.with(opts)"),
 "RemoveWorker from a Func waits for itself": ("balancer.go", "if err != nil || b.inFunc() {", "if err != nil {"),
 "inFunc looks at the first slot only": ("worker.go", "\t\tfor i := range w.runners {", "\t\tfor i := range 1 {"),
 "TrySubmit drops the request's ctx": ("balancer.go", "r := request[Req, Res]{ctx: ctx, req: req, reply: reply}", "r := request[Req, Res]{ctx: context.Background(), req: req, reply: reply}"),
 "TrySubmit accepts a done ctx": ("balancer.go", "\tif err := ctx.Err(); err != nil {\n\t\treturn nil, err\n\t}\n\treply := make(chan Result[Req, Res], 1)", "\treply := make(chan Result[Req, Res], 1)"),
 "Shutdown cancels without a cause": ("balancer.go", "\t\tb.abort(ErrClosed)\n\t\tb.command(", "\t\tb.abort(nil)\n\t\tb.command("),
 "merged run context loses the cause": ("balancer.go", "func() { cancel(ErrClosed) }", "func() { cancel(nil) }"),
 "FanIn send ignores ctx": ("fanin.go", "\t\t\tselect {\n\t\t\tcase out <- v:\n\t\t\tcase <-ctx.Done():\n\t\t\t\treturn\n\t\t\t}\n", "\t\t\tout <- v\n"),
 "a hold that ran out never holds again": ("pool.go", "\ts.expired = false\n", ""),
 "Close returns before the workers end": ("balancer.go", "\tb.wg.Wait()\n\tb.abort(ErrClosed)", "\tb.abort(ErrClosed)"),
 "a running request's age not counted": ("pool.go", "\t\tt = max(t, float64(w.oldest(now)))", "\t\tt = max(t, 0)"),
 "estimate rises as slowly as it falls": ("pool.go", "\t\tstep(&w.service, int64(d), riseSmoothing)", "\t\tstep(&w.service, int64(d), fallSmoothing)"),
 "the first runs' peak rises as slowly as it falls": ("pool.go", "fold(&w.service, int64(d), first, replace, min(n, riseSmoothing),", "fold(&w.service, int64(d), first, replace, min(n, fallSmoothing),"),
 "the level rises as fast as the peak": ("pool.go", "\t\tstep(&w.level, int64(d), levelRise)", "\t\tstep(&w.level, int64(d), riseSmoothing)"),
 "hold margin back at 2": ("pool.go", "const holdMargin = 1.5", "const holdMargin = 2"),
 "estimate off by default": ("balancer.go", "depth: DefaultQueueDepth, estimate: true,", "depth: DefaultQueueDepth, estimate: false,"),
 "a late Do does not refuse the queue": ("balancer.go", "case <-b.quit:\n\t\t\tb.refuseQueued()", "case <-b.quit:"),
 "Do does not poke a loop about to park": ("balancer.go", "if b.idle.Load() && b.idle.CompareAndSwap(true, false) {", "if false {"),
 "loop parks without a last look at the queue": ("balancer.go", "if w := b.nextQueued(); w != nil { // the last look", "if w := (*waiter[Req, Res])(nil); w != nil { // the last look"),
 "loop parks on hand-offs without saying it is idle": ("balancer.go", "\t\t\tb.idle.Store(true)\n\t\t\tif w := b.nextQueued(); w != nil { // the last look", "\t\t\tif w := b.nextQueued(); w != nil { // the last look"),
 "queued request dispatched after Close began": ("balancer.go", "\tcase b.closing:\n\t\tr.deliver(", "\tcase false:\n\t\tr.deliver("),
 "queued request with a done ctx dispatched": ("balancer.go", "\tcase r.ctx.Err() != nil:\n\t\tr.deliver(", "\tcase false:\n\t\tr.deliver("),
 "closing loop leaves the queue alone": ("balancer.go", "\t\tb.closing = true\n\t\tb.refuseWaiting()\n", "\t\tb.closing = true\n"),
 "Stats does not count the queue": ("worker.go", "int(b.waiting.Load() + b.queued.Load())", "int(b.waiting.Load())"),
 "hold does not count the queue": ("balancer.go", "waiting = b.waiting.Load() + b.queued.Load()", "waiting = b.waiting.Load()"),
 "queued Do's wait not timed": ("balancer.go", "\t\tw.r.at = b.now() // it waits, so", "\t\t// it waits, so"),
 "a worker does not wake a sleeping loop": ("balancer.go", "\tif b.sleeping.Load() {\n", "\tif false {\n"),
 "loop sleeps without a last look at the stack": ("balancer.go", "if b.finished.Load() != nil || ready &&", "if false || ready &&"),
 "loop sleeps with room without a last look at the queue": ("balancer.go", "ready && (b.line != nil || b.queue.Load() != nil)", "ready && b.line != nil"),
 "loop sleeps with room without saying it is idle": ("balancer.go", "\tif ready {\n\t\tb.idle.Store(true)\n\t}\n\tb.sleeping.Store(true)", "\tb.sleeping.Store(true)"),
 "one completion taken per push": ("balancer.go", "for n := w.untaken.Swap(0); n > 0; n-- {", "for n := min(w.untaken.Swap(0), 1); n > 0; n-- {"),
 "loop never parks on hand-offs alone": ("balancer.go", "ready && b.draining == 0 && b.lone >= loneRounds", "ready && b.draining == 0 && false"),
 "a burst does not bring back sleeping on completions": ("balancer.go", "// a burst\n\t\t\tb.lone = 0\n", "// a burst\n"),
 "rounds that took nothing count as lone": ("balancer.go", "b.took == 1 && b.lone < loneRounds", "b.took <= 1 && b.lone < loneRounds"),
 "the loop refuses the queue but not the line": ("balancer.go", "\tfor w := b.line; w != nil; w = b.line {", "\tfor w := (*waiter[Req, Res])(nil); w != nil; w = b.line {"),
 "the line is taken newest first": ("balancer.go", "\t\t\tw.next = b.line\n\t\t\tb.line = w\n", "\t\t\tw.next = nil\n\t\t\tif b.line == nil {\n\t\t\t\tb.line = w\n\t\t\t} else {\n\t\t\t\tlast := b.line\n\t\t\t\tfor last.next != nil {\n\t\t\t\t\tlast = last.next\n\t\t\t\t}\n\t\t\t\tlast.next = w\n\t\t\t}\n"),
 "a cancelled Do reuses a waiter the loop holds": ("balancer.go", "\t\t\t// going back to the pool.\n\t\t\treturn zero, ctx.Err()", "\t\t\t// going back to the pool.\n\t\t\tb.release(w)\n\t\t\treturn zero, ctx.Err()"),
 "the loop takes the queue without counting it out": ("balancer.go", "\tr := w.r // once r has its outcome, w may be reused\n\tb.queued.Add(-1)\n", "\tr := w.r // once r has its outcome, w may be reused\n"),
 "TrySubmit's dispatch is not counted in the round": ("balancer.go", "\t\t\tb.dispatch(c.req)\n", "\t\t\tb.dispatch(c.req)\n\t\t\tb.took--\n"),
 "running never decremented": ("worker.go", "\tw.completed.Add(1)\n\tw.running.Add(-1)\n", "\tw.completed.Add(1)\n"),
 "the outcome sent before the slot is reported": ("worker.go", "\tw.b.report(w)\n\tr.deliver(res)\n", "\tr.deliver(res)\n\tw.b.report(w)\n"),
 "completion counted after the outcome": ("worker.go", "\tw.completed.Add(1)\n\tw.running.Add(-1)\n\t// The slot", "\tw.running.Add(-1)\n\tdefer w.completed.Add(1)\n\t// The slot"),
 "failure counted after the outcome": ("worker.go", "\tif res.Err != nil {\n\t\tw.failed.Add(1)\n\t}\n\tw.completed", "\tif res.Err != nil {\n\t\tdefer w.failed.Add(1)\n\t}\n\tw.completed"),
 "counters written after the slot is reported": ("worker.go", "\tw.b.report(w)\n\tr.deliver(res)\n", "\tw.completed.Add(^uint64(0))\n\tw.b.report(w)\n\tw.completed.Add(1)\n\tr.deliver(res)\n"),
 "stall age read from the last busy slot": ("pool.go", "age = max(age, now-since)", "age = now - since"),
 "stall age read from the first busy slot": ("pool.go", "age = max(age, now-since)", "return now - since"),
 "Submit's wait not timed": ("balancer.go", "\tr.at = b.now()\n\tb.waiting.Add(1)", "\tb.waiting.Add(1)"),
 "a wait in the worker's queue not timed": ("balancer.go", "\t\tr.at = b.now() // it waits in w's queue for a slot", "\t\t_ = r.at // it waits in w's queue for a slot"),
 "All's waits not counted": ("worker.go", "\tobserveWait(w, wait)\n", "\tif r.batch == nil {\n\t\tobserveWait(w, wait)\n\t}\n"),
 "TrySubmit's waits not counted": ("worker.go", "\tobserveWait(w, wait)\n", "\tif r.keep || r.batch != nil || r.at != 0 {\n\t\tobserveWait(w, wait)\n\t}\n"),
 "callers in a hand-off not counted as waiting": ("balancer.go", "\tb.waiting.Add(1)\n\tdefer b.waiting.Add(-1)\n", "\tdefer b.waiting.Add(0)\n"),
 "accepted counted after the request reaches its worker": ("balancer.go", "\tw.assigned.Add(1)\n\tb.accepted.Add(1)\n\tif b.hooks", "\tdefer w.assigned.Add(1)\n\tdefer b.accepted.Add(1)\n\tif b.hooks"),
 "no centre step: noise separates equal workers": ("pool.go", "\tif t0*bucket >= r && t0 <= r*bucket {", "\tif t0 == r {"),
 "ref is the upper median": ("pool.go", "s.ref = xs[(len(xs)-1)/2]", "s.ref = xs[len(xs)/2]"),
 "ref never reckoned after the first": ("pool.go", "\tif s.completed++; s.completed >= s.reckonAt || s.now-s.refreshed >= reckonEvery {", "\tif s.completed++; s.ref == 0 {"),
 "ref not published to the slots": ("pool.go", "\t\t\ts.published.Store(int64(s.ref))", "\t\t\t_ = s.published"),
 "estimates never expire": ("pool.go", "\treturn s.now-w.seen.Load() > w.patience<<w.impatience", "\treturn false"),
 "patience ignores concurrency": ("worker.go", "patience:    int64(float64(staleAfter) / math.Sqrt(float64(o.concurrency))),", "patience:    staleAfter + int64(0*math.Pi),"),
 "a probe takes as many requests as the worker holds": ("pool.go", "w.lapsed = t > bucket*prior && !w.probing && s.stale(w)", "w.lapsed = t > bucket*prior && s.stale(w)"),
 "patience never grows": ("pool.go", "\t\tw.impatience = min(w.impatience+1, maxImpatience)", "\t\tw.impatience = 0"),
 "patience never set back": ("pool.go", "\t\tw.impatience, w.inLine = 0, 0", "\t\tw.inLine = 0"),
 "an expired estimate's next run folds into the old mean": ("pool.go", "\t\t\tw.restart(d)\n\t\t\treturn\n", ""),
 "the first runs are no running mean": ("pool.go", "\tif n < fallSmoothing { // past it, n is not read\n\t\tn = w.observed.Add(1)", "\tif n < fallSmoothing { // past it, n is not read\n\t\tn = fallSmoothing"),
 "a cold first call counts whole": ("pool.go", "\t\t\tfirst = int64(bucket * prior)\n", ""),
 "a capped first run is never replaced": ("pool.go", "replace := n == 2 && w.provisional.Load()", "replace := false && w.provisional.Load()"),
 "weight is not the prior": ("pool.go", "\tprior := s.ref / w.weight\n\tt := float64(w.level.Load())", "\tprior := s.ref\n\tt := float64(w.level.Load())"),
 "ties ignore the count rule": ("pool.go", "\tif s.load != t.load {", "\tif false {"),
 "weights count in ties after the first run": ("pool.go", "\tif s.estimate && w.service.Load() != 0 {", "\tif false {"),
 "stall rule without an estimate": ("pool.go", "if now != 0 && t > 0 {", "if now != 0 {"),
 "cost blind to pending while a slot is free": ("pool.go", "\treturn float64(w.pending+w.concurrency) * w.lastKey / float64(w.concurrency)\n}", "\treturn float64(max(w.pending+1, w.concurrency)) * w.lastKey / float64(w.concurrency)\n}"),
 "a dispatch keeps the cost it had": ("pool.go", "cost = float64(w.pending+w.concurrency) * w.lastKey / float64(w.concurrency)", "cost = kept"),
 "a probe is not marked": ("pool.go", "kept, probe := s.pool.slots[0].cost, w.lapsed && !w.probing", "kept, probe := s.pool.slots[0].cost, false"),
 "ref follows only the clock at first": ("pool.go", "\t\tif s.reckonAt = 2 * max(s.completed, 1); s.reckonAt > 8*int64(s.pool.Len()) {", "\t\tif s.reckonAt = 2 * max(s.completed, 1); true {"),
}
only = sys.argv[1:]
for name, (f, old, new) in muts.items():
    if only and name not in only: continue
    src = open(f).read()
    assert old in src, name
    open(f, "w").write(src.replace(old, new, 1))
    try:
        run = ["-run", os.environ["RUN"]] if "RUN" in os.environ else []
        out = subprocess.run(["go", "test", "-short", "-count=1", "-timeout", "120s", *run, "."],
                             capture_output=True, text=True).stdout
    finally:
        open(f, "w").write(src)
    failed = sorted(set(re.findall(r"--- FAIL: (\S+)", out)))
    panics = re.findall(r"panic: (.*)", out)[:1]
    timeout = "test timed out" in out
    broken = "[build failed]" in out or "[setup failed]" in out
    print(f"{name}: failed={failed} {'TIMEOUT ' if timeout else ''}{'BUILD FAILED ' if broken else ''}{panics}")
