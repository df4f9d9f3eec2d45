"""`branchserve serve --ray`: the same server as a Ray Serve application. The only module that imports Ray.

    ingress deployment (no model)                  one deployment per family and per standalone model
    the FastAPI app of `serve`: OpenAI front,  ──▶ ModelServer replicas, each running today's Engine for
    auth, router, pipelines, over a RemoteEngine  ◀── its entry; token events streamed back per step

The ingress runs the same handlers as the single process. Its RemoteEngine answers what they ask of an engine
(targets, admission, prompt checks, grammars) from each deployment's description, and turns ``submit`` into a
streaming call to that deployment; detokenization and stop strings stay at the ingress, as in one process. A
client that goes away cancels the call, and Ray cancels the replica's generator, which cancels the sequence.
Router embeddings of a served model are embed jobs on a replica that serves it. Exemplar edits go through the
exemplar file and its lock, which every ingress replica re-reads when it changes (a shared file system when they
run on several machines).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass

import ray
from ray import serve

from compression.errors import UserError
from server.config import RayDeployment, ServerConfig
from server.engine.sequence import Event, Sequence
from server.engine.core import EngineBase, Target
from server.engine.scheduler import EngineFull
from server.engine.stream import RequestStream, deliver
from server.metrics import REQUEST_METRICS, RequestMetrics

log = logging.getLogger("branchserve.ray")

LOST = "the replica serving {model} was lost"


# -- configuration -> deployments

def deployments(config: ServerConfig) -> list[tuple[str, str, int]]:
    """(deployment name, kind, index in the config) per family and standalone model."""
    out, seen = [], set()
    entries = [("family", i, f.artifact.name) for i, f in enumerate(config.families)]
    entries += [("standalone", i, s.name) for i, s in enumerate(config.standalone)]
    for kind, i, label in entries:
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in f"{kind}-{label}")
        while name in seen:
            name += "-"
        seen.add(name)
        out.append((name, kind, i))
    return out


def entry_of(config: ServerConfig, kind: str, index: int):
    return config.families[index] if kind == "family" else config.standalone[index]


def options(config: ServerConfig, own: RayDeployment | None, device: str | None) -> dict:
    """Ray Serve deployment options: the entry's ``ray:`` over ``ray.defaults`` over the built-in defaults (a model
    replica takes 1 CPU, and 1 GPU on cuda; the ingress, ``device`` None, takes none)."""
    base = config.ray.defaults if device is not None else RayDeployment()
    merged = {**base.model_dump(exclude_unset=True), **(own.model_dump(exclude_unset=True) if own else {})}
    d = RayDeployment.model_validate(merged)
    out: dict = {"max_ongoing_requests": d.max_ongoing_requests or 2 * config.limits.max_batch}
    if d.autoscaling is not None:
        out["autoscaling_config"] = d.autoscaling.model_dump()
    else:
        out["num_replicas"] = d.num_replicas or 1
    actor: dict = {"num_cpus": d.num_cpus if d.num_cpus is not None else (1 if device is not None else 0)}
    gpus = d.num_gpus if d.num_gpus is not None else (1 if device and device.startswith("cuda") else 0)
    if gpus:
        actor["num_gpus"] = gpus
    if d.memory is not None:
        actor["memory"] = d.memory
    if d.resources:
        actor["resources"] = dict(d.resources)
    out["ray_actor_options"] = actor
    return out


def most_replicas(opts: dict) -> int:
    return opts["autoscaling_config"]["max_replicas"] if "autoscaling_config" in opts else opts["num_replicas"]


# -- the model deployments

class ModelServer:
    """One family or standalone model: a replica runs the Engine `serve` runs, with only that entry."""

    def __init__(self, config: dict, kind: str, index: int):
        from server.serve import build_engine

        config = ServerConfig.model_validate(config)
        entry = entry_of(config, kind, index)
        only = config.model_copy(update={"families": [entry] if kind == "family" else [],
                                         "standalone": [entry] if kind == "standalone" else []})
        self.engine = build_engine(only)
        self.engine.start()
        self.engine.wait_ready()  # compiled and captured before Ray marks the replica healthy
        self._metrics()

    def _metrics(self) -> None:
        """The replica's load as Ray metrics (Ray adds the deployment, replica and application tags)."""
        from ray.serve import metrics

        running = metrics.Gauge("branchserve_replica_running", "Sequences in this replica's running batches")
        waiting = metrics.Gauge("branchserve_replica_waiting", "Sequences waiting to join a running batch in this replica")
        self.tokens = metrics.Counter("branchserve_replica_generation_tokens", "Tokens this replica generated",
                                      tag_keys=("model",))

        def report():
            while True:
                running.set(self.engine.running())
                waiting.set(self.engine.waiting())
                time.sleep(1.0)

        threading.Thread(target=report, name="branchserve-replica-metrics", daemon=True).start()

    def grammar_counts(self) -> dict:
        """Grammars this replica compiled itself and loaded from its ingress, over its models."""
        built = [t._grammars for t in self.engine.targets.values() if t._grammars is not None]
        return {"compiled": sum(g.compiles for g in built), "loaded": sum(g.loads for g in built)}

    def describe(self) -> list[dict]:
        """What the ingress needs to answer for each served name without a model: its tokenizer, limits and
        defaults."""
        return [{"name": t.name, "kind": t.kind, "branch": t.branch, "defaults": t.defaults,
                 "tokenizer": t.tokenizer, "stop_ids": sorted(t.stop_ids), "max_seq": t.runner.max_seq,
                 "max_batch": t.runner.max_batch, "vocab_size": t.runner.vocab_size}
                for t in self.engine.targets.values()]

    async def generate(self, model: str, prompt: list[int], params, constraint, wire: str | None, request_id: str):
        """The sequence's events, each engine step's in one list, as plain tuples. Ray cancels this generator
        when the ingress stops reading; the sequence is cancelled with it. ``constraint``: the request's,
        compiled by the ingress and sent as ``wire`` (loaded here, not compiled again)."""
        if constraint is not None:
            grammar = await (self.engine.load_compiled(model, constraint, wire) if wire is not None
                             else self.engine.compile(model, constraint))
            params = dataclasses.replace(params, grammar=grammar)
        try:
            stream = self.engine.submit(model, prompt, params, request_id, admitted=True)
        except (ValueError, EngineFull) as e:
            yield [("", [], "error", len(prompt), 0, str(e), None)]
            return
        async for batch in stream.raw():
            n = sum(len(e.token_ids) for e in batch)
            if n:
                self.tokens.inc(n, tags={"model": model})
            yield [(e.text, e.token_ids, e.finish_reason, e.prompt_tokens, e.completion_tokens, e.error,
                    e.logprobs) for e in batch]

    async def embed(self, model: str, tokens: list[int], layer: int):
        return await self.engine.embed(model, tokens, layer)

    def stats(self) -> dict:
        ctx = serve.get_replica_context()
        return {"replica": ctx.replica_id.unique_id, "pid": os.getpid(), "running": self.engine.running(),
                "waiting": self.engine.waiting()}

    def check_health(self) -> None:
        if not self.engine.alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop()


