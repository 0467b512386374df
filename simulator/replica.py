"""One simulated vLLM v1 engine: continuous batching over a paged, prefix-cached KV pool.

The scheduler follows ``vllm/v1/core/sched/scheduler.py`` (FCFS policy) step by step:

1. Running requests first, in order: each asks for its remaining tokens (1 when decoding, the
   rest of its prompt when prefilling), capped by the step's token budget
   (``max_num_batched_tokens``: chunked prefill). If the pool cannot give the blocks, the
   *last* running request is preempted (its blocks freed, its progress reset: recompute) and
   put at the front of the waiting queue, until the request fits or is itself preempted.
2. Only if nothing was preempted this step, waiting requests in order while budget and
   ``max_num_seqs`` allow: look up the longest cached prefix (never the whole prompt: at
   least its last token is computed, ``num_tokens - 1``), allocate the rest (hit blocks are
   revived from the free queue), first chunk capped by the budget. The first time a request
   is scheduled its hit is recorded as its cached tokens (vLLM's ``num_cached_tokens``).
3. The step takes ``profile.step_s`` for its batch; at its end every scheduled request has
   its tokens computed; one that has now computed all its tokens samples one output token
   (its first token when the prompt just finished). A request with all its output tokens
   finishes and frees its blocks, tail first.

Full blocks are given keys when allocated for (like vLLM's ``cache_full_blocks``): prompt
blocks take the workload's keys; blocks holding output tokens get keys unique to the request,
so they occupy the cache and produce KV events as in vLLM, but never hit.

Fast path: when every running request is decoding, nothing waits and no request will finish
for ``k`` steps, and the pool can give every block those steps ask for, those ``k`` steps are
taken as one run (their total duration has a closed form, since each step's context grows by
one token per request). The blocks the run's steps allocate and fill (a new block when a
request's next token starts one, its key when a token completes one: every ``block_size``
steps per request) are allocated and cached by one *boundary* event at the start of each
step that has any, in the running order, at the time step-by-step scheduling would: the pool,
its KV events and their times are those of stepping one by one. An arrival during a run cuts
it after the step in progress, exactly where vLLM would admit the newcomer, so the result is
the same as stepping one by one (times equal to float rounding). On a ``SharedHost`` a step's
start moves with the other engines' load, so there a run stops before its first boundary
instead (no boundary events).

Shared compute (``SharedHost``): by default every replica has its own accelerator, so its
steps take exactly what the profile says whatever the other replicas do. Replicas that share
one machine's compute (CPU engines on one host) are given one ``SharedHost``: a step's
profile time is then its *work*, and the host divides its compute among the engines that are
stepping (processor sharing): with ``slots`` 1, two engines stepping at once each progress at
half speed.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from heapq import heapify, heappop, heappush

import xxhash

from router.profile import LatencyProfile
from simulator.block_pool import BlockPool
from simulator.kernel import PRIORITY_ENGINE, Kernel, Timer

_xxh3 = xxhash.xxh3_64_intdigest


class SharedHost:
    """Compute shared by the engines of one machine, divided by processor sharing.

    ``slots``: how many engines can step at once at full speed (a GPU each: as many as
    there are engines; CPU engines whose threads fill the machine: 1). While ``k`` engines
    are stepping, each progresses at ``min(1, slots / k)`` of its profile speed; when an
    engine starts or stops stepping, every other stepping engine's step end is moved to
    match its remaining work at the new speed. Holds one record per stepping engine:
    O(engines) per change of the stepping set, O(1) when an engine goes from one step to
    the next.
    """

    __slots__ = ("kernel", "slots", "_work")

    def __init__(self, kernel: Kernel, slots: float) -> None:
        if isinstance(slots, bool) or not isinstance(slots, (int, float)) or not math.isfinite(slots) or slots <= 0:
            raise ValueError(f"host slots must be a finite number > 0, got {slots!r}")
        self.kernel = kernel
        self.slots = float(slots)
        # engine -> [remaining work (s at full speed), time of that figure, finish callback]
        self._work: dict[EngineReplica, list] = {}

    def speed(self, stepping: int | None = None) -> float:
        """Fraction of full speed each engine gets while ``stepping`` engines step."""
        k = len(self._work) if stepping is None else stepping
        return 1.0 if k <= self.slots else self.slots / k

    def stepping(self) -> int:
        return len(self._work)

    def _sync(self, now: float) -> None:
        speed = self.speed()
        for record in self._work.values():
            left = record[0] - (now - record[1]) * speed
            record[0] = left if left > 0.0 else 0.0
            record[1] = now

    def _schedule(self, engine: EngineReplica, now: float, speed: float) -> None:
        record = self._work[engine]
        if engine._timer is not None:
            engine._timer.cancel()
        engine._timer = self.kernel.schedule(now + record[0] / speed, record[2], priority=PRIORITY_ENGINE)

    def run(self, engine: EngineReplica, now: float, work: float, callback: Callable[[], None]) -> None:
        """``engine`` steps for ``work`` seconds of full-speed compute, then ``callback``."""
        joining = engine not in self._work
        self._sync(now)
        self._work[engine] = [work, now, callback]
        speed = self.speed()
        if joining:
            for other in self._work:
                self._schedule(other, now, speed)
        else:
            self._schedule(engine, now, speed)

    def set_work(self, engine: EngineReplica, now: float, work: float) -> None:
        """``engine``'s current step now has ``work`` seconds of full-speed compute left."""
        self._sync(now)
        self._work[engine][0] = max(0.0, work)
        self._schedule(engine, now, self.speed())

    def remaining(self, engine: EngineReplica, now: float) -> float:
        """Full-speed seconds of ``engine``'s current step not yet done at ``now``."""
        record = self._work[engine]
        return max(0.0, record[0] - (now - record[1]) * self.speed())

    def release(self, engine: EngineReplica, now: float) -> None:
        """``engine`` stopped stepping (idle or dead): the others speed up."""
        if engine not in self._work:
            return
        self._sync(now)
        del self._work[engine]
        speed = self.speed()
        for other in self._work:
            self._schedule(other, now, speed)


