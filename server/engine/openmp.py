"""One OpenMP team in the process: the engine thread's.

torch's CPU ops run their parallel parts on OpenMP (libgomp in torch's wheels), which keeps a team of worker
threads for every thread that has run a parallel op, for as long as that thread lives. Once the teams hold
more threads than the machine has cores, libgomp stops letting idle workers spin and puts them to sleep at
once, so each of a step's hundreds of small parallel regions pays a wake-up. On the 2-core machine, a
one-row decode step of SmolLM2-135M took 50 ms on the engine thread while the thread that had loaded the
model kept its team, 25 ms once that team was released (bench/RESULTS.md).

So the engine thread keeps the only team: a thread that loads models or runs an embedder releases its own
team when that work is done (``release_team``), and a thread that only touches small tensors on every step
never forms one (``single_threaded``). A released team is formed again by the thread's next parallel op.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os

log = logging.getLogger("branchserve.engine")

OMP_PAUSE_SOFT = 1  # OpenMP 5.0's omp_pause_soft: free the calling thread's team; the runtime stays usable


@functools.lru_cache(maxsize=1)
def runtimes() -> tuple[ctypes.CDLL, ...]:
    """The OpenMP runtimes loaded in this process (torch's own libgomp; libiomp5 or libomp in other builds)."""
    import torch  # noqa: F401  (loads torch's runtime)

    paths: list[str] = []
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/lib" in line and _is_runtime(line.split()[-1])})
    except OSError:  # no /proc: the runtime torch ships beside its libraries
        torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
        paths = sorted(p for p in glob.glob(os.path.join(torch_lib, "*omp*")) if _is_runtime(p))
    found = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
            lib.omp_pause_resource_all, lib.omp_set_num_threads  # noqa: B018 (both must exist)
        except (OSError, AttributeError):
            continue
        lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
        lib.omp_set_num_threads.argtypes = [ctypes.c_int]
        found.append(lib)
    return tuple(found)


def _is_runtime(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(("libgomp", "libiomp5", "libomp")) and (".so" in name or name.endswith(".dylib"))


def release_team() -> None:
    """Free the calling thread's OpenMP worker threads (outside any parallel region)."""
    for lib in runtimes():
        if lib.omp_pause_resource_all(OMP_PAUSE_SOFT) != 0:
            log.debug("the OpenMP runtime %s kept this thread's team", lib._name)


def single_threaded() -> None:
    """The calling thread's parallel ops run on it alone from now on: it forms no team. Only this thread's
    setting changes (OpenMP's per-thread count); torch's own setting, every other thread's, stays."""
    import torch

    torch.get_num_threads()  # torch sets a new thread's count on its first parallel op: let it do so now
    for lib in runtimes():
        lib.omp_set_num_threads(1)
