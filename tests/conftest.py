import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from compression.synthetic import build_family

ROOT = Path(__file__).resolve().parent.parent
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> dict[str, Path]:
    """Three untied fp32 members of one base; the second is sharded."""
    root = tmp_path_factory.mktemp("family")
    return build_family(root, ["math", "code", "chat"], shards={"code": 3}, seed=1)


@pytest.fixture(scope="session")
def tied_family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tied")
    return build_family(root, ["a", "b"], tied=True, seed=2)


def member_args(members: dict[str, Path]) -> list[str]:
    return [f"{name}={path}" for name, path in members.items()]


def run_cli(*args, **kwargs) -> subprocess.CompletedProcess:
    """Run the real console entry point in a child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *map(str, args)],
        capture_output=True, text=True, env=env, timeout=600, **kwargs,
    )
