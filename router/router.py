"""The router: embed the request, score every route's exemplars, pick a target.

The exemplar matrix is rebuilt lazily when the store's version changes, so an
edit takes effect on the next request; cached embeddings make that cheap.

Scores are centred: the mean of the store's exemplar embeddings is subtracted
from every exemplar and query before the cosine. Language-model embeddings sit
in a narrow cone (every text scores 0.93-0.99 against every route with the
decoder-suffix embedder); centring spreads them so that thresholds and a margin
can tell a clear winner from a guess.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from compression.errors import UserError
from router.cache import EmbeddingCache
from router.decision import Decision, decide, route_scores
from router.embedders import Embedder
from router.store import Calibration, ExemplarStore, Route, StoreError

log = logging.getLogger("branchserve.router")

InputMode = Literal["last_user", "context", "conversation"]


def route_input(messages: list[dict], mode: InputMode = "context") -> tuple[str, str]:
    """What the router embeds, as (text, context): the last user message, alone (``last_user``) or with the
    turns before it as context (``context``; the embedder keeps the context's last tokens, and the router
    blends it with the message alone); or the whole conversation as one text (``conversation``)."""
    if mode == "conversation":
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m.get("content")), ""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user" and messages[i].get("content"):
            if mode == "last_user":
                return messages[i]["content"], ""
            before = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:i]
                               if m.get("content") and m["role"] in ("user", "assistant"))
            return messages[i]["content"], before
    raise StoreError("the router needs a user message to route on")


def check_routes(store: ExemplarStore, default_route: str, targets: set[str] | None) -> None:
    """At start: the default route exists and every route targets something served."""
    if default_route not in store.routes:
        raise UserError(f"default route {default_route!r} is not in {store.path} "
                        f"(routes: {', '.join(store.routes) or 'none'})")
    if targets is not None:
        for r in store.routes.values():
            if r.target not in targets:
                raise UserError(f"{store.path}: route {r.name!r} targets {r.target!r}, which is not served "
                                f"(served: {', '.join(sorted(targets))})")


@dataclass
class _Built:
    """What a store version scores with: its routes, the exemplar matrix (centred, when ``mean`` is set), each
    row's route index, and the store's calibration."""
    version: int
    routes: list[Route]
    matrix: torch.Tensor
    owners: torch.Tensor
    mean: torch.Tensor | None
    calibration: Calibration | None


def _check_text(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise StoreError("text must be a non-empty string")


class Router:
    def __init__(self, store: ExemplarStore, embedder: Embedder, cache_dir: str | Path, default_route: str,
                 aggregate: Literal["max", "mean_top_k"] = "max", top_k: int = 3,
                 input: InputMode = "context", targets: set[str] | None = None, center: bool = True,
                 context_weight: float = 0.5):
        self.store, self.embedder = store, embedder
        self.default_route, self.aggregate, self.top_k, self.input = default_route, aggregate, top_k, input
        self.center, self.context_weight = center, context_weight
        self.targets = targets  # names a route may target (None: not checked)
        check_routes(store, default_route, targets)
        self.cache = EmbeddingCache(cache_dir, embedder.fingerprint)
        self._lock = threading.Lock()
        self._built = _Built(-1, [], torch.empty(0, 0), torch.empty(0, dtype=torch.long), None, None)
        self._rejected = -1
        self._current()  # embed the exemplars now, not on the first request
        fitted_for = self._built.calibration.fitted_for
        if fitted_for and fitted_for != self.scoring:
            log.warning("the thresholds in %s were fitted for %s, and this router scores with %s: refit them "
                        "(branchserve router fit --write)", store.path, fitted_for, self.scoring)

    @property
    def scoring(self) -> str:
        """What a score depends on besides the exemplars: thresholds fitted under one do not fit another."""
        parts = [self.embedder.fingerprint, "centred" if self.center else "raw", self.aggregate]
        if self.aggregate == "mean_top_k":
            parts.append(str(self.top_k))
        return "/".join(parts)

    def set_center(self, center: bool) -> None:
        """Centre the scores or not from now on (the exemplar matrix is rebuilt)."""
        with self._lock:
            self.center = center
            self._built.version = -1
        self._current()

    def _current(self) -> "_Built":
        """The routes and exemplar matrix, rebuilt after any edit, ours or another process's (the file is
        checked on every call: one stat). An outside change that breaks the file, drops the default route or
        targets an unserved name is logged and the last good routes keep serving."""
        with self._lock:
            try:
                self.store.refresh()
            except UserError as e:
                log.warning("ignoring the exemplar file's new contents: %s", e)
            version = self.store.version
            if self._built.version != version:
                version, routes, calibration = self.store.snapshot_all()
                problem = self._problem(routes)
                if problem and self._built.version >= 0:
                    if self._rejected != version:
                        log.warning("ignoring the exemplar file's new contents: %s", problem)
                        self._rejected = version
                    return self._built
                texts = [e.text for r in routes for e in r.exemplars]
                owners = torch.tensor([i for i, r in enumerate(routes) for _ in r.exemplars], dtype=torch.long)
                matrix = self.cache.get(texts, self.embedder.embed)
                mean = None
                if self.center and len(set(owners.tolist())) >= 2:  # centring one route's exemplars says nothing
                    mean = matrix.mean(0)
                    matrix = torch.nn.functional.normalize(matrix - mean, dim=1)
                self._built = _Built(version, routes, matrix, owners, mean, calibration)
            return self._built

    def _problem(self, routes: list[Route]) -> str | None:
        names = {r.name for r in routes}
        if self.default_route not in names:
            return f"the default route {self.default_route!r} is gone"
        for r in routes:
            if self.targets is not None and r.target not in self.targets:
                return f"route {r.name!r} targets {r.target!r}, which is not served"
        return None

    def _query(self, built: _Built, queries: list[torch.Tensor]) -> torch.Tensor:
        """The message alone, or blended with the message in its context: a follow-up ("and divided by 4?")
        borrows its topic from the turns before it, and a change of topic still counts for more than they do."""
        if built.mean is not None:
            queries = [torch.nn.functional.normalize(q - built.mean, dim=0) for q in queries]
        if len(queries) == 1:
            return queries[0]
        return torch.nn.functional.normalize(queries[0] + self.context_weight * queries[1], dim=0)

    def _embed(self, text: str, context: str) -> tuple[list[torch.Tensor], bool]:
        query, truncated = self.embedder.embed_one(text)
        if context and self.context_weight > 0:
            return [query, self.embedder.embed_one(text, context)[0]], truncated
        return [query], truncated

    async def _aembed(self, text: str, context: str) -> tuple[list[torch.Tensor], bool]:
        import asyncio

        if hasattr(self.embedder, "aembed_one"):
            one = self.embedder.aembed_one
        else:
            async def one(t, c=""):
                return await asyncio.to_thread(self.embedder.embed_one, t, c)
        if context and self.context_weight > 0:
            (query, truncated), (with_context, _) = await asyncio.gather(one(text), one(text, context))
            return [query, with_context], truncated
        query, truncated = await one(text)
        return [query], truncated

    def _decide(self, queries: list[torch.Tensor], truncated: bool, thresholds: dict | None = None,
                margin: float | None | bool = True) -> Decision:
        built = self._current()
        query = self._query(built, queries)
        scores = route_scores(query, built.matrix, built.owners, len(built.routes), self.aggregate, self.top_k)
        decision = decide(scores, built.routes, self.default_route, thresholds,
                          built.calibration.margin if margin is True else margin)
        decision.truncated = truncated
        return decision

    def decide_text(self, text: str, thresholds: dict[str, float | None] | None = None,
                    margin: float | None | bool = True, context: str = "") -> Decision:
        """``thresholds`` and ``margin`` override the stored ones for this decision (evaluation and fitting;
        ``margin=True``: the stored one)."""
        _check_text(text)
        return self._decide(*self._embed(text, context), thresholds, margin)

    def decide_messages(self, messages: list[dict], thresholds: dict[str, float | None] | None = None,
                        margin: float | None | bool = True) -> Decision:
        text, context = route_input(messages, self.input)
        return self.decide_text(text, thresholds, margin, context)

    async def adecide_text(self, text: str, context: str = "") -> Decision:
        """As ``decide_text``, for the event loop: a served model's embedding is an engine job, awaited (and
        cancelled with the awaiting task); anything else runs in a worker thread."""
        import asyncio

        _check_text(text)
        queries, truncated = await self._aembed(text, context)
        return await asyncio.to_thread(self._decide, queries, truncated)  # an edit may need exemplars embedded

    async def adecide_messages(self, messages: list[dict]) -> Decision:
        return await self.adecide_text(*route_input(messages, self.input))

    # -- edits that need the router's knowledge, on top of the store's own checks
    def add_route(self, name: str, target: str, **kw) -> Route:
        if self.targets is not None and target not in self.targets:
            raise StoreError(f"target {target!r} is not served (served: {', '.join(sorted(self.targets))})",
                             missing=True)
        return self.store.add_route(name, target, **kw)

    def remove_route(self, name: str) -> None:
        if name == self.default_route:
            raise StoreError(f"route {name!r} is the default route and cannot be removed")
        self.store.remove_route(name)
