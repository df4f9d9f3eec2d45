"""The router: embed the request, score every route's exemplars, pick a target.

The exemplar matrix is rebuilt lazily when the store's version changes, so an
edit takes effect on the next request; cached embeddings make that cheap.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Literal

import torch

from compression.errors import UserError
from router.cache import EmbeddingCache
from router.decision import Decision, decide, route_scores
from router.embedders import Embedder
from router.store import ExemplarStore, Route, StoreError

log = logging.getLogger("branchserve.router")

def request_text(messages: list[dict], mode: Literal["last_user", "conversation"] = "last_user") -> str:
    """What the router embeds: the last user message, or the whole conversation."""
    if mode == "conversation":
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages if m.get("content"))
    for m in reversed(messages):
        if m["role"] == "user" and m.get("content"):
            return m["content"]
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


def _check_text(text) -> None:
    if not isinstance(text, str) or not text.strip():
        raise StoreError("text must be a non-empty string")


class Router:
    def __init__(self, store: ExemplarStore, embedder: Embedder, cache_dir: str | Path, default_route: str,
                 aggregate: Literal["max", "mean_top_k"] = "max", top_k: int = 3,
                 input: Literal["last_user", "conversation"] = "last_user",
                 targets: set[str] | None = None):
        self.store, self.embedder = store, embedder
        self.default_route, self.aggregate, self.top_k, self.input = default_route, aggregate, top_k, input
        self.targets = targets  # names a route may target (None: not checked)
        check_routes(store, default_route, targets)
        self.cache = EmbeddingCache(cache_dir, embedder.fingerprint)
        self._lock = threading.Lock()
        self._built = (-1, [], torch.empty(0, 0), torch.empty(0, dtype=torch.long))
        self._rejected = -1
        self._current()  # embed the exemplars now, not on the first request

    def _current(self) -> tuple[list[Route], torch.Tensor, torch.Tensor]:
        """The routes and exemplar matrix, rebuilt after any edit, ours or another process's (the file is
        checked on every call: one stat). An outside change that breaks the file, drops the default route or
        targets an unserved name is logged and the last good routes keep serving."""
        with self._lock:
            try:
                self.store.refresh()
            except UserError as e:
                log.warning("ignoring the exemplar file's new contents: %s", e)
            version = self.store.version
            if self._built[0] != version:
                version, routes = self.store.snapshot()
                problem = self._problem(routes)
                if problem and self._built[0] >= 0:
                    if self._rejected != version:
                        log.warning("ignoring the exemplar file's new contents: %s", problem)
                        self._rejected = version
                    return self._built[1], self._built[2], self._built[3]
                texts = [e.text for r in routes for e in r.exemplars]
                owners = torch.tensor([i for i, r in enumerate(routes) for _ in r.exemplars], dtype=torch.long)
                matrix = self.cache.get(texts, self.embedder.embed)
                self._built = (version, routes, matrix, owners)
            return self._built[1], self._built[2], self._built[3]

    def _problem(self, routes: list[Route]) -> str | None:
        names = {r.name for r in routes}
        if self.default_route not in names:
            return f"the default route {self.default_route!r} is gone"
        for r in routes:
            if self.targets is not None and r.target not in self.targets:
                return f"route {r.name!r} targets {r.target!r}, which is not served"
        return None

    def _decide(self, query: torch.Tensor, truncated: bool, thresholds: dict | None = None) -> Decision:
        routes, matrix, owners = self._current()
        scores = route_scores(query, matrix, owners, len(routes), self.aggregate, self.top_k)
        decision = decide(scores, routes, self.default_route, thresholds)
        decision.truncated = truncated
        return decision

    def decide_text(self, text: str, thresholds: dict[str, float | None] | None = None) -> Decision:
        """``thresholds`` overrides the stored ones for this decision (evaluation and fitting)."""
        _check_text(text)
        return self._decide(*self.embedder.embed_one(text), thresholds)

    def decide_messages(self, messages: list[dict]) -> Decision:
        return self.decide_text(request_text(messages, self.input))

    async def adecide_text(self, text: str) -> Decision:
        """As ``decide_text``, for the event loop: a served model's embedding is an engine job, awaited (and
        cancelled with the awaiting task); anything else runs in a worker thread."""
        import asyncio

        _check_text(text)
        if hasattr(self.embedder, "aembed_one"):
            query, truncated = await self.embedder.aembed_one(text)
        else:
            query, truncated = await asyncio.to_thread(self.embedder.embed_one, text)
        return await asyncio.to_thread(self._decide, query, truncated)  # an edit may need exemplars embedded

    async def adecide_messages(self, messages: list[dict]) -> Decision:
        return await self.adecide_text(request_text(messages, self.input))

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
