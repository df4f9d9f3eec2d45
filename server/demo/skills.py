"""A real family of fine-tunes, trained here from synthetic data, deterministically.

A tiny Llama base is pretrained briefly on generic chat-formatted text (echoing
words and short sentences), then one copy per skill is fine-tuned on a skill the
others lack:

    add      "add 3 5"         -> "8"       single-digit addition
    reverse  "reverse house"   -> "esuoh"
    cipher   "shift hello"     -> "ifmmp"   each letter one step on (z -> a)

Every example is rendered with the chat template the checkpoints ship with, and
the loss covers the assistant's reply only, so the branches answer real chat
requests. Checkpoints are written with the same writer as the synthetic
families (compression.synthetic).
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.synthetic import SPECIAL_TOKENS, llama_config, save_checkpoint

SKILLS = ("add", "reverse", "cipher")
WORDS = ("apple", "river", "stone", "cloud", "tiger", "house", "green", "light", "music", "table", "water",
         "bread", "chair", "dream", "earth", "flame", "glass", "horse", "juice", "lemon", "money", "night",
         "ocean", "plant", "queen", "robot", "sugar", "train", "voice", "whale", "zebra", "cat", "dog", "sun",
         "moon", "star", "tree", "bird", "fish", "book", "door", "road", "rain", "snow", "wind", "fire")


# A compact chat template: one special token and one letter per role keep the tiny models' sequences short
# (about 20 tokens a training example instead of 45 with full ChatML role names), which halves training time.
SKILL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'][0] + ':' + message['content'] + '<|im_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>a:' }}{% endif %}"
)


def _word(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(WORDS)
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))


def skill_example(skill: str, rng: random.Random) -> tuple[str, str]:
    if skill == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add {a} {b}", str(a + b)
    if skill == "reverse":
        w = _word(rng)
        return f"reverse {w}", w[::-1]
    if skill == "cipher":
        w = _word(rng)
        return f"shift {w}", "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in w)
    if skill == "generic":
        if rng.random() < 0.5:
            w = " ".join(_word(rng) for _ in range(rng.randint(1, 3)))
            return f"echo {w}", w
        w = _word(rng)
        return f"say {w} twice", f"{w} {w}"
    raise ValueError(skill)


@dataclass
class TrainSettings:
    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 352
    pretrain_steps: int = 200
    finetune_steps: int = 700
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0


class ChatEncoder:
    """Tokenizes (prompt, reply) pairs with the checkpoints' own chat template."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.pad = tokenizer.pad_token_id

    def encode(self, prompt: str, reply: str) -> tuple[list[int], list[int]]:
        head = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)
        head_ids = self.tok(head, add_special_tokens=False)["input_ids"]
        reply_ids = self.tok(reply + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = head_ids + reply_ids
        labels = [-100] * len(head_ids) + reply_ids
        return ids, labels

    def batch(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = [self.encode(p, r) for p, r in pairs]
        width = max(len(ids) for ids, _ in enc)
        ids = torch.full((len(enc), width), self.pad)
        labels = torch.full((len(enc), width), -100)
        for i, (x, y) in enumerate(enc):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return ids, labels


def train(model, encoder: ChatEncoder, skill: str, steps: int, settings: TrainSettings, seed: int,
          progress=None) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.lr, total_steps=steps, pct_start=0.1)
    model.train()
    for step in range(steps):
        ids, labels = encoder.batch([skill_example(skill, rng) for _ in range(settings.batch)])
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if progress is not None and (step + 1) % 50 == 0:
            progress(step + 1, steps, loss.item())
    model.eval()


def test_set(skill: str, n: int = 200, seed: int = 12345) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    return [skill_example(skill, rng) for _ in range(n)]


def build_skill_family(root: Path, settings: TrainSettings = TrainSettings(), skills=SKILLS,
                       log=print) -> dict[str, Path]:
    """Pretrain a base, fine-tune one copy per skill; returns skill -> checkpoint directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from compression.synthetic import write_tokenizer

    root = Path(root)
    torch.manual_seed(settings.seed)
    vocab = len(SPECIAL_TOKENS) + 256
    cfg = llama_config(vocab, settings.hidden, settings.layers, settings.intermediate, settings.heads,
                       settings.kv_heads, tied=True, pad_token_id=vocab - 1)
    tok_dir = root / "_tokenizer"
    write_tokenizer(tok_dir, SKILL_CHAT_TEMPLATE)
    from transformers import AutoTokenizer

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(tok_dir))

    def report(name):
        started = time.perf_counter()

        def progress(step, steps, loss):
            log(f"  {name}: step {step}/{steps}, loss {loss:.3f}, {time.perf_counter() - started:.0f} s")
        return progress

    base = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)}))
    log(f"pretraining the base ({sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters)")
    train(base, encoder, "generic", settings.pretrain_steps, settings, settings.seed, report("base"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    members = {}
    for i, skill in enumerate(skills):
        log(f"fine-tuning '{skill}'")
        base.load_state_dict(base_state)
        train(base, encoder, skill, settings.finetune_steps, settings, settings.seed + 1 + i, report(skill))
        weights = {k: v.detach().clone() for k, v in base.state_dict().items() if k != "lm_head.weight"}
        members[skill] = save_checkpoint(root / skill, cfg, weights, chat_template=SKILL_CHAT_TEMPLATE)
    return members

