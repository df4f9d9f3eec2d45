"""``limits.compile``: decode steps through torch.compile, compiled before the server says it is ready.

A step whose rows all decode (the steady state) runs the model compiled, with dynamic shapes over its rows;
a step that carries prompt chunks runs eagerly, as prefill always has. Everything of a compiled step is in
its graph: the cache write is an index copy into the cache tensors, and attention is
``kv_cache.decode_attention``, written for inductor to fuse with the block gathers (no opaque op, no plan
read in Python). The lm_heads run after it, eagerly, on the branches present.

The warm-up runs decode steps of one short row and of several long ones (rows split into several units of
keys), for every branch and the mix, so that every version dynamo makes is made at start; serving compiles
nothing.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time

import torch

log = logging.getLogger("branchserve.engine")


def compile_step(fn, recompile_limit: int, device: torch.device):
    """``fn`` through torch.compile, dynamic in its shapes. The weights of a served model never change after
    load, so the step does not re-check its modules' tensors on every call."""
    options = {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
    if device.type == "cuda":
        # Triton's tiling analysis fails an assertion on this step's dynamic shapes in torch 2.11 (InductorError
        # "failed to set ranges [1, 1, 1, 16*s19]", seen on an H200); without it inductor tiles as it did before
        # that analysis existed. Triton only: the CPU's compiled step is left as it was measured.
        options["triton.coalesce_tiling_analysis"] = False
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(fn, dynamic=True, fullgraph=True, recompile_limit=recompile_limit, options=options)
    # torch before 2.12 (2.11 is what the CUDA images here carry): the limit is dynamo's global setting
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, recompile_limit)
    return torch.compile(fn, dynamic=True, fullgraph=True, options=options)


@contextlib.contextmanager
def tracing():
    """The settings every trace runs under: Python ints (a step's single branch) stay constants, since a
    symbolic one in a weight slice's offset broke inductor's code (torch 2.13); sizes of 0 and 1 are not
    special, so one row and many share a version; sizes that happen to be equal at a trace (a decode step's
    keys chunk and the head size, both 64) are not assumed equal ever after (duck shapes made every other
    chunk size a recompile while serving)."""
    import torch.fx.experimental._config as fx_config

    with torch._dynamo.config.patch(specialize_int=True), fx_config.patch(backed_size_oblivious=True,
                                                                          use_duck_shape=False):
        yield


def warm_up(runner) -> None:
    """Run the decode steps serving will meet, on throwaway sequences whose blocks go back to the pool."""
    from server.engine.sequence import Sequence
    from server.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    branches = list(range(len(getattr(runner.model, "branches", [0]))))
    mixes = [[b] for b in branches] + ([branches] if len(branches) > 1 else [])
    longest = min(runner.max_seq - 1, 600)
    shapes = ((1, 3), (3, longest))
    total, done = len(mixes) * len(shapes), 0
    name = type(runner.model).__name__
    log.info("compiling %s's decode steps: %d shapes (torch.compile; minutes on a CPU)", name, total)
    for mix in mixes:
        for rows, length in shapes:
            done += 1
            log.info("compiling %s's decode steps: %d/%d (branches %s, %d rows of %d tokens), %.0f s so far", name,
                     done, total, mix, rows, length, time.perf_counter() - t0)
            seqs = [Sequence("warm-up", [1] * length, SamplingParams(max_tokens=1), lambda e: None,
                             mix[i % len(mix)]) for i in range(rows)]
            if not all(runner.pool.grow(s.blocks, s.length) for s in seqs):
                continue
            for s in seqs:
                s.computed = s.length - 1
            runner._forward([(s, 1) for s in seqs], rows, seqs)
            for s in seqs:
                runner.pool.release(s.blocks)
    log.info("decode steps compiled in %.1f s", time.perf_counter() - t0)