# -- the ingress side

# Labels Ray adds to every exported series; /metrics sums them away (replica and node), as one process would count.
RAY_LABELS = frozenset({"Component", "NodeAddress", "SessionName", "Version", "WorkerId", "replica", "application",
                        "otel_scope_name", "otel_scope_schema_url", "otel_scope_version"})


def summed(texts: list[str], app: str) -> str:
    """Prometheus text of ``app``'s ray_branchserve_* samples in ``texts``, without Ray's prefix and labels, summed
    per remaining label set (the ingress's deployment label dropped too: it is every request's)."""
    import re

    meta: dict[str, list[str]] = {}
    totals: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for line in text.splitlines():
            if line.startswith(("# HELP ray_branchserve_", "# TYPE ray_branchserve_")):
                kind, _, rest = line[2:].partition(" ")
                family = rest.split(" ", 1)[0].removeprefix("ray_")
                entry = meta.setdefault(family, [])
                if not any(m.startswith(f"# {kind} ") for m in entry):
                    entry.append(f"# {kind} {rest.removeprefix('ray_')}")
                continue
            if not line.startswith("ray_branchserve_"):
                continue
            key, _, value = line.rpartition(" ")
            name, _, body = key.partition("{")
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', body))
            if labels.get("application") != app:
                continue
            kept = tuple(sorted((k, v) for k, v in labels.items() if k not in RAY_LABELS
                                and not (k == "deployment" and v == "ingress")))
            series = totals.setdefault(name.removeprefix("ray_"), {})
            series[kept] = series.get(kept, 0.0) + float(value)

    def order(item):  # histogram buckets in increasing ``le``, as Prometheus expects
        labels = item[0]
        return [(k, float(v) if k == "le" else 0.0, "" if k == "le" else v) for k, v in labels]

    def lines(name: str) -> list[str]:
        out = []
        for labels, value in sorted(totals.pop(name).items(), key=order):
            body = ",".join(f'{k}="{v}"' for k, v in labels)
            out.append(f"{name}{{{body}}} {value!r}" if body else f"{name} {value!r}")
        return out

    out = []
    for family in sorted(meta):
        out += meta[family]
        for name in sorted(n for n in totals if n == family or n.startswith(family + "_")):
            out += lines(name)
    for name in sorted(totals):  # samples whose family had no HELP/TYPE line
        out += lines(name)
    return "\n".join(out) + "\n"


