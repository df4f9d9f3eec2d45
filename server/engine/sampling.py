"""Sampling for a whole batch at once.

Temperature, top-k and top-p are applied to every sampled row in one pass (one
sort for the batch), and the draw is an exponential race: argmax(p / E) with
E ~ Exp(1) picks token i with probability p_i, and needs no ``multinomial``.
A request with a seed draws its E from its own generator, so its tokens
reproduce whatever the neighbours; the others share one draw.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


MAX_LOGPROBS = 20
LOGPROB_FLOOR = -9999.0  # what a token the constraint forbids reports (JSON has no -inf)


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: int | None = None  # None: off; n >= 0: the sampled token's logprob and the n most likely
    grammar: object | None = None  # a structured.Compiled: decoding is constrained to it
    ignore_eos: bool = False  # the model's end-of-turn tokens do not end the sequence (stop_token_ids still do)
    min_tokens: int = 0  # before this many tokens: no end-of-turn or stop token is sampled, no stop string ends it

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError("min_tokens must be between 0 and max_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_LOGPROBS}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's own generator when it has a seed; None: it shares the batch's draw."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                  ) -> torch.Tensor:
    """logits (B, V) fp32; per row: temperature (B,), top_k (B,) with 0 for off, top_p (B,) -> masked logits."""
    logits = logits / temperature[:, None]
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    rank = torch.arange(vocab, device=logits.device)[None, :]
    drop = rank >= k[:, None]  # outside the top k
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    # Keep the smallest prefix whose mass reaches top_p, and always the top token (a top_p that rounds to 0 in
    # fp32, 1e-300 say, would otherwise drop every token).
    drop |= (probs.cumsum(dim=-1) - probs >= top_p[:, None]) & (rank > 0)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> list[int]:
    """logits (B, V) -> one token per row: greedy rows by argmax, the others in one batched draw; one
    device sync at the end."""
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        dev = logits.device
        rows = [params[i] for i in sampled]
        filtered = filter_logits(
            logits[torch.tensor(sampled, device=dev)].float(),
            torch.tensor([p.temperature for p in rows], device=dev),
            torch.tensor([p.top_k for p in rows], device=dev),
            torch.tensor([p.top_p for p in rows], device=dev))
        probs = filtered.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_()  # one draw for the rows without a seed
        for j, i in enumerate(sampled):
            if generators[i] is not None:
                race[j].exponential_(generator=generators[i])
        tokens[torch.tensor(sampled, device=dev)] = (probs / race).argmax(dim=-1)
    return tokens.tolist()


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], top: list[int]
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each of ``rows``: (the logprob of its sampled token, its ``top[j]`` most likely (id, logprob)), from
    the distribution the token was drawn from before temperature and top-p: the model's, after any constraint.
    One device sync."""
    dev = logits.device
    lp = logits[torch.tensor(rows, device=dev)].float().log_softmax(dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=dev))[:, 0]
    k = max(top)
    best = lp.topk(k, dim=-1) if k else None
    chosen = chosen.clamp(min=LOGPROB_FLOOR).tolist()
    values = best.values.clamp(min=LOGPROB_FLOOR).tolist() if k else [[] for _ in rows]
    ids = best.indices.tolist() if k else [[] for _ in rows]
    return [(chosen[j], list(zip(ids[j][:top[j]], values[j][:top[j]]))) for j in range(len(rows))]


def forbid_stops(logits: torch.Tensor, rows: list[int], ids: list[list[int]]) -> torch.Tensor:
    """``logits`` with each of ``rows`` unable to sample its ``ids`` (min_tokens: a sequence's stop tokens,
    until it has that many). The indices go to the device without a sync."""
    flat_rows = [r for r, row_ids in zip(rows, ids) for _ in row_ids]
    flat_ids = [t for row_ids in ids for t in row_ids]
    if not flat_ids:
        return logits
    device = logits.device
    index = torch.tensor([flat_rows, flat_ids], dtype=torch.long)
    index = index.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else index
    return logits.index_put((index[0], index[1]), torch.tensor(float("-inf"), device=device, dtype=logits.dtype))
