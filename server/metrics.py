"""Prometheus metrics, on a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


class Metrics:
    """The server's own counters and histograms, rendered by ``/metrics``. Under Ray Serve, RayMetrics
    (server/ray_app.py) takes its place."""

    def __init__(self, engine_load=None):
        self.registry = CollectorRegistry()
        r = self.registry
        # A pipeline request counts once, under the pipeline's name; "stages" names its stages' models in order
        # (empty for a request one model answers).
        self.requests = Counter("branchserve_requests", "Chat completion requests by model, status and stages",
                                ["model", "status", "stages"], registry=r)
        self.prompt_tokens = Counter("branchserve_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.generation_tokens = Counter("branchserve_generation_tokens", "Tokens generated", ["model"], registry=r)
        self.ttft = Histogram("branchserve_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("branchserve_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("branchserve_e2e_request_latency_seconds", "End-to-end request latency", ["model"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.route_decisions = Counter("branchserve_route_decisions", "Router decisions by route and outcome",
                                       ["route", "outcome"], registry=r)
        self.running = Gauge("branchserve_requests_running", "Sequences in the running batches", registry=r)
        self.waiting = Gauge("branchserve_requests_waiting", "Sequences waiting for a slot", registry=r)
        self._engine_load = engine_load  # () -> (running, waiting)

    def observe(self, model: str, status: str, prompt_tokens: int, completion_tokens: int,
                ttft: float | None, e2e: float, stages: str = "") -> None:
        self.requests.labels(model, status, stages).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        self.e2e.labels(model).observe(e2e)
        if ttft is not None:
            self.ttft.labels(model).observe(ttft)
            if completion_tokens > 1:
                self.tpot.labels(model).observe((e2e - ttft) / (completion_tokens - 1))

    def refused(self, model: str, status: str, stages: str = "") -> None:
        """A request answered with a 4xx before it generated anything."""
        self.requests.labels(model, status, stages).inc()

    def routed(self, route: str, outcome: str) -> None:
        self.route_decisions.labels(route, outcome).inc()

    def render(self) -> bytes:
        if self._engine_load is not None:
            running, waiting = self._engine_load()
            self.running.set(running)
            self.waiting.set(waiting)
        return generate_latest(self.registry)
