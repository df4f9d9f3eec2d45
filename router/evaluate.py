"""Evaluate a router on labeled texts, and fit per-route thresholds.

A labeled file is JSON lines: {"text": ..., "route": ...}. The label "none"
marks an out-of-scope text, which must fall to the default route.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from compression.errors import UserError
from router.router import Router

NONE = "none"


def read_labeled(path: str | Path) -> list[tuple[str, str]]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            text, route = row["text"], row["route"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: expected {{\"text\": ..., \"route\": ...}}") from None
        if not isinstance(text, str) or not text.strip() or not isinstance(route, str):
            raise UserError(f"{path}:{n}: text and route must be non-empty strings")
        out.append((text, route))
    if not out:
        raise UserError(f"{path}: no labeled examples")
    return out


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def evaluate(router: Router, examples: list[tuple[str, str]],
             thresholds: dict[str, float | None] | None = None) -> dict:
    """Accuracy and more of ``router`` on labeled examples, with the stored thresholds or ``thresholds``."""
    known = set(router.store.routes) | {NONE}
    unknown = sorted({label for _, label in examples} - known)
    if unknown:
        raise UserError(f"labels name routes the exemplars do not have: {', '.join(unknown)}")
    expected, predicted, latencies = [], [], []
    for text, label in examples:
        t0 = time.perf_counter()
        decision = router.decide_text(text, thresholds)
        latencies.append((time.perf_counter() - t0) * 1000)
        expected.append(router.default_route if label == NONE else label)
        predicted.append(decision.route)
    labels = sorted(set(expected) | set(predicted))
    confusion = {e: {p: 0 for p in labels} for e in labels}
    for e, p in zip(expected, predicted):
        confusion[e][p] += 1
    per_route = {}
    for r in labels:
        tp = confusion[r][r]
        pred_n = sum(confusion[e][r] for e in labels)
        true_n = sum(confusion[r].values())
        per_route[r] = {"precision": tp / pred_n if pred_n else None, "recall": tp / true_n if true_n else None,
                        "support": true_n}
    correct = sum(e == p for e, p in zip(expected, predicted))
    return {"n": len(examples), "accuracy": correct / len(examples), "per_route": per_route,
            "confusion": confusion, "latency_ms": {"p50": _percentile(latencies, 0.5),
                                                   "p95": _percentile(latencies, 0.95)},
            "embedder": router.embedder.fingerprint, "default_route": router.default_route}


def fit_thresholds(router: Router, examples: list[tuple[str, str]]) -> dict[str, float | None]:
    """The per-route threshold that gets the most examples right.

    With a threshold t on route R, an example whose best route is R falls to the
    default route when its score is below t. Only the examples whose best route
    is R depend on R's threshold, so each route is fitted on its own, exactly.
    """
    _, routes = router.store.snapshot()
    saved = {r.name: r.threshold for r in routes}
    raw = {name: None for name in saved}  # no thresholds: every example's best route
    outcomes: dict[str, list[tuple[float, bool, bool]]] = {}
    for text, label in examples:
        d = router.decide_text(text, raw)
        if d.score is None:  # no route has exemplars
            continue
        want = router.default_route if label == NONE else label
        outcomes.setdefault(d.route, []).append((d.score, d.route == want, router.default_route == want))
    fitted: dict[str, float | None] = {}
    for route in saved:
        rows = outcomes.get(route, [])
        if route == router.default_route or not rows:
            fitted[route] = saved[route]
            continue
        best_t, best_right = None, sum(kept for _, kept, _ in rows)
        for score, _, _ in sorted(rows):
            t = min(round(score + 1e-6, 6), 1.0)  # everything scoring below t falls to the default route
            right = sum(fell if s < t else kept for s, kept, fell in rows)
            if right > best_right:
                best_t, best_right = t, right
        fitted[route] = best_t
    return fitted
