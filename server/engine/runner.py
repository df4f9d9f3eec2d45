"""Runners: continuous batching for one model, one engine step at a time.

A step admits waiting sequences into free slots, runs at most one prefill chunk
(so a newcomer's prompt never stalls the running decodes for long), then one
decode step for every sequence that is generating. Finished and cancelled
sequences leave between steps.

``FamilyRunner`` drives the family model (a preallocated KV-cache slot per
sequence, branches mixed in one forward). ``StandaloneRunner`` drives any
transformers causal LM: its running sequences share one left-padded cache that
newcomers are padded into and leavers are cut out of.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from server.engine.model import row_groups, single_branch
from server.engine.sampling import SamplingParams, sample_rows


@dataclass
class Event:
    """What a request's consumer receives: new text and tokens, and at the end a finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class Sequence:
    id: str
    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    branch: int = 0  # row's branch index (family runner)
    stop_ids: frozenset = frozenset()
    generator: torch.Generator | None = None
    slot: int = -1
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    finished: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    state: object = None  # runner-specific (standalone: the newcomer's own cache while it prefills)

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

    # -- the scheduler's side
    def add(self, seq: Sequence) -> None:
        """Queue a sequence; the engine has already checked that its prompt fits."""
        seq.generator = seq.params.generator(self.device)
        self.waiting.append(seq)

    def warm_up(self) -> None:
        """Compile and capture whatever the runner's steps need, before the server says it is ready."""

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> None:
        self._reap()
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting.popleft()
            if seq.cancelled.is_set():
                self._finish(seq, "cancelled")
                continue
            self._admit(seq)
            self.running.append(seq)
        decoding = [s for s in self.running if s.output and not s.finished]
        if decoding:
            self.peak_batch = max(self.peak_batch, len(decoding))
            self.peak_mixed = max(self.peak_mixed, len({s.branch for s in decoding}))
            self._accept(decoding, self._decode(decoding))
        batch = self._prefill_batch()
        if batch:
            logits = self._prefill(batch)
            for seq, chunk in batch:
                seq.prefilled += len(chunk)
            done = [i for i, (seq, _) in enumerate(batch) if seq.prefilled == len(seq.prompt)]
            if done:
                self._accept([batch[i][0] for i in done], logits[done])
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
        """Sampled tokens go out as they are; text, stop strings and events are the output side's work."""
        tokens = sample_rows(logits, [s.params for s in seqs], [s.generator for s in seqs])
        for seq, tok in zip(seqs, tokens):
            seq.output.append(tok)
            if tok in seq.stop_ids or tok in seq.params.stop_token_ids:
                seq.emit(Event("", [tok]))
                self._finish(seq, "stop")
            elif len(seq.output) >= seq.params.max_tokens or seq.length >= self.max_seq:
                seq.emit(Event("", [tok]))
                self._finish(seq, "length")
            else:
                seq.emit(Event("", [tok]))

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

    # -- what each model does differently
    def _admit(self, seq: Sequence) -> None: ...
    def _release(self, seqs: list[Sequence]) -> None: ...
    def _reset(self) -> None: ...
    def _prefill(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor: ...  # -> (B, V) at chunk ends
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor: ...  # -> (B, V)


class FamilyRunner(Runner):
    """The family model. Running sequences hold cache slots 0..n-1 (compact: when one leaves, the last one
    moves into its slot, one row's cache copied once), so a decode step's row i is slot i and attention reads
    the cache as a view. A slot still prefilling is a padding row in the decode step: its new keys go to the
    scratch slot and its output is dropped."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256,
                 static_decode: bool = False, compile: bool = False):
        """``static_decode``: decode steps with static shapes, padded to batch buckets; on CUDA they are
        captured as CUDA graphs (server/engine/graphs.py). ``compile``: those steps go through
        torch.compile first (implies ``static_decode``). Both are prepared by ``warm_up``."""
        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        self.scratch = max_batch  # the slot padding rows write to
        model.allocate_cache(max_batch + 1, max_seq)
        self.slots: list[Sequence] = []  # slots[i] holds slot i's sequence
        self.graphs = None
        if static_decode or compile:
            from server.engine.graphs import DecodeGraphs

            self.graphs = DecodeGraphs(model, max_batch, self.scratch, capture=model.device.type == "cuda",
                                       compile=compile)
        self.copied_rows = 0  # cache rows moved to keep slots compact (one per leave that opens a hole)

    def warm_up(self) -> None:
        if self.graphs is not None:
            self.graphs.prepare()

    def _admit(self, seq: Sequence) -> None:
        seq.slot = len(self.slots)
        self.slots.append(seq)

    def _release(self, seqs: list[Sequence]) -> None:
        gone = {id(s) for s in seqs}
        for seq in seqs:
            hole = seq.slot
            while self.slots and id(self.slots[-1]) in gone:  # leavers at the end just go
                self.slots.pop()
            if hole >= len(self.slots) or id(self.slots[hole]) not in gone:
                continue
            last = self.slots.pop()  # the last running sequence moves into the hole
            n = min(last.length, self.max_seq)
            for kc, vc in zip(self.model.k_cache, self.model.v_cache):
                kc[hole, :, :n] = kc[last.slot, :, :n]
                vc[hole, :, :n] = vc[last.slot, :, :n]
            self.copied_rows += 1
            last.slot = hole
            self.slots[hole] = last

    def _reset(self) -> None:
        self.slots = []

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

    def decode_rows(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int], list[int]]:
        """Inputs for one row per occupied slot: (tokens, positions, write slots, branches). Slots that are not
        decoding are padding rows: token 0 at position 0, written to the scratch slot, on a present branch."""
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
        order = [s.slot for s in seqs]
        return logits if order == list(range(len(self.slots))) else logits[self._tensor(order)]


class StandaloneRunner(Runner):
    """Any transformers causal LM. Running rows share one left-padded DynamicCache."""

    def __init__(self, model, max_batch: int = 16, max_seq: int = 2048, prefill_chunk: int = 256):
        super().__init__(model.device, max_batch, max_seq, prefill_chunk)
        self.model = model
        self._reset()

    def _reset(self) -> None:
        self.cache = None  # the shared cache of self.rows
        self.rows: list[Sequence] = []
        self.pad: list[int] = []  # left padding of each row in the shared cache

    def _admit(self, seq: Sequence) -> None:
        from transformers import DynamicCache

        seq.state = DynamicCache(config=self.model.config)

    @torch.inference_mode()
    def _prefill(self, batch: list[tuple[Sequence, list[int]]]) -> torch.Tensor:
        # Each newcomer fills its own cache; it joins the shared one when its prompt is done.
        logits = []
        for seq, chunk in batch:
            ids = torch.tensor([chunk], device=self.device)
            pos = torch.arange(seq.prefilled, seq.prefilled + len(chunk), device=self.device)[None]
            out = self.model(input_ids=ids, position_ids=pos, past_key_values=seq.state, use_cache=True,
                             logits_to_keep=1)
            if seq.prefilled + len(chunk) == len(seq.prompt):
                self._join(seq)
            logits.append(out.logits[0, -1])
        return torch.stack(logits)

    def _join(self, seq: Sequence) -> None:
        """Pad the newcomer's cache and the shared one to a common length and stack them."""
        own = seq.state
        seq.state = None
        if self.cache is None:
            self.cache, self.rows, self.pad = own, [seq], [0]
            return
        shared_len, own_len = self.cache.get_seq_length(), own.get_seq_length()
        length = max(shared_len, own_len)
        for shared_layer, own_layer in zip(self.cache.layers, own.layers):
            for attr in ("keys", "values"):
                a = F.pad(getattr(shared_layer, attr), (0, 0, length - shared_len, 0))
                b = F.pad(getattr(own_layer, attr), (0, 0, length - own_len, 0))
                setattr(shared_layer, attr, torch.cat([a, b]))
        self.pad = [p + length - shared_len for p in self.pad] + [length - own_len]
        self.rows.append(seq)

    def _release(self, seqs: list[Sequence]) -> None:
        keep = [i for i, s in enumerate(self.rows) if s not in seqs]
        if not keep:
            self._reset()
            return
        trim = min(self.pad[i] for i in keep)
        index = torch.tensor(keep, device=self.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, trim:]
            layer.values = layer.values.index_select(0, index)[:, :, trim:]
        self.rows = [self.rows[i] for i in keep]
        self.pad = [self.pad[i] - trim for i in keep]

    @torch.inference_mode()
    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        # Every row of the shared cache is generating: seqs are self.rows, possibly in another order.
        order = {id(s): i for i, s in enumerate(self.rows)}
        length = self.cache.get_seq_length()
        ids = torch.tensor([[s.output[-1]] for s in self.rows], device=self.device)
        mask = torch.ones(len(self.rows), length + 1, dtype=torch.long, device=self.device)
        for i, p in enumerate(self.pad):
            mask[i, :p] = 0
        pos = torch.tensor([[length - p] for p in self.pad], device=self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                         use_cache=True)
        logits = out.logits[:, -1]
        return logits[torch.tensor([order[id(s)] for s in seqs], device=self.device)]
