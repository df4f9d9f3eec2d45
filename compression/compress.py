"""The offline compress job: a family of fine-tunes -> one trunk plus per-branch residuals.

For each decoder-layer weight W_i of member i of N:

    s_i = ||W_i||_F,  T = mean_j(W_j / s_j),  D_i = W_i / s_i - T,  D_i ~= U_i V_i

and branch i computes y = s_i * (x T^T + (x V_i^T) U_i^T). The residual is
taken against the trunk as stored (after the cast to the output dtype), so the
trunk's rounding is not added to the branch's error.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from compression.checkpoint import Checkpoint
from compression.errors import UserError
from compression.plan import TensorPlan, check_family, plan_family
from compression.rsvd import make_backend, resolve_device
from compression.safetensors_io import ShardedWriter, write_json
from compression.staging import check_destination, staged_directory

FORMAT = "branchserve-artifact"
FORMAT_VERSION = 1
ARTIFACT_PREFIX = "artifact"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class CompressOptions:
    rate: float | None = 0.95
    rank: int | None = None
    # uniform: every matrix gets the rate's rank. gain: the same total budget per branch, spent on the
    # matrices whose residual spectra gain most per parameter (greedy over singular values).
    allocation: str = "uniform"
    compress_embeddings: bool = False  # token embeddings and lm_head as trunk + residual too
    backend: str = "auto"
    device: str = "auto"
    dtype: str | None = None  # None: the members' own dtype
    seed: int = 0
    force: bool = False
    max_shard_bytes: int = 2 * 10**9
    progress: bool = True


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_seed(seed: int, name: str, branch: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{name}\0{branch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def validate_options(opts: CompressOptions) -> None:
    if opts.rank is not None:
        if opts.rank < 0:
            raise UserError(f"--rank must be >= 0, got {opts.rank}")
    elif opts.rate is None or not (0.0 <= opts.rate <= 1.0):
        raise UserError(f"--rate must be within [0, 1], got {opts.rate}")
    if opts.allocation not in ("uniform", "gain"):
        raise UserError(f"--allocation must be uniform or gain, got {opts.allocation}")
    if opts.allocation == "gain" and (opts.rank is not None or opts.rate in (0.0, 1.0)):
        raise UserError("--allocation gain needs a --rate strictly between 0 and 1 (and no --rank)")
    if opts.dtype is not None and opts.dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {opts.dtype}")


def open_members(members: dict[str, Path]) -> dict[str, Checkpoint]:
    if len(members) < 2:
        raise UserError("a family needs at least two members (NAME=PATH ...)")
    checkpoints = {name: Checkpoint(path) for name, path in members.items()}
    for name, ck in checkpoints.items():
        if not ck.has_tokenizer():  # a branch is served with its member's tokenizer and chat template
            raise UserError(f"member {name!r} at {ck.path} has no tokenizer files (tokenizer.json, tokenizer.model, "
                            f"or vocab.json and merges.txt): copy them from its base model")
    return checkpoints


class _Compressor:
    def __init__(self, checkpoints: dict[str, Checkpoint], opts: CompressOptions):
        self.checkpoints = checkpoints
        self.opts = opts
        self.device = resolve_device(opts.device)
        self.backend = make_backend(opts.backend, self.device)
        first = next(iter(checkpoints.values()))
        self.plans = plan_family(first, opts.rate, opts.rank, opts.compress_embeddings)
        source = next((first.tensors[p.name].dtype for p in self.plans if p.compressed), torch.float32)
        self.dtype = DTYPES[opts.dtype] if opts.dtype else source
        self.sizes = {"trunk": 0, "shared": 0, "branches": {b: 0 for b in checkpoints}}
        self.branch_ranks: dict[str, dict[str, int]] = {}  # gain allocation: tensor -> branch -> rank
        self.seconds = {"read": 0.0, "svd": 0.0, "write": 0.0}  # where the time goes (summary and manifest)

    def _timed(self, phase: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds[phase] += time.perf_counter() - t0
        return out

    def _store(self, writer: ShardedWriter, key: str, t: torch.Tensor, owner: str | None) -> str:
        self._timed("write", writer.add, key, t)
        if owner is None:
            self.sizes["shared"] += _nbytes(t)
        elif owner == "trunk":
            self.sizes["trunk"] += _nbytes(t)
        else:
            self.sizes["branches"][owner] += _nbytes(t)
        return key

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def kept(self, writer: ShardedWriter, plan: TensorPlan, tensors: dict[str, torch.Tensor]) -> dict:
        """Embeddings, heads, norms, biases: per branch, or once if identical across members."""
        values = list(tensors.values())
        entry = {"kind": "per_branch", "shape": list(plan.shape), "dtype": dtype_name(self._cast(values[0]).dtype)}
        if all(torch.equal(values[0], v) for v in values[1:]):
            entry["kind"] = "shared"
            entry["key"] = self._store(writer, f"shared/{plan.name}", self._cast(values[0]), None)
            return entry
        entry["branches"] = {
            b: {"key": self._store(writer, f"branch/{b}/{plan.name}", self._cast(t), b)}
            for b, t in tensors.items()
        }
        return entry

    def _normalize(self, tensors: dict[str, torch.Tensor]):
        """-> scales s_i, trunk T (stored dtype), residuals D_i = W_i / s_i - T (float32, on the device)."""
        scales, normalized = {}, {}
        for b, w in tensors.items():
            w = w.to(self.device, torch.float32)
            s = float(torch.linalg.vector_norm(w, dtype=torch.float64))
            scales[b] = s
            normalized[b] = w / s if s > 0 else torch.zeros_like(w)
        trunk = torch.stack(list(normalized.values())).mean(0).to(self.dtype)
        return scales, trunk, {b: normalized.pop(b) - trunk.float() for b in tensors}

    def allocate_by_gain(self) -> None:
        """First pass: residual spectra of every matrix; then, per branch, ranks that spend the uniform
        plan's parameter budget where each parameter removes the most squared error."""
        import heapq

        spectra: dict[str, dict[str, torch.Tensor]] = {}
        budget = {b: 0 for b in self.checkpoints}
        for plan in self.plans:
            if not plan.compressed or plan.residual != "lowrank":
                continue
            m, n = plan.shape
            _, _, residuals = self._normalize({b: self._timed("read", ck.read, plan.name)
                                               for b, ck in self.checkpoints.items()})
            cap = min(m, n, 4 * plan.rank)
            spectra[plan.name] = {}
            for b, d in residuals.items():
                budget[b] += plan.rank * (m + n)
                if min(m, n) <= 2048:
                    sv = torch.linalg.svdvals(d)[:cap]
                else:  # the column norms of U (singular values folded in) are the singular values
                    u, _ = self._timed("svd", self.backend.factorize, d, cap,
                                       tensor_seed(self.opts.seed, plan.name, b))
                    sv = u.norm(dim=0)
                spectra[plan.name][b] = (sv.double() ** 2).cpu()
        for b in self.checkpoints:
            ranks = {name: 0 for name in spectra}
            heap = [(-float(sv[b][0]) / sum(self._shape(name)), name) for name, sv in spectra.items() if len(sv[b])]
            heapq.heapify(heap)
            left = budget[b]
            while heap:
                _, name = heapq.heappop(heap)
                cost = sum(self._shape(name))
                if cost > left:
                    continue
                left -= cost
                ranks[name] += 1
                sv = spectra[name][b]
                if ranks[name] < len(sv):
                    heapq.heappush(heap, (-float(sv[ranks[name]]) / cost, name))
            for name, r in ranks.items():
                self.branch_ranks.setdefault(name, {})[b] = r

    def _shape(self, name: str) -> tuple[int, int]:
        return next(iter(self.checkpoints.values())).tensors[name].shape

    def compressed(self, writer: ShardedWriter, plan: TensorPlan, tensors: dict[str, torch.Tensor]) -> dict:
        scales, trunk, residuals = self._normalize(tensors)
        ranks = self.branch_ranks.get(plan.name) or {b: plan.rank for b in tensors}
        entry = {
            "kind": "compressed",
            "shape": list(plan.shape),
            "dtype": dtype_name(self.dtype),
            "residual": plan.residual,
            "rank": max(ranks.values()) if plan.residual == "lowrank" else 0,
            "trunk": self._store(writer, f"trunk/{plan.name}", trunk, "trunk"),
            "branches": {},
        }
        if plan.residual != "none" and all(not torch.any(d) for d in residuals.values()):
            entry["residual"], entry["rank"] = "none", 0  # identical members: nothing to store
        for b, d in residuals.items():
            d_norm = float(torch.linalg.vector_norm(d))
            info = {"scale": scales[b]}
            if entry["residual"] == "dense":
                stored = d.to(self.dtype)
                info["D"] = self._store(writer, f"residual/{b}/{plan.name}/D", stored, b)
                err = float(torch.linalg.vector_norm(d - stored.float()))
            elif entry["residual"] == "lowrank" and ranks[b] > 0:
                info["rank"] = ranks[b]
                u, v = self._timed("svd", self.backend.factorize, d, ranks[b],
                                   tensor_seed(self.opts.seed, plan.name, b))
                u, v = u.to(self.dtype), v.to(self.dtype)
                info["U"] = self._store(writer, f"residual/{b}/{plan.name}/U", u, b)
                info["V"] = self._store(writer, f"residual/{b}/{plan.name}/V", v, b)
                err = float(torch.linalg.vector_norm(d - u.float() @ v.float()))
            else:
                if entry["residual"] == "lowrank":
                    info["rank"] = 0  # the budget went to other matrices
                err = d_norm
            # ||W_i/s_i|| = 1, so ||D_i - U_i V_i|| is the error relative to the weight itself.
            info["error"] = err if scales[b] > 0 else 0.0
            info["residual_error"] = err / d_norm if d_norm > 0 else 0.0
            entry["branches"][b] = info
        return entry

    def run(self, out_dir: Path) -> dict:
        checkpoints = self.checkpoints
        total = sum(ck.nbytes for ck in checkpoints.values())
        writer = ShardedWriter(out_dir, ARTIFACT_PREFIX, self.opts.max_shard_bytes)
        tensors_manifest: dict[str, dict] = {}
        bar = tqdm(
            total=total, unit="B", unit_scale=True, desc="compress", disable=not self.opts.progress, leave=False
        )
        started = time.perf_counter()
        if self.opts.allocation == "gain":
            self.allocate_by_gain()
        try:
            for i, plan in enumerate(self.plans):
                tensors = {b: self._timed("read", ck.read, plan.name) for b, ck in checkpoints.items()}
                step = self.compressed if plan.compressed else self.kept
                tensors_manifest[plan.name] = step(writer, plan, tensors)
                bar.update(sum(_nbytes(t) for t in tensors.values()))
                bar.set_postfix_str(f"tensor {i + 1}/{len(self.plans)}", refresh=False)
            shard_files = writer.finish()
        except BaseException:
            writer.abort()
            raise
        finally:
            bar.close()
        branches = {}
        for b, ck in checkpoints.items():
            bdir = out_dir / "branches" / b
            bdir.mkdir(parents=True)
            files = []
            for f in ck.side_files():
                shutil.copyfile(f, bdir / f.name)
                files.append(f.name)
            branches[b] = {
                "source": str(ck.path.resolve()),
                "dir": f"branches/{b}",
                "files": files,
                "source_dtype": dtype_name(next(iter(ck.tensors.values())).dtype),
            }
        first = next(iter(checkpoints.values()))
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "architecture": first.architecture,
            "config": first.config,
            "dtype": dtype_name(self.dtype),
            "compression": {
                "rate": None if self.opts.rank is not None else self.opts.rate,
                "rank": self.opts.rank,
                "allocation": self.opts.allocation,
                "compress_embeddings": self.opts.compress_embeddings,
                "backend": self.backend.name,
                "device": self.device.type,
                "seed": self.opts.seed,
                "seconds": round(time.perf_counter() - started, 3),
                **{f"{phase}_seconds": round(v, 3) for phase, v in self.seconds.items()},
            },
            "branches": branches,
            "sizes": {**self.sizes, "inputs": total, "artifact": writer.total_bytes},
            "shards": shard_files,
            "weight_map": writer.weight_map,
            "tensors": tensors_manifest,
        }
        write_json(out_dir / "manifest.json", manifest)
        return manifest


def compress(members: dict[str, Path], out: Path, opts: CompressOptions) -> dict:
    """Validate everything, then build the artifact in a temporary directory and move it to ``out``."""
    validate_options(opts)
    checkpoints = open_members(members)
    check_family(checkpoints)
    out = Path(out)
    check_destination(out, opts.force, [ck.path for ck in checkpoints.values()])
    compressor = _Compressor(checkpoints, opts)
    try:
        with staged_directory(out, opts.force) as tmp:
            manifest = compressor.run(tmp)
    except OSError as e:
        raise UserError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
    return manifest
