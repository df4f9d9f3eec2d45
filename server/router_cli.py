"""`branchserve router eval|fit` and `branchserve exemplars list|add|remove`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from compression.errors import UserError
from compression.report import text_table


def _router(args):
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
    if default is None:
        raise UserError("give --default-route NAME (the route out-of-scope texts must fall to)")
    spec = args.embedder or (rc.embedder if rc else "minilm")
    embedder = build_embedder(spec, args.layer, config=config, suffix=not args.no_suffix, pooling=args.pooling)
    return Router(store, embedder, cache_dir(), default, args.aggregate, args.top_k)


def cmd_router_eval(args) -> int:
    from router.evaluate import evaluate, read_labeled

    examples = read_labeled(args.labeled)
    report = evaluate(_router(args), examples)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['n']} examples, accuracy {report['accuracy']:.3f}, embedder {report['embedder']}, "
          f"latency p50 {report['latency_ms']['p50']:.1f} ms, p95 {report['latency_ms']['p95']:.1f} ms")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    rows = [[r, fmt(m["precision"]), fmt(m["recall"]), str(m["support"])] for r, m in report["per_route"].items()]
    print(text_table(["route", "precision", "recall", "support"], rows))
    labels = list(report["confusion"])
    rows = [[e, *(str(report["confusion"][e][p]) for p in labels)] for e in labels]
    print("\nconfusion (rows: expected, columns: chosen)")
    print(text_table(["", *labels], rows))
    return 0


def cmd_router_fit(args) -> int:
    from router.evaluate import evaluate, fit_thresholds, read_labeled

    examples = read_labeled(args.labeled)
    router = _router(args)
    before = evaluate(router, examples)["accuracy"]
    fitted = fit_thresholds(router, examples)
    after = evaluate(router, examples, fitted)["accuracy"]
    if args.write:
        router.store.set_thresholds(fitted)
    result = {"thresholds": fitted, "accuracy_before": before, "accuracy_after": after, "written": args.write}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(text_table(["route", "threshold"], [[r, "none" if t is None else f"{t:.4f}"] for r, t in fitted.items()]))
        print(f"accuracy on {args.labeled}: {before:.3f} -> {after:.3f}"
              + (f"; thresholds written to {router.store.path}" if args.write else " (use --write to save)"))
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


def cmd_exemplars(args) -> int:
    from router.store import ExemplarStore, StoreError

    if args.url:
        if args.action == "list":
            routes = _remote(args, "GET", "/v1/router/routes")["routes"]
        elif args.action == "add":
            ex = _remote(args, "POST", f"/v1/router/routes/{args.route}/exemplars", {"text": args.text})
            print(ex["id"])
            return 0
        else:
            _remote(args, "DELETE", f"/v1/router/routes/{args.route}/exemplars/{args.id}")
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
                              ("fit", cmd_router_fit, "per-route thresholds that maximise accuracy")):
        p = rsub.add_parser(name, help=help_)
        p.add_argument("--labeled", required=True, metavar="FILE.jsonl", help='lines of {"text": ..., "route": ...}')
        p.add_argument("--config", help="server config whose router section to use")
        p.add_argument("--exemplars", help="exemplar YAML file (instead of the config's store)")
        p.add_argument("--embedder", help="minilm | decoder:NAME | decoder:PATH | PATH")
        p.add_argument("--default-route", help="route for texts labeled none (default: the config's)")
        p.add_argument("--layer", type=int, default=-1, help="decoder embedder: hidden layer to pool")
        p.add_argument("--no-suffix", action="store_true", help="decoder embedder: pool the input, not the suffix")
        p.add_argument("--pooling", choices=["mean", "last"], default="mean", help="decoder embedder pooling")
        p.add_argument("--aggregate", choices=["max", "mean_top_k"], default="max")
        p.add_argument("--top-k", type=int, default=3)
        p.add_argument("--json", action="store_true")
        if name == "fit":
            p.add_argument("--write", action="store_true", help="save the thresholds into the exemplar file")
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
