"""Evaluate a router on labeled texts, and fit its per-route thresholds and margin.

A labeled file is JSON lines: {"text": ..., "route": ...}, or {"messages":
[{"role": ..., "content": ...}, ...], "route": ...} for a conversation (routed as
the server routes it, by the router's input mode). The label "none" marks an
out-of-scope text, which must fall to the default route.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from compression.errors import UserError
from router.decision import falls_back
from router.router import Router

NONE = "none"
_ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    text: str | None  # a single text, or
    messages: list[dict] | None  # a conversation
    route: str

    @property
    def turns(self) -> int:
        return 1 if self.messages is None else sum(m["role"] == "user" for m in self.messages)


def _messages(value) -> list[dict] | None:
    if not isinstance(value, list) or not value:
        return None
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return None
    if not any(m["role"] == "user" and m["content"].strip() for m in value):
        return None
    return value


def read_labeled(path: str | Path) -> list[Example]:
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    out = []
    shape = 'expected {"text": ..., "route": ...} or {"messages": [...], "route": ...}'
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not JSON; {shape}") from None
        if not isinstance(row, dict) or not isinstance(row.get("route"), str) or not row["route"].strip():
            raise UserError(f"{path}:{n}: {shape}")
        if "messages" in row:
            messages = _messages(row["messages"])
            if messages is None:
                raise UserError(f"{path}:{n}: messages must be a list of {{role, content}} with a user message")
            out.append(Example(None, messages, row["route"]))
        elif isinstance(row.get("text"), str) and row["text"].strip():
            out.append(Example(row["text"], None, row["route"]))
        else:
            raise UserError(f"{path}:{n}: {shape}")
    if not out:
        raise UserError(f"{path}: no labeled examples")
    return out


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


@dataclass
class Scored:
    """One example's raw decision (no thresholds, no margin): what fitting and re-scoring need."""
    want: str  # the route it must reach
    best: str | None
    score: float | None
    runner_score: float | None
    ms: float

    @property
    def spread(self) -> float | None:
        if self.score is None:
            return None
        return self.score - self.runner_score if self.runner_score is not None else 2.0


def score_examples(router: Router, examples: list[Example]) -> list[Scored]:
    known = set(router.store.routes) | {NONE}
    unknown = sorted({e.route for e in examples} - known)
    if unknown:
        raise UserError(f"labels name routes the exemplars do not have: {', '.join(unknown)}")
    raw = {name: None for name in router.store.routes}
    out = []
    for ex in examples:
        t0 = time.perf_counter()
        if ex.messages is None:
            d = router.decide_text(ex.text, raw, None)
        else:
            d = router.decide_messages(ex.messages, raw, None)
        ms = (time.perf_counter() - t0) * 1000
        want = router.default_route if ex.route == NONE else ex.route
        out.append(Scored(want, d.route if d.score is not None else None, d.score, d.runner_up_score, ms))
    return out


def choose(s: Scored, default: str, thresholds: dict[str, float | None], margin: float | None) -> str:
    """The route ``s`` reaches under these thresholds and margin (the rule router.decision.decide applies)."""
    if s.best is None or falls_back(s.best, default, s.score, thresholds.get(s.best), s.spread, margin):
        return default
    return s.best


def report(router: Router, examples: list[Example], scored: list[Scored], thresholds: dict[str, float | None],
           margin: float | None) -> dict:
    expected = [s.want for s in scored]
    predicted = [choose(s, router.default_route, thresholds, margin) for s in scored]
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
    right = [e == p for e, p in zip(expected, predicted)]
    multi = [ok for ok, ex in zip(right, examples) if ex.turns > 1]
    spreads = [s.spread for s in scored if s.spread is not None and s.runner_score is not None]
    latencies = [s.ms for s in scored]
    return {"n": len(scored), "accuracy": sum(right) / len(scored),
            "accuracy_multi_turn": sum(multi) / len(multi) if multi else None, "n_multi_turn": len(multi),
            "per_route": per_route, "confusion": confusion,
            "spread": {"median": statistics.median(spreads) if spreads else None,
                       "p10": _percentile(spreads, 0.1) if spreads else None},
            "latency_ms": {"p50": _percentile(latencies, 0.5), "p95": _percentile(latencies, 0.95)},
            "embedder": router.embedder.fingerprint, "scoring": router.scoring, "input": router.input,
            "default_route": router.default_route, "thresholds": thresholds, "margin": margin,
            "mistakes": [{"input": ex.text if ex.messages is None else ex.messages, "expected": e, "chosen": p}
                         for ex, e, p, ok in zip(examples, expected, predicted, right) if not ok]}