class RayMetrics(RequestMetrics):
    """The ingress's request counters and latency histograms as Ray metrics. Ray exports them with every replica's,
    one endpoint per node; ``/metrics`` on the ingress reads those endpoints and answers the application's series
    summed over replicas and nodes, under the single process's names."""

    def __init__(self):
        from ray.serve import metrics

        self.series = {key: metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=labels) if buckets
                       else metrics.Counter(name, doc, tag_keys=labels)
                       for key, name, doc, labels, buckets in REQUEST_METRICS}

    def _count(self, key: str, labels: dict, value: float = 1.0) -> None:
        if value > 0:  # Ray's counters take positive increments only
            self.series[key].inc(value, tags=labels)

    def _observe(self, key: str, labels: dict, value: float) -> None:
        self.series[key].observe(value, tags=labels)

    def render(self) -> bytes:
        """Every node's export, this application's ``ray_branchserve_*`` series, summed over replicas and nodes.
        Blocking (one HTTP read per node, 2 s each at most): the handler runs it in a thread. Ray exports every
        few seconds (``metrics_report_interval_ms``), so the totals lag by that much."""
        import httpx

        app = serve.get_replica_context().app_name
        texts = []
        for node in ray.nodes():
            if not node.get("Alive") or not node.get("MetricsExportPort"):
                continue
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            try:
                texts.append(httpx.get(url, timeout=2.0).text)
            except httpx.HTTPError as e:
                log.warning("metrics of node %s unread: %s", node["NodeManagerAddress"], e)
        return summed(texts, app).encode()


@dataclass
class RemoteRunner:
    """The limits of a runner on a replica: what the handlers read from ``target.runner``."""

    max_seq: int
    max_batch: int
    vocab_size: int


class _Cancel:
    """RequestStream's wake-up, for a remote sequence: cancelling it cancels the streaming call."""

    def __init__(self, future: concurrent.futures.Future):
        self.future = future

    def set(self) -> None:
        self.future.cancel()


