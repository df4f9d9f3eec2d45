"""`branchserve serve`: check the config, build the engine in the background, answer HTTP."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from compression.errors import UserError
from server.config import ServerConfig
from server.engine.scheduler import Engine

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def served_names(config: ServerConfig) -> set[str]:
    """Every model name the config exposes, checked: artifacts and branches exist, no name twice."""
    from compression.artifact import Artifact

    names: set[str] = set()

    def expose(name: str) -> None:
        if name in names or name == "auto":
            raise UserError(f"model name {name!r} is exposed twice" if name != "auto" else "'auto' is reserved")
        names.add(name)

    for fam in config.families:
        artifact = Artifact(fam.artifact)
        for exposed, branch in (fam.branches or {b: b for b in artifact.branches}).items():
            artifact.check_branch(branch)
            expose(exposed)
    for sa in config.standalone:
        if not (Path(sa.path) / "config.json").is_file():
            raise UserError(f"standalone model {sa.name!r}: no checkpoint at {sa.path} (config.json missing)")
        expose(sa.name)
    return names


def preflight(config: ServerConfig):
    """Catch what we can before the port opens: missing models, unknown branches, bad templates and routes,
    absent devices. Returns the loaded pipelines."""
    from server.pipelines import load_pipelines

    names = served_names(config)
    pipelines = load_pipelines(config.pipelines, names)
    if config.router is not None:
        from router.router import check_routes
        from server.routing import exemplar_store

        check_routes(exemplar_store(config.router), config.router.default_route, names | set(pipelines))
        spec = config.router.embedder
        if spec.startswith("decoder:") and spec[8:] not in names and not Path(spec[8:]).is_dir():
            raise UserError(f"router embedder {spec!r}: {spec[8:]!r} is neither a served model nor a directory")
    for device in [f.device for f in config.families] + [s.device for s in config.standalone]:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"device {device!r} is configured but no CUDA device is available")
    return pipelines


def build_engine(config: ServerConfig) -> Engine:
    limits = config.limits
    engine = Engine(max_waiting=limits.queue_size)
    common = dict(max_batch=limits.max_batch, max_seq=limits.max_context, prefill_chunk=limits.prefill_chunk)
    for fam in config.families:
        engine.add_family(fam.artifact, fam.branches, device=fam.device,
                          dtype=DTYPES[fam.dtype] if fam.dtype else None,
                          defaults=fam.sampling.model_dump(exclude_none=True),
                          static_decode=limits.cuda_graphs or limits.compile, compile=limits.compile, **common)
    for sa in config.standalone:
        engine.add_standalone(sa.name, sa.path, device=sa.device, dtype=DTYPES[sa.dtype] if sa.dtype else None,
                              trust_remote_code=sa.trust_remote_code,
                              defaults=sa.sampling.model_dump(exclude_none=True), **common)
    return engine


def router_factory(config: ServerConfig, pipelines: dict):
    if config.router is None:
        return None
    from server.routing import build_router

    return lambda engine: build_router(config, engine, set(pipelines))


def serve(config: ServerConfig, host: str, port: int, banner: str | None = None) -> None:
    import uvicorn

    from server.api.app import build_app

    pipelines = preflight(config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(config, lambda: build_engine(config), router_factory(config, pipelines), pipelines)
    print(banner or f"branchserve: http://{host}:{port}/v1 (models load in the background; GET /health is 200 "
                    f"once ready)", flush=True)
    uvicorn.run(app, host=host, port=port, timeout_graceful_shutdown=int(config.shutdown_grace_s),
                log_level="info")
