"""`branchserve serve` as a process: config errors exit 2 before the port opens; SIGTERM exits cleanly."""

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from compression.compress import CompressOptions, compress
from server.cli import main
from tests.conftest import ROOT, free_port, run_cli


@pytest.fixture(scope="module")
def artifact(family, tmp_path_factory):
    out = tmp_path_factory.mktemp("serve") / "art"
    compress(family, out, CompressOptions(rate=1, progress=False))
    return out


def write(tmp_path, data) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return str(path)


@pytest.mark.parametrize("data,expect", [
    ({"families": [{"artifact": "x", "colour": "red"}]}, "unknown key 'families.0.colour'"),
    ({"familes": []}, "unknown key 'familes'"),
    ({"families": [{"device": "cpu"}]}, "missing key 'families.0.artifact'"),
    ({}, "serves no model"),
    ("families: [unclosed", "not valid YAML"),
    ({"families": [{"artifact": "missing-dir"}]}, "artifact directory not found"),
    ({"limits": {"max_batch": 0}, "families": [{"artifact": "a"}]}, "limits.max_batch"),
])
def test_bad_config_exits_2_with_one_line(tmp_path, capsys, data, expect):
    code = main(["serve", "--config", write(tmp_path, data)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert expect in err


def test_config_errors_name_their_line(tmp_path, capsys):
    path = write(tmp_path, "families:\n  - artifact: a\n    colour: red\n")
    assert main(["serve", "--config", path]) == 2
    assert capsys.readouterr().err == f"error: {path}:3: unknown key 'families.0.colour'\n"
    path = write(tmp_path, "limits:\n  max_batch: 1\n  queue_size: [\n")
    assert main(["serve", "--config", path]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}:4: not valid YAML")


def test_unknown_branch_in_config(tmp_path, capsys, artifact):
    data = {"families": [{"artifact": str(artifact), "branches": {"x": "nobody"}}]}
    assert main(["serve", "--config", write(tmp_path, data)]) == 2
    assert "unknown branch 'nobody'" in capsys.readouterr().err


def test_a_port_in_use_exits_2_before_anything_loads(tmp_path, capsys, artifact):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data = {"families": [{"artifact": str(artifact)}]}
        assert main(["serve", "--config", write(tmp_path, data), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err == f"error: cannot listen on 127.0.0.1:{port}: the port is in use\n" and "branchserve:" not in out


def test_a_model_that_fails_to_load_exits_2_before_the_port_opens(tmp_path, capsys, artifact):
    """Preflight cannot see everything (here: an artifact whose branch lost its tokenizer); loading happens
    before the port opens, so the failure is one line and exit 2, not a server stuck at 503."""
    import shutil
    import socket

    broken = tmp_path / "art"
    shutil.copytree(artifact, broken)
    for f in broken.rglob("tokenizer*"):
        f.unlink()
    port = free_port()
    data = {"families": [{"artifact": str(broken)}]}
    assert main(["serve", "--config", write(tmp_path, data), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: loading the models failed: ") and err.count("\n") == 1, err
    assert "branchserve:" not in out
    with socket.socket() as s:  # nothing listens
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_sigterm_shuts_down_cleanly(tmp_path, artifact):
    port = free_port()
    config = write(tmp_path, {"families": [{"artifact": str(artifact)}], "shutdown_grace_s": 20})
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", config, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        # A stream in flight when SIGTERM arrives still finishes within the grace period.
        body = {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                "temperature": 0, "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            first = next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert first.startswith("data: ") and rest[-1] == "data: [DONE]"
        assert '"finish_reason": "length"' in rest[-2]
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert f"http://127.0.0.1:{port}/v1" in out
        assert "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_under_clients_on_kept_alive_connections_cuts_none(tmp_path, artifact):
    """Clients looping on kept-alive connections when SIGTERM arrives: every request they send is answered or
    refused at connect; none is cut. A request sent on a connection that was idle at the signal is answered (503,
    Connection: close): uvicorn alone closed idle kept-alive connections at once, cutting a request sent on one
    just then."""
    import concurrent.futures

    port = free_port()
    config = write(tmp_path, {"families": [{"artifact": str(artifact)}], "shutdown_grace_s": 20,
                              "limits": {"max_batch": 4}})
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--config", config, "--port", str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        body = {"model": "math", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 12}

        def client(k: int) -> list[str]:
            seen = []
            with httpx.Client(timeout=60) as c:  # one kept-alive connection per client
                while time.monotonic() < deadline:
                    try:
                        r = c.post(url + "/v1/chat/completions", json=body)
                        seen.append(f"{r.status_code} {r.headers.get('connection', '')}".strip())
                    except httpx.ConnectError:
                        seen.append("refused")
                        if proc.poll() is not None:
                            return seen
                        time.sleep(0.05)
                    except httpx.TransportError as e:
                        seen.append(f"cut: {type(e).__name__}")
            return seen

        deadline = time.monotonic() + 60
        with httpx.Client(timeout=60) as idle, concurrent.futures.ThreadPoolExecutor(12) as pool:
            assert idle.post(url + "/v1/chat/completions", json=body).status_code == 200  # then kept alive, idle
            futures = [pool.submit(client, k) for k in range(12)]
            time.sleep(3)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            late = idle.post(url + "/v1/chat/completions", json=body)  # on the idle connection, after the signal
            seen = [o for f in futures for o in f.result()]
        out, err = proc.communicate(timeout=30)
        assert [o for o in seen if o.startswith("cut")] == [] and "200" in seen, sorted(set(seen))
        assert late.status_code == 503 and late.headers["connection"] == "close"  # answered, then closed
        assert late.json()["error"]["code"] == "shutting_down"
        assert proc.returncode == 0 and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_example_gpu_config_is_valid():
    """configs/llama3-phi3.yaml: the schema, its templates and its routes check out (its models live elsewhere)."""
    from router.router import check_routes
    from router.store import ExemplarStore
    from server.config import load_config
    from server.pipelines import load_pipelines
    from server.routing import seed_file

    config = load_config(ROOT / "configs" / "llama3-phi3.yaml")
    names = set(config.families[0].branches) | {s.name for s in config.standalone}
    pipelines = load_pipelines(config.pipelines, names)
    check_routes(ExemplarStore(seed_file(config.router.seed)), config.router.default_route, names | set(pipelines))


def test_connections_have_nagle_off():
    """Every response is written in more than one send(); with Nagle's algorithm on, the second waited for the
    client's delayed ACK (40 ms on Linux: /health took 44 ms through httpx instead of 1 ms)."""
    import asyncio
    import socket

    from server.serve import bind

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    seen = []

    async def main():
        async def handle(reader, writer):
            seen.append(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert seen and seen[0] != 0


def test_cli_refuses_what_it_cannot_use_and_ends_quietly_in_a_pipe(family, tmp_path):
    """--port outside 0-65535 (it listened on another port), a branch named '.', and `inspect | head` (a
    BrokenPipeError traceback)."""
    import subprocess
    import sys

    out = run_cli("serve", "--demo", "--port", "99999")
    assert out.returncode == 2 and "99999 is not a port number" in out.stderr and out.stderr.count("\n") == 1
    out = run_cli("compress", "--out", tmp_path / "o", f".={family['math']}", f"b={family['code']}")
    assert out.returncode == 2 and "not only dots" in out.stderr
    assert not (tmp_path / "o").exists()
    big = tmp_path / "ex.yaml"  # output far past a pipe's buffer, so that the reader closes it mid-write
    big.write_text(yaml.safe_dump({"routes": {"r": {"target": "m", "exemplars": [f"text number {i} " * 4
                                                                                 for i in range(4000)]}}}))
    piped = subprocess.run(f"{sys.executable} -m server.cli exemplars --file {big} list | head -1", shell=True,
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                           timeout=120)
    assert piped.stdout.count("\n") == 1 and piped.stderr == ""
