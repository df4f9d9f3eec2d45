"""A local Hugging Face checkpoint directory, read lazily one tensor at a time."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from compression.errors import UserError
from compression.safetensors_io import TensorInfo, read_header, read_tensor

# Non-weight files a branch needs to be served or exported: config, generation
# settings, tokenizer and chat template. Copied verbatim, never interpreted here.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


class Checkpoint:
    """Headers of every safetensors file in an HF directory; tensors are read on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise UserError(f"checkpoint directory not found: {self.path}")
        if not self.path.is_dir():
            raise UserError(f"not a checkpoint directory: {self.path}")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise UserError(f"{self.path}: no config.json (expected a Hugging Face checkpoint directory)")
        try:
            self.config: dict = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{config_path}: unreadable config ({e})") from None
        self.tensors: dict[str, TensorInfo] = {}
        for file in self._weight_files():
            infos, _ = read_header(file)
            for name, info in infos.items():
                if name in self.tensors:
                    raise UserError(f"{self.path}: tensor {name!r} appears in two files")
                self.tensors[name] = info
        if not self.tensors:
            raise UserError(f"{self.path}: the safetensors files hold no tensors")

    def _weight_files(self) -> list[Path]:
        index_path = self.path / "model.safetensors.index.json"
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (OSError, json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{index_path}: unreadable safetensors index") from None
            files = []
            for name in dict.fromkeys(weight_map.values()):
                file = self.path / name
                if not file.is_file():
                    raise UserError(f"{self.path}: shard {name} named in the index is missing")
                files.append(file)
            return files
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.path.glob("*.bin")] + [p.name for p in self.path.glob("*.pt")]
            hint = f" (found {pickled[0]}; pickle checkpoints are not read, convert them to safetensors)" if pickled else ""
            raise UserError(f"{self.path}: no *.safetensors weights{hint}")
        return files

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or ["?"]
        return f"{self.config.get('model_type', '?')}/{archs[0]}"

    @property
    def vocab_size(self):
        return self.config.get("vocab_size")

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self.tensors[name])

    def has_tokenizer(self) -> bool:
        """A tokenizer transformers can load: tokenizer.json, a sentencepiece model, or BPE vocab and merges."""
        have = {p.name for p in self.side_files()}
        return "tokenizer.json" in have or "tokenizer.model" in have or {"vocab.json", "merges.txt"} <= have

    def side_files(self) -> list[Path]:
        return [self.path / f for f in SIDE_FILES if (self.path / f).is_file()]

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self.tensors.values())
