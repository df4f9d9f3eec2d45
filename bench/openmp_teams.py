"""One-row decode steps on the engine thread, with and without a second OpenMP team in the process.

    python bench/openmp_teams.py [--compile] [--steps 40] [--rounds 3] [--json out.json]

torch's CPU ops run on OpenMP (libgomp), which keeps a team of worker threads for every thread that has run a
parallel op. The server loads its models on one thread and steps them on another (the engine thread); while
the loading thread kept its team, the engine's steps ran at about half speed on a 2-core machine
(server/engine/openmp.py). This script times the same one-row decode steps of SmolLM2-135M-Instruct (the
demo's conversion, a standalone model) three ways, in turns, ``--rounds`` times:

- ``main``: on the thread that loaded the model (one team in the process);
- ``thread, two teams``: on another thread, while the loading thread holds its team (the server before
  ``release_team``);
- ``thread, one team``: on another thread, after the loading thread released its team (the server now).

Each figure is the median step time (ms) over ``--steps`` steps of one sequence; it prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import threading
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compile", action="store_true", help="decode steps through torch.compile (limits.compile)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", help="also write the report here")
    args = p.parse_args()
    if args.steps < 1 or args.rounds < 1:
        p.error("--steps and --rounds must be at least 1")

    from server.demo.build import smollm2
    from server.engine.core import Engine
    from server.engine.openmp import release_team, runtimes
    from server.engine.sampling import SamplingParams
    from server.engine.sequence import Sequence

    engine = Engine()
    runner = engine.add_standalone("smollm2", smollm2(), max_batch=4, max_seq=2048, compile=args.compile)
    runner.allocate()
    if args.compile:
        from server.engine.compiled import tracing

        with tracing():
            runner.warm_up()

    def steps() -> float:
        seq = Sequence("bench", list(range(1, 61)), SamplingParams(max_tokens=args.steps + 10, temperature=0),
                       lambda event: None, 0)
        runner.add(seq)
        for _ in range(6):  # the prompt, then a few decode steps
            runner.step()
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            runner.step()
            times.append(time.perf_counter() - t)
        while runner.has_work():
            runner.step()
        return 1000 * statistics.median(times)

    def on_thread() -> float:
        out = []
        worker = threading.Thread(target=lambda: out.append(steps()))
        worker.start()
        worker.join()
        return out[0]

    def hold_team() -> None:
        torch.ones(2000, 2000).add_(1)  # the loading thread's parallel ops form its team again

    ways = {"main": steps, "thread, two teams": lambda: (hold_team(), on_thread())[1],
            "thread, one team": lambda: (release_team(), on_thread())[1]}
    runs: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(args.rounds):
        for way, run in ways.items():
            runs[way].append(run())
    report = {"machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads", "torch": torch.__version__,
              "openmp": [lib._name for lib in runtimes()], "compile": args.compile, "steps": args.steps,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "step_ms": {w: statistics.median(r) for w, r in runs.items()}, "rounds_ms": runs}
    print(f"one-row decode step, SmolLM2-135M-Instruct fp32, {'compiled' if args.compile else 'eager'}; "
          f"median over {args.rounds} rounds of {args.steps} steps each")
    print("| where the steps run | step ms | vs main | rounds |\n|---|---|---|---|")
    base = report["step_ms"]["main"]
    for way, ms in report["step_ms"].items():
        print(f"| {way} | {ms:.1f} | {ms / base:.2f}x | {', '.join(f'{x:.1f}' for x in runs[way])} |")
    print(json.dumps(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
