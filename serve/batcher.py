"""The batching core of ``ddpm serve``: requests in, merged reverse loops out; nothing here knows HTTP.

One :class:`Batcher` per loaded model owns that model's backend and the one worker thread that calls it (a
backend's IO buffers are not shared between threads). Requests whose plans are equal (same model, sampler,
steps, spacing, eta, clip, variance; the model fixes runtime and precision) share a *key* and are merged:

    the worker takes the oldest waiting request; its key K decides the batch
    it waits until the requests of key K hold max_batch rows, or max_wait has passed since the later of the
        oldest's arrival and the end of the previous loop (the clients that loop answered get max_wait to send
        their next request, so concurrent clients fill one loop instead of alternating in two half-full ones);
        right after a loop of key K it stops waiting as soon as K holds the rows the loop answered plus those that
        were already waiting when it ended (capped at max_batch): the clients it expects are back, and waiting
        longer only adds latency. Clients that do not come back cost at most max_wait, as before.
    it takes rows of key K in arrival order, at most max_batch: a request contributes what is left of it up to
        the batch's free rows, and if rows are still left it goes to the BACK of the queue (round robin)
    one reverse loop runs them: ddpm.runtime.segments.sample_segments, one segment per request piece

The round robin is what splits long requests: a 4096-sample request gives at most max_batch rows per loop and then
waits its turn, so a 1-sample request that arrives behind it runs in the next loop, not after 4096 samples.
Each piece keeps its request's seed and global sample indices (Segment(seed, first, n)), so every request gets
the rows ``ddpm run`` computes for it (docs/design.md, "Serving").

Other work on the backend (``call``: image-to-image) runs on the same thread, alternating with the batches.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from ddpm.errors import DDPMError, SamplingError
from ddpm.runtime.sampling import SamplingPlan
from ddpm.runtime.segments import Segment, sample_segments

__all__ = ["Batcher", "Ticket", "QueueFull", "Closed", "Compute"]

# compute(backend, plan, segments) -> [sum n, *sample_shape] float32: what one merged loop runs
Compute = Callable[[Any, SamplingPlan, Sequence[Segment]], torch.Tensor]
# on_batch(rows, seconds): after every merged loop (the server's metrics)
BatchObserver = Callable[[int, float], None]


class QueueFull(DDPMError):
    """The model's queue holds ``max_queue`` samples already; ``retry_after`` (s) estimates when it drains."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Closed(DDPMError):
    """The batcher is closed (the server is stopping): nothing new is taken, waiting work is refused."""


@dataclass(eq=False)
class Ticket:
    """One sampling request: samples ``0 .. num_samples - 1`` of ``seed`` under ``plan``; ``future`` gets
    [num_samples, *sample_shape] float32 on the CPU, or the error. Cancelling the future drops the rows not yet
    computed."""

    key: Hashable
    plan: SamplingPlan
    seed: int
    num_samples: int
    arrived: float
    future: Future = field(default_factory=Future)
    scheduled: int = 0  # rows handed to a loop so far (the worker, under the lock)
    done: int = 0  # rows delivered (the worker)
    out: torch.Tensor | None = None
    cancelled: bool = False

    @property
    def remaining(self) -> int:
        return self.num_samples - self.scheduled


Piece = tuple[Ticket, int, int]  # (ticket, first global sample index, rows)


