"""The ``branchserve`` console script."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from compression.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see '{self.prog} --help')\n")
        sys.exit(2)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def _members(specs: list[str]) -> dict[str, Path]:
    members: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UserError(f"member {spec!r} is not NAME=PATH")
        if not all(c.isalnum() or c in "-_." for c in name) or not name.strip("."):
            raise UserError(f"branch name {name!r} may only hold letters, digits, '-', '_' and '.', and not only "
                            "dots")
        if name in members:
            raise UserError(f"branch name {name!r} is given twice")
        members[name] = Path(path)
    return members


def cmd_compress(args) -> int:
    from compression.compress import CompressOptions, compress
    from compression.report import format_summary, summarize
    from compression.safetensors_io import parse_size

    opts = CompressOptions(
        rate=args.rate,
        rank=args.rank,
        allocation=args.allocation,
        compress_embeddings=args.compress_embeddings,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        force=args.force,
        max_shard_bytes=parse_size(args.max_shard_size),
        progress=not args.quiet,
    )
    manifest = compress(_members(args.members), Path(args.out), opts)
    print(format_summary(summarize(manifest, args.out)))
    print(f"wrote {args.out}")
    return 0


def cmd_inspect(args) -> int:
    from compression.artifact import Artifact
    from compression.report import format_summary, format_tensors, summarize

    artifact = Artifact(args.dir)
    summary = summarize(artifact.manifest, str(artifact.path))
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary))
        print()
        print(format_tensors(summary))
    return 0


def cmd_export(args) -> int:
    from compression.export import export_branch
    from compression.safetensors_io import parse_size

    out = export_branch(
        Path(args.dir), args.branch, Path(args.out), args.force, parse_size(args.max_shard_size), not args.quiet
    )
    print(f"wrote {out}")
    return 0


def cmd_serve(args) -> int:
    from server.config import load_config
    from server.serve import serve

    if args.demo == bool(args.config):
        raise UserError("give either --config FILE or --demo")
    if args.address and not args.ray:
        raise UserError("--address needs --ray")
    if args.ray:
        try:
            from server.ray_app import serve_ray
        except ImportError:
            raise UserError("--ray needs Ray Serve: pip install 'branchserve[ray]'") from None
        if args.demo:
            from server.demo.build import demo_config

            config = demo_config()
        else:
            config = load_config(args.config)
        serve_ray(config, args.host, args.port, args.address)
    elif args.demo:
        from server.demo.build import banner, demo_config

        serve(demo_config(), args.host, args.port, banner(args.host, args.port))
    else:
        serve(load_config(args.config), args.host, args.port)
    return 0


def cmd_plan(args) -> int:
    from server.config import load_config
    from server.engine.kv_cache import parse_bytes
    from server.plan import make_plan, table

    memory = None
    if args.device_memory is not None:
        try:
            memory = parse_bytes(args.device_memory)
        except ValueError:
            raise UserError(f"--device-memory {args.device_memory!r} is not a size (say 48GB or 80GiB)") from None
        if memory <= 0:
            raise UserError("--device-memory must be positive")
    plan = make_plan(load_config(args.config), memory)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print("\n".join(table(plan)))
    if plan.shortfall:
        short = ", ".join(f"{d} by {n / 2**30:.2f} GiB" for d, n in plan.shortfall.items())
        sys.stderr.write(f"error: the models do not fit: {short}\n")
        return 2
    return 0


def cmd_bench_quality(args) -> int:
    from server.demo.quality import bench_quality

    bench_quality(args)
    return 0


def cmd_bench_compress(args) -> int:
    from compression.bench import bench_compress

    if args.members < 2 or args.layers < 1:
        raise UserError("--members must be at least 2 and --layers at least 1")
    bench_compress(args)
    return 0


def cmd_bench_engine(args) -> int:
    import torch

    from server.bench.engine import bench_engine

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if min(args.branches, args.batch, args.new_tokens, args.prompt, args.ttft_prompt, args.rounds) < 1:
        raise UserError("--branches, --batch, --prompt, --new-tokens, --ttft-prompt and --rounds must be at least 1")
    if args.new_tokens < 4:
        raise UserError("--new-tokens must be at least 4: the prefill step brings two, one decode step is watched "
                        "for KV copies, and at least one more is timed")
    if not 0 < args.rate < 1:
        raise UserError(f"--rate must be within (0, 1) for the engine benchmark, got {args.rate}")
    if args.long_only and not args.long:
        raise UserError("--long-only needs --long TOKENS")
    if args.long and not 1 <= args.long_rows < args.batch:
        raise UserError(f"--long-rows must be at least 1 and below --batch ({args.batch}), got {args.long_rows}")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    bench_engine(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="branchserve", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("compress", help="compress a family of fine-tunes into a trunk plus residual branches")
    c.add_argument("members", nargs="+", metavar="NAME=PATH", help="a branch name and its HF checkpoint directory")
    c.add_argument("--out", required=True, help="artifact directory to create")
    c.add_argument("--rate", type=float, default=0.95, help="compression rate in [0, 1] (default 0.95)")
    c.add_argument("--rank", type=int, default=None, help="fixed residual rank; overrides --rate")
    c.add_argument("--allocation", choices=["uniform", "gain"], default="uniform",
                   help="uniform: every matrix gets the rate's rank; gain: the same size, ranks spent per matrix "
                        "by singular-value gain")
    c.add_argument("--compress-embeddings", action="store_true",
                   help="store the token embeddings and lm_head as trunk + residual too (they stay per branch "
                        "by default)")
    c.add_argument("--backend", choices=["auto", "fbpca", "torch"], default="auto")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None,
                   help="stored dtype (default: the members' own)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--force", action="store_true", help="replace an existing output directory")
    c.add_argument("--max-shard-size", default="2GB")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="show an artifact's branches, ranks, sizes and errors")
    i.add_argument("dir")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="write one branch as a standard Hugging Face checkpoint")
    e.add_argument("dir")
    e.add_argument("branch")
    e.add_argument("out")
    e.add_argument("--force", action="store_true")
    e.add_argument("--max-shard-size", default="5GB")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)

    s = sub.add_parser("serve", help="serve families and standalone models behind an OpenAI-compatible API")
    s.add_argument("--config", help="YAML config file")
    s.add_argument("--demo", action="store_true",
                   help="build (first time) and serve the offline demo from the data directory")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--ray", action="store_true",
                   help="run as a Ray Serve application: an ingress and one deployment per model (the config's "
                        "ray: sections); needs branchserve[ray]")
    s.add_argument("--address", help="with --ray: the Ray cluster to join (default: start a local one)")
    s.set_defaults(func=cmd_serve)

    pl = sub.add_parser("plan", help="what a config's models take on each device and the KV cache left, "
                                     "without loading anything")
    pl.add_argument("--config", required=True, help="the YAML config `serve` would get")
    pl.add_argument("--device-memory", help="bytes of each CUDA device (48GB, 80GiB); default: the device's own")
    pl.add_argument("--json", action="store_true", help="the plan as JSON")
    pl.set_defaults(func=cmd_plan)

    from server.router_cli import add_parsers

    add_parsers(sub, _Parser)

    b = sub.add_parser("bench", help="benchmarks that print a table and JSON")
    bsub = b.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bc = bsub.add_parser("compress", help="compress -> export round trip on a synthetic family")
    bc.add_argument("--members", type=int, default=3)
    bc.add_argument("--hidden", type=int, default=256)
    bc.add_argument("--layers", type=int, default=4)
    bc.add_argument("--rates", default="0,0.5,0.9,0.95,1")
    bc.add_argument("--backends", default="fbpca,torch")
    bc.add_argument("--shape", choices=["llama3-8b"], default=None,
                    help="time compression alone on layers of this shape (read, rSVD, write); --hidden is ignored")
    bc.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="with --shape")
    bc.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bc.set_defaults(func=cmd_bench_compress)
    bq = bsub.add_parser("quality", help="skill accuracy kept by compression on the demo's real fine-tunes")
    bq.add_argument("--rates", default="0.5,0.7,0.8,0.9,1")
    bq.add_argument("--n", type=int, default=200, help="held-out prompts per skill")
    bq.add_argument("--compress-embeddings", action="store_true", help="compress embeddings and lm_head too")
    bq.add_argument("--json", action="store_true", help="print JSON instead of the table")
    bq.set_defaults(func=cmd_bench_quality)
    be = bsub.add_parser("engine", help="tokens/s: dense vs one branch vs N branches mixed")
    be.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    be.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: float32 on the CPU, bfloat16 on CUDA")
    be.add_argument("--shape", choices=["tiny", "small", "llama3-8b"], default="small")
    be.add_argument("--branches", type=int, default=4)
    be.add_argument("--rate", type=float, default=0.95)
    be.add_argument("--batch", type=int, default=16)
    be.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    be.add_argument("--new-tokens", type=int, default=32)
    be.add_argument("--rounds", type=int, default=3,
                    help="timed batches per configuration, the configurations taking turns (default 3)")
    be.add_argument("--compress-embeddings", action="store_true",
                    help="per-branch lm_heads as trunk + residual (one trunk head read per step, not N heads)")
    be.add_argument("--compile", action="store_true", help="steps through torch.compile (inductor)")
    be.add_argument("--cuda-graphs", action="store_true",
                    help="decode steps replayed from CUDA graphs (limits.cuda_graphs); elsewhere, their padded "
                         "static inputs without capture")
    be.add_argument("--long", type=int, default=0, metavar="TOKENS",
                    help="also time decode steps of short rows beside --long-rows rows of this many prompt tokens, "
                         "against the same rows beside short ones (paged attention: a row reads its own context)")
    be.add_argument("--long-rows", type=int, default=1, metavar="N",
                    help="with --long: N rows of that many prompt tokens beside batch - N short rows (default 1)")
    be.add_argument("--long-only", action="store_true",
                    help="with --long: only that run, on the mixed family (one model loaded, one warm-up)")
    be.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for the time-to-first-token column")
    be.add_argument("--standalone", choices=["small", "7b"], default=None,
                    help="also load a random standalone model of this shape next to the mixed family and report "
                         "the memory of both")
    be.add_argument("--hf-baseline", metavar="PATH", default=None,
                    help="also compare with transformers generate on this HF Llama checkpoint")
    be.add_argument("--json", action="store_true", help="print JSON instead of the table")
    be.set_defaults(func=cmd_bench_engine)
    return p


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except UserError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C now would turn exit 130 into a signal death
        sys.stderr.write("error: interrupted; nothing was written\n")
        return 130
    except BrokenPipeError:  # `branchserve inspect ... | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