class EngineRequest:
    """A request inside one engine: token counts, blocks and timestamps. Mutable; one owner."""

    __slots__ = ("uid", "prompt_tokens", "max_output", "num_tokens", "num_computed", "num_output",
                 "keys", "blocks", "num_cached_blocks", "cached_tokens", "arrival_s", "first_token_s",
                 "finish_s", "preemptions", "tag", "transferred")

    def __init__(self, uid: int, prompt_tokens: int, output_tokens: int, keys: Sequence[int],
                 arrival_s: float, tag: object = None, transferred: bool = False) -> None:
        self.uid = uid
        self.prompt_tokens = prompt_tokens
        self.max_output = output_tokens
        self.num_tokens = prompt_tokens
        self.num_computed = 0
        self.num_output = 0
        self.keys = list(keys)
        self.blocks: list[int] = []
        self.num_cached_blocks = 0
        self.cached_tokens = -1
        self.arrival_s = arrival_s
        self.first_token_s = -1.0
        self.finish_s = -1.0
        self.preemptions = 0
        self.tag = tag
        # The prompt's KV arrived from a prefill replica (PD disaggregation,
        # ``simulator.pd``): admission allocates and caches its blocks, computes only its
        # last token (as vLLM's scheduler does for a remote prefill), and counts no
        # prefix-cache query. A preemption drops the KV: the prompt is then recomputed here.
        self.transferred = transferred


