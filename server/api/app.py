"""The FastAPI app: the shared state (engine, router, metrics, keys), who may call what, and the routes wired
to their modules (chat, completions, embeddings, the router API)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from router.router import Router
from server.api import errors
from server.api.chat import install_chat_routes
from server.api.common import SHUTTING_DOWN
from server.api.completions import install_completion_routes
from server.api.embeddings import install_embedding_routes
from server.api.input_processor import InputProcessor
from server.api.protocol import HealthBody, ModelCard, ModelList, now
from server.api.router_routes import install_router_routes
from server.config import ServerConfig
from server.engine.core import Engine
from server.engine.openmp import release_team
from server.metrics import Metrics
from server.pipelines import Pipeline

log = logging.getLogger("branchserve.api")

ADMIN_PROXIED = ("The router API without an admin key answers only clients on this machine, not requests a proxy "
                 "forwarded (this one carries a Forwarded or X-Forwarded-For header, or comes from another "
                 "address). Set router.admin_keys in the config or the BRANCHSERVE_ADMIN_KEY environment variable.")
ADMIN_OFF = ("The router API is off: this server has no admin key. Set router.admin_keys in the config or the "
             "BRANCHSERVE_ADMIN_KEY environment variable (or, with no keys at all, listen on 127.0.0.1).")


class State:
    """What the handlers share: the engine and router once loaded, metrics, settings."""

    def __init__(self, config: ServerConfig, build_engine: Callable[[], Engine] | None,
                 build_router: Callable[[Engine], Router] | None = None, pipelines: dict[str, Pipeline] | None = None,
                 host: str = "127.0.0.1"):
        self.config = config
        self.pipelines = pipelines or {}
        self.build_engine, self.build_router = build_engine, build_router
        self.engine: Engine | None = None
        self.router: Router | None = None
        self.load_error: str | None = None
        self.stopping = False  # set at the shutdown signal: new generations get a 503, connections close after
        self.draining = False  # set by drain() just before the grace ends
        self.api_keys = [k.encode() for k in config.resolved_api_keys()]
        self.admin_keys = [k.encode() for k in config.resolved_admin_keys()]
        # With no key of any kind, router edits are open only to this machine: the server listens on loopback.
        self.edits_open = not self.api_keys and not self.admin_keys and is_loopback(host)
        self.metrics = Metrics(self._load)
        self.created = now()
        self._inputs: InputProcessor | None = None

    @property
    def inputs(self) -> InputProcessor:
        """The input processor over the loaded engine."""
        if self._inputs is None or self._inputs.engine is not self.engine:
            self._inputs = InputProcessor(self.engine, self.config.limits.default_max_tokens)
        return self._inputs

    def _load(self) -> tuple[int, int, list]:
        if not self.engine:
            return 0, 0, []
        return self.engine.running(), self.engine.waiting(), getattr(self.engine, "kv_usage", list)()

    def load(self) -> None:
        """Build, start and warm the engine, then the router. Raises; on failure nothing is left running."""
        engine = self.build_engine()
        try:
            engine.start()
            engine.wait_ready()  # every step compiled before /health says ok
            for pipeline in self.pipelines.values():
                pipeline.prepare(engine)  # stage constraints compiled: a bad one stops the start
            router = self.build_router(engine) if self.build_router is not None else None
        except BaseException:
            engine.stop()
            raise
        finally:
            release_team()  # what this thread ran (exemplar embeddings, say): the engine's team is the only one
        self.engine, self.router = engine, router
        log.info("ready: serving %s", ", ".join(engine.targets))

    def stop_accepting(self) -> None:
        """Shutdown has begun: /health answers 503, new chat and text completions a 503 ``shutting_down``, and
        every answer carries ``Connection: close``, so that a client's kept-alive connection ends after an
        answer rather than under a request it has just sent. Requests in flight go on."""
        self.stopping = True

    def drain(self) -> None:
        """Shutdown, just before the grace period ends: answer every request still in flight (503, or an error
        event in a stream) instead of letting the server cut its connection."""
        self.stopping = self.draining = True
        if self.engine is not None:
            self.engine.drain(SHUTTING_DOWN)

    def load_in_background(self) -> None:
        try:
            self.load()
        except Exception as e:  # surfaced by /health and the log; the process keeps answering 503
            self.load_error = f"{type(e).__name__}: {e}"
            log.exception("loading the models failed")


FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip", "x-forwarded-host")


def local_client(request: Request) -> bool:
    """The request comes from this machine itself: a loopback peer address and no proxy's forwarding header."""
    peer = request.client.host if request.client is not None else ""
    return is_loopback(peer) and not any(h in request.headers for h in FORWARDING_HEADERS)


def is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CloseWhenStopping:
    """Once shutdown has begun, every answer says ``Connection: close``."""

    def __init__(self, app, state: State):
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def closing(message):
            if message["type"] == "http.response.start" and self.state.stopping:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


def bearer_matches(request: Request, keys: list[bytes]) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = False
    for key in keys:  # every key is compared, in constant time
        ok |= hmac.compare_digest(token.strip().encode(), key)
    return scheme.lower() == "bearer" and ok


