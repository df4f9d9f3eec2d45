"""Planning a compression: which tensor is compressed and with what residual.

Pure functions over names and shapes; no tensor data is touched here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from compression.checkpoint import Checkpoint
from compression.errors import UserError

# A tensor inside a numbered decoder block: model.layers.3.*, transformer.h.3.*, ...
_LAYER = re.compile(r"(^|\.)(layers|h|blocks|block)\.\d+\.")


@dataclass(frozen=True)
class TensorPlan:
    name: str
    shape: tuple[int, ...]
    compressed: bool
    residual: str | None = None  # compressed only: "dense" | "lowrank" | "none"
    rank: int = 0  # lowrank only


EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")


def is_compressed(name: str, shape: tuple[int, ...], embeddings: bool = False) -> bool:
    """Decoder-layer 2-D weights go into the trunk; embeddings, heads, norms and biases stay per branch,
    unless ``embeddings`` asks for the token embeddings and the lm_head to be compressed too."""
    if embeddings and name in EMBEDDINGS and len(shape) == 2:
        return True
    return len(shape) == 2 and name.endswith("weight") and _LAYER.search(name) is not None


def rank_for_rate(m: int, n: int, rate: float) -> int:
    """r = floor((1 - rate) * m * n / (m + n)): the residual gets (1 - rate) of the matrix's parameters."""
    # Rounded before the floor so that e.g. rate 0.95 is not undone by 0.05000000000000004.
    return math.floor(round((1.0 - rate) * m * n / (m + n), 9))


def plan_tensor(name: str, shape: tuple[int, ...], rate: float | None, rank: int | None,
                embeddings: bool = False) -> TensorPlan:
    if not is_compressed(name, shape, embeddings):
        return TensorPlan(name, shape, compressed=False)
    m, n = shape
    if rank is not None:
        r = min(rank, m, n)
    elif rate == 0:
        return TensorPlan(name, shape, True, "dense")
    elif rate == 1:
        r = 0
    else:
        r = min(rank_for_rate(m, n, rate), m, n)
    if r == 0:
        return TensorPlan(name, shape, True, "none")
    return TensorPlan(name, shape, True, "lowrank", r)


def check_family(members: dict[str, Checkpoint]) -> None:
    """All members must share architecture, vocabulary and every tensor's name and shape."""
    items = list(members.items())
    first_name, first = items[0]
    for name, ck in items[1:]:
        if ck.architecture != first.architecture:
            raise UserError(
                f"architecture differs: {first_name} is {first.architecture}, {name} is {ck.architecture}"
            )
        if ck.vocab_size != first.vocab_size:
            raise UserError(
                f"vocabulary differs: {first_name} has vocab_size {first.vocab_size}, {name} has {ck.vocab_size}"
            )
        for t in first.tensors:
            if t not in ck.tensors:
                raise UserError(f"tensor {t} is in {first_name} but not in {name}")
        for t, info in ck.tensors.items():
            if t not in first.tensors:
                raise UserError(f"tensor {t} is in {name} but not in {first_name}")
            if info.shape != first.tensors[t].shape:
                raise UserError(
                    f"shape of {t} differs: {first_name} has {list(first.tensors[t].shape)}, "
                    f"{name} has {list(info.shape)}"
                )


def plan_family(first: Checkpoint, rate: float | None, rank: int | None, embeddings: bool = False
                ) -> list[TensorPlan]:
    return [plan_tensor(name, info.shape, rate, rank, embeddings) for name, info in first.tensors.items()]
