"""`branchserve router eval|fit` and `branchserve exemplars list|add|remove`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compression.errors import UserError
from compression.report import text_table


INPUTS = ("last_user", "context", "conversation")


def _check_flags(args, examples: list) -> None:
    """Every flag used as given, or one line saying why not: --input values, one --embedder unless comparing,
    and --default-route (or the config's) when a labeled text is none."""
    from router.evaluate import NONE

    compare = getattr(args, "compare", False)
    inputs = args.input.split(",") if args.input else []
    for mode in inputs:
        if mode not in INPUTS:
            raise UserError(f"--input {mode!r} is not one of {', '.join(INPUTS)}")
    if len(inputs) > 1 and not compare:
        raise UserError("--input takes several modes only with --compare")
    if args.embedder and len(args.embedder) > 1 and not compare:
        raise UserError("--embedder is given more than once: that needs --compare")
    args.needs_default = any(ex.route == NONE for ex in examples)


def _router(args, spec: str | None = None, suffix: bool | None = None, center: bool | None = None,
            input: str | None = None):
    from router.router import Router
    from router.store import ExemplarStore
    from server.config import load_config
    from server.routing import build_embedder, cache_dir, exemplar_store

    config = load_config(args.config) if args.config else None
    rc = config.router if config else None
    if args.exemplars:
        store = ExemplarStore(args.exemplars)
    elif rc:
        store = exemplar_store(rc)
    else:
        raise UserError("give --exemplars FILE, or --config FILE with a router section")
    default = args.default_route or (rc.default_route if rc else None)
    if default is None and getattr(args, "needs_default", True):
        raise UserError(f"give --default-route NAME: {args.labeled} labels texts none, and those must fall to a "
                        "route")
    if default is None:  # nothing is labeled none: the default route only catches what scores nowhere
        default = next(iter(store.routes))
    spec = spec or (args.embedder[0] if args.embedder else None) or (rc.embedder if rc else "minilm")
    suffix = (not args.no_suffix) if suffix is None else suffix
    if center is None:
        center = (rc.center if rc else True) and not args.raw
    input = input or (args.input.split(",")[0] if args.input else None) or (rc.input if rc else "context")
    embedder = build_embedder(spec, args.layer, config=config, suffix=suffix, pooling=args.pooling,
                              context_tokens=rc.context_tokens if rc else 128)
    weight = args.context_weight if args.context_weight is not None else rc.context_weight if rc else 0.5
    return Router(store, embedder, cache_dir(), default, args.aggregate, args.top_k, input, center=center,
                  context_weight=weight)


class _Memo:
    """An embedder whose ``embed_one`` remembers (a comparison scores the same texts several ways)."""

    def __init__(self, inner):
        self.inner, self.fingerprint, self.seen = inner, inner.fingerprint, {}

    def embed(self, texts):
        return self.inner.embed(texts)

    def embed_one(self, text, context=""):
        if (text, context) not in self.seen:
            self.seen[(text, context)] = self.inner.embed_one(text, context)
        return self.seen[(text, context)]


def _fmt(v, digits=3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _print_report(report: dict, labeled: str) -> None:
    multi = (f", multi-turn {report['accuracy_multi_turn']:.3f} ({report['n_multi_turn']})"
             if report["n_multi_turn"] else "")
    print(f"{report['n']} examples in {labeled}, accuracy {report['accuracy']:.3f}{multi}; spread (best minus "
          f"runner-up) median {_fmt(report['spread']['median'])}, p10 {_fmt(report['spread']['p10'])}; latency "
          f"p50 {report['latency_ms']['p50']:.1f} ms, p95 {report['latency_ms']['p95']:.1f} ms")
    print(f"scoring {report['scoring']}, input {report['input']}, margin {_fmt(report['margin'], 4)}")
    rows = [[r, _fmt(m["precision"], 2), _fmt(m["recall"], 2), str(m["support"])]
            for r, m in report["per_route"].items()]
    print(text_table(["route", "precision", "recall", "support"], rows))
    labels = list(report["confusion"])
    rows = [[e, *(str(report["confusion"][e][p]) for p in labels)] for e in labels]
    print("\nconfusion (rows: expected, columns: chosen)")
    print(text_table(["", *labels], rows))
    if report["mistakes"]:
        print(f"\nmistakes ({len(report['mistakes'])}):")
        for m in report["mistakes"]:
            shown = m["input"] if isinstance(m["input"], str) else " | ".join(
                f"{t['role']}: {t['content']}" for t in m["input"])
            print(f"  {m['expected']} -> {m['chosen']}: {shown[:100]}")


def _variants(args, config_embedder: str | None) -> list[tuple[str, bool, bool, str]]:
    specs = args.embedder or [s for s in ("minilm", config_embedder) if s]
    specs = list(dict.fromkeys(specs))
    inputs = args.input.split(",") if args.input else ["last_user", "context"]
    out = []
    for spec in specs:
        for suffix in ((True, False) if spec.startswith("decoder:") else (True,)):
            for center in (False, True):
                for mode in inputs:
                    out.append((spec, suffix, center, mode))
    return out


def cmd_router_eval(args) -> int:
    from router.evaluate import evaluate, fit, read_labeled, report, score_examples, stored

    examples = read_labeled(args.labeled)
    _check_flags(args, examples + (read_labeled(args.fit_on) if args.fit_on else []))
    if not args.compare:
        router = _router(args)
        if args.fit_on:
            thresholds, margin = fit(router, read_labeled(args.fit_on))
            result = evaluate(router, examples, thresholds, margin)
        else:
            result = evaluate(router, examples)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            _print_report(result, args.labeled)
        return 0
    import logging

    from server.config import load_config

    # the variants score in other ways than the store's thresholds were fitted for: that is the point here
    logging.getLogger("branchserve.router").setLevel(logging.ERROR)
    config = load_config(args.config) if args.config else None
    fit_examples = read_labeled(args.fit_on) if args.fit_on else None
    rows, results, routers, first_ms = [], [], {}, {}
    for spec, suffix, center, mode in _variants(args, config.router.embedder if config and config.router else None):
        key = (spec, suffix)
        if key not in routers:
            routers[key] = _router(args, spec, suffix, False, mode)
            routers[key].embedder = _Memo(routers[key].embedder)
        router = routers[key]
        router.input = mode
        router.set_center(center)
        scored = score_examples(router, examples)
        argmax = report(router, examples, scored, {}, None)
        # later variants reuse the embeddings: their latency is this embedder's first run
        latency = first_ms.setdefault((spec, suffix), argmax["latency_ms"])
        argmax["latency_ms"] = latency
        fitted = None
        if fit_examples is not None:
            thresholds, margin = fit(router, fit_examples)
            fitted = report(router, examples, scored, thresholds, margin)
        elif router.scoring == router.store.calibration.fitted_for:
            fitted = report(router, examples, scored, *stored(router))
        name = spec if not spec.startswith("decoder:") else f"{spec} ({'suffix' if suffix else 'no suffix'})"
        results.append({"embedder": name, "centred": center, "input": mode, "scoring": router.scoring,
                        "argmax": argmax, "fitted": fitted})
        rows.append([name, "yes" if center else "no", mode, _fmt(argmax["accuracy"]),
                     _fmt(fitted["accuracy"]) if fitted else "-",
                     _fmt(fitted["accuracy_multi_turn"]) if fitted else _fmt(argmax["accuracy_multi_turn"]),
                     _fmt((fitted or argmax)["spread"]["median"]), _fmt((fitted or argmax)["spread"]["p10"]),
                     f"{latency['p50']:.1f}"])
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    fitted_on = f"fitted on {args.fit_on}" if args.fit_on else "stored thresholds"
    print(f"{len(examples)} examples in {args.labeled}; accuracy with no thresholds (argmax) and with the "
          f"thresholds and margin {fitted_on}; multi-turn: accuracy on the conversations alone; spread: best "
          f"minus runner-up score; latency: one query, embedded alone")
    print(text_table(["embedder", "centred", "input", "argmax", "fitted", "multi-turn", "spread p50",
                      "spread p10", "p50 ms"], rows))
    return 0


def cmd_router_fit(args) -> int:
    from router.evaluate import evaluate, fit, read_labeled

    examples = read_labeled(args.labeled)
    _check_flags(args, examples)
    router = _router(args)
    before = evaluate(router, examples)["accuracy"]
    thresholds, margin = fit(router, examples)
    after = evaluate(router, examples, thresholds, margin)["accuracy"]
    if args.write:
        router.store.set_thresholds(thresholds, margin, router.scoring)
    result = {"thresholds": thresholds, "margin": margin, "fitted_for": router.scoring, "accuracy_before": before,
              "accuracy_after": after, "written": args.write}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text_table(["route", "threshold"],
                         [[r, "none" if t is None else f"{t:.4f}"] for r, t in thresholds.items()]))
        print(f"margin {'none' if margin is None else f'{margin:.4f}'}; fitted for {router.scoring}")
        print(f"accuracy on {args.labeled}: {before:.3f} -> {after:.3f}"
              + (f"; written to {router.store.path}" if args.write else " (use --write to save)"))
    return 0


def _remote(args, method: str, path: str, body=None):
    import httpx

    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    try:
        r = httpx.request(method, args.url.rstrip("/") + path, json=body, headers=headers, timeout=60)
    except httpx.HTTPError as e:
        raise UserError(f"cannot reach {args.url}: {e}") from None
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:
            message = r.text.strip() or r.reason_phrase
        raise UserError(f"{r.status_code}: {message}")
    return r.json() if r.content else None


def _segment(text: str) -> str:
    """One URL path segment: every '/', '.' and other reserved character escaped, so that a route or exemplar
    id such as ``../../victim`` names itself, never another path (the client would resolve the dots)."""
    from urllib.parse import quote

    return quote(text, safe="").replace(".", "%2E")


def cmd_exemplars(args) -> int:
    from router.store import ExemplarStore, StoreError

    if args.url:
        if args.action == "list":
            routes = _remote(args, "GET", "/v1/router/routes")["routes"]
        elif args.action == "add":
            ex = _remote(args, "POST", f"/v1/router/routes/{_segment(args.route)}/exemplars", {"text": args.text})
            print(ex["id"])
            return 0
        else:
            _remote(args, "DELETE", f"/v1/router/routes/{_segment(args.route)}/exemplars/{_segment(args.id)}")
            return 0
    else:
        if not args.file:
            raise UserError("give --url URL of a running server, or --file FILE")
        store = ExemplarStore(args.file)
        try:
            if args.action == "add":
                print(store.add_exemplar(args.route, args.text).id)
                return 0
            if args.action == "remove":
                store.remove_exemplar(args.route, args.id)
                return 0
        except StoreError as e:
            raise UserError(str(e)) from None
        from server.api.router_routes import route_json

        routes = [route_json(r) for r in store.snapshot()[1]]
    for r in routes:
        threshold = "" if r["threshold"] is None else f", threshold {r['threshold']}"
        print(f"{r['name']} -> {r['target']}{threshold}")
        for e in r["exemplars"]:
            print(f"  {e['id']}  {e['text']}")
    sys.stdout.flush()
    return 0


def add_parsers(sub, parser_class) -> None:
    r = sub.add_parser("router", help="evaluate the router and fit its thresholds on labeled texts")
    rsub = r.add_subparsers(dest="router_command", required=True, parser_class=parser_class)
    for name, func, help_ in (("eval", cmd_router_eval, "accuracy, per-route precision/recall, confusion, latency"),
                              ("fit", cmd_router_fit, "per-route thresholds and a margin that maximise accuracy")):
        p = rsub.add_parser(name, help=help_)
        p.add_argument("--labeled", required=True, metavar="FILE.jsonl", help='lines of {"text": ..., "route": ...}')
        p.add_argument("--config", help="server config whose router section to use")
        p.add_argument("--exemplars", help="exemplar YAML file (instead of the config's store)")
        p.add_argument("--embedder", action="append", metavar="SPEC",
                       help="minilm | decoder:NAME | decoder:PATH | PATH (eval --compare: repeat it)")
        p.add_argument("--input", help="last_user | context | conversation (default: the config's; eval "
                                       "--compare: a comma-separated list, default last_user,context)")
        p.add_argument("--raw", action="store_true", help="score raw cosines (no centring)")
        p.add_argument("--context-weight", type=float, help="input context: weight of the message in its "
                                                             "context against the message alone")
        p.add_argument("--default-route", help="route for texts labeled none (default: the config's; needed "
                                                "only when a labeled text is none)")
        p.add_argument("--layer", type=int, default=-1, help="decoder embedder: hidden layer to pool")
        p.add_argument("--no-suffix", action="store_true", help="decoder embedder: pool the input, not the suffix")
        p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="decoder embedder pooling")
        p.add_argument("--aggregate", choices=["max", "mean_top_k"], default="max")
        p.add_argument("--top-k", type=int, default=3)
        p.add_argument("--json", action="store_true")
        if name == "fit":
            p.add_argument("--write", action="store_true",
                           help="save the thresholds, margin and what they fit into the exemplar file")
        else:
            p.add_argument("--compare", action="store_true",
                           help="one table over embedders, suffix or not, centred or not, input modes")
            p.add_argument("--fit-on", metavar="FILE.jsonl",
                           help="fit thresholds and margin on this labeled set first, then evaluate")
        p.set_defaults(func=func)

    e = sub.add_parser("exemplars", help="list, add or remove exemplars on a running server or in a file")
    e.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    e.add_argument("--key", help="admin key, when the server has auth on")
    e.add_argument("--file", type=Path, help="an exemplar YAML file (when no server is given)")
    esub = e.add_subparsers(dest="action", required=True, parser_class=parser_class)
    esub.add_parser("list")
    add = esub.add_parser("add")
    add.add_argument("route")
    add.add_argument("text")
    rm = esub.add_parser("remove")
    rm.add_argument("route")
    rm.add_argument("id")
    e.set_defaults(func=cmd_exemplars)
