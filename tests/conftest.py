"""Shared test fixtures: devices, dtypes and the one table of tolerances."""
import pytest
import torch

import hires_lmm

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Tolerances per dtype against the fp32 reference, stated once (atol, rtol).
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

HAS_CUDA = torch.cuda.is_available() and hires_lmm.build_info()["cuda"] is not None
NO_CUDA_REASON = ("no CUDA device visible" if not torch.cuda.is_available()
                  else "this build of hires_lmm has no CUDA kernels (CPU-only build)")

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                              pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)])]


def tol(dtype):
    return TOL[dtype]


@pytest.fixture(autouse=True)
def _kernels_backend():
    """Every test starts on the kernels backend with value checks on."""
    hires_lmm.set_backend("kernels")
    hires_lmm.set_value_checks(True)
    yield
    hires_lmm.set_backend("kernels")
    hires_lmm.set_value_checks(True)
