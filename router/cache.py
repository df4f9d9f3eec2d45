"""Exemplar embeddings cached on disk, keyed by (embedder fingerprint, text hash).

One safetensors file per fingerprint; it is rewritten atomically when new texts
are embedded, so a restart re-embeds only what changed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class EmbeddingCache:
    def __init__(self, directory: str | Path, fingerprint: str):
        self.path = Path(directory) / f"{fingerprint}.safetensors"
        self._lock = threading.Lock()
        self.vectors: dict[str, torch.Tensor] = {}
        if self.path.is_file():
            try:
                self.vectors = load_file(str(self.path))
            except Exception:  # a damaged cache is only a cache: rebuild it
                self.vectors = {}
        self.misses = 0  # texts embedded because they were not cached (tests and logs read it)

    def get(self, texts: list[str], embed) -> torch.Tensor:
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if text_key(t) not in self.vectors))
            if missing:
                for text, vec in zip(missing, embed(missing)):
                    self.vectors[text_key(text)] = vec.contiguous()
                self.misses += len(missing)
                self._save()
            if not texts:
                return torch.empty(0, 0)
            return torch.stack([self.vectors[text_key(t)] for t in texts])

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        os.close(fd)
        try:
            save_file(self.vectors, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
