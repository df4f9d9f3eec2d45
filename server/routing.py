"""Building the router from the server config: exemplar store, embedder, cache."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from compression.errors import UserError
from router.embedders import (
    DecoderSuffixEmbedder,
    SentenceTransformerEmbedder,
    load_decoder_path,
)
from router.router import Router
from router.store import ExemplarStore
from server.config import RouterConfig, ServerConfig, data_home


def seed_file(name: str) -> Path:
    path = Path(str(resources.files("prompts").joinpath(f"router/{name}.yaml")))
    if not path.is_file():
        raise UserError(f"no shipped exemplar set named {name!r} (prompts/router/{name}.yaml)")
    return path


def exemplar_store(config: RouterConfig) -> ExemplarStore:
    path = config.exemplars or data_home() / "router" / "exemplars.yaml"
    return ExemplarStore(path, seed_file(config.seed))


def cache_dir() -> Path:
    return data_home() / "router" / "cache"


def build_embedder(spec: str, layer: int = -1, engine=None, config: ServerConfig | None = None,
                   suffix: bool = True, pooling: str = "mean", max_tokens: int = 512, context_tokens: int = 128):
    """minilm | decoder:NAME (a served model, or one named in the config) | decoder:PATH | PATH."""
    if spec == "minilm":
        return SentenceTransformerEmbedder(max_tokens=max_tokens, context_tokens=context_tokens)
    if spec.startswith("decoder:"):
        name = spec.removeprefix("decoder:")
        if engine is not None and name in engine.targets:
            # A served model embeds through engine jobs: the engine thread is the only one that runs it.
            return DecoderSuffixEmbedder(
                name, engine.targets[name].tokenizer, lambda ids, lyr: engine.embed_future(name, ids, lyr).result(),
                layer=layer, suffix=suffix, pooling=pooling, max_tokens=max_tokens,
                ahidden=lambda ids, lyr: engine.embed(name, ids, lyr), context_tokens=context_tokens)
        if config is not None:
            for sa in config.standalone:
                if sa.name == name:
                    return load_decoder_path(sa.path, layer, suffix, pooling, max_tokens, context_tokens, name)
            for fam in config.families:
                from compression.artifact import Artifact
                from server.engine.model import FamilyModel
                from server.engine.text import load_tokenizer

                artifact = Artifact(fam.artifact)
                branch = (fam.branches or {b: b for b in artifact.branches}).get(name)
                if branch is not None:
                    model = FamilyModel.from_artifact(artifact, [branch])
                    return DecoderSuffixEmbedder(name, load_tokenizer(artifact.branch_dir(branch)),
                                                 lambda ids, lyr: model.hidden([ids], [0], lyr)[0], layer=layer,
                                                 suffix=suffix, pooling=pooling, max_tokens=max_tokens,
                                                 context_tokens=context_tokens)
        if Path(name).is_dir():
            return load_decoder_path(name, layer, suffix, pooling, max_tokens, context_tokens)
        raise UserError(f"embedder {spec!r}: {name!r} is neither a served model nor a checkpoint directory")
    if Path(spec).is_dir():
        return SentenceTransformerEmbedder(spec, max_tokens=max_tokens, context_tokens=context_tokens)
    raise UserError(f"embedder {spec!r}: use minilm, decoder:NAME or the path of a sentence-transformers model")


def build_router(config: ServerConfig, engine, pipelines: set[str] = frozenset()) -> Router:
    rc = config.router
    embedder = build_embedder(rc.embedder, rc.layer, engine=engine, pooling=rc.pooling,
                              max_tokens=rc.max_input_tokens, context_tokens=rc.context_tokens)
    store = exemplar_store(rc)
    router = Router(store, embedder, cache_dir(), rc.default_route, rc.aggregate, rc.top_k, rc.input,
                    targets=set(engine.targets) | set(pipelines), center=rc.center,
                    context_weight=rc.context_weight)
    store.materialize()  # a seeded store's file appears once the server is up, not before
    return router