class EngineReplica:
    """A vLLM v1 engine replica in simulated time.

    Holds a ``BlockPool``, the waiting queue (deque) and the running list. One step costs
    O(scheduled requests + blocks allocated); the decode fast path costs O(running) per run
    of steps. Callbacks: ``on_first_token(request, t)``, ``on_finished(request, t)``,
    ``on_stored(keys)`` / ``on_removed(keys)`` (KV events).
    """

    def __init__(self, name: str, kernel: Kernel, profile: LatencyProfile, *, num_blocks: int,
                 block_size: int, max_num_seqs: int | None = None,
                 max_num_batched_tokens: int | None = None,
                 on_first_token: Callable[[EngineRequest, float], None] | None = None,
                 on_finished: Callable[[EngineRequest, float], None] | None = None,
                 on_stored: Callable[[list[int]], None] | None = None,
                 on_removed: Callable[[list[int]], None] | None = None, fast_decode: bool = True,
                 host: SharedHost | None = None) -> None:
        self.name = name
        self.host = host
        self.fast_decode = fast_decode
        self.kernel = kernel
        self.profile = profile
        self.block_size = block_size
        self.max_num_seqs = max_num_seqs or profile.max_num_seqs
        self.budget = max_num_batched_tokens or profile.max_batched_tokens
        self.pool = BlockPool(num_blocks, on_stored=on_stored, on_removed=on_removed)
        self.waiting: deque[EngineRequest] = deque()
        self.running: list[EngineRequest] = []
        self.on_first_token = on_first_token
        self.on_finished = on_finished
        self.busy = False
        self.alive = True
        self.preemptions = 0
        self.steps = 0
        self.busy_s = 0.0
        # The step (or run of decode steps) in flight.
        self._timer: Timer | None = None
        # The run's next boundary step (1-based; its blocks are allocated and cached when it
        # starts) and its timer, or 0 / None.
        self._boundary_step = 0
        self._boundary_timer: Timer | None = None
        # The run's (next work step, running index) per running request with work left in
        # the run: ``_boundary``'s agenda.
        self._boundary_heap: list[tuple[int, int]] = []
        self._scheduled: list[tuple[EngineRequest, int]] = []
        self._run_start = 0.0
        self._run_steps = 0
        self._run_a = 0.0       # per-step time of the run's first step
        self._run_b = 0.0       # growth of the step time per step

    # -- admission -------------------------------------------------------------------------
    def fits(self, prompt_tokens: int, output_tokens: int) -> bool:
        """Whether the request could ever run here (its whole sequence fits in the pool)."""
        return math.ceil((prompt_tokens + output_tokens) / self.block_size) <= self.pool.num_blocks

    def add_request(self, request: EngineRequest) -> None:
        now = self.kernel.now
        self.waiting.append(request)
        if not self.busy:
            self._start_step(now)
        elif self._run_steps > 1:
            self._cut_run(now)

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self) -> int:
        return len(self.running)

    # -- scheduling ------------------------------------------------------------------------
    def _allocate(self, req: EngineRequest, new_tokens: int, hit: list[int]) -> bool:
        """vLLM's allocate_slots: blocks for ``new_tokens`` more tokens (after ``hit``)."""
        pool = self.pool
        size = self.block_size
        total = req.num_computed + len(hit) * size + new_tokens
        need = -(-total // size) - len(req.blocks) - len(hit)
        evictable = pool.count_free(hit) if hit else 0
        if need > pool.num_free - evictable:
            return False
        if hit:
            pool.touch(hit)
            req.blocks.extend(hit)
            req.num_cached_blocks = len(hit)
        if need > 0:
            req.blocks.extend(pool.get_new_blocks(need))
        full = min(total, req.num_tokens) // size
        if full > req.num_cached_blocks:
            keys = req.keys
            if full > len(keys):
                self._extend_keys(req, full)
            pool.cache_blocks(req.blocks[req.num_cached_blocks:full], keys[req.num_cached_blocks:full])
            req.num_cached_blocks = full
        return True

    @staticmethod
    def _extend_keys(req: EngineRequest, count: int) -> None:
        # Blocks past the prompt's full blocks hold output tokens: chain keys unique to
        # this request (its uid is mixed in), so they never match another request.
        keys = req.keys
        prev = keys[-1] if keys else 0
        while len(keys) < count:
            prev = _xxh3(b"out" + req.uid.to_bytes(8, "little") + len(keys).to_bytes(4, "little"), prev)
            keys.append(prev)

    def _preempt(self, req: EngineRequest) -> None:
        self.pool.free(req.blocks[::-1])
        req.transferred = False
        req.blocks = []
        req.num_cached_blocks = 0
        req.num_computed = 0
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    def _schedule(self) -> list[tuple[EngineRequest, int]]:
        budget = self.budget
        scheduled: list[tuple[EngineRequest, int]] = []
        running = self.running
        preempted = False
        i = 0
        size = self.block_size
        while i < len(running) and budget > 0:
            req = running[i]
            new = req.num_tokens - req.num_computed
            if new > budget:
                new = budget
            if new <= 0:
                i += 1
                continue
            total = req.num_computed + new
            if total <= len(req.blocks) * size and \
                    (total if total < req.num_tokens else req.num_tokens) // size <= req.num_cached_blocks:
                # ``_allocate(req, new, [])`` with nothing to do (most decode steps: the
                # token fits the last block and fills none), without the call.
                scheduled.append((req, new))
                budget -= new
                i += 1
                continue
            while not self._allocate(req, new, []):
                victim = running.pop()
                self._preempt(victim)
                preempted = True
                if victim is req:
                    break
            else:
                scheduled.append((req, new))
                budget -= new
                i += 1
                continue
            break  # the request itself was preempted
        if preempted:
            return scheduled
        waiting = self.waiting
        pool = self.pool
        while waiting and budget > 0 and len(running) < self.max_num_seqs:
            req = waiting[0]
            hit = pool.longest_hit(req.keys, (req.num_tokens - 1) // size)
            computed = len(hit) * size
            new = req.num_tokens - computed
            if new > budget:
                new = budget
            if req.transferred:
                # Blocks for the whole prompt (its KV is here), one token to compute.
                if not self._allocate(req, req.num_tokens - computed, hit):
                    break
                waiting.popleft()
                running.append(req)
                if req.cached_tokens < 0:
                    req.cached_tokens = computed
                req.num_computed = req.num_tokens - 1
                scheduled.append((req, 1))
                budget -= 1
                continue
            if not self._allocate(req, new, hit):
                break
            waiting.popleft()
            running.append(req)
            if req.cached_tokens < 0:
                req.cached_tokens = computed
                pool.queries_blocks += req.prompt_tokens // size
                pool.hits_blocks += len(hit)
            req.num_computed = computed
            scheduled.append((req, new))
            budget -= new
        return scheduled

    # -- stepping --------------------------------------------------------------------------
    def _start_step(self, now: float) -> None:
        if not self.alive:
            return
        run = self._decode_run_length() if self.fast_decode else 0
        if run > 1:
            self._start_run(now, run)
            return
        scheduled = self._schedule()
        if not scheduled:
            self.busy = False
            if self.host is not None:
                self.host.release(self, now)
            return
        prof = self.profile
        prefill = 0
        decode = 0
        context = 0
        pairs = 0
        for req, new in scheduled:
            if new == 1 and req.num_output:
                decode += 1
                context += req.num_computed
            else:
                prefill += new
                pairs += new * (req.num_computed + new // 2)
        step = (prof.step_overhead_s + prof.prefill_s_per_token * prefill + prof.decode_s_per_seq * decode
                + prof.attention_s_per_context_token * context + prof.prefill_attention_s_per_pair * pairs)
        self.busy = True
        self._scheduled = scheduled
        self._run_steps = 1
        self._run_start = now
        if self.host is not None:
            self.host.run(self, now, step, self._finish_step)
        else:
            self._timer = self.kernel.schedule(now + step, self._finish_step, priority=PRIORITY_ENGINE)

    def _finish_step(self) -> None:
        now = self.kernel.now
        self.steps += 1
        self.busy_s += now - self._run_start
        finished = []
        first = []
        for req, new in self._scheduled:
            req.num_computed += new
            if req.num_computed >= req.num_tokens:
                req.num_output += 1
                req.num_tokens += 1
                if req.first_token_s < 0:
                    req.first_token_s = now
                    first.append(req)
                if req.num_output >= req.max_output:
                    finished.append(req)
        self._scheduled = []
        self._complete(first, finished, now)
        self._start_step(now)

    def _complete(self, first: list[EngineRequest], finished: list[EngineRequest], now: float) -> None:
        if finished:
            gone = set(map(id, finished))
            self.running = [r for r in self.running if id(r) not in gone]
            for req in finished:
                self.pool.free(req.blocks[::-1])
                req.blocks = []
                req.finish_s = now
        if self.on_first_token is not None:
            for req in first:
                self.on_first_token(req, now)
        if self.on_finished is not None:
            for req in finished:
                self.on_finished(req, now)

    # -- decode fast path ------------------------------------------------------------------
    def _decode_run_length(self) -> int:
        """Steps that can be taken at once: all running decode, nothing waits, no request
        finishes before the last of them, and the pool can give every block they allocate
        (so none of them preempts). On a shared host, also none allocates or caches a block
        (no boundary events there: see the module docstring)."""
        if self.waiting or not self.running:
            return 0
        size = self.block_size
        boundaries = self.host is None
        run = 1 << 30
        for req in self.running:
            if req.num_computed != req.num_tokens - 1 or not req.num_output:
                return 0  # still prefilling
            limit = req.max_output - req.num_output
            if not boundaries:
                # Step j (1-based) schedules the token at position tokens + j - 2 (0-based):
                # it needs a new block when that position reaches len(blocks) * size, and a
                # key when it completes a block.
                tokens = req.num_tokens
                next_alloc = len(req.blocks) * size - tokens + 2
                next_cache = (req.num_cached_blocks + 1) * size - tokens + 1
                limit = min(limit, next_alloc - 1, next_cache - 1)
            if limit < run:
                run = limit
                if run <= 1:
                    return 0
        if boundaries and self._allocations(run) > self.pool.num_free:
            # The last step whose allocations all fit: the step after it preempts, stepped
            # one by one. Allocations grow with the steps, so bisect.
            low, high = 0, run  # fits(low), not fits(high)
            while high - low > 1:
                middle = (low + high) // 2
                if self._allocations(middle) <= self.pool.num_free:
                    low = middle
                else:
                    high = middle
            run = low
        return run if run > 1 else 0

    def _allocations(self, steps: int) -> int:
        """Blocks the running decodes allocate in their next ``steps`` steps: one each
        time a request's next token starts a block (step ``len(blocks) * size - tokens +
        2``, then every ``size`` steps)."""
        size = self.block_size
        total = 0
        for req in self.running:
            first = len(req.blocks) * size - req.num_tokens + 2
            if steps >= first:
                total += (steps - first) // size + 1
        return total

    def _boundary(self, step: int) -> None:
        """The start of the run's step ``step``: what ``_allocate`` does for each running
        request's one token there (a new block when it starts one, the key of a block it
        completes), in the running order; then the next boundary is armed. Step 0 (the
        run's start, whose blocks the last step already gave) changes nothing: it puts each
        running request in a heap by the step of its next block start or completion
        (O(running)) and arms the first. A later boundary takes from the heap only the
        requests with work at that step, in running order (the heap's ties break on the
        running index), and puts each back at its next such step: O(k log running) for k
        of them, instead of a pass over every running request at every boundary (with
        16-token blocks and a hundred running requests, a boundary nearly every step, each
        with work for one or two). The running list does not change during a run (it stops
        before any request finishes or arrives), so the indices hold."""
        pool = self.pool
        size = self.block_size
        running = self.running
        last = self._run_steps
        if step == 0:
            heap = []
            for i, req in enumerate(running):
                done = req.num_computed
                alloc = len(req.blocks) * size - done + 1
                cache = (req.num_cached_blocks + 1) * size - done
                nxt = alloc if alloc < cache else cache
                if nxt <= last:
                    heap.append((nxt, i))
            heapify(heap)
            self._boundary_heap = heap
        heap = self._boundary_heap
        while heap and heap[0][0] == step:
            i = heappop(heap)[1]
            req = running[i]
            done = req.num_computed  # as the run began: step j computes up to token done + j
            total = done + step
            blocks = req.blocks
            if total > len(blocks) * size:
                blocks.extend(pool.get_new_blocks(-(-total // size) - len(blocks)))
            cached = req.num_cached_blocks
            if total >= (cached + 1) * size:
                full = total // size
                if full > len(req.keys):
                    self._extend_keys(req, full)
                pool.cache_blocks(blocks[cached:full], req.keys[cached:full])
                req.num_cached_blocks = cached = full
            alloc = len(blocks) * size - done + 1
            cache = (cached + 1) * size - done
            nxt = alloc if alloc < cache else cache
            if nxt <= last:
                heappush(heap, (nxt, i))
        self._arm_boundary(heap[0][0] if heap and heap[0][0] <= self._run_steps else 0)

    def _arm_boundary(self, step: int) -> None:
        """The run's next boundary is step ``step`` (0: none): taken now if it is the first
        step, else at that step's start."""
        self._boundary_step = step
        if step == 0:
            self._boundary_timer = None
        elif step == 1:  # the run starts now: scheduled now, as step by step
            self._boundary(1)
        else:
            self._boundary_timer = self.kernel.schedule(self._run_start + self._run_time(step - 1), self._boundary,
                                                        step, priority=PRIORITY_ENGINE)

    def _disarm_boundary(self) -> None:
        """No boundary armed (a pending one is cancelled; cancelling a fired one is a no-op)."""
        if self._boundary_timer is not None:
            self._boundary_timer.cancel()
        self._boundary_step, self._boundary_timer = 0, None

    def _start_run(self, now: float, steps: int) -> None:
        prof = self.profile
        n = len(self.running)
        context = sum(r.num_computed for r in self.running)
        self._run_a = (prof.step_overhead_s + prof.decode_s_per_seq * n
                       + prof.attention_s_per_context_token * context)
        self._run_b = prof.attention_s_per_context_token * n
        self._run_start = now
        self._run_steps = steps
        self.busy = True
        if self.host is not None:
            self.host.run(self, now, self._run_time(steps), self._finish_run)
        else:
            # Its first boundary armed (step 1's blocks now, before its end is scheduled, as a step's).
            self._boundary(0)
            self._timer = self.kernel.schedule(now + self._run_time(steps), self._finish_run,
                                               priority=PRIORITY_ENGINE)

    def _run_time(self, steps: int) -> float:
        return steps * self._run_a + self._run_b * steps * (steps - 1) / 2

    def _cut_run(self, now: float) -> None:
        """An arrival during a run of decode steps: stop after the step in progress."""
        host = self.host
        if host is not None:  # progress in full-speed seconds of compute, not wall time
            elapsed = self._run_time(self._run_steps) - host.remaining(self, now)
        else:
            elapsed = now - self._run_start
        a, b = self._run_a, self._run_b
        # Steps completed by ``now``: the largest k with run_time(k) <= elapsed.
        if b > 0:
            k = int((-(a - b / 2) + math.sqrt((a - b / 2) ** 2 + 2 * b * elapsed)) / b)
        else:
            k = int(elapsed / a)
        while k > 0 and self._run_time(k) > elapsed:
            k -= 1
        while self._run_time(k + 1) <= elapsed:
            k += 1
        steps = min(k + 1, self._run_steps)  # the step in progress completes first
        if steps >= self._run_steps:
            return
        self._run_steps = steps
        if host is not None:
            host.set_work(self, now, self._run_time(steps) - elapsed)
            return
        if self._boundary_step > steps:  # a step the run no longer takes
            self._disarm_boundary()
        self._timer.cancel()
        self._timer = self.kernel.schedule(self._run_start + self._run_time(steps), self._finish_run,
                                           priority=PRIORITY_ENGINE)

    def _finish_run(self) -> None:
        now = self.kernel.now
        steps = self._run_steps
        self.steps += steps
        self.busy_s += now - self._run_start
        finished = []
        for req in self.running:
            req.num_computed += steps
            req.num_output += steps
            req.num_tokens += steps
            if req.num_output >= req.max_output:
                finished.append(req)
        self._run_steps = 0
        self._disarm_boundary()  # every boundary of the run was at an earlier step start: fired
        self._complete([], finished, now)
        self._start_step(now)

    # -- failure ---------------------------------------------------------------------------
    def fail(self) -> list[EngineRequest]:
        """The engine dies: every request in it is lost (returned), its cache is gone."""
        self.alive = False
        if self._timer is not None:
            self._timer.cancel()
        self._disarm_boundary()
        if self.host is not None:
            self.host.release(self, self.kernel.now)
        lost = list(self.running) + list(self.waiting)
        self.running = []
        self.waiting.clear()
        self.busy = False
        return lost

    def kv_usage(self) -> float:
        return self.pool.usage
