"""`branchserve bench compress`: a compress -> export round trip on a synthetic family.

For every backend and rate it compresses the family, exports every branch as a
plain HF checkpoint, loads it with transformers and compares its logits with the
original member's. Plain (unnormalized) averaging, classic merging, is the
reference row.
"""

from __future__ import annotations

import json
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


def bench_compress(args) -> dict:
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