class Access:
    """Who may call what, as FastAPI dependencies: ``authorized`` (the API key, when set), ``admin`` (the router
    API), and ``engine`` / ``router`` (503 while loading, 404 without a router)."""

    def __init__(self, state: State):
        self.state = state

    def authorized(self, request: Request) -> None:
        if self.state.api_keys and not bearer_matches(request, self.state.api_keys):
            raise errors.unauthorized()

    def admin(self, request: Request) -> None:
        """The router API needs an admin key whenever one is set (a user key is not one). With no key of any
        kind it is open only to a client that is itself on this machine: the server listens on loopback, the
        client's own address is loopback, and no proxy forwarded the request (a reverse proxy on this host
        would otherwise hand anyone's edits over from 127.0.0.1). Otherwise it is off."""
        state = self.state
        if state.admin_keys:
            if not bearer_matches(request, state.admin_keys):
                raise errors.unauthorized(admin=True)
        elif not state.edits_open:
            raise errors.APIError(403, ADMIN_OFF, type="permission_error", code="admin_key_required")
        elif not local_client(request):
            raise errors.APIError(403, ADMIN_PROXIED, type="permission_error", code="admin_key_required")

    def engine(self) -> Engine:
        if self.state.engine is None:
            raise errors.not_ready()
        return self.state.engine

    def router(self) -> Router:
        self.engine()
        if self.state.router is None:
            raise errors.APIError(404, "This server has no router configured", code="router_not_configured")
        return self.state.router


def build_app(config: ServerConfig, build_engine: Callable[[], Engine] | None = None,
              build_router: Callable[[Engine], Router] | None = None,
              pipelines: dict[str, Pipeline] | None = None, *, host: str = "127.0.0.1",
              loaded: State | None = None) -> FastAPI:
    """The app over ``loaded`` (a State whose models are loaded: `branchserve serve` loads them before the port
    opens), or over a State that loads them in the background from ``build_engine`` (GET /health says when)."""
    state = loaded or State(config, build_engine, build_router, pipelines, host)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        if state.engine is None:
            threading.Thread(target=state.load_in_background, name="branchserve-load", daemon=True).start()
        yield
        if state.engine is not None:
            state.engine.stop()

    docs_open = "docs" in config.open_endpoints
    app = FastAPI(title="branchserve", lifespan=lifespan, **({} if docs_open else
                                                             {"openapi_url": None, "docs_url": None, "redoc_url": None}))
    app.state.branchserve = state
    errors.install(app)
    app.add_middleware(errors.BodyLimit, max_bytes=config.limits.max_request_bytes)
    app.add_middleware(CloseWhenStopping, state=state)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    access = Access(state)
    install_status_routes(app, state, access, docs_open)
    install_router_routes(app, access.router, access.admin, lambda: state.config.limits.request_timeout_s)
    install_chat_routes(app, state, access.authorized, access.engine)
    install_completion_routes(app, state, access.authorized, access.engine)
    install_embedding_routes(app, state, access.authorized, access.engine)
    app.openapi = lambda: openapi_schema(app, state)
    return app


def install_status_routes(app: FastAPI, state: State, access: Access, docs_open: bool) -> None:
    """/health, /metrics, /v1/models, and the API's documents behind the key unless open."""
    @app.get("/health", responses={503: {"model": HealthBody,
                                         "description": "Loading, loading failed, or the engine is not running"}},
             response_model=HealthBody)
    async def health():
        if state.stopping:
            return JSONResponse({"status": "stopping", "detail": SHUTTING_DOWN}, status_code=503)
        if state.engine is None:
            body = {"status": "error" if state.load_error else "loading", "detail": state.load_error}
            return JSONResponse(body, status_code=503)
        problem = state.engine.problem()
        if problem is not None:  # the engine thread ended, is stuck in a step, or its steps keep failing
            return JSONResponse({"status": "error", "detail": problem}, status_code=503)
        return {"status": "ok"}

    if not docs_open:  # the same documents, behind the API key
        from fastapi.openapi.docs import get_swagger_ui_html

        @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(access.authorized)])
        async def openapi_document():
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=[Depends(access.authorized)])
        async def swagger():
            return get_swagger_ui_html(openapi_url="/openapi.json", title="branchserve")

    @app.get("/metrics", response_class=Response, dependencies=[] if "metrics" in state.config.open_endpoints
             else [Depends(access.authorized)],
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus"}})
    async def metrics():
        text = await asyncio.to_thread(state.metrics.render)  # under Ray it reads every node's export
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", dependencies=[Depends(access.authorized)], responses=errors.documented(401, 503))
    async def models() -> ModelList:
        cards = [ModelCard(id=name, created=state.created, kind=t.kind) for name, t in access.engine().targets.items()]
        cards += [ModelCard(id=name, created=state.created, kind="pipeline") for name in state.pipelines]
        if state.router is not None:
            cards.append(ModelCard(id="auto", created=state.created, kind="router"))
        cards += [ModelCard(id=name, created=state.created, kind="embedding") for name in state.embedders.names()]
        return ModelList(data=cards)


def openapi_schema(app: FastAPI, state: State) -> dict:
    """FastAPI's schema, less the 422 it documents by default: validation errors here are 400s."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        if state.router is not None and state.router.targets and "NewRoute" in components:
            components["NewRoute"]["properties"]["target"]["enum"] = sorted(state.router.targets)
        if state.router is None and state.engine is None:
            return schema  # not loaded yet: the served names are not known, so do not cache
        app.openapi_schema = schema
    return app.openapi_schema