class RemoteEngine(EngineBase):
    """The engine interface of the handlers over deployment handles. Its own event loop, in a thread, makes every
    call to Ray, so it serves the handlers' loop and blocking callers (the router's set-up) alike."""

    def __init__(self, handles: dict, capacities: dict[str, int], max_waiting: int):
        super().__init__(max_waiting)
        self.handles = handles  # deployment name -> DeploymentHandle
        self.capacities = capacities  # deployment name -> most replicas
        self.deployment_of: dict[str, str] = {}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="branchserve-remote", daemon=True)
        self._inflight: dict[concurrent.futures.Future, tuple] = {}
        self._lock = threading.Lock()
        self._draining: str | None = None

    def _call(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # -- lifecycle
    def start(self) -> None:
        if self._thread.is_alive():  # the ingress starts it early, to learn the served names
            return
        self._thread.start()
        for name, handle in self.handles.items():
            described = self._call(self._describe(handle)).result()
            for d in described:  # the names of one deployment share its runner
                runner = RemoteRunner(d["max_seq"], d["max_batch"], d["vocab_size"])
                self.targets[d["name"]] = Target(d["name"], d["kind"], runner, d["tokenizer"],
                                                 frozenset(d["stop_ids"]), d["branch"], d["defaults"])
                self.deployment_of[d["name"]] = name
            self.admission.add(name, described[0]["max_batch"] * self.capacities[name])

    @staticmethod
    async def _describe(handle):
        return await handle.describe.remote()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Every deployment was described in ``start``: its replicas are up."""

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self.drain("the server is shutting down")
        self._loop.call_soon_threadsafe(self._loop.stop)

    def drain(self, message: str) -> None:
        self._draining = message
        with self._lock:
            inflight = list(self._inflight.items())
        for future, (caller, events, seq) in inflight:
            caller.call_soon_threadsafe(events.put_nowait, Event("", [], "error", len(seq.prompt), 0, error=message))
            future.cancel()

    # -- requests
    def _key(self, target: Target):
        return self.deployment_of[target.name]

    async def compile(self, model: str, constraint):
        """Compiled here, in the compile pool (its time limit and its 400 before anything streams), and
        serialized for the replica, which loads it instead of compiling it again: once per request."""
        compiled = await super().compile(model, constraint)
        if compiled.wire is None:
            wire = await asyncio.to_thread(compiled.grammars.serialized, constraint, compiled.grammar)
            compiled = dataclasses.replace(compiled, wire=wire)
        return compiled

    def running(self) -> int:
        """Sequences this ingress replica has in flight (each replica reports its own batches to Ray)."""
        return len(self._inflight)

    def submit(self, model: str, prompt: list[int], params, request_id: str | None = None,
               admitted: bool = False, reservation=None) -> RequestStream:
        target = self._target(model)
        self.check_prompt(model, target, prompt)
        if self._draining:
            raise EngineFull(self._draining)
        key = self._key(target)
        counted = reservation is None  # a pipeline's stage runs under its request's reservation
        if counted:
            self.admission.admit(key, force=admitted)
        caller = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        seq = Sequence(request_id or uuid.uuid4().hex, list(prompt), params, lambda event: None, target.branch,
                       target.stop_ids)
        grammar = params.grammar
        sent = dataclasses.replace(params, grammar=None)
        future = self._call(self._stream(key, model, seq, sent, grammar, caller, events))
        with self._lock:
            self._inflight[future] = (caller, events, seq)
        future.add_done_callback(lambda f: self._done(f, key, counted))
        return RequestStream(seq, events, _Cancel(future), target.tokenizer)

    def _done(self, future, key: str, counted: bool = True) -> None:
        with self._lock:
            self._inflight.pop(future, None)
        if counted:
            self.admission.release(key)

    async def _stream(self, key: str, model: str, seq: Sequence, params, grammar, caller, events) -> None:
        def put(*batch: Event) -> None:  # one thread-safe call per engine step, not per event
            caller.call_soon_threadsafe(deliver, [(events, event, None) for event in batch])

        constraint, wire = (grammar.constraint, grammar.wire) if grammar is not None else (None, None)
        response = self.handles[key].options(stream=True).generate.remote(model, seq.prompt, params, constraint,
                                                                        wire, seq.id)
        finished = False
        try:
            async for batch in response:
                got = [Event(*item) for item in batch]
                put(*got)
                finished = got[-1].finish_reason is not None
            if not finished:
                put(Event("", [], "error", len(seq.prompt), 0, error=LOST.format(model=model)))
        except asyncio.CancelledError:
            response.cancel()
            raise
        except Exception as e:  # the replica died or its call failed: the stream ends with an error event
            log.warning("stream %s on %s failed: %s", seq.id, key, f"{type(e).__name__}: {e}".splitlines()[0])
            put(Event("", [], "error", len(seq.prompt), 0, error=LOST.format(model=model)))

    def embed_future(self, model: str, tokens: list[int], layer: int = -1) -> concurrent.futures.Future:
        target = self._target(model)
        self.check_embed(tokens)  # the same bound as in one process, before anything crosses to a replica
        return self._call(self._embed(self._key(target), model, list(tokens), layer))

    async def _embed(self, key: str, model: str, tokens: list[int], layer: int):
        return await self.handles[key].embed.remote(model, tokens, layer)


class Ingress:
    """The FastAPI app of `branchserve serve`, over a RemoteEngine: auth, router, pipelines; no model."""

    def __init__(self, config: dict, handles: dict, capacities: dict[str, int], host: str):
        from server.api.app import State
        from server.serve import router_factory
        from server.pipelines import load_pipelines

        self.config = ServerConfig.model_validate(config)
        self.host = host
        engine = RemoteEngine(handles, capacities, self.config.limits.queue_size)
        engine.start()  # describes every deployment: the served names are known from here
        pipelines = load_pipelines(self.config.pipelines, set(engine.targets))
        self.state = State(self.config, lambda: engine, router_factory(self.config, pipelines), pipelines, host)
        self.state.metrics = RayMetrics()
        self.state.load()

    def __serve_build_asgi_app__(self):
        from server.api.app import build_app

        return build_app(self.config, host=self.host, loaded=self.state)


def build_application(config: ServerConfig, host: str):
    """The Ray Serve application of ``config``: an ingress deployment over one deployment per model."""
    raw = config.model_dump(mode="json")
    handles, capacities = {}, {}
    for name, kind, index in deployments(config):
        entry = entry_of(config, kind, index)
        opts = options(config, entry.ray, entry.device)
        capacities[name] = most_replicas(opts)
        handles[name] = serve.deployment(ModelServer, name=name, **opts).bind(raw, kind, index)
    ingress = serve.deployment(serve.ingress()(Ingress), name="ingress", **options(config, config.ray.ingress, None))
    return ingress.bind(raw, handles, capacities, host)


def app_builder(args: dict):
    """The application for Ray's own tools: ``serve run server.ray_app:app_builder config=/path/serve.yaml``, or the
    ``import_path`` of a KubeRay RayService (deploy/kuberay/rayservice.yaml). ``host`` (default 0.0.0.0) is where
    Ray's proxy listens: the router API stays closed off loopback until an admin key is set."""
    from server.config import load_config
    from server.serve import preflight

    if "config" not in args:
        raise UserError("app_builder needs config=/path/to/serve.yaml")
    config = load_config(args["config"])
    preflight(config)
    return build_application(config, args.get("host", "0.0.0.0"))


def serve_ray(config: ServerConfig, host: str, port: int, address: str | None) -> None:
    """Deploy ``config`` on Ray (a local instance, or the cluster at ``address``) and block until a signal."""
    from server.serve import bind, preflight

    preflight(config)
    bind(host, port).close()  # a port in use is one clear line now, not a proxy that fails later
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    local = address is None
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING,
                 **({"num_cpus": local_cpus(config)} if local else {}))
    except (ConnectionError, RuntimeError, ValueError) as e:
        hint = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                " (a cluster started by `ray start` 2.59 or later asks for its token: set RAY_AUTH_MODE=token, with "
                "the token in ~/.ray/auth_token or RAY_AUTH_TOKEN)")
        raise UserError(f"cannot reach the Ray cluster at {address}: {str(e).splitlines()[0]}{hint}") from None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(build_application(config, host), name=config.ray.app_name, route_prefix="/")
        except RuntimeError as e:
            raise UserError(f"the Ray Serve application did not start: {str(e).splitlines()[0]}") from None
        names = [n for n, _, _ in deployments(config)]
        print(f"branchserve: http://{host}:{port}/v1 on Ray Serve (application {config.ray.app_name!r}: "
              f"ingress, {', '.join(names)})", flush=True)
        if local:
            print(f"branchserve: metrics in Ray's export, http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}"
                  "/metrics (ray_branchserve_*)", flush=True)
        stop.wait()
    finally:
        try:
            serve.delete(config.ray.app_name)
        except Exception:  # the cluster is going away anyway
            log.debug("deleting the application failed", exc_info=True)
        if local:
            serve.shutdown()
            ray.shutdown()


def local_cpus(config: ServerConfig) -> int:
    """Logical CPUs for a local Ray instance: the machine's, or what the deployments reserve if that is more (a
    replica's reservation is a scheduling unit; torch still uses the cores it finds)."""
    wanted = 0.0
    for _, kind, index in deployments(config):
        entry = entry_of(config, kind, index)
        opts = options(config, entry.ray, entry.device)
        wanted += opts["ray_actor_options"]["num_cpus"] * most_replicas(opts)
    opts = options(config, config.ray.ingress, None)
    wanted += opts["ray_actor_options"]["num_cpus"] * most_replicas(opts)
    return max(os.cpu_count() or 1, int(wanted + 0.999))
