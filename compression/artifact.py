"""Read a compressed artifact lazily: trunk, per-branch residual factors and own tensors.

Residuals are handed out as factors and never densified here, except by
``dense_weight``, which export uses to rebuild a branch's plain checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from compression.compress import FORMAT, FORMAT_VERSION
from compression.errors import UserError
from compression.safetensors_io import TensorInfo, read_header, read_tensor


@dataclass(frozen=True)
class Residual:
    """One branch's residual for one matrix: dense ``D``, or low-rank ``U @ V``, or nothing."""

    kind: str  # "dense" | "lowrank" | "none"
    D: torch.Tensor | None = None
    U: torch.Tensor | None = None  # m x r
    V: torch.Tensor | None = None  # r x n


class Artifact:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not self.path.is_dir():
            raise UserError(f"artifact directory not found: {self.path}")
        if not manifest_path.is_file():
            raise UserError(f"{self.path}: not a branchserve artifact (no manifest.json)")
        try:
            self.manifest: dict = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{manifest_path}: unreadable manifest ({e})") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"{self.path}: not a branchserve artifact")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"{self.path}: artifact format version {self.manifest.get('format_version')} "
                f"is not supported (this branchserve reads version {FORMAT_VERSION})"
            )
        self._infos: dict[str, TensorInfo] = {}
        for shard in self.manifest["shards"]:
            infos, _ = read_header(self.path / shard)
            self._infos.update(infos)
        missing = [k for k in self.manifest["weight_map"] if k not in self._infos]
        if missing:
            raise UserError(f"{self.path}: stored tensor {missing[0]!r} is missing from the shards")

    @property
    def config(self) -> dict:
        return self.manifest["config"]

    @property
    def branches(self) -> list[str]:
        return list(self.manifest["branches"])

    @property
    def tensor_names(self) -> list[str]:
        return list(self.manifest["tensors"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.manifest["dtype"])

    def check_branch(self, branch: str) -> None:
        if branch not in self.manifest["branches"]:
            raise UserError(f"unknown branch {branch!r} (this artifact has: {', '.join(self.branches)})")

    def branch_dir(self, branch: str) -> Path:
        self.check_branch(branch)
        return self.path / self.manifest["branches"][branch]["dir"]

    def spec(self, name: str) -> dict:
        return self.manifest["tensors"][name]

    def is_compressed(self, name: str) -> bool:
        return self.spec(name)["kind"] == "compressed"

    def _load(self, key: str) -> torch.Tensor:
        return read_tensor(self._infos[key])

    def trunk(self, name: str) -> torch.Tensor:
        return self._load(self.spec(name)["trunk"])

    def scale(self, branch: str, name: str) -> float:
        return self.spec(name)["branches"][branch]["scale"]

    def residual(self, branch: str, name: str) -> Residual:
        spec = self.spec(name)
        info = spec["branches"][branch]
        if spec["residual"] == "dense":
            return Residual("dense", D=self._load(info["D"]))
        if spec["residual"] == "lowrank" and info.get("rank", spec["rank"]) > 0:
            return Residual("lowrank", U=self._load(info["U"]), V=self._load(info["V"]))
        return Residual("none")

    def own(self, branch: str, name: str) -> torch.Tensor:
        """A tensor kept per branch (embedding, head, norm, bias), or stored once for all."""
        spec = self.spec(name)
        if spec["kind"] == "shared":
            return self._load(spec["key"])
        return self._load(spec["branches"][branch]["key"])

    def dense_weight(self, branch: str, name: str) -> torch.Tensor:
        """Branch's full tensor in the artifact's dtype: s * (T + U V) for compressed matrices."""
        if not self.is_compressed(name):
            return self.own(branch, name)
        w = self.trunk(name).float()
        r = self.residual(branch, name)
        if r.kind == "dense":
            w += r.D.float()
        elif r.kind == "lowrank":
            w += r.U.float() @ r.V.float()
        return (w * self.scale(branch, name)).to(self.dtype)


class SingleCheckpoint:
    """A plain HF checkpoint seen as a one-branch artifact: trunk = W, scale 1, no residual.

    Lets the family model serve an ordinary Llama checkpoint (and benchmarks compare
    it with transformers on the very same weights).
    """

    def __init__(self, path: str | Path, branch: str = "model"):
        from compression.checkpoint import Checkpoint
        from compression.plan import is_compressed

        self.checkpoint = Checkpoint(path)
        self.path = self.checkpoint.path
        self.config = self.checkpoint.config
        self.branches = [branch]
        self.tensor_names = list(self.checkpoint.tensors)
        first = next(iter(self.checkpoint.tensors.values()))
        self.dtype = first.dtype
        self._compressed = {n for n, i in self.checkpoint.tensors.items() if is_compressed(n, i.shape)}

    def check_branch(self, branch: str) -> None:
        if branch not in self.branches:
            raise UserError(f"unknown branch {branch!r} (this checkpoint serves as: {self.branches[0]})")

    def branch_dir(self, branch: str) -> Path:
        return self.path

    def is_compressed(self, name: str) -> bool:
        return name in self._compressed

    def trunk(self, name: str) -> torch.Tensor:
        return self.checkpoint.read(name)

    def scale(self, branch: str, name: str) -> float:
        return 1.0

    def residual(self, branch: str, name: str) -> Residual:
        return Residual("none")

    def own(self, branch: str, name: str) -> torch.Tensor:
        return self.checkpoint.read(name)
