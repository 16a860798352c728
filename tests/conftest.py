"""Shared test fixtures: devices, dtypes, the one table of tolerances, and the --fuzz-long option
of the property-based suite (tests/test_fuzz_ops.py)."""
import os

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


# ---- property-based fuzzing (tests/test_fuzz_ops.py, tests/fuzz_ops_lib.py) ---------------------
FUZZ_LONG_SCALE = 20  # --fuzz-long multiplies every hypothesis example count by this


def pytest_addoption(parser):
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help=f"property-based op fuzzing: {FUZZ_LONG_SCALE}x the hypothesis example "
                          "counts (the default run is sized for CI)")


def pytest_configure(config):
    # an environment variable, so that the fuzz subprocesses see it too
    if config.getoption("--fuzz-long"):
        os.environ["HIRES_LMM_FUZZ_SCALE"] = str(FUZZ_LONG_SCALE)
