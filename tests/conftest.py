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


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(self, app):
        import threading

        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def wait_ready(self, timeout: float = 60) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise TimeoutError("server did not become ready")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(config) -> LiveServer:
    """The app as `branchserve serve` builds it (preflight, engine, router, pipelines), on a loopback port."""
    from server.api.app import build_app
    from server.serve import build_engine, preflight, router_factory

    pipelines = preflight(config)
    server = LiveServer(build_app(config, lambda: build_engine(config), router_factory(config, pipelines), pipelines))
    server.wait_ready()
    return server


def run_rows(model, ids, start, seqs, branches, head=True):
    """One family-model step as a runner makes it, without a runner: rows ``ids`` (token lists of equal length)
    at positions start[i].. of sequence seqs[i], for branches[i]. Sequence s owns a fixed block table, blocks
    s * 8 .. s * 8 + 7 (128 positions), of a cache allocated here on first use. One-token rows must come
    first (decode rows) -> logits (B, L, V), or final hidden states (B, L, H) with ``head=False``."""
    import torch

    from server.engine.kv_cache import BLOCK_SIZE, StepBatch
    from server.engine.model import row_groups, single_branch

    per_seq = 8
    if not model.k_cache:
        model.allocate_cache(per_seq * 8)
    tables = {s: list(range(s * per_seq, (s + 1) * per_seq)) for s in set(seqs)}
    decode_rows = sum(1 for row in ids if len(row) == 1)
    batch = StepBatch([(tables[s], p, len(row)) for row, s, p in zip(ids, seqs, start)], decode_rows, BLOCK_SIZE,
                      model.cfg.num_heads, model.cfg.num_kv_heads, model.dtype, model.device)
    tokens = [t for row in ids for t in row]
    per_token = [b for row, b in zip(ids, branches) for _ in row]
    single = single_branch(per_token)
    out = model(torch.tensor(tokens, device=model.device), torch.tensor(per_token, device=model.device), batch,
                single=single, groups=row_groups(per_token, model.device) if single is None else None,
                last_branches=None, head=head)
    return out.view(len(ids), len(ids[0]), -1)
