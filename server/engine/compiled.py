"""``limits.compile``: a model's steps through torch.compile, compiled before the server says it is ready.

What is compiled is everything between the attention calls: norms, the branch linears, rope, the MLP, with
dynamic shapes over the step's flat tokens. Paged attention itself stays eager (its unit layout changes with
every batch; on the CPU it is one fused flash kernel per kind of unit anyway), so dynamo breaks the graph
around it. The warm-up runs one-token and prompt steps, one branch and mixed, so every version dynamo makes
is made at start; serving compiles nothing.
"""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger("branchserve.engine")


def compile_step(fn, recompile_limit: int):
    """``fn`` through torch.compile, dynamic in its tensors' shapes. Python ints (a step's single branch) stay
    constants (see ``warm_up``): a symbolic one in a weight slice's offset broke inductor's code (torch 2.13).
    Guards on the modules stay: the attention's graph break resumes inside a layer's forward, and dropping
    module guards there (skip_guard_on_all_nn_modules_unsafe) dropped the input shape checks with them."""
    return torch.compile(fn, dynamic=True, recompile_limit=recompile_limit)


def warm_up(runner) -> None:
    """Run the step shapes serving will meet, on throwaway sequences whose blocks go back to the pool."""
    with torch._dynamo.config.patch(specialize_int=True):
        _warm_up(runner)


def _warm_up(runner) -> None:
    from server.engine.runner import Sequence
    from server.engine.sampling import SamplingParams

    t0 = time.perf_counter()
    branches = sorted({t for t in range(len(getattr(runner.model, "branches", [0])))})
    mixes = [[b] for b in branches] + ([branches] if len(branches) > 1 else [])
    for mix in mixes:
        for rows, length in ((1, 1), (2, 1), (1, 40), (3, 40), (4, 1)):
            seqs = [Sequence("warm-up", [1] * (length + 1), SamplingParams(max_tokens=1), lambda e: None,
                             mix[i % len(mix)]) for i in range(rows)]
            if not all(runner.pool.grow(s.blocks, s.length) for s in seqs):
                continue
            for s in seqs:
                s.computed = s.length - length
            scheduled = [(s, length) for s in seqs]
            runner._forward(scheduled, rows if length == 1 else 0, seqs)
            for s in seqs:
                runner.pool.release(s.blocks)
    log.info("steps compiled in %.1f s", time.perf_counter() - t0)
