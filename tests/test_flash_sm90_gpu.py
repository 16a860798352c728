"""GPU validation of the opt-in sm_90a attention kernel (kernels/attention/flash_fwd_sm90.cuh), which
has never run on a GPU. On an sm_90 device with an sm_90a build these tests force it
(HIRES_LMM_ATTN_SM90=1, no split-KV), check with the profiler that flash_fwd_sm90_kernel is what
ran, and compare against the fp64 reference: block counts 0 (causal rows above the diagonal), 1,
2 and many (both rings wrap around with odd and even counts), GQA, both head dims and dtypes,
lse. Elsewhere they skip, saying why."""
import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference

HAS_SM90 = (torch.cuda.is_available() and hires_lmm.build_info().get("sm90a_kernels", False)
            and torch.cuda.get_device_capability() == (9, 0))
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 GPU and a build with sm_90a kernels")]


def _kernels_run(fn):
    """Names of the CUDA kernels fn launches."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        out = fn()
        torch.cuda.synchronize()
    return out, [e.name for e in prof.events()]


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(s, generator=gen).to(dtype).cuda()
               for s in ((B, Sq, Hq, D), (B, Sk, Hkv, D), (B, Sk, Hkv, D)))
    return q, k, v


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 300, 5, 2, 2),      # causal: first query blocks see no key
                                   (2, 1, 128, 4, 1),      # one K/V block
                                   (1, 129, 256, 4, 2),    # two blocks, two query blocks
                                   (2, 333, 1153, 8, 2),   # 10 blocks: rings wrap, GQA 4
                                   (1, 4096, 4096, 2, 2)], # 32 blocks, long causal diagonal
                         ids=lambda s: "x".join(map(str, s)))
def test_sm90_kernel_runs_and_matches(shape, causal, D, dtype, monkeypatch):
    B, Sq, Sk, Hq, Hkv = shape
    q, k, v = _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed=Sq + 3 * Sk + D)
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", "1")  # the sm_90a kernel has no split-KV
    monkeypatch.setenv("HIRES_LMM_ATTN_SM90", "1")
    (out, lse, _), names = _kernels_run(
        lambda: ops.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True))
    assert any("flash_fwd_sm90_kernel" in n for n in names), names
    assert not any("flash_fwd_kernel" in n for n in names), names
    ref, ref_lse, _ = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal,
                                                return_attn_probs=True)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)
    if causal and Sq > Sk:
        assert (out[:, : Sq - Sk] == 0).all()
        assert (lse[:, :, : Sq - Sk] == -float("inf")).all()


@pytest.mark.parametrize("scale", [-0.1, 0.0])
def test_non_positive_scale_runs_the_sm80_kernel(scale, monkeypatch):
    """The scale fold needs scale > 0: other scales take the sm_80 kernel, still right."""
    q, k, v = _inputs(1, 200, 300, 2, 2, 64, torch.bfloat16, seed=7)
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", "1")
    monkeypatch.setenv("HIRES_LMM_ATTN_SM90", "1")
    out, names = _kernels_run(lambda: ops.flash_attn_func(q, k, v, softmax_scale=scale))
    assert not any("flash_fwd_sm90_kernel" in n for n in names), names
    ref = reference.flash_attn_func(q.double(), k.double(), v.double(), softmax_scale=scale)
    torch.testing.assert_close(out.double(), ref, atol=1e-2, rtol=1e-2)


def test_opt_in_only(monkeypatch):
    """Without HIRES_LMM_ATTN_SM90=1 the default sm_80 kernel runs."""
    q, k, v = _inputs(1, 256, 256, 2, 2, 128, torch.float16, seed=3)
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", "1")
    monkeypatch.delenv("HIRES_LMM_ATTN_SM90", raising=False)
    _, names = _kernels_run(lambda: ops.flash_attn_func(q, k, v))
    assert not any("flash_fwd_sm90_kernel" in n for n in names), names
