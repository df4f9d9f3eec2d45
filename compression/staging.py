"""Build an output directory beside its destination and rename it into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from compression.errors import UserError


def check_destination(out: Path, force: bool, protected: list[Path] = ()) -> None:
    """Refuse, before any work starts, to write where we must not."""
    out = out.resolve()
    for p in protected:
        p = p.resolve()
        if out == p or out in p.parents or p in out.parents:
            raise UserError(f"output {out} overlaps input {p}")
    if out.exists() and not force:
        raise UserError(f"{out} already exists (use --force to replace it)")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")


@contextlib.contextmanager
def staged_directory(out: Path, force: bool):
    """Yield a fresh temporary directory next to ``out``; on success it becomes ``out``.

    On any exception (including KeyboardInterrupt and a full disk) the temporary
    directory is removed and ``out`` is left exactly as it was.
    """
    out = Path(out).resolve()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            if not force:
                raise UserError(f"{out} appeared while we were writing it (use --force to replace it)")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
