"""Randomized SVD backends behind one small interface.

``factorize(D, rank, seed)`` returns float32 factors ``U`` (m x r, singular
values folded in) and ``V`` (r x n, orthonormal rows) with ``D ~= U @ V``, on
D's device. Both backends follow Halko, Martinsson and Tropp: a Gaussian or
uniform sketch with oversampling, a few power iterations, then an exact SVD of
the small projected matrix. When the sketch would cover most of the matrix an
exact SVD is cheaper and is used instead.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from compression.errors import UserError

OVERSAMPLE = 10
POWER_ITERS = 4


def _sketch_width(m: int, n: int, rank: int) -> int:
    return min(rank + OVERSAMPLE, m, n)


def _exact(D: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return U[:, :rank] * S[:rank], Vh[:rank].contiguous()


class TorchRSVD:
    """Halko's range finder in torch; runs wherever D lives (CPU or CUDA)."""

    name = "torch"

    def factorize(self, D: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        D = D.float()
        m, n = D.shape
        width = _sketch_width(m, n, rank)
        if width >= 0.8 * min(m, n):
            return _exact(D, rank)
        gen = torch.Generator(device=D.device).manual_seed(seed)
        omega = torch.randn(n, width, generator=gen, device=D.device, dtype=D.dtype)
        Q, _ = torch.linalg.qr(D @ omega)
        for _ in range(POWER_ITERS):
            Q, _ = torch.linalg.qr(D.T @ Q)
            Q, _ = torch.linalg.qr(D @ Q)
        Ub, S, Vh = torch.linalg.svd(Q.T @ D, full_matrices=False)
        U = Q @ Ub[:, :rank]
        return U * S[:rank], Vh[:rank].contiguous()


def _quiet_foreign_blas():
    """Limit every BLAS pool but numpy's own to one thread.

    numpy and scipy wheels each bundle an OpenBLAS; fbpca alternates numpy
    matmuls with scipy LU/QR, and two busy-waiting pools on the same cores made
    it 3-10x slower on a 2-core machine. The big matmuls stay multi-threaded.
    """
    from threadpoolctl import ThreadpoolController

    ctl = ThreadpoolController()
    others = [lib.filepath for lib in ctl.lib_controllers if lib.user_api == "blas" and "numpy" not in lib.filepath]
    if len(others) == len([lib for lib in ctl.lib_controllers if lib.user_api == "blas"]):
        return contextlib.nullcontext()  # one shared BLAS, or numpy's cannot be told apart
    return ctl.select(filepath=others).limit(limits=1)


class FbpcaRSVD:
    """Facebook's fbpca (numpy, CPU). Seeded through numpy's global generator, which fbpca uses."""

    name = "fbpca"

    def factorize(self, D: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        import fbpca
        import scipy.linalg  # noqa: F401  (loaded first, so that its BLAS pool can be limited)

        m, n = D.shape
        A = D.detach().to("cpu", torch.float64).numpy()
        saved = np.random.get_state()
        np.random.seed(seed % 2**32)
        try:
            with _quiet_foreign_blas():
                U, s, Va = fbpca.pca(A, k=rank, raw=True, n_iter=POWER_ITERS, l=_sketch_width(m, n, rank))
        finally:
            np.random.set_state(saved)
        U = torch.from_numpy(np.ascontiguousarray(U * s)).float().to(D.device)
        V = torch.from_numpy(np.ascontiguousarray(Va)).float().to(D.device)
        return U, V


BACKENDS = {"torch": TorchRSVD, "fbpca": FbpcaRSVD}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    return torch.device(device)


def make_backend(name: str, device: torch.device):
    if name == "auto":
        name = "torch" if device.type == "cuda" else "fbpca"
    return BACKENDS[name]()
