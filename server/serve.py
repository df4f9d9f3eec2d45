"""`branchserve serve`: check the config, build the engine in the background, answer HTTP."""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import threading
from pathlib import Path

import torch

from compression.compress import DTYPES
from compression.errors import UserError
from server.config import ServerConfig
from server.engine.core import Engine

log = logging.getLogger("branchserve.serve")


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
    engine = Engine(max_waiting=limits.queue_size, kv_cache_memory=limits.kv_cache_memory,
                    step_timeout_s=limits.step_timeout_s, request_timeout_s=limits.request_timeout_s)
    common = dict(max_batch=limits.max_batch, max_seq=limits.max_context, prefill_chunk=limits.prefill_chunk)
    for fam in config.families:
        engine.add_family(fam.artifact, fam.branches, device=fam.device,
                          dtype=DTYPES[fam.dtype] if fam.dtype else None,
                          defaults=fam.sampling.model_dump(exclude_none=True),
                          compile=limits.compile, cuda_graphs=limits.cuda_graphs, **common)
    for sa in config.standalone:
        engine.add_standalone(sa.name, sa.path, device=sa.device, dtype=DTYPES[sa.dtype] if sa.dtype else None,
                              trust_remote_code=sa.trust_remote_code,
                              defaults=sa.sampling.model_dump(exclude_none=True), compile=limits.compile,
                              cuda_graphs=limits.cuda_graphs, **common)
    return engine


def router_factory(config: ServerConfig, pipelines: dict):
    if config.router is None:
        return None
    from server.routing import build_router

    return lambda engine: build_router(config, engine, set(pipelines))


def bind(host: str, port: int):
    """The listening socket, bound before anything loads: a port in use is an error before the banner."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    family, _, _, _, address = infos[0]
    # proto IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections whose
    # socket says TCP. With it on, a response's second write waited for the client's delayed ACK: 40 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        why = "the port is in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise UserError(f"cannot listen on {host}:{port}: {why}") from None
    return sock


def load(config: ServerConfig, pipelines: dict, host: str):
    """Every model built, warmed up and checked, and the router built, before the port opens."""
    from server.api.app import State

    state = State(config, lambda: build_engine(config), router_factory(config, pipelines), pipelines, host)
    try:
        state.load()
    except UserError:
        raise
    except Exception as e:
        log.debug("loading failed", exc_info=True)
        raise UserError(f"loading the models failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                        ) from None
    return state


def log_plan(config: ServerConfig) -> None:
    """`branchserve plan`'s table, before loading: what each model will take and what is left for the cache."""
    from server.plan import make_plan, table

    try:
        plan = make_plan(config)
    except Exception as e:  # the plan only informs: loading says what is really wrong
        log.warning("no memory plan: %s", e)
        return
    for line in table(plan):
        log.info("plan: %s", line)


IDLE_CLOSE_S = 1.0  # at shutdown, a kept-alive connection idle this long is closed (its client sends no more)


def idle(connection) -> bool:
    """A uvicorn connection with no request in progress (its next one may be on the wire)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is None or getattr(cycle, "response_complete", False)


def serve(config: ServerConfig, host: str, port: int, banner: str | None = None) -> None:
    import uvicorn

    from server.api.app import ADMIN_OFF, build_app, is_loopback

    pipelines = preflight(config)
    sock = bind(host, port)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log_plan(config)
    try:
        state = load(config, pipelines, host)
        app = build_app(config, host=host, loaded=state)
        print(banner or f"branchserve: http://{host}:{port}/v1 (serving {', '.join(state.engine.targets)})",
              flush=True)
        for line in state.engine.kv_report():
            print(f"branchserve: {line}", flush=True)
        if config.router is not None and not state.edits_open and not state.admin_keys:
            print(f"branchserve: {ADMIN_OFF}", flush=True)
        if not state.api_keys and not is_loopback(host):
            print(f"branchserve: warning: no API key, and listening on {host}: anyone who can reach this port can "
                  "use the models. Set api_keys in the config or BRANCHSERVE_API_KEY.", flush=True)
        grace = config.shutdown_grace_s

        class Server(uvicorn.Server):
            def handle_exit(self, sig, frame):
                if not self.should_exit:  # the first signal: requests get until just before the grace ends
                    timer = threading.Timer(max(grace - 2.0, 0.0), state.drain)
                    timer.daemon = True
                    timer.start()
                super().handle_exit(sig, frame)

            async def shutdown(self, sockets=None):
                """uvicorn closes idle kept-alive connections at once, and the others as soon as their answer
                ends: a request a client sends on one just then is cut. Here a connection is closed only once
                it has been idle for a while; until then a request on it is answered (a 503 and Connection:
                close for a new generation). Then uvicorn's own shutdown, for what is left."""
                for server in self.servers:
                    server.close()
                for s in sockets or []:
                    s.close()
                # Only now (the port closed) do answers say Connection: close: a client told so earlier would
                # reconnect, and a connection still in the listener's backlog when it closes is reset.
                state.stop_accepting()
                loop = asyncio.get_running_loop()
                end, idle_since = loop.time() + grace, {}
                while self.server_state.connections and loop.time() < end and not self.force_exit:
                    now = loop.time()
                    for c in list(self.server_state.connections):
                        if not idle(c):
                            idle_since.pop(c, None)
                        elif now - idle_since.setdefault(c, now) >= IDLE_CLOSE_S:
                            c.shutdown()
                    await asyncio.sleep(0.05)
                self.config.timeout_graceful_shutdown = max(1, int(end - loop.time()))
                await super().shutdown(sockets=None)

        server = Server(uvicorn.Config(app, timeout_graceful_shutdown=int(grace), log_level="info"))
        for sig in (signal.SIGINT, signal.SIGTERM):  # uvicorn shuts down gracefully, then re-raises the
            signal.signal(sig, lambda *_: None)      # signal it caught: that is a normal exit here
        server.run(sockets=[sock])
    finally:
        sock.close()
