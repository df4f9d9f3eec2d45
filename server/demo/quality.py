"""`branchserve bench quality`: what compression keeps of each fine-tune's skill.

For every skill branch it measures exact-match accuracy on held-out prompts of
the original fine-tune, of the compressed branch over a sweep of rates (uniform
ranks, and ranks allocated by singular-value gain at the same size), and of the
plain average of the family. Generation runs through the serving engine itself.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path


from compression.artifact import Artifact, SingleCheckpoint
from compression.compress import CompressOptions, compress
from compression.report import text_table, summarize
from compression.synthetic import plain_average
from server.demo.skills import SKILLS, test_set
from server.engine.model import FamilyModel
from server.engine.runner import FamilyRunner
from server.engine.sequence import Sequence
from server.engine.sampling import SamplingParams
from server.engine.text import load_tokenizer, render_chat, stop_token_ids


def accuracy(source, branches: list[str], skills: list[str], n: int = 200, max_batch: int = 32) -> dict[str, float]:
    """Greedy exact-match accuracy of each branch on its own skill (branches[i] is scored on skills[i])."""
    model = FamilyModel.from_artifact(source, branches)
    runner = FamilyRunner(model, max_batch=max_batch, max_seq=64, prefill_chunk=1024)
    runner.allocate()
    out = {}
    for b, (branch, skill) in enumerate(zip(branches, skills)):
        tok = load_tokenizer(source.branch_dir(branch))
        stops = frozenset(stop_token_ids(source.branch_dir(branch), tok))
        cases = test_set(skill, n)
        seqs = []
        for prompt, _ in cases:
            ids = render_chat(tok, [{"role": "user", "content": prompt}])
            seq = Sequence(prompt, ids, SamplingParams(max_tokens=12, temperature=0), lambda ev: None, b, stops)
            runner.add(seq)
            seqs.append(seq)
        while runner.has_work():
            runner.step()
        answers = [tok.decode([t for t in s.output if t not in stops], skip_special_tokens=True).strip() for s in seqs]
        out[skill] = sum(answer == want for answer, (_, want) in zip(answers, cases)) / n
    return out


def bench_quality(args) -> dict:
    from server.demo.build import skill_family

    members = skill_family(log=lambda m: print(m, file=sys.stderr))
    skills = [s for s in SKILLS if s in members]
    rows = []
    inputs = None
    with tempfile.TemporaryDirectory(prefix="branchserve-quality-") as tmp:
        root = Path(tmp)
        fine = {s: accuracy(SingleCheckpoint(members[s], s), [s], [s], args.n)[s] for s in skills}
        rows.append({"method": "fine-tune (original)", "rate": None, "size": 1.0, **fine})
        avg = plain_average(members, root / "average")
        rows.append({"method": "plain average", "rate": None, "size": 1 / len(skills),
                     **accuracy(SingleCheckpoint(avg, "avg"), ["avg"] * len(skills), skills, args.n)})
        for rate in [float(r) for r in args.rates.split(",")]:
            for allocation in ("uniform", "gain"):
                if rate in (0.0, 1.0) and allocation == "gain":
                    continue
                out = root / f"art-{rate}-{allocation}"
                t0 = time.perf_counter()
                opts = CompressOptions(rate=rate, allocation=allocation, compress_embeddings=args.compress_embeddings,
                                       progress=False)
                manifest = compress(members, out, opts)
                s = summarize(manifest)
                inputs = s["inputs_bytes"]
                acc = accuracy(Artifact(out), skills, skills, args.n)
                rows.append({"method": f"trunk + residuals ({allocation})", "rate": rate, "size": s["ratio"],
                             "compress_s": round(time.perf_counter() - t0, 2), **acc})
    for r in rows:
        r["kept"] = {s: (r[s] / fine[s] if fine[s] else None) for s in skills}
    report = {"skills": skills, "n": args.n, "inputs_bytes": inputs, "rows": rows}
    if args.json:
        print(json.dumps(report, indent=2))
        return report
    table = [[r["method"], "" if r["rate"] is None else f"{r['rate']:g}", f"{r['size']:.2f}",
              *(f"{r[s]:.2f}" for s in skills),
              f"{min(v for v in r['kept'].values() if v is not None):.2f}"] for r in rows]
    extra = "; embeddings and head compressed too" if args.compress_embeddings else ""
    print(f"skill accuracy (exact match, {args.n} held-out prompts each, greedy); size = artifact / members' total"
          f"{extra}")
    print(text_table(["method", "rate", "size", *skills, "min kept"], table))
    return report
