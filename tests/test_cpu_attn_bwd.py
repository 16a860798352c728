"""CPU attention backward: the default path (ATen's CPU flash backward where the forward's ATen
path applies, csrc/cpu/attention_fast.cpp attention_cpu_fast_bwd; varlen per sequence) against the
twin (HIRES_LMM_CPU_TWIN=1, csrc/cpu/attention_bwd.cpp) and against a direct call of the ATen kernel.

tests/test_flash_attn_bwd.py runs the default path against the fp64 reference; the twin-forced
copies here keep the twin (the proof of the CUDA backward's tiling) under the same criteria."""
import pytest
import torch

from hires_lmm import ops
from hires_lmm.reference import attention as _ref_attn
import test_flash_attn_bwd as tfb
from conftest import DTYPES

_aten_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@pytest.fixture(autouse=True)
def default_cpu_path(monkeypatch):
    monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)
    monkeypatch.delenv("HIRES_LMM_ATTN_MATH", raising=False)


def _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    return r(B, Sq, Hq, D), r(B, Sk, Hkv, D), r(B, Sk, Hkv, D), r(B, Sq, Hq, D)


def _fwd_bwd(q, k, v, g, **kw):
    """(o, lse, dq, dk, dv) of flash_attn_func through autograd."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    o, lse, _ = ops.flash_attn_func(*leaves, return_attn_probs=True, **kw)
    return (o.detach(), lse) + torch.autograd.grad(o, leaves, g)


def _twin(monkeypatch, fn, *a, **kw):
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    try:
        return fn(*a, **kw)
    finally:
        monkeypatch.delenv("HIRES_LMM_CPU_TWIN")


def _close_to_twin(ours, twin, dtype):
    """fp32 accumulation and one rounding on both sides: within a few ulps of the result's scale."""
    eps = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, a, b in zip(("dq", "dk", "dv"), ours, twin):
        assert a.dtype == b.dtype == dtype and a.shape == b.shape, name
        assert torch.isfinite(a.float()).all(), name
        tol = eps * (b.float().abs().max().item() + 1.0)
        err = (a.float() - b.float()).abs().max().item()
        assert err <= tol, f"{name}: |default - twin| {err:.3e} > {tol:.3e}"


# (B, Sq, Sk, Hq, Hkv, D), causal, window: odd sizes, GQA / MQA, causal Sq < Sk, windows
FAST = [
    ((2, 33, 33, 4, 2, 64), True, (-1, -1)),
    ((1, 37, 75, 6, 2, 40), True, (-1, -1)),    # causal Sq < Sk (bottom-right mask), GQA 3
    ((1, 19, 19, 3, 1, 96), False, (-1, -1)),   # MQA
    ((1, 45, 90, 2, 2, 32), False, (8, 8)),     # two-sided window, Sq < Sk
    ((1, 70, 70, 4, 2, 64), False, (16, 0)),    # sliding window, GQA
    ((2, 1, 29, 4, 2, 24), True, (-1, -1)),     # decode-shaped (forward: small-q kernel)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FAST, ids=lambda c: "x".join(map(str, c[0])) + ("-causal" if c[1] else "")
                         + (f"-w{c[2][0]}_{c[2][1]}" if c[2] != (-1, -1) else ""))
def test_fast_bwd_matches_twin_and_aten(case, dtype, monkeypatch):
    (B, Sq, Sk, Hq, Hkv, D), causal, window = case
    q, k, v, g = _inputs(B, Sq, Sk, Hq, Hkv, D, dtype, Sq * 3 + Sk + D)
    kw = dict(causal=causal, window_size=window)
    o, lse, *ours = _fwd_bwd(q, k, v, g, **kw)
    twin = _twin(monkeypatch, _fwd_bwd, q, k, v, g, **kw)[2:]
    _close_to_twin(ours, twin, dtype)
    # the default path is ATen's kernel, fed exactly: (B,H,S,D) views, the forward's natural-log lse
    # as ATen's logsumexp, the bottom-right causal / window as an fp32 additive mask (ATen's causal
    # flag when Sq == Sk), fp16 / bf16 upcast to fp32 and each gradient rounded once
    plain = causal and Sq == Sk and window[0] < 0
    vis = _ref_attn._visible(Sq, Sk, causal, window[0], window[1], "cpu")
    mask = None if plain or (not causal and window == (-1, -1)) else \
        torch.zeros(Sq, Sk).masked_fill(~vis, float("-inf"))
    f = lambda t: t.float().transpose(1, 2)  # noqa: E731
    want = _aten_bwd(f(g), f(q), f(k), f(v), f(o), lse, 0.0, plain, attn_mask=mask, scale=D ** -0.5)
    for name, a, w in zip(("dq", "dk", "dv"), ours, want):
        assert torch.equal(a, w.transpose(1, 2).to(dtype)), name


@pytest.mark.parametrize("case", [
    ((1, 40, 25, 2, 1, 32), dict(causal=True)),                    # causal Sq > Sk: rows see no key
    ((1, 33, 40, 4, 2, 64), dict(causal=True, softcap=5.0)),       # softcap
    ((1, 30, 30, 2, 2, 32), dict(window_size=(4, 0), softcap=2.0)),
], ids=["no-key-rows", "softcap", "window-softcap"])
def test_twin_cases_stay_on_twin(case, monkeypatch):
    """Calls the ATen path cannot take run the twin's backward: bitwise the forced twin's."""
    (B, Sq, Sk, Hq, Hkv, D), kw = case
    q, k, v, g = _inputs(B, Sq, Sk, Hq, Hkv, D, torch.float32, Sq + Sk)
    ours = _fwd_bwd(q, k, v, g, **kw)[2:]
    twin = _twin(monkeypatch, _fwd_bwd, q, k, v, g, **kw)[2:]
    for a, b in zip(ours, twin):
        assert torch.equal(a, b)


