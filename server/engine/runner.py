"""Runners: continuous batching for one model, one forward per engine step.

A step schedules every running sequence's next tokens as one flat batch under a token budget (vLLM v1's
unified batch): each decoding sequence's one new token, then prompt chunks of those still prefilling, up to
``prefill_chunk`` prompt tokens in all; waiting sequences join while there are batch places, budget and KV
blocks. Then one forward, and every sequence whose tokens are all computed samples its next token.

Keys and values live in a paged cache (server/engine/kv_cache.py): a sequence takes blocks as it grows and
gives them back when it leaves. When a running sequence needs a block and none is free, the newest
sequence is preempted: its blocks are freed and it goes back to the front of the queue, to be recomputed
(its prompt and the tokens it has produced) when blocks free up. Nothing is lost and no token changes.

``FamilyRunner`` drives the family model (branches mixed in one forward); ``StandaloneRunner`` drives any
transformers causal LM through the same cache and attention (server/engine/paged_hf.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from compression.errors import UserError
from server.engine.kv_cache import BLOCK_SIZE, BlockPool, StepBatch, kv_bytes_per_token
from server.engine.model import linear, row_groups, single_branch
from server.engine.sampling import SamplingParams, sample_rows, token_logprobs
from server.engine.structured import apply_masks, fill_masks

log = logging.getLogger("branchserve.engine")
_FILLS = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="branchserve-grammar")  # bitmask fills


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
    blocks: list[int] = field(default_factory=list)  # the block table: the KV blocks this sequence holds
    computed: int = 0  # tokens whose keys and values are in the cache
    output: list[int] = field(default_factory=list)
    finished: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, n: int) -> list[int]:
        """Tokens start..start+n-1 of prompt + output, without joining the two."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start:start + n]
        if start >= p:
            return self.output[start - p:start - p + n]
        return self.prompt[start:] + self.output[:start + n - p]


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host values as a long tensor on ``device``: through pinned memory without blocking on CUDA."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Runner:
    def __init__(self, device: torch.device, max_batch: int, max_seq: int, prefill_chunk: int):
        self.device = device
        self.max_batch = max_batch
        self.max_context = max_seq  # as configured; max_seq is capped by the cache once it is allocated
        self.max_seq = max_seq
        self.prefill_chunk = prefill_chunk  # prompt tokens per step, over all rows
        self.pool: BlockPool | None = None
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.peak_batch = 0  # most sequences in one step
        self.peak_mixed = 0  # most distinct branches in one step
        self.forwards = 0  # model forwards run by steps
        self.preemptions = 0

    # -- the KV cache
    def kv_bytes_per_token(self) -> int:
        raise NotImplementedError

    def worst_case_tokens(self) -> int:
        """Tokens the cache would need for every sequence at its longest: more is never used."""
        return self.max_batch * self.max_context

    def allocate(self, budget: int | None = None, device_budget: int | None = None) -> None:
        """Size the cache to ``budget`` bytes, at most the worst case (None: the worst case), and allocate it.
        ``device_budget``: what the device's models share, for the error when this share holds no block."""
        per_block = self.kv_bytes_per_token() * BLOCK_SIZE
        blocks = -(-self.worst_case_tokens() // BLOCK_SIZE)
        if budget is not None:
            blocks = min(budget // per_block, blocks)
        if blocks < 1:
            shared = budget if device_budget is None else device_budget
            raise UserError(f"a KV cache of {shared} bytes holds no block of {BLOCK_SIZE} tokens "
                            f"({per_block} bytes each) for every model; raise limits.kv_cache_memory")
        self.pool = BlockPool(blocks)
        self._allocate_blocks(blocks)
        self.max_seq = min(self.max_context, self.pool.capacity)

    def _allocate_blocks(self, blocks: int) -> None:
        raise NotImplementedError

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
        """Compile whatever the runner's steps need, before the server says it is ready."""

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        """One engine step: schedule, one forward over every scheduled token, then sample for each sequence
        whose tokens are now all computed (a decode row, or a prompt's last chunk)."""
        self._reap()
        scheduled, decode_rows = self._schedule()
        if scheduled:
            sampling = [seq for seq, n in scheduled if seq.computed + n == seq.length]
            matchers = [s.matcher for s in sampling]
            # Constrained rows' masks are filled while the forward runs: they depend on accepted tokens only.
            masks = _FILLS.submit(fill_masks, matchers, self.vocab_size) \
                if any(m is not None for m in matchers) else None
            logits = self._forward(scheduled, decode_rows, sampling)
            self.forwards += 1
            self.peak_batch = max(self.peak_batch, len(scheduled))
            self.peak_mixed = max(self.peak_mixed, len({s.branch for s, _ in scheduled}))
            for seq, n in scheduled:
                seq.computed += n
            if sampling:
                self._accept(sampling, logits, masks.result() if masks is not None else None)
        self._reap()

    def _schedule(self) -> tuple[list[tuple[Sequence, int]], int]:
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
                self._finish(seq, "cancelled")
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
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        log.debug("preempted %s at %d tokens (%d blocks free)", seq.id, seq.length, len(self.pool.free))

    def fail_all(self, message: str) -> None:
        """End every sequence that has not ended yet with an error, once each."""
        for seq in list(self.running) + list(self.waiting):
            if seq.finished is None:
                seq.finished = "error"
                seq.emit(Event("", [], "error", len(seq.prompt), len(seq.output), error=message))
            if self.pool is not None:
                self.pool.release(seq.blocks)
        self.running.clear()
        self.waiting.clear()

    # -- shared mechanics
    def _accept(self, seqs: list[Sequence], logits: torch.Tensor, masks=None) -> None:
        """Constraints mask their rows (``masks`` from ``fill_masks``), then every row is sampled; sampled tokens
        go out as they are (text, stop strings and events are the output side's work)."""
        if masks is not None:
            logits = apply_masks(logits, masks)
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = dict(zip(want, token_logprobs(logits, want, tokens, [seqs[i].params.logprobs for i in want]))) \
            if want else {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.output.append(tok)
            event = Event("", [tok], logprobs=[logprobs[i]] if i in logprobs else None)
            seq.emit(event)
            if seq.matcher is not None and not seq.matcher.accept(tok):  # cannot happen with the mask applied
                seq.finished = "error"
                seq.emit(Event("", [], "error", len(seq.prompt), len(seq.output),
                               error=f"the constraint rejected token {tok}"))
            elif tok in seq.params.stop_token_ids or (tok in seq.stop_ids and not seq.params.ignore_eos):
                self._finish(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq:
                self._finish(seq, "length")

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
            for seq in gone:
                self.pool.release(seq.blocks)
        self.waiting = collections.deque(s for s in self.waiting if not self._drop_cancelled(s))

    def _drop_cancelled(self, seq: Sequence) -> bool:
        if seq.cancelled.is_set():
            self.pool.release(seq.blocks)  # a preempted sequence holds none; this is for safety's sake
            self._finish(seq, "cancelled")
            return True
        return False

    def _batch(self, scheduled: list[tuple[Sequence, int]], decode_rows: int, heads: int, kv_heads: int,
               dtype: torch.dtype) -> StepBatch:
        return StepBatch([(seq.blocks, seq.computed, n) for seq, n in scheduled], decode_rows, self.pool.block_size,
                         heads, kv_heads, dtype, self.device, lengths=[seq.length for seq, _ in scheduled])

    @staticmethod
    def _flat(scheduled: list[tuple[Sequence, int]], sampling: list[Sequence]) -> tuple[list[int], list[int]]:
        """The step's flat tokens, and the index of each sampling sequence's last token among them."""
        tokens, last, ends = [], [], {id(s) for s in sampling}
        for seq, n in scheduled:
            tokens += seq.tokens(seq.computed, n)
            if id(seq) in ends:
                last.append(len(tokens) - 1)
        return tokens, last

    # -- what each model does differently
    def _forward(self, scheduled: list[tuple[Sequence, int]], decode_rows: int, sampling: list[Sequence]
                 ) -> torch.Tensor: ...  # -> (len(sampling), V)


class FamilyRunner(Runner):
    """The family model, branches mixed in one forward."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                 compile: bool = False):
        """``compile``: steps go through torch.compile (dynamic shapes), compiled by ``warm_up``."""
        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        self.step_forward = model
        self.decode_forward = None  # limits.compile: decode-only steps, compiled
        if compile:
            from server.engine.compiled import compile_step

            self.decode_forward = compile_step(model, 8 + 4 * len(model.branches))

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.cfg
        return kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.model.dtype)

    def _allocate_blocks(self, blocks: int) -> None:
        self.model.allocate_cache(blocks)

    def warm_up(self) -> None:
        if self.decode_forward is not None:
            from server.engine.compiled import tracing, warm_up

            with tracing():
                warm_up(self)

    def _forward(self, scheduled, decode_rows, sampling):
        tokens, last = self._flat(scheduled, sampling)
        branches = [seq.branch for seq, n in scheduled for _ in range(n)]
        single = single_branch(branches)
        cfg = self.model.cfg
        batch = self._batch(scheduled, decode_rows, cfg.num_heads, cfg.num_kv_heads, self.model.dtype)
        groups = row_groups(branches, self.device) if single is None and self.model.row_grouped else None
        if self.decode_forward is not None and decode_rows == len(scheduled) and groups is None:
            branch = to_device(branches, self.device)  # every row decodes, and samples: heads after the graph
            hidden = self.decode_forward(to_device(tokens, self.device), branch, batch.pack(), single=single,
                                         head=False)
            return self.model.project(hidden, branch, branches)
        return self.step_forward(to_device(tokens, self.device), to_device(branches, self.device), batch,
                                 single=single, groups=groups, last=to_device(last, self.device),
                                 last_branches=[s.branch for s in sampling], head=bool(sampling))


def _cpu_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    y = linear(x, self.weight)
    return y if self.bias is None else y + self.bias


class StandaloneRunner(Runner):
    """Any transformers causal LM on the same paged cache and attention as the family model: the engine's
    attention is registered with transformers (server/engine/paged_hf.py), and a step is one forward over
    the flat batch, as one sequence of T tokens whose positions and cache slots the batch gives."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                 compile: bool = False):
        """``compile``: steps go through torch.compile (dynamic shapes), compiled by ``warm_up``."""
        from server.engine.paged_hf import ATTENTION, PagedCache

        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        model.config._attn_implementation = ATTENTION
        if model.device.type == "cpu":  # the family model's CPU GEMM layout for a few rows (model.linear)
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.forward = _cpu_linear.__get__(module)
        cfg = model.config
        self.heads = cfg.num_attention_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.cache = PagedCache(cfg.num_hidden_layers)
        # transformers 5 renamed past_key_values to cache (the old name warns, then goes in 5.40)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.step_forward = model
        self.decode_forward = None  # limits.compile: decode-only steps, compiled
        if compile:
            from server.engine.compiled import compile_step

            self.decode_forward = compile_step(model, 16)

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config.num_hidden_layers, self.kv_heads, self.head_dim,
                                  self.model.dtype)

    def _allocate_blocks(self, blocks: int) -> None:
        self.cache.allocate(blocks, self.kv_heads, self.head_dim, self.model.dtype, self.device)

    @torch.inference_mode()
    def warm_up(self) -> None:
        if self.decode_forward is not None:
            from server.engine.compiled import tracing, warm_up

            with tracing():
                warm_up(self)

    @torch.inference_mode()
    def _forward(self, scheduled, decode_rows, sampling):
        tokens, last = self._flat(scheduled, sampling)
        batch = self._batch(scheduled, decode_rows, self.heads, self.kv_heads, self.model.dtype)
        self.cache.batch = batch
        forward = self.step_forward
        if self.decode_forward is not None and decode_rows == len(scheduled):
            forward = self.decode_forward
            batch.pack()
        out = forward(input_ids=to_device(tokens, self.device)[None], position_ids=batch.positions[None],
                                use_cache=True, **{self.cache_arg: self.cache},
                                logits_to_keep=to_device(last, self.device), paged=batch)
        return out.logits[0]
