"""Full fine-tunes of SmolLM2-135M-Instruct for bench/fidelity.py: every weight trained, deterministic.

Each example is rendered with the model's own chat template (its default system prompt included, as a
served request gets it) and the loss covers the assistant's reply and its end token only. After each skill
batch (by default) comes one batch of the replay pool: ordinary instructions answered by the instruct
model itself (bench/fidelity_data.py says why). Logits are computed for the reply positions alone,
which saves the 49152-way head on every prompt token.
"""

from __future__ import annotations

import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fidelity_data import examples
from server.demo.skills import ChatEncoder


@dataclass(frozen=True)
class FineTune:
    steps: int = 60  # steps on the skill
    replay_every: int = 1  # after every this many skill steps, one step on the replay pool (0: none)
    batch: int = 8
    lr: float = 1e-4
    warmup: int = 5
    seed: int = 0

    @property
    def total_steps(self) -> int:
        return self.steps + (self.steps // self.replay_every if self.replay_every else 0)

    def tag(self) -> str:
        # "v2": fused AdamW and length-grouped replay batches; fine-tunes of the first recipe are not reused
        return f"v2-s{self.steps}-r{self.replay_every}-b{self.batch}-lr{self.lr:g}-seed{self.seed}"


def replay_batches(replay: list[tuple[str, str]], size: int, seed: int):
    """Endless replay batches of similar length (the pool sorted by length, cut into batches, each pass
    shuffled), so a batch pads little: the replies run from a few tokens to the 48-token cap."""
    pool = sorted(replay, key=lambda pair: (len(pair[0]) + len(pair[1]), pair))
    groups = [pool[i: i + size] for i in range(0, len(pool) - size + 1, size)]
    if not groups:
        raise ValueError(f"the replay pool has {len(replay)} pairs, fewer than one batch of {size}")
    rng = random.Random(seed)
    while True:
        rng.shuffle(groups)
        yield from groups


def batches(skill: str, replay: list[tuple[str, str]], settings: FineTune) -> list[list[tuple[str, str]]]:
    """The training batches in order: skill batches, with a replay batch after every ``replay_every``."""
    data = examples(skill, settings.steps * settings.batch, "train", settings.seed)
    rehearse = replay_batches(replay, settings.batch, settings.seed)
    out = []
    for step in range(settings.steps):
        out.append(data[step * settings.batch: (step + 1) * settings.batch])
        if settings.replay_every and (step + 1) % settings.replay_every == 0:
            out.append(next(rehearse))
    return out


def fine_tune(base: Path, skill: str, out: Path, settings: FineTune, replay: list[tuple[str, str]],
              log=print) -> Path:
    """Train a copy of ``base`` on ``skill`` (rehearsing ``replay``); write a plain HF checkpoint at ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(settings.seed)
    tok = AutoTokenizer.from_pretrained(str(base))
    encoder = ChatEncoder(tok)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.train()
    plan = batches(skill, replay, settings)
    total = len(plan)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0, betas=(0.9, 0.95), fused=True)

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - settings.warmup) / max(1, total - settings.warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    started = time.perf_counter()
    for step, pairs in enumerate(plan):
        ids, labels = encoder.batch(pairs)
        hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
        target = labels[:, 1:]
        keep = target != -100
        logits = model.lm_head(hidden[keep])
        loss = torch.nn.functional.cross_entropy(logits.float(), target[keep])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % 10 == 0 or step + 1 == total:
            log(f"  fine-tuning {skill}: step {step + 1}/{total}, loss {loss.item():.3f}, "
                f"{time.perf_counter() - started:.0f} s")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    for name in ("chat_template.jinja", "generation_config.json"):
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
    return out
