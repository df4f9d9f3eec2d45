"""Scoring for bench/fidelity.py: greedy generation through branchserve's own engine.

Every model in the table (the instruct model, each fine-tune, each compressed branch, each merge) is
loaded into the family model and generated from by the family runner, the code that serves requests,
so every row is scored by the same forward, the same chat template and the same stop tokens.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from fidelity_data import general_correct, load_general, skill_correct, test_set

SKILL_MAX_TOKENS = 40
GENERAL_MAX_TOKENS = 32


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Task:
    branch: int
    prompt: str
    correct: object  # reply -> bool
    max_tokens: int


def skill_tasks(branch: int, skill: str, n: int) -> list[Task]:
    return [Task(branch, p, (lambda reply, a=a: skill_correct(reply, a)), SKILL_MAX_TOKENS) for p, a in
            test_set(skill, n)]


def general_tasks(branch: int) -> list[Task]:
    return [Task(branch, it["prompt"], (lambda reply, it=it: general_correct(reply, it)), GENERAL_MAX_TOKENS)
            for it in load_general()]


def generate(source, branches: list[str], tasks: list[Task], max_batch: int = 128) -> list[tuple[str, str]]:
    """Greedy (reply, finish reason) for ``tasks`` (each on its branch), every branch mixed in the same batches."""
    from server.engine.model import FamilyModel
    from server.engine.runner import FamilyRunner
    from server.engine.sequence import Sequence
    from server.engine.sampling import SamplingParams
    from server.engine.text import load_tokenizer, render_chat, stop_token_ids

    model = FamilyModel.from_artifact(source, branches)
    runner = FamilyRunner(model, max_batch=max_batch, max_seq=320, prefill_chunk=2048)
    runner.allocate()
    toks = {}
    seqs = []
    for i, task in enumerate(tasks):
        if task.branch not in toks:
            path = source.branch_dir(branches[task.branch])
            tok = load_tokenizer(path)
            toks[task.branch] = (tok, frozenset(stop_token_ids(path, tok)))
        tok, stops = toks[task.branch]
        ids = render_chat(tok, [{"role": "user", "content": task.prompt}])
        seq = Sequence(str(i), ids, SamplingParams(max_tokens=task.max_tokens, temperature=0), lambda ev: None,
                       task.branch, stops)
        runner.add(seq)
        seqs.append(seq)
    while runner.has_work():
        runner.step()
    out = []
    for task, seq in zip(tasks, seqs):
        tok, stops = toks[task.branch]
        out.append((tok.decode([t for t in seq.output if t not in stops], skip_special_tokens=True),
                    seq.finished))
    return out


def score(source, branches: list[str], groups: dict[str, list[Task]], label: str) -> dict[str, float]:
    """Accuracy per named group of tasks, all groups generated together."""
    started = time.perf_counter()
    tasks = [t for ts in groups.values() for t in ts]
    replies = generate(source, branches, tasks)
    out, at = {}, 0
    for name, ts in groups.items():
        got = replies[at: at + len(ts)]
        out[name] = sum(t.correct(reply) for t, (reply, _) in zip(ts, got)) / len(ts)
        at += len(ts)
    say(f"  scored {label}: {len(tasks)} prompts in {time.perf_counter() - started:.0f} s "
        + ", ".join(f"{k} {v:.2f}" for k, v in out.items()))
    return out