class Batcher:
    """Merges compatible requests for one backend (see the module docstring).

    Args:
        backend: the open backend; only the worker thread calls it.
        max_batch: rows of one loop. max_wait_s: how long the oldest request waits for a fuller batch.
        max_queue: samples waiting (not yet handed to a loop); :meth:`submit` raises QueueFull beyond it.
        compute: what runs one merged loop (tests inject a fake); on_batch: called after each loop.
        start: start the worker now (False: later, with :meth:`start`).
    """

    def __init__(
        self,
        backend: Any,
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        max_queue: int = 1024,
        compute: Compute = sample_segments,
        on_batch: BatchObserver | None = None,
        name: str = "model",
        start: bool = True,
    ) -> None:
        self.backend = backend
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.compute, self.on_batch = compute, on_batch
        self._cond = threading.Condition()
        self._queue: collections.deque[Ticket] = collections.deque()
        self._jobs: collections.deque[tuple[Callable[[Any], Any], Future, int]] = collections.deque()
        self._pending = 0  # samples (and job costs) waiting
        self._rows: collections.Counter[Hashable] = collections.Counter()  # key -> its rows waiting
        self._closed = False
        self._job_turn = False
        self._rate = 0.0  # rows/s of recent loops (an average), for Retry-After
        self._free_since = 0.0  # time.monotonic() when the worker last finished a loop or job
        # (key, rows) after a loop of key, until the next job: the rows to expect back (its answered clients' and
        # those waiting when it ended); _free_since says when
        self._expect: tuple[Hashable, int] | None = None
        self._thread = threading.Thread(target=self._run, name=f"ddpm-serve-{name}", daemon=True)
        if start:
            self._thread.start()

    def start(self) -> None:
        """Start the worker (a batcher made with ``start=False`` queues requests but computes nothing yet)."""
        self._thread.start()

    # ---- the front: any thread ----

    @property
    def pending(self) -> int:
        """Samples (and job costs) waiting for the worker: the queue depth."""
        return self._pending

    def submit(self, key: Hashable, plan: SamplingPlan, seed: int, num_samples: int) -> Ticket:
        """Queue ``num_samples`` samples of ``seed`` under ``plan`` (requests of equal ``key`` merge)."""
        ticket = Ticket(key, plan, seed, num_samples, time.monotonic())
        with self._cond:
            self._admit(num_samples)
            self._queue.append(ticket)
            self._pending += num_samples
            self._rows[key] += num_samples
            self._cond.notify()
        ticket.future.add_done_callback(lambda f: self.cancel(ticket) if f.cancelled() else None)
        return ticket

    def call(self, fn: Callable[[Any], Any], cost: int = 1) -> Future:
        """Run ``fn(backend)`` on the worker thread, between loops; counts ``cost`` against the queue."""
        fut: Future = Future()
        with self._cond:
            self._admit(cost)
            self._jobs.append((fn, fut, cost))
            self._pending += cost
            self._cond.notify()
        return fut

    def cancel(self, ticket: Ticket, error: BaseException | None = None) -> None:
        """Drop a request's rows not yet computed (a timeout, a client gone, a failed loop): its future gets
        ``error`` unless it is resolved or cancelled already."""
        with self._cond:
            if ticket.cancelled:
                return
            ticket.cancelled = True
            self._pending -= ticket.remaining
            self._drop_rows(ticket.key, ticket.remaining)
            ticket.scheduled = ticket.num_samples
            try:
                self._queue.remove(ticket)
            except ValueError:
                pass  # finished its last piece, or in a loop now
        _settle(ticket.future, error=error or Closed("request cancelled"))

    def close(self, timeout: float | None = 5.0) -> bool:
        """Refuse new work, fail what waits, let the current loop finish; True when the worker has stopped."""
        with self._cond:
            self._closed = True
            waiting, jobs = list(self._queue), list(self._jobs)
            self._queue.clear()
            self._jobs.clear()
            self._pending = 0
            self._rows.clear()
            self._cond.notify_all()
        for t in waiting:
            t.cancelled = True
            _settle(t.future, error=Closed("the server is stopping"))
        for _, fut, _ in jobs:
            _settle(fut, error=Closed("the server is stopping"))
        if self._thread.ident is not None:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _admit(self, n: int) -> None:  # under the lock
        if self._closed:
            raise Closed("the server is stopping")
        if self._pending + n > self.max_queue:
            wait = (self._pending + n) / self._rate if self._rate > 0 else 1.0
            raise QueueFull(
                f"the queue holds {self._pending} of {self.max_queue} samples; {n} more do not fit",
                retry_after=max(1, min(60, math.ceil(wait))),
            )

    # ---- the worker thread ----

    def _run(self) -> None:
        while True:
            work = self._next()
            if work is None:
                return
            work()
            with self._cond:
                self._free_since = time.monotonic()

    def _next(self) -> Callable[[], None] | None:
        with self._cond:
            while True:
                if self._closed:
                    return None
                if self._jobs and (self._job_turn or not self._queue):
                    fn, fut, cost = self._jobs.popleft()
                    self._pending -= cost
                    self._job_turn = False
                    return lambda: self._run_job(fn, fut)
                if not self._queue:
                    self._cond.wait()
                    continue
                head = self._queue[0]
                wait = max(head.arrived, self._free_since) + self.max_wait_s - time.monotonic()
                if wait > 0 and self._rows[head.key] < self._enough(head):
                    self._cond.wait(wait)
                    continue
                pieces = self._take(head.key)
                self._job_turn = True
                return lambda: self._run_loop(head.plan, pieces)

    def _enough(self, head: Ticket) -> int:  # under the lock
        """Rows of ``head``'s key worth starting a loop for before max_wait: max_batch, or fewer right after a
        loop of that key (the rows it expects back, see the module docstring)."""
        if self._expect is not None:
            key, rows = self._expect
            if rows and key == head.key and head.arrived <= self._free_since + self.max_wait_s:
                return min(self.max_batch, rows)
        return self.max_batch

    def _drop_rows(self, key: Hashable, n: int) -> None:  # under the lock
        self._rows[key] -= n
        if self._rows[key] <= 0:
            del self._rows[key]

    def _take(self, key: Hashable) -> list[Piece]:
        """Up to max_batch rows of ``key`` in queue order; a request with rows left moves to the back."""
        free, pieces = self.max_batch, []
        keep: collections.deque[Ticket] = collections.deque()
        again = []
        for t in self._queue:
            if free and t.key == key:
                k = min(t.remaining, free)
                pieces.append((t, t.scheduled, k))
                t.scheduled += k
                free -= k
                self._pending -= k
                self._drop_rows(key, k)
                if t.remaining:
                    again.append(t)
            else:
                keep.append(t)
        keep.extend(again)
        self._queue = keep
        return pieces

    def _run_job(self, fn: Callable[[Any], Any], fut: Future) -> None:
        with self._cond:
            self._expect = None
        if not fut.set_running_or_notify_cancel():
            return
        try:
            result = fn(self.backend)
        except BaseException as e:  # noqa: BLE001 - delivered to the request that asked
            _settle(fut, error=e)
        else:
            _settle(fut, result)

    def _run_loop(self, plan: SamplingPlan, pieces: list[Piece]) -> None:
        segments = [Segment(t.seed, first, k) for t, first, k in pieces]
        rows = sum(k for _, _, k in pieces)
        start = time.perf_counter()
        try:
            x = self.compute(self.backend, plan, segments).to("cpu")
        except BaseException as e:  # noqa: BLE001 - every request of the loop gets the error
            for t, _, _ in pieces:
                self.cancel(t, e)
            return
        seconds = time.perf_counter() - start
        self._rate = rows / seconds if self._rate == 0 else 0.8 * self._rate + 0.2 * rows / max(seconds, 1e-9)
        if self.on_batch is not None:
            self.on_batch(rows, seconds)
        key = pieces[0][0].key
        with self._cond:  # before any answer goes out: what waits now arrived during the loop
            waiting = self._rows.get(key, 0)
        answered = 0
        a = 0
        for t, first, k in pieces:
            part, a = x[a : a + k], a + k
            if t.cancelled:
                continue
            if not bool(torch.isfinite(part).all()):
                bad = SamplingError(
                    f"sampling produced NaN/Inf in samples {first}..{first + k - 1} of seed {t.seed}; the "
                    "model or its export is broken, or the clip/variance do not suit it"
                )
                self.cancel(t, bad)
                continue
            if t.out is None:
                t.out = torch.empty((t.num_samples, *part.shape[1:]), dtype=part.dtype)
            t.out[first : first + k] = part
            t.done += k
            if t.done == t.num_samples:
                answered += t.num_samples
                _settle(t.future, t.out)
        with self._cond:
            self._expect = (key, answered + waiting)


def _settle(fut: Future, result: Any = None, *, error: BaseException | None = None) -> None:
    """Resolve a future unless it is resolved or cancelled already (a waiter may have given up meanwhile)."""
    if fut.done():
        return
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
