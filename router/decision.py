"""The decision: cosine similarity of a query to every exemplar, aggregated per route."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.store import Route


@dataclass
class Decision:
    route: str
    target: str
    score: float | None  # the chosen route's score (for a fallback: the best route's score that failed its
    # threshold; None when no route has an exemplar to score)
    runner_up: str | None
    runner_up_score: float | None
    fallback: bool  # the best route failed its threshold or the margin: the default route was used
    scores: dict[str, float | None]  # None: the route has no exemplars
    truncated: bool = False  # only the end of a long input was embedded (the embedder's max tokens)

    def to_json(self) -> dict:
        return {"route": self.route, "target": self.target, "score": self.score, "runner_up": self.runner_up,
                "runner_up_score": self.runner_up_score, "fallback": self.fallback, "scores": self.scores,
                "truncated": self.truncated}


def route_scores(query: torch.Tensor, matrix: torch.Tensor, owners: torch.Tensor, n_routes: int,
                 aggregate: str = "max", top_k: int = 3) -> torch.Tensor:
    """query (d,), matrix (n, d) unit rows, owners (n,) route index of each row -> (n_routes,) scores.

    A route with no exemplars scores -inf.
    """
    sims = matrix @ query if len(matrix) else torch.empty(0)
    scores = torch.full((n_routes,), float("-inf"))
    for r in range(n_routes):
        mine = sims[owners == r]
        if len(mine) == 0:
            continue
        if aggregate == "max":
            scores[r] = mine.max()
        else:  # mean of the top k
            scores[r] = mine.topk(min(top_k, len(mine))).values.mean()
    return scores


def falls_back(best: str, default_route: str, score: float, threshold: float | None, lead: float | None,
               margin: float | None) -> bool:
    """Whether the best route gives way to the default route: it scored under its threshold, or it leads the
    runner-up by less than the margin (``lead`` None: there is no runner-up)."""
    if best == default_route:
        return False
    return (threshold is not None and score < threshold) or (margin is not None and lead is not None
                                                              and lead < margin)


def decide(scores: torch.Tensor, routes: list[Route], default_route: str,
           thresholds: dict[str, float | None] | None = None, margin: float | None = None) -> Decision:
    """Best route wins if it clears its threshold and leads the runner-up by at least ``margin``; otherwise the
    default route is used. Ties go to the route named first alphabetically. A route with no exemplars never
    wins. ``thresholds`` overrides the routes' own (a name mapped to None: no threshold)."""
    scores = scores.clamp(max=1.0)  # a cosine; rounding must not report 1.0000001
    order = sorted(range(len(routes)), key=lambda i: (-float(scores[i]), routes[i].name))
    by_name = {r.name: r for r in routes}
    score_map = {routes[i].name: round(float(scores[i]), 6) if scores[i] > float("-inf") else None
                 for i in range(len(routes))}
    if not order or scores[order[0]] == float("-inf"):
        d = by_name[default_route]
        return Decision(d.name, d.target, None, None, None, True, score_map)
    best = routes[order[0]]
    runner = routes[order[1]] if len(order) > 1 and scores[order[1]] != float("-inf") else None
    best_score = float(scores[order[0]])
    runner_score = float(scores[order[1]]) if runner else None
    threshold = thresholds[best.name] if thresholds is not None and best.name in thresholds else best.threshold
    lead = best_score - runner_score if runner else None
    if falls_back(best.name, default_route, best_score, threshold, lead, margin):
        d = by_name[default_route]
        return Decision(d.name, d.target, best_score, best.name, best_score, True, score_map)
    return Decision(best.name, best.target, best_score, runner.name if runner else None, runner_score, False,
                    score_map)
