"""Runners: continuous batching for one model, one engine step at a time.

A step admits waiting sequences into free slots, runs at most one prefill chunk
(so a newcomer's prompt never stalls the running decodes for long, and its first
token never waits for their step), then one decode step for every sequence that
is generating. Finished and cancelled
sequences leave between steps.

Both runners keep a preallocated KV-cache slot per sequence, addressed by row:
running sequences hold slots 0..n-1, so a decode step's row i is slot i and
attention reads the cache as a view. ``FamilyRunner`` drives the family model
(branches mixed in one forward); ``StandaloneRunner`` drives any transformers
causal LM through the same slots (server/engine/rowcache.py).
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.model import linear, row_groups, single_branch
from server.engine.sampling import SamplingParams, sample_rows, token_logprobs
from server.engine.structured import apply_constraints

log = logging.getLogger("branchserve.engine")


@dataclass
class Event:
    """What a request's consumer receives: new text and tokens, and at the end a finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # per token in token_ids when the request asked for logprobs: (logprob, [(id, logprob) of the most likely])
    logprobs: list | None = None


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    branch: int = 0  # row's branch index (family runner)
    stop_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    matcher: object | None = None  # structured.Matcher when decoding is constrained
    slot: int = -1
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    finished: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host values as a long tensor on ``device``: through pinned memory without blocking on CUDA."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class Runner:
    def __init__(self, device: torch.device, max_batch: int, max_seq: int, prefill_chunk: int):
        self.device = device
        self.max_batch = max_batch
        self.max_seq = max_seq
        self.prefill_chunk = prefill_chunk
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.peak_batch = 0  # most sequences in one decode step
        self.peak_mixed = 0  # most distinct branches in one decode step
        self.slots: list[Sequence] = []  # slots[i] holds slot i's sequence
        self.scratch = max_batch  # the cache slot padding rows write to
        self.copied_rows = 0  # cache rows moved to keep slots compact (one per leave that opens a hole)

    # -- the scheduler's side
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; the engine has already checked that its prompt fits."""
        seq.generator = seq.params.generator(self.device)
        if seq.params.grammar is not None:
            seq.matcher = seq.params.grammar.matcher()
        self.waiting.append(seq)

    @property
    def vocab_size(self) -> int:
        """The width of the logits rows this runner samples from."""
        return self.model.config.vocab_size

    def warm_up(self) -> None:
        """Compile and capture whatever the runner's steps need, before the server says it is ready."""

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self, flush: Callable[[], None] | None = None) -> None:
        """One engine step: admit waiting sequences, prefill a chunk of their prompts, then decode every running
        row once (those just prefilled included). ``flush`` delivers the events emitted so far; it is called
        between the two, so a newcomer's first token goes out before the decode step, not after it."""
        self._reap()
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            self._admit(seq)
            self.running.append(seq)
        batch = self._prefill_batch()
        if batch:  # first: a newcomer's first token does not wait for the others' decode step
            logits = self._prefill(batch)
            for seq, chunk in batch:
                seq.prefilled += len(chunk)
            done = [i for i, (seq, _) in enumerate(batch) if seq.prefilled == len(seq.prompt)]
            if done:
                self._accept([batch[i][0] for i in done], logits[done])
                if flush is not None:
                    flush()
        decoding = [s for s in self.running if s.output and not s.finished]  # those just prefilled included
        if decoding:
            self.peak_batch = max(self.peak_batch, len(decoding))
            self.peak_mixed = max(self.peak_mixed, len({s.branch for s in decoding}))
            self._accept(decoding, self._decode(decoding))
        self._reap()

    def _prefill_batch(self) -> list[tuple[Sequence, list[int]]]:
        """Prompt chunks for this step: rows padded to the longest stay within prefill_chunk tokens."""
        batch, longest = [], 0
        for seq in self.running:
            left = len(seq.prompt) - seq.prefilled
            if left <= 0:
                continue
            n = min(left, self.prefill_chunk)
            if batch and (len(batch) + 1) * max(longest, n) > self.prefill_chunk:
                if (len(batch) + 1) * longest > self.prefill_chunk:
                    break
                n = longest  # a shorter piece of a long prompt still fits beside the others
            batch.append((seq, seq.prompt[seq.prefilled:seq.prefilled + n]))
            longest = max(longest, n)
        return batch

    def fail_all(self, message: str) -> None:
        for seq in list(self.running) + list(self.waiting):
            seq.emit(Event("", [], "error", len(seq.prompt), len(seq.output), error=message))
            seq.finished = "error"
        self.running.clear()
        self.waiting.clear()
        self._reset()

    # -- shared mechanics
    def _accept(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Constraints mask their rows, then every row is sampled; sampled tokens go out as they are (text, stop
        strings and events are the output side's work)."""
        matchers = [s.matcher for s in seqs]
        if any(m is not None for m in matchers):
            logits = apply_constraints(logits, matchers)
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = dict(zip(want, token_logprobs(logits, want, tokens, [seqs[i].params.logprobs for i in want]))) \
            if want else {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.output.append(tok)
            event = Event("", [tok], logprobs=[logprobs[i]] if i in logprobs else None)
            if seq.matcher is not None and not seq.matcher.accept(tok):  # cannot happen with the mask applied
                seq.emit(event)
                seq.finished = "error"
                seq.emit(Event("", [], "error", len(seq.prompt), len(seq.output),
                               error=f"the constraint rejected token {tok}"))
            elif tok in seq.stop_ids or tok in seq.params.stop_token_ids:
                seq.emit(event)
                self._finish(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq:
                seq.emit(event)
                self._finish(seq, "length")
            else:
                seq.emit(event)

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finished = reason
        seq.emit(Event("", [], reason, len(seq.prompt), len(seq.output)))

    def _reap(self) -> None:
        for seq in self.running:
            if not seq.finished and seq.cancelled.is_set():
                self._finish(seq, "cancelled")
        gone = [s for s in self.running if s.finished]
        if gone:
            self.running = [s for s in self.running if not s.finished]
            self._release(gone)
        self.waiting = collections.deque(s for s in self.waiting if not self._drop_cancelled(s))

    def _drop_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled.is_set():
            self._finish(seq, "cancelled")
            return True
        return False

    # -- cache slots: running sequences hold slots 0..n-1
    def _admit(self, seq: Sequence) -> None:
        seq.slot = len(self.slots)
        self.slots.append(seq)

    def _release(self, seqs: list[Sequence]) -> None:
        """Leavers free their slots; the last running sequence moves into each hole (one row's cache copied
        once), so slots stay compact and a decode step reads the cache's first rows as a view."""
        gone = {id(s) for s in seqs}
        for seq in seqs:
            hole = seq.slot
            while self.slots and id(self.slots[-1]) in gone:  # leavers at the end just go
                self.slots.pop()
            if hole >= len(self.slots) or id(self.slots[hole]) not in gone:
                continue
            last = self.slots.pop()
            n = min(last.length, self.max_seq)
            for kc, vc in self._caches():
                kc[hole, :, :n] = kc[last.slot, :, :n]
                vc[hole, :, :n] = vc[last.slot, :, :n]
            self.copied_rows += 1
            last.slot = hole
            self.slots[hole] = last

    def _reset(self) -> None:
        self.slots = []

    def decode_rows(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Inputs for one row per occupied slot: (tokens, positions, write slots, branches). Slots that are not
        decoding (still prefilling) are padding rows: token 0 at position 0, written to the scratch slot, on a
        present branch, their output dropped."""
        decoding = {id(s) for s in seqs}
        pad_branch = seqs[0].branch  # padding never adds a branch to the mix
        tokens, start, write, branch = [], [], [], []
        for i, s in enumerate(self.slots):
            real = id(s) in decoding
            tokens.append(s.output[-1] if real else 0)
            start.append(s.length - 1 if real else 0)
            write.append(i if real else self.scratch)
            branch.append(s.branch if real else pad_branch)
        return tokens, start, write, branch

    def in_slot_order(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Rows of a decode step (one per slot) -> rows of ``seqs``, in their order."""
        order = [s.slot for s in seqs]
        return logits if order == list(range(len(self.slots))) else logits[to_device(order, self.device)]

    # -- what each model does differently
    def _caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]: ...  # (keys, values) per layer, slot first
    def _prefill(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor: ...  # -> (B, V) at chunk ends
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor: ...  # -> (B, V)


class FamilyRunner(Runner):
    """The family model, branches mixed in one forward."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                 static_decode: bool = False, compile: bool = False):
        """``static_decode``: decode steps with static shapes, padded to batch buckets; on CUDA they are
        captured as CUDA graphs (server/engine/graphs.py). ``compile``: those steps go through
        torch.compile first (implies ``static_decode``). Both are prepared by ``warm_up``."""
        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        model.allocate_cache(max_batch + 1, max_seq)  # + the scratch slot
        self.graphs = None
        if static_decode or compile:
            from server.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, max_batch, self.scratch, capture=model.device.type == "cuda",
                                       compile=compile)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def warm_up(self) -> None:
        if self.graphs is not None:
            self.graphs.prepare()

    def _caches(self):
        return list(zip(self.model.k_cache, self.model.v_cache))

    def _tensor(self, values) -> torch.Tensor:
        return to_device(values, self.device)

    def _prefill(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        longest = max(len(chunk) for _, chunk in batch)
        tokens = [chunk + [0] * (longest - len(chunk)) for _, chunk in batch]  # right padding
        seqs = [seq for seq, _ in batch]
        branches = [s.branch for s in seqs]
        single = single_branch(branches)
        return self.model(
            self._tensor(tokens), self._tensor([s.prefilled for s in seqs]), self._tensor(branches),
            self._tensor([s.slot for s in seqs]),
            single=single, groups=None if single is not None else row_groups(branches, self.device),
            own=[(s.slot, s.prefilled, len(chunk)) for s, chunk in batch],
            last=self._tensor([len(chunk) - 1 for _, chunk in batch]),
        )

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        tokens, start, write, branch = self.decode_rows(seqs)
        if self.graphs is not None:
            logits = self.graphs.run(tokens, start, write, branch)
        else:
            single = single_branch(branch)
            logits = self.model(
                self._tensor([[t] for t in tokens]), self._tensor(start), self._tensor(branch), self._tensor(write),
                single=single, groups=None if single is not None else row_groups(branch, self.device),
                span=min(max(start) + 1, self.max_seq))[:, 0]
        return self.in_slot_order(logits, seqs)


def _cpu_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = linear(x, self.weight)
    return y if self.bias is None else y + self.bias


class StandaloneRunner(Runner):
    """Any transformers causal LM, on a ``RowCache``: per-row slots like the family's, nothing copied when a
    sequence joins, one row when one leaves."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                 compile: bool = False):
        """``compile``: decode steps go through torch.compile (one function, dynamic in batch and span),
        compiled by ``warm_up``; prefill stays eager."""
        from server.engine.rowcache import ATTENTION, RowCache

        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        model.config._attn_implementation = ATTENTION  # views of the cache, grouped heads folded, no copies
        if model.device.type == "cpu":  # the family model's CPU GEMM layout for a few rows (model.linear)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.forward = _cpu_linear.__get__(module)
        cfg = model.config
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.cache = RowCache(cfg.num_hidden_layers, max_batch + 1, getattr(cfg, "num_key_value_heads", None) or heads,
                              max_seq, head_dim, model.dtype, model.device)
        self.decode_forward = model
        if compile:
            # Versions: batch 1, any other batch; spans are symbolic. The limit leaves room, never a silent eager
            # fallback past dynamo's default of 8.
            from server.engine.graphs import compile_step

            self.decode_forward = compile_step(model, 16)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """With ``compile``: every decode version compiled now (batches 1, 2 and max_batch; short and full
        spans), on rows that prefill overwrites before anything reads them."""
        if self.decode_forward is self.model:
            return
        import time

        t0 = time.perf_counter()
        for rows in sorted({1, min(2, self.max_batch), self.max_batch}):
            for span in sorted({2, 3, self.max_seq}):
                self._forward([[0]] * rows, [span - 1] * rows, list(range(rows)), (rows, span), True)
        log.info("standalone decode steps compiled in %.1f s", time.perf_counter() - t0)

    def _caches(self):
        return list(zip(self.cache.k, self.cache.v))

    def _forward(self, tokens: list[list[int]], start: list[int], slots: list[int], read: tuple, decoding: bool,
                 pad: list[int] | None = None, **kw):
        """``read``: (rows, span) for a decode step, (the rows' slots, end) for a prefill; either way the keys
        attended over are the first read[1] positions, and a query at position p sees those <= p. ``pad``: how
        many padding tokens lead each prefill row (left padding, so every row's last token is the forward's
        last): they write the spare column of their own slot and see only the first key."""
        L = len(tokens[0])
        steps = torch.arange(L, device=self.device)
        pos = to_device(start, self.device)[:, None] + steps  # (B, L)
        write = pos.clamp(max=self.max_seq - 1)
        if pad is not None and any(pad):
            pad_t = to_device(pad, self.device)[:, None]
            lead = steps[None, :] < pad_t  # (B, L) padding positions
            pos = (pos - pad_t).clamp(min=0)
            write = torch.where(lead, self.max_seq, pos)
            seen = torch.where(lead, 0, pos)
        else:
            seen = pos
        mask = torch.arange(read[1], device=self.device)[None, None, :] <= seen[:, :, None]  # (B, L, keys)
        self.cache.slots, self.cache.pos = to_device(slots, self.device), write
        self.cache.read, self.cache.decoding = read, decoding
        forward = self.decode_forward if decoding else self.model
        return forward(input_ids=to_device(tokens, self.device), position_ids=pos, attention_mask=mask[:, None],
                       past_key_values=self.cache, use_cache=True, **kw).logits

    @torch.inference_mode()
    def _prefill(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        """Every row's chunk in one forward, left-padded to the longest."""
        longest = max(len(chunk) for _, chunk in batch)
        pad = [longest - len(chunk) for _, chunk in batch]
        slots = [seq.slot for seq, _ in batch]
        end = max(seq.prefilled + len(chunk) for seq, chunk in batch)
        out = self._forward([[0] * p + chunk for p, (_, chunk) in zip(pad, batch)],
                            [seq.prefilled for seq, _ in batch], slots, (slots, end), False, pad=pad,
                            logits_to_keep=1)
        return out[:, -1]

    @torch.inference_mode()
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        tokens, start, write, _ = self.decode_rows(seqs)
        span = min(max(start) + 1, self.max_seq)
        logits = self._forward([[t] for t in tokens], start, write, (len(tokens), span), True)[:, -1]
        return self.in_slot_order(logits, seqs)
