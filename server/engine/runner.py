"""Model runners: one per served model; each engine step runs one forward over the tokens the scheduler
(server/engine/scheduler.py) picked, then samples for every sequence whose tokens are now all computed.

Keys and values live in a paged cache (server/engine/kv_cache.py) that the runner allocates and the scheduler
hands out by blocks.

``FamilyRunner`` drives the family model (branches mixed in one forward); ``StandaloneRunner`` drives any
transformers causal LM through the same cache and attention (server/engine/paged_hf.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch

from compression.errors import UserError
from server.engine.kv_cache import BLOCK_SIZE, BlockPool, StepBatch, kv_bytes_per_token
from server.engine.model import linear, row_groups, single_branch
from server.engine.openmp import single_threaded
from server.engine.sampling import forbid_stops, sample_rows, token_logprobs
from server.engine.scheduler import Scheduler
from server.engine.sequence import Event, Sequence
from server.engine.structured import FILL_NICE, apply_masks, fill_masks, lower_priority

log = logging.getLogger("branchserve.engine")


def _fill_thread() -> None:
    """The bitmask-fill thread: below the engine's priority, and its allocations run on it alone (an OpenMP
    team of its own would slow every step: server/engine/openmp.py)."""
    lower_priority(FILL_NICE)
    single_threaded()


_FILLS = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="branchserve-grammar",  # bitmask fills
                                               initializer=_fill_thread)


@dataclass
class Parked:
    """A constrained row's logits from a step whose mask fill had not finished when the forward did."""

    logits: torch.Tensor  # (1, V)
    fill: concurrent.futures.Future  # -> fill_masks' (bitmask, rows) for the step
    row: int  # its row in that bitmask


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host values as a long tensor on ``device``: through pinned memory without blocking on CUDA."""
    t = torch.tensor(values, dtype=torch.long)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Runner:
    def __init__(self, device: torch.device, max_batch: int, max_seq: int, prefill_chunk: int):
        self.device = device
        self.decode_forward = None  # limits.compile: decode-only steps, compiled
        self.graphs = None  # limits.cuda_graphs: decode steps over padded static inputs (server/engine/graphs.py)
        self.max_batch = max_batch
        self.max_context = max_seq  # as configured; max_seq is capped by the cache once it is allocated
        self.max_seq = max_seq
        self.prefill_chunk = prefill_chunk  # prompt tokens per step, over all rows
        self.pool: BlockPool | None = None
        self.scheduler = Scheduler(max_batch, prefill_chunk)
        self.parked: list[Sequence] = []  # sampled rows whose grammar mask is still being filled
        self.peak_batch = 0  # most sequences in one step
        self.peak_mixed = 0  # most distinct branches in one step
        self.forwards = 0  # model forwards run by steps

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def preemptions(self) -> int:
        return self.scheduler.preemptions

    # -- the KV cache
    def kv_bytes_per_token(self) -> int:
        raise NotImplementedError

    def worst_case_tokens(self) -> int:
        """Tokens the cache would need for every sequence at its longest, and the null block when decode steps
        are padded (graphs): more is never used."""
        return self.max_batch * self.max_context + self.reserved_blocks * BLOCK_SIZE

    @property
    def reserved_blocks(self) -> int:
        return 1 if self.graphs is not None else 0  # the padding rows' null block

    def allocate(self, budget: int | None = None, device_budget: int | None = None) -> None:
        """Size the cache to ``budget`` bytes, at most the worst case (None: the worst case), and allocate it.
        ``device_budget``: what the device's models share, for the error when this share holds no block."""
        per_block = self.kv_bytes_per_token() * BLOCK_SIZE
        reserved = self.reserved_blocks
        blocks = -(-self.worst_case_tokens() // BLOCK_SIZE)
        if budget is not None:
            blocks = min(budget // per_block, blocks)
        if blocks < 1 + reserved:
            shared = budget if device_budget is None else device_budget
            raise UserError(f"a KV cache of {shared} bytes holds no block of {BLOCK_SIZE} tokens "
                            f"({per_block} bytes each) for every model; raise limits.kv_cache_memory")
        self.pool = self.scheduler.pool = BlockPool(blocks, reserved=reserved)
        self._allocate_blocks(blocks)
        self.max_seq = min(self.max_context, self.pool.capacity)

    def _allocate_blocks(self, blocks: int) -> None:
        raise NotImplementedError

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; the engine has already checked that its prompt fits."""
        seq.generator = seq.params.generator(self.device)
        if seq.params.grammar is not None:
            seq.matcher = seq.params.grammar.matcher()
        self.scheduler.add(seq)

    @property
    def vocab_size(self) -> int:
        """The width of the logits rows this runner samples from."""
        return self.model.config.vocab_size

    def warm_up(self) -> None:
        """Compile and capture whatever the runner's steps need, before the server says it is ready."""
        if self.decode_forward is not None:
            from server.engine.compiled import tracing, warm_up

            with tracing():
                warm_up(self)
        if self.graphs is not None:
            self._prepare_graphs()

    def _prepare_graphs(self) -> None:
        from server.engine.compiled import tracing

        with tracing() if self.decode_forward is not None else contextlib.nullcontext():
            self.graphs.prepare(self.max_seq, self.pool.num_blocks, self.vocab_size)

    def _graphed(self, scheduled: list[tuple[Sequence, int]], decode_rows: int, tokens: list[int], single):
        """A decode-only step through its CUDA graph bucket -> (output, branches on the device), or None."""
        if self.graphs is None or decode_rows != len(scheduled):
            return None
        return self.graphs.run([(seq.blocks, seq.computed, t, seq.branch) for (seq, _), t in zip(scheduled, tokens)],
                               single)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> None:
        """One engine step: schedule, one forward over every scheduled token, then sample for each sequence
        whose tokens are now all computed (a decode row, or a prompt's last chunk)."""
        self.scheduler.reap()
        self._resume_parked()
        scheduled, decode_rows = self.scheduler.schedule()
        if scheduled:
            sampling = [seq for seq, n in scheduled if seq.computed + n == seq.length]
            matchers = [s.matcher for s in sampling]
            # Constrained rows' masks are filled while the forward runs: they depend on accepted tokens only.
            fill = _FILLS.submit(fill_masks, matchers, self.vocab_size) \
                if any(m is not None for m in matchers) else None
            logits = self._forward(scheduled, decode_rows, sampling)
            self.forwards += 1
            self.peak_batch = max(self.peak_batch, len(scheduled))
            self.peak_mixed = max(self.peak_mixed, len({s.branch for s, _ in scheduled}))
            for seq, n in scheduled:
                seq.computed += n
            if sampling:
                self._sample(sampling, logits, fill)
        elif self.parked:  # nothing to run but rows waiting for their masks: wait a little for one
            concurrent.futures.wait({s.pending.fill for s in self.parked if s.pending is not None}, timeout=0.005,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
            self._resume_parked()
        self.scheduler.reap()

    def _sample(self, sampling: list[Sequence], logits: torch.Tensor, fill) -> None:
        """Sample every row; when the grammar masks are not filled yet, the unconstrained rows go now and the
        constrained ones are parked with their logits until their masks are (``_resume_parked``): a slow fill
        delays only its own rows, which skip steps meanwhile."""
        if fill is None or fill.done():
            self._accept(sampling, logits, fill.result() if fill is not None else None)
            return
        plain = [i for i, s in enumerate(sampling) if s.matcher is None]
        if plain:
            self._accept([sampling[i] for i in plain], logits[to_device(plain, logits.device)])
        for i, seq in enumerate(sampling):
            if seq.matcher is not None:  # a copy: a captured step reuses its output buffer
                seq.pending = Parked(logits[i:i + 1].clone(), fill, i)
                if not any(p is seq for p in self.parked):
                    self.parked.append(seq)

    def _resume_parked(self) -> None:
        """Sample the parked rows whose masks are now filled (all in one call); drop those that ended or were
        preempted meanwhile."""
        if not self.parked:
            return
        ready = [s for s in self.parked if s.pending is None or s.finished or s.pending.fill.done()]
        if not ready:
            return
        done = {id(s) for s in ready}
        self.parked = [s for s in self.parked if id(s) not in done]
        live = [s for s in ready if s.pending is not None and not s.finished]
        if live:
            logits = torch.cat([s.pending.logits for s in live])
            mask = torch.stack([s.pending.fill.result()[0][s.pending.row] for s in live])
        for seq in ready:
            seq.pending = None
        if live:
            self._accept(live, logits, (mask, list(range(len(live)))))

    def fail_all(self, message: str) -> None:
        self.scheduler.fail_all(message)
        self.parked = []

    # -- shared mechanics
    def _accept(self, seqs: list[Sequence], logits: torch.Tensor, masks=None) -> None:
        """Constraints mask their rows (``masks`` from ``fill_masks``), then every row is sampled; sampled tokens
        go out as they are (text, stop strings and events are the output side's work)."""
        if masks is not None:
            logits = apply_masks(logits, masks)
        early = [i for i, s in enumerate(seqs) if len(s.output) < s.params.min_tokens and s.matcher is None]
        if early:  # min_tokens: no stop token yet (a constraint's end still ends a constrained row)
            logits = forbid_stops(logits, early, [sorted(seqs[i].stop_ids | set(seqs[i].params.stop_token_ids))
                                                  for i in early])
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logprobs = dict(zip(want, token_logprobs(logits, want, tokens, [seqs[i].params.logprobs for i in want]))) \
            if want else {}
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            seq.output.append(tok)
            event = Event("", [tok], logprobs=[logprobs[i]] if i in logprobs else None)
            seq.emit(event)
            if seq.matcher is not None and not seq.matcher.accept(tok):  # cannot happen with the mask applied
                self.scheduler.fail(seq, f"the constraint rejected token {tok}")
            elif tok in seq.params.stop_token_ids or (tok in seq.stop_ids and not seq.params.ignore_eos):
                self.scheduler.finish(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq:
                self.scheduler.finish(seq, "length")

    def _batch(self, scheduled: list[tuple[Sequence, int]], decode_rows: int, heads: int, kv_heads: int,
               dtype: torch.dtype, compiled: bool = False) -> StepBatch:
        return StepBatch([(seq.blocks, seq.computed, n) for seq, n in scheduled], decode_rows, self.pool.block_size,
                         heads, kv_heads, dtype, self.device, lengths=[seq.length for seq, _ in scheduled],
                         compiled=compiled)

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
                 compile: bool = False, graphs: bool = False, capture: bool | None = None):
        """``compile``: steps go through torch.compile (dynamic shapes), compiled by ``warm_up``. ``graphs``:
        decode steps replayed from CUDA graphs captured by ``warm_up`` (``capture=False``: their padded static
        inputs without the graphs, on any device; default: capture on CUDA)."""
        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        self.step_forward = model
        self.decode_forward = None  # limits.compile: decode-only steps, compiled
        if compile:
            from server.engine.compiled import compile_step

            self.decode_forward = compile_step(model, 8 + 4 * len(model.branches), self.device)
        if graphs:
            from server.engine.graphs import DecodeGraphs

            n = len(model.branches)  # the mixed forward needs the host's row groups with dense residuals
            mixes = list(range(n)) + ([None] if n > 1 and not model.row_grouped else [])
            self.graphs = DecodeGraphs(self._decode_step, mixes, max_batch, BLOCK_SIZE, self.device,
                                       self.device.type == "cuda" if capture is None else capture)

    def _decode_step(self, tokens, branch, batch, single):
        forward = self.step_forward if self.decode_forward is None else self.decode_forward
        return forward(tokens, branch, batch, single=single, head=False)

    @property
    def vocab_size(self) -> int:
        return self.model.cfg.vocab_size

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.cfg
        return kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.model.dtype)

    def _allocate_blocks(self, blocks: int) -> None:
        self.model.allocate_cache(blocks)

    def _forward(self, scheduled, decode_rows, sampling):
        tokens, last = self._flat(scheduled, sampling)
        branches = [seq.branch for seq, n in scheduled for _ in range(n)]
        single = single_branch(branches)
        graphed = self._graphed(scheduled, decode_rows, tokens, single)
        if graphed is not None:  # every row decodes, and samples: the heads after the replay
            return self.model.project(*graphed, branches)
        cfg = self.model.cfg
        groups = row_groups(branches, self.device) if single is None and self.model.row_grouped else None
        compiled = self.decode_forward is not None and decode_rows == len(scheduled) and groups is None
        batch = self._batch(scheduled, decode_rows, cfg.num_heads, cfg.num_kv_heads, self.model.dtype, compiled)
        if compiled:
            branch = to_device(branches, self.device)  # every row decodes, and samples: heads after the graph
            hidden = self.decode_forward(to_device(tokens, self.device), branch, batch, single=single, head=False)
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
                 compile: bool = False, graphs: bool = False, capture: bool | None = None):
        """``compile``: steps go through torch.compile (dynamic shapes), compiled by ``warm_up``. ``graphs``:
        decode steps replayed from CUDA graphs captured by ``warm_up`` (``capture=False``: their padded static
        inputs without the graphs, on any device; default: capture on CUDA)."""
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

            self.decode_forward = compile_step(model, 16, self.device)
        if graphs:
            from server.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(self._decode_step, [0], max_batch, BLOCK_SIZE, self.device,
                                       self.device.type == "cuda" if capture is None else capture)

    def _decode_step(self, tokens, branch, batch, single):
        self.cache.batch = batch
        forward = self.step_forward if self.decode_forward is None else self.decode_forward
        out = forward(input_ids=tokens[None], position_ids=batch.positions[None], use_cache=True,
                      **{self.cache_arg: self.cache}, logits_to_keep=0, paged=batch)
        return out.logits[0]

    def kv_bytes_per_token(self) -> int:
        return kv_bytes_per_token(self.model.config.num_hidden_layers, self.kv_heads, self.head_dim,
                                  self.model.dtype)

    def _allocate_blocks(self, blocks: int) -> None:
        self.cache.allocate(blocks, self.kv_heads, self.head_dim, self.model.dtype, self.device)

    @torch.inference_mode()
    def warm_up(self) -> None:
        super().warm_up()

    @torch.inference_mode()
    def _forward(self, scheduled, decode_rows, sampling):
        tokens, last = self._flat(scheduled, sampling)
        graphed = self._graphed(scheduled, decode_rows, tokens, 0)
        if graphed is not None:
            return graphed[0]
        compiled = self.decode_forward is not None and decode_rows == len(scheduled)
        batch = self._batch(scheduled, decode_rows, self.heads, self.kv_heads, self.model.dtype, compiled)
        self.cache.batch = batch
        forward = self.decode_forward if compiled else self.step_forward
        out = forward(input_ids=to_device(tokens, self.device)[None], position_ids=batch.positions[None],
                                use_cache=True, **{self.cache_arg: self.cache},
                                logits_to_keep=to_device(last, self.device), paged=batch)
        return out.logits[0]
