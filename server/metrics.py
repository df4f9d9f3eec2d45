"""Prometheus metrics: what a request counts, and the single process's exporter."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


# What a request counts, one table for every exporter: (key, name, help, label names, histogram buckets or None
# for a counter). A pipeline request counts once, under the pipeline's name; "stages" names its stages' models in
# order (empty for a request one model answers).
REQUEST_METRICS = (
    ("requests", "branchserve_requests", "Chat completion requests by model, status and stages",
     ("model", "status", "stages"), None),
    ("prompt_tokens", "branchserve_prompt_tokens", "Prompt tokens processed", ("model",), None),
    ("generation_tokens", "branchserve_generation_tokens", "Tokens generated", ("model",), None),
    ("ttft", "branchserve_time_to_first_token_seconds", "Time to first token", ("model",), LATENCY_BUCKETS),
    ("tpot", "branchserve_time_per_output_token_seconds", "Time per output token after the first", ("model",),
     TPOT_BUCKETS),
    ("e2e", "branchserve_e2e_request_latency_seconds", "End-to-end request latency", ("model",), LATENCY_BUCKETS),
    ("route_decisions", "branchserve_route_decisions", "Router decisions by route and outcome",
     ("route", "outcome"), None),
)


class RequestMetrics:
    """What the handlers count, whatever exports it: ``Metrics`` here, ``RayMetrics`` (server/ray_app.py) under
    Ray Serve. An exporter adds to a counter (``_count``) and observes a histogram (``_observe``) by key."""

    def _count(self, key: str, labels: dict, value: float = 1.0) -> None:
        raise NotImplementedError

    def _observe(self, key: str, labels: dict, value: float) -> None:
        raise NotImplementedError

    def render(self) -> bytes:
        raise NotImplementedError

    def observe(self, model: str, status: str, prompt_tokens: int, completion_tokens: int,
                ttft: float | None, e2e: float, stages: str = "") -> None:
        self.refused(model, status, stages)
        labels = {"model": model}
        self._count("prompt_tokens", labels, prompt_tokens)
        self._count("generation_tokens", labels, completion_tokens)
        self._observe("e2e", labels, e2e)
        if ttft is not None:
            self._observe("ttft", labels, ttft)
            if completion_tokens > 1:
                self._observe("tpot", labels, (e2e - ttft) / (completion_tokens - 1))

    def refused(self, model: str, status: str, stages: str = "") -> None:
        """A request answered with a 4xx before it generated anything (and, through ``observe``, every other)."""
        self._count("requests", {"model": model, "status": status, "stages": stages})

    def routed(self, route: str, outcome: str) -> None:
        self._count("route_decisions", {"route": route, "outcome": outcome})


class Metrics(RequestMetrics):
    """The single process's metrics, on a registry of their own, with the engine's load as gauges."""

    def __init__(self, engine_load=None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.series = {key: Histogram(name, doc, labels, buckets=buckets, registry=r) if buckets
                       else Counter(name, doc, labels, registry=r)
                       for key, name, doc, labels, buckets in REQUEST_METRICS}
        self.running = Gauge("branchserve_requests_running", "Sequences in the running batches", registry=r)
        self.waiting = Gauge("branchserve_requests_waiting", "Sequences waiting to join a running batch", registry=r)
        self.kv_blocks_used = Gauge("branchserve_kv_cache_blocks_used", "KV cache blocks held by sequences",
                                    ("models",), registry=r)
        self.kv_blocks = Gauge("branchserve_kv_cache_blocks", "KV cache blocks in all", ("models",), registry=r)
        self.kv_tokens = Gauge("branchserve_kv_cache_capacity_tokens", "Tokens the KV cache holds", ("models",),
                               registry=r)
        self._engine_load = engine_load  # () -> (running, waiting, [(models, blocks used, blocks, tokens)])

    def _count(self, key: str, labels: dict, value: float = 1.0) -> None:
        self.series[key].labels(**labels).inc(value)

    def _observe(self, key: str, labels: dict, value: float) -> None:
        self.series[key].labels(**labels).observe(value)

    def render(self) -> bytes:
        if self._engine_load is not None:
            running, waiting, kv = self._engine_load()
            self.running.set(running)
            self.waiting.set(waiting)
            for models, used, blocks, tokens in kv:
                self.kv_blocks_used.labels(models).set(used)
                self.kv_blocks.labels(models).set(blocks)
                self.kv_tokens.labels(models).set(tokens)
        return generate_latest(self.registry)
