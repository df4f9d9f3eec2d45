"""Rebuild one branch as a standard Hugging Face checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm import tqdm

from compression.artifact import Artifact
from compression.errors import UserError
from compression.safetensors_io import ShardedWriter, write_json
from compression.staging import check_destination, staged_directory


def export_branch(
    artifact_dir: Path, branch: str, out: Path, force: bool = False, max_shard_bytes: int = 5 * 10**9, progress: bool = True
) -> Path:
    artifact = Artifact(artifact_dir)
    artifact.check_branch(branch)
    out = Path(out)
    check_destination(out, force, [artifact.path])
    try:
        with staged_directory(out, force) as tmp:
            writer = ShardedWriter(tmp, "model", max_shard_bytes)
            try:
                for name in tqdm(artifact.tensor_names, desc=f"export {branch}", disable=not progress, leave=False):
                    writer.add(name, artifact.dense_weight(branch, name))
                writer.finish()
            except BaseException:
                writer.abort()
                raise
            src = artifact.branch_dir(branch)
            for f in artifact.manifest["branches"][branch]["files"]:
                if f == "config.json":
                    continue
                shutil.copyfile(src / f, tmp / f)
            config = json.loads((src / "config.json").read_text())
            # The weights are now in the artifact's dtype; say so under both spellings.
            for key in ("torch_dtype", "dtype"):
                if key in config:
                    config[key] = artifact.manifest["dtype"]
            write_json(tmp / "config.json", config)
    except OSError as e:
        raise UserError(f"writing {out} failed: {e.strerror or e}; nothing was written") from None
    return out
