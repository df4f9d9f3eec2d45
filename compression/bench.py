"""`branchserve bench compress`: a compress -> export round trip on a synthetic family.

With ``--shape llama3-8b`` it times compression alone on layers of that shape instead:
read, rSVD and write seconds of each backend (``--device cuda`` on a GPU).

For every backend and rate it compresses the family, exports every branch as a
plain HF checkpoint, loads it with transformers and compares its logits with the
original member's. Plain (unnormalized) averaging, classic merging, is the
reference row.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from compression.compress import CompressOptions, compress
from compression.export import export_branch
from compression.report import text_table, summarize
from compression.synthetic import build_family, plain_average


def _logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids).logits[0]


# Decoder-layer shapes of real models (vocabulary kept small: embeddings are copied per branch, not compressed).
SHAPES = {
    "llama3-8b": dict(hidden=4096, intermediate=14336, heads=32, kv_heads=8),
}


def bench_compress_timing(args) -> dict:
    """Where a compression's time goes (read, rSVD, write, other math) on a family of real layer shapes."""
    shape = SHAPES[args.shape]
    names = [f"member{i}" for i in range(args.members)]
    results = []
    with tempfile.TemporaryDirectory(prefix="branchserve-bench-") as tmp:
        root = Path(tmp)
        print(f"building a synthetic {args.shape}-shaped family: {args.members} members, {args.layers} layers, "
              f"bfloat16", file=sys.stderr)
        members = build_family(root / "family", names, layers=args.layers, dtype=torch.bfloat16, **shape)
        inputs = sum(f.stat().st_size for p in members.values() for f in p.glob("*.safetensors"))
        for backend in args.backends.split(","):
            for rate in [float(r) for r in args.rates.split(",")]:
                out = root / f"artifact-{backend}-{rate}"
                t0 = time.perf_counter()
                manifest = compress(members, out, CompressOptions(rate=rate, backend=backend, device=args.device,
                                                                  progress=False))
                c = manifest["compression"]
                results.append({"backend": c["backend"], "device": c["device"], "rate": rate,
                                "seconds": time.perf_counter() - t0,
                                **{k: c[f"{k}_seconds"] for k in ("read", "svd", "write")},
                                "ratio": manifest["sizes"]["artifact"] / inputs})
                shutil.rmtree(out)
    report = {"shape": args.shape, "members": args.members, "layers": args.layers, "input_bytes": inputs,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    rows = [[r["backend"], r["device"], f"{r['rate']:g}", f"{r['read']:.1f}", f"{r['svd']:.1f}", f"{r['write']:.1f}",
             f"{r['seconds'] - r['read'] - r['svd'] - r['write']:.1f}", f"{r['seconds']:.1f}",
             f"{r['seconds'] / args.layers:.1f}", f"{r['ratio']:.3f}"] for r in results]
    print(f"compress, {args.members} members of {args.layers} {args.shape}-shaped layers ({inputs / 1e9:.2f} GB "
          f"bf16), torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(text_table(["backend", "device", "rate", "read s", "rSVD s", "write s", "other s", "total s",
                      "s per layer", "size/inputs"], rows))
    return report


def bench_compress(args) -> dict:
    if args.shape:
        return bench_compress_timing(args)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rates = [float(r) for r in args.rates.split(",")]
    backends = args.backends.split(",")
    names = [f"member{i}" for i in range(args.members)]
    results = []
    with tempfile.TemporaryDirectory(prefix="branchserve-bench-") as tmp:
        root = Path(tmp)
        print(f"building a synthetic family: {args.members} members, hidden {args.hidden}, {args.layers} layers",
              file=sys.stderr)
        members = build_family(root / "family", names, hidden=args.hidden, layers=args.layers,
                               intermediate=int(args.hidden * 2.75))
        gen = torch.Generator().manual_seed(1)
        input_ids = torch.randint(0, 256, (1, 32), generator=gen)
        reference = {b: _logits(p, input_ids) for b, p in members.items()}
        avg = _logits(plain_average(members, root / "plain-average"), input_ids)
        results.append({
            "method": "plain average", "backend": "", "rate": None, "ratio": None,
            "mean_error": None, "max_error": None, "compress_s": None,
            "max_logit_diff": max(float((avg - ref).abs().max()) for ref in reference.values()),
        })
        for backend in backends:
            for rate in rates:
                out = root / f"artifact-{backend}-{rate}"
                t0 = time.perf_counter()
                manifest = compress(members, out, CompressOptions(rate=rate, backend=backend, progress=False))
                seconds = time.perf_counter() - t0
                s = summarize(manifest)
                diffs = []
                for b in names:
                    exported = export_branch(out, b, root / f"export-{backend}-{rate}-{b}", progress=False)
                    diffs.append(float((_logits(exported, input_ids) - reference[b]).abs().max()))
                ranks = sorted({t["rank"] for t in s["tensors"] if t.get("residual") == "lowrank"})
                results.append({
                    "method": "trunk + residuals", "backend": backend, "rate": rate,
                    "ranks": ranks, "ratio": s["ratio"],
                    "mean_error": sum(b["mean_error"] for b in s["branches"]) / len(s["branches"]),
                    "max_error": max(b["max_error"] for b in s["branches"]),
                    "compress_s": seconds, "max_logit_diff": max(diffs),
                })
    if args.json:
        print(json.dumps({"family": vars(args) | {"func": None}, "results": results}, indent=2))
        return {"results": results}

    def fmt(v, f):
        return "" if v is None else format(v, f)

    rows = [[
        r["method"], r["backend"], fmt(r["rate"], "g"), ",".join(map(str, r.get("ranks", []))),
        fmt(r["ratio"], ".3f"), fmt(r["mean_error"], ".4f"), fmt(r["max_error"], ".4f"),
        fmt(r["max_logit_diff"], ".2e"), fmt(r["compress_s"], ".2f"),
    ] for r in results]
    print(text_table(["method", "backend", "rate", "ranks", "size/inputs", "mean err", "max err",
                  "max |dlogit|", "compress s"], rows))
    print("rate 0 must reproduce every member (|dlogit| ~ 1e-6); rate 1 is normalized averaging.")
    return {"results": results}
