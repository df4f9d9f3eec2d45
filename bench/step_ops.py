"""The host's work per decode step: aten calls dispatched, eagerly and with the step replayed from a graph.

    python bench/step_ops.py [--layers 32] [--branches 4] [--batches 1,32] [--json out.json]

An eager decode step on a GPU is bound by the host when it dispatches thousands of small ops (on an H200, 57 ms a
step at one row for Llama-3-8B's shape: bench/RESULTS.md, "On an H200"). The count does not depend on the
layers' widths, so this script counts it on the CPU, on a tiny family of ``--layers`` layers and ``--branches``
branches, with the attention path CUDA takes (not the CPU's fused kernel): every aten call of one decode step
of ``batch`` rows of 32 tokens, one branch and mixed. With ``limits.cuda_graphs`` the forward is one graph
replay; what the host still dispatches is counted as the step's calls outside the forward (the padded inputs'
copy, the lm_heads, sampling), on the same buckets run without capture. A second table times the host's
planning of one step (block tables to index tensors) at 1k and 8k tokens a row. It prints both and JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def count(artifact: Path, batch: int, mixed: bool, graphs: bool, branches: int) -> int:
    from compression.artifact import Artifact
    from server.engine.model import FamilyModel
    from server.engine.runner import FamilyRunner
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    runner = FamilyRunner(FamilyModel.from_artifact(Artifact(artifact)), max_batch=batch, max_seq=256,
                          prefill_chunk=32 * batch, graphs=graphs, capture=False)
    runner.allocate()
    runner.warm_up()
    seqs = [Sequence(str(i), [3 + i % 50] * 32, SamplingParams(max_tokens=8, temperature=0), lambda e: None,
                     i % branches if mixed else 0) for i in range(batch)]
    for s in seqs:
        runner.add(s)
    while not all(len(s.output) >= 2 for s in seqs):
        runner.step()
    counter = Count()
    if graphs:  # the forward is the graph's: not counted
        step = runner.graphs.step

        def outside(*args):
            counter.paused = True
            try:
                return step(*args)
            finally:
                counter.paused = False

        runner.graphs.step = outside
    with counter:
        runner.step()
    assert not graphs or runner.graphs.replays > 0
    return counter.calls


def planning_ms(rows: int, context: int, repeats: int = 30) -> dict[str, float]:
    """Host ms to plan one decode step of ``rows`` rows at ``context`` tokens each (Llama-3-8B's heads): the eager
    step's StepBatch, the compiled step's, and a graph bucket's padded inputs."""
    import time

    from server.engine.graphs import plan, units_needed
    from server.engine.kv_cache import BLOCK_SIZE, StepBatch

    per = context // BLOCK_SIZE
    tables = [list(range(1 + i * per, 1 + (i + 1) * per)) for i in range(rows)]
    decode = [(t, context - 1, 5, i % 3) for i, t in enumerate(tables)]
    need = units_needed([context - 1] * rows, rows, BLOCK_SIZE)
    cpu = torch.device("cpu")
    runs = {
        "eager": lambda: StepBatch([(t, context - 1, 1) for t in tables], rows, BLOCK_SIZE, 32, 8, torch.bfloat16,
                                   cpu),
        "compiled": lambda: StepBatch([(t, context - 1, 1) for t in tables], rows, BLOCK_SIZE, 32, 8,
                                      torch.bfloat16, cpu, compiled=True),
        "graph bucket": lambda: torch.from_numpy(plan(decode, rows, need, BLOCK_SIZE).flat()),
    }
    out = {}
    for name, run in runs.items():
        run()
        t0 = time.perf_counter()
        for _ in range(repeats):
            run()
        out[name] = 1000 * (time.perf_counter() - t0) / repeats
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--branches", type=int, default=4)
    p.add_argument("--batches", default="1,32", help="rows per decode step, comma-separated")
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        p.error(f"--batches {args.batches!r}: give numbers separated by commas")
    if args.layers < 1 or args.branches < 2 or min(batches) < 1:
        p.error("--layers and every batch must be at least 1, --branches at least 2")

    import server.engine.kv_cache as kv_cache
    from compression.compress import CompressOptions, compress
    from compression.synthetic import build_family

    kv_cache.FLASH_ON_CPU = False  # the attention path CUDA takes
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        members = build_family(root, [f"b{i}" for i in range(args.branches)], layers=args.layers, seed=1)
        compress(members, root / "art", CompressOptions(rate=0.9, progress=False))
        for batch in batches:
            for mixed in (False, True):
                if mixed and batch == 1:
                    continue
                eager = count(root / "art", batch, mixed, False, args.branches)
                graphed = count(root / "art", batch, mixed, True, args.branches)
                rows.append({"batch": batch, "branches": "mixed" if mixed else "one", "eager": eager,
                             "graphs_outside_replay": graphed})
    planning = [{"rows": max(batches), "context": c, **planning_ms(max(batches), c)} for c in (1024, 8192)]
    report = {"layers": args.layers, "branches": args.branches, "torch": torch.__version__,
              "machine": platform.processor() or platform.machine(), "rows": rows, "planning_ms": planning}
    print(f"aten calls per decode step, family of {args.layers} layers and {args.branches} branches, CUDA's "
          f"attention path, counted on the CPU; torch {torch.__version__}")
    print(f"{'rows':>5}  {'branches':8}  {'eager':>6}  {'with graphs (outside the replay)':>32}")
    for r in rows:
        print(f"{r['batch']:>5}  {r['branches']:8}  {r['eager']:>6}  {r['graphs_outside_replay']:>32}")
    print(f"\nhost ms to plan one decode step of {max(batches)} rows (block tables to the step's index tensors)")
    print(f"{'context':>8}  {'eager':>6}  {'compiled':>8}  {'graph bucket':>12}")
    for r in planning:
        print(f"{r['context']:>8}  {r['eager']:>6.2f}  {r['compiled']:>8.2f}  {r['graph bucket']:>12.2f}")
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