def test_nonfinite_dout_runs_twin(monkeypatch):
    """A NaN / inf in dO: the twin's rules (it never multiplies a masked key's zero weight); the
    backward op alone, on the same saved tensors, bitwise the forced twin's."""
    q, k, v, g = _inputs(1, 20, 20, 2, 1, 32, torch.float32, 5)
    g[0, 3, 1, 7] = float("nan")
    g[0, 11, 0, 2] = float("inf")
    o, lse = ops.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2]
    bwd = torch.ops.hires_lmm.flash_attn_bwd
    ours = bwd(g, q, k, v, o, lse, None, True)
    twin = _twin(monkeypatch, bwd, g, q, k, v, o, lse, None, True)
    for a, b in zip(ours, twin):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_fast_bwd_matches_twin(dtype, causal, monkeypatch):
    lq, lk, Hq, Hkv, D = [1, 33, 0, 17], [40, 33, 0, 21], 4, 2, 40
    gen = torch.Generator().manual_seed(7)
    cu_q, cu_k = tfb._cu(lq), tfb._cu(lk)
    q = torch.randn(sum(lq) + 2, Hq, D, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lk) + 1, Hkv, D, generator=gen).to(dtype) for _ in range(2))
    g = torch.randn(q.shape, generator=gen).to(dtype)
    args = (cu_q, cu_k, max(lq), max(lk))
    o, lse = ops.flash_attn_varlen_func(q, k, v, *args, causal=causal, return_attn_probs=True)[:2]
    bwd = torch.ops.hires_lmm.flash_attn_varlen_bwd
    ours = bwd(g, q, k, v, o, lse, *args, None, causal)
    _close_to_twin(ours, _twin(monkeypatch, bwd, g, q, k, v, o, lse, *args, None, causal), dtype)
    for t, n in zip(ours, (cu_q[-1], cu_k[-1], cu_k[-1])):
        assert (t[int(n):] == 0).all()  # tokens outside every sequence: no gradient
    # each sequence is ATen's kernel on that sequence (causal: bottom-right, as an additive mask
    # unless Sq == Sk), from the varlen forward's out and lse
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(lq)):
        if lq[i] == 0:
            continue
        f = lambda t, c: t[None, c[i]:c[i + 1]].float().transpose(1, 2)  # noqa: E731
        sq, sk = lq[i], lk[i]
        plain = causal and sq == sk
        mask = None
        if causal and not plain:
            vis = _ref_attn._visible(sq, sk, True, -1, -1, "cpu")
            mask = torch.zeros(sq, sk).masked_fill(~vis, float("-inf"))
        want = _aten_bwd(f(g, cq), f(q, cq), f(k, ck), f(v, ck), f(o, cq), lse[None, :, cq[i]:cq[i + 1]], 0.0,
                         plain, attn_mask=mask, scale=D ** -0.5)
        for a, w, c in zip(ours, want, (cq, ck, ck)):
            assert torch.equal(a[c[i]:c[i + 1]], w[0].transpose(0, 1).to(dtype))


# ---- the twin, forced, under test_flash_attn_bwd's reference criteria --------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", tfb.DENSE, ids=lambda s: "x".join(map(str, s)))
def test_twin_bwd_dense(shape, causal, dtype, monkeypatch):
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    tfb.test_flash_attn_bwd_dense(shape, causal, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", tfb.EXTRAS, ids=lambda c: f"w{c[1][0]}_{c[1][1]}-c{int(c[2])}-cap{c[3]}")
def test_twin_bwd_window_softcap(case, dtype, monkeypatch):
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    tfb.test_flash_attn_bwd_window_softcap(case, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", tfb.VARLEN, ids=lambda c: f"{len(c[0])}seqs-d{c[4]}")
def test_twin_bwd_varlen(case, causal, dtype, monkeypatch):
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    tfb.test_flash_attn_varlen_bwd(case, causal, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_qkv_slices(dtype, monkeypatch):
    """q, k, v as slices of one fused (B, S, 3, H, D) tensor (read in place by the checks): the
    result of contiguous copies; an inf / NaN in such a slice still sends the call to the twin."""
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 29, 3, 4, 48, generator=gen).to(dtype)
    g = torch.randn(2, 29, 4, 48, generator=gen).to(dtype)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    got = _fwd_bwd(q, k, v, g, causal=True)
    want = _fwd_bwd(q.contiguous(), k.contiguous(), v.contiguous(), g, causal=True)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for t, val in ((0, float("inf")), (1, float("nan")), (2, float("nan"))):
        bad = qkv.clone()
        bad[1, 20, t, 2, 5] = val
        q, k, v = bad.unbind(2)
        got = _fwd_bwd(q, k, v, g, causal=True)
        twin = _twin(monkeypatch, _fwd_bwd, q, k, v, g, causal=True)
        for a, b in zip(got, twin):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
