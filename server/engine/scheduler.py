"""Who runs next: admission (how many sequences a model takes in and queues) and, per model, the step's
schedule (which sequences run, with how many tokens), KV blocks as they grow, and preemption.

A step schedules every running sequence's next tokens as one flat batch under a token budget (vLLM v1's
unified batch): each decoding sequence's one new token, then prompt chunks of those still prefilling, up to
``prefill_chunk`` prompt tokens in all; waiting sequences join while there are batch places, budget and KV
blocks.

A sequence takes KV blocks as it grows and gives them back when it leaves. When a running sequence needs a
block and none is free, the newest sequence is preempted: its blocks are freed and it goes back to the front
of the queue, to be recomputed (its prompt and the tokens it has produced) when blocks free up. Nothing is
lost and no token changes.
"""

from __future__ import annotations

import collections
import logging
import threading

from server.engine.kv_cache import BlockPool
from server.engine.sequence import Event, Sequence

log = logging.getLogger("branchserve.engine")


class EngineFull(RuntimeError):
    pass


class Admission:
    """Sequences submitted and not yet finished, per key (a runner here, a deployment behind Ray): up to the key's
    capacity run; beyond that, up to ``max_waiting`` wait, over all keys. Counted where they are submitted and where
    they end, so a burst is admitted by the same rule whether or not the engine has run yet."""

    def __init__(self, max_waiting: int):
        self.max_waiting = max_waiting
        self._count: dict = {}
        self._capacity: dict = {}
        self._lock = threading.Lock()

    def add(self, key, capacity: int) -> None:
        self._capacity[key] = capacity

    def _queued(self) -> int:
        return sum(max(0, n - self._capacity[k]) for k, n in self._count.items())

    def queued(self) -> int:
        with self._lock:
            return self._queued()

    def _refuse(self, key) -> None:
        if self._count.get(key, 0) >= self._capacity[key] and self._queued() >= self.max_waiting:
            raise EngineFull(f"{self._queued()} requests are waiting; try again later")

    def admit(self, key, force: bool = False) -> None:
        """Count one more sequence for ``key``. ``force``: it continues a request already admitted (a pipeline's
        next stage), so the queue bound does not refuse it."""
        with self._lock:
            if not force:
                self._refuse(key)
            self._count[key] = self._count.get(key, 0) + 1

    def release(self, key) -> None:
        with self._lock:
            self._count[key] -= 1

    def in_flight(self) -> int:
        """Sequences (and reservations) admitted and not yet released, over all keys."""
        with self._lock:
            return sum(self._count.values())


class Reservation:
    """One admitted place held for a whole request (a pipeline: all its stages): counted once when taken,
    released once, however often ``release`` is called."""

    def __init__(self, admission: Admission, key):
        self._admission, self._key = admission, key
        self._lock = threading.Lock()
        self._held = True

    def release(self) -> None:
        with self._lock:
            held, self._held = self._held, False
        if held:
            self._admission.release(self._key)


class Scheduler:
    """One model's sequences: those waiting and those running, and each step's schedule. Runs on the engine
    thread only."""

    def __init__(self, max_batch: int, prefill_chunk: int):
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk  # prompt tokens per step, over all rows
        self.pool: BlockPool | None = None  # set when the runner allocates its cache
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[tuple[Sequence, int]], int]:
        """(sequence, tokens) for this step, one-token rows first, and how many those are. Running sequences
        first, in the order they joined; then waiting ones while there are places, budget and blocks."""
        budget = self.prefill_chunk
        single, chunks = [], []
        for seq in list(self.running):
            if seq.finished or seq not in self.running:  # preempted by an earlier row of this step
                continue
            left = seq.length - seq.computed
            n = 1 if left == 1 and seq.output else min(left, budget)
            if n == 0 or not self._grow(seq, seq.computed + n):
                continue
            if n > 1 or not seq.output:  # a prompt (or a recomputation) takes budget; a decode row does not
                budget -= n
            (single if n == 1 else chunks).append((seq, n))
        while self.waiting and len(self.running) < self.max_batch and budget > 0:
            seq = self.waiting[0]
            if seq.cancelled.is_set():
                self.waiting.popleft()
                self.finish(seq, "cancelled")
                continue
            n = min(seq.length - seq.computed, budget)
            if not self.pool.grow(seq.blocks, seq.computed + n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            budget -= n
            (single if n == 1 else chunks).append((seq, n))
        return single + chunks, len(single)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for ``tokens`` of ``seq``, preempting the newest running sequences until they are free; False
        when ``seq`` itself had to go."""
        while not self.pool.grow(seq.blocks, tokens):
            victim = self.running[-1]
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free its blocks and queue it first again; it is recomputed from its tokens when it resumes."""
        self.pool.release(seq.blocks)
        seq.computed = 0
        seq.pending = None  # a parked sample is dropped: the row samples again once recomputed
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        log.debug("preempted %s at %d tokens (%d blocks free)", seq.id, seq.length, len(self.pool.free))

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finished = reason
        seq.emit(Event("", [], reason, len(seq.prompt), len(seq.output)))

    def fail(self, seq: Sequence, message: str) -> None:
        seq.finished = "error"
        seq.emit(Event("", [], "error", len(seq.prompt), len(seq.output), error=message))

    def fail_all(self, message: str) -> None:
        """End every sequence that has not ended yet with an error, once each."""
        for seq in list(self.running) + list(self.waiting):
            if seq.finished is None:
                self.fail(seq, message)
            if self.pool is not None:
                self.pool.release(seq.blocks)
        self.running.clear()
        self.waiting.clear()

    def reap(self) -> None:
        """Sequences that finished or were cancelled leave, and their blocks go back to the pool."""
        for seq in self.running:
            if not seq.finished and seq.cancelled.is_set():
                self.finish(seq, "cancelled")
        gone = [s for s in self.running if s.finished]
        if gone:
            self.running = [s for s in self.running if not s.finished]
            for seq in gone:
                self.pool.release(seq.blocks)
        self.waiting = collections.deque(s for s in self.waiting if not self._drop_cancelled(s))

    def _drop_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled.is_set():
            self.pool.release(seq.blocks)  # a preempted sequence holds none; this is for safety's sake
            self.finish(seq, "cancelled")
            return True
        return False
