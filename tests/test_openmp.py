"""The engine thread keeps the process's only OpenMP team (server/engine/openmp.py): a second team of CPU
worker threads halved the speed of its decode steps on two cores."""

import os
import subprocess
import sys
import textwrap

from conftest import ROOT

# Run in a child process: its OpenMP teams are only the ones this script forms. ``held()`` counts the worker
# threads the calling thread holds: the process's threads before and after releasing them.
SCRIPT = textwrap.dedent("""
    import asyncio, os, sys, threading
    import torch
    torch.set_num_threads(2)
    from server.engine.openmp import release_team, runtimes
    from server.engine.core import Engine
    from server.engine.sampling import SamplingParams
    from server.engine.runner import _FILLS
    from router.embedders import SentenceTransformerEmbedder, load_decoder_path

    def threads():
        return len(os.listdir("/proc/self/task"))

    def held():
        n = threads()
        release_team()
        return n - threads()

    def parallel_op():
        torch.ones(2000, 2000).add_(1)  # 4M elements: torch splits it over its threads

    def on_thread(fn):
        out = []
        t = threading.Thread(target=lambda: out.append(fn()))
        t.start()
        t.join()
        return out[0]

    assert runtimes(), "no OpenMP runtime found"
    parallel_op()
    print("main after a parallel op", held())
    print("main after releasing", held())
    parallel_op()  # as loading the models would
    engine = Engine()
    engine.add_standalone("m", sys.argv[1], max_batch=2, max_seq=64)
    engine.start()
    engine.wait_ready(timeout=300)
    print("main after Engine.start", held())

    async def generate():
        return [t async for e in engine.submit("m", [1, 2, 3], SamplingParams(max_tokens=3, temperature=0))
                for t in e.token_ids]
    print("tokens", len(asyncio.run(generate())))
    embedder = SentenceTransformerEmbedder()
    print("main after loading the embedder and embedding", (embedder.embed(["warm"]), held())[1])
    print("a worker thread after embedding", on_thread(lambda: (embedder.embed(["what is 2 + 2?"]), held())[1]))
    print("the fill thread after a parallel op", _FILLS.submit(lambda: (parallel_op(), held())[1]).result())
    decoder = load_decoder_path(sys.argv[1])  # a decoder the router runs itself, not through the engine
    forward = decoder.hidden
    decoder.hidden = lambda ids, layer: (parallel_op(), forward(ids, layer))[1]  # as large models' forwards do
    print("a worker thread after a decoder embedding", on_thread(lambda: (decoder.embed_one("2 + 2"), held())[1]))
    engine.stop()
""")


def test_only_the_engine_thread_keeps_openmp_workers(tmp_path):
    from compression.synthetic import build_standalone

    path = build_standalone(tmp_path / "m", seed=3)
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2"), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.rsplit(" ", 1) for line in out.stdout.splitlines())
    assert lines == {
        "main after a parallel op": "1",  # the probe sees a team: one worker beside the thread itself
        "main after releasing": "0",
        "main after Engine.start": "0",  # what the loading thread formed is gone
        "tokens": "3",
        "main after loading the embedder and embedding": "0",
        "a worker thread after embedding": "0",  # the router's embedder releases its team
        "the fill thread after a parallel op": "0",  # the grammar fill thread never forms one
        "a worker thread after a decoder embedding": "0",
    }, out.stdout