def stored(router: Router) -> tuple[dict[str, float | None], float | None]:
    _, routes, calibration = router.store.snapshot_all()
    return {r.name: r.threshold for r in routes}, calibration.margin


def evaluate(router: Router, examples: list[Example], thresholds: dict[str, float | None] | None = None,
             margin: float | None | bool = True) -> dict:
    """Accuracy and more of ``router`` on labeled examples, with the stored thresholds and margin or these."""
    saved_t, saved_m = stored(router)
    return report(router, examples, score_examples(router, examples),
                  saved_t if thresholds is None else thresholds, saved_m if margin is True else margin)


def _cut(a: float, b: float | None) -> float:
    """A cut point midway between neighbouring values (a cut on a value itself overfits); past the last one,
    just above it."""
    return round((a + b) / 2, 6) if b is not None else round(a + 1e-6, 6)


def _cuts(values: list[float]) -> list[float]:
    v = sorted(set(round(x, 6) for x in values))
    return [_cut(a, b) for a, b in zip(v, v[1:] + [None])]


def _threshold(rows: list[Scored], route: str, default: str) -> tuple[float | None, int]:
    """The threshold on ``route`` that gets the most of ``rows`` (its examples) right, and how many: one pass
    over the rows by score, counting what falls below each cut and what stays above it. Ties: the lowest."""
    rows = sorted(rows, key=lambda s: s.score)
    best_t, best_right = None, sum(s.want == route for s in rows)
    fell, kept = 0, best_right  # below the cut and wanting the default; above it and wanting the route
    for i, s in enumerate(rows):
        fell += s.want == default
        kept -= s.want == route
        after = rows[i + 1].score if i + 1 < len(rows) else None
        if after is not None and round(after, 6) == round(s.score, 6):
            continue  # no cut between equal scores
        if fell + kept > best_right:
            best_t, best_right = _cut(round(s.score, 6), None if after is None else round(after, 6)), fell + kept
    return best_t, best_right


def fit(router: Router, examples: list[Example], scored: list[Scored] | None = None,
        ) -> tuple[dict[str, float | None], float | None]:
    """Per-route thresholds and one margin that get the most examples right.

    Under a margin m, an example whose best route R leads by less than m falls to the default route; of the
    rest, one whose score is under R's threshold does too. For a given margin only the examples whose best
    route is R depend on R's threshold, so each route is fitted on its own, exactly; the margin is searched
    over the midpoints of the examples' spreads. Ties go to the smaller margin, then the lower threshold.
    """
    scored = scored if scored is not None else score_examples(router, examples)
    default = router.default_route
    saved_t, _ = stored(router)
    candidates = [None] + _cuts([s.spread for s in scored if s.best not in (None, default)])
    best = (-1, None, None)
    for margin in candidates:
        fitted: dict[str, float | None] = {}
        total = 0
        for route in saved_t:
            rows = [s for s in scored if s.best == route]
            if route == default:
                fitted[route] = saved_t[route]
                total += sum(s.want == route for s in rows)
                continue
            kept = [s for s in rows if margin is None or s.spread >= margin]
            total += sum(s.want == default for s in rows if margin is not None and s.spread < margin)
            best_t, best_right = _threshold(kept, route, default)
            fitted[route] = None if best_t is None else min(best_t, 1.0)
            total += best_right
        total += sum(s.want == default for s in scored if s.best is None)
        if total > best[0]:
            best = (total, fitted, margin)
    return best[1], best[2]
