"""The fused AVX-512 CPU prefill attention kernel (csrc/cpu/attention_prefill.cpp, README "CPU
paths") against the fp64 reference, with the criterion of tests/test_flash_attn.py (max |ours -
ref64| <= 2 max |same-dtype attention - ref64| + atol) and lse within 2e-4 of fp64.
HIRES_LMM_CPU_PREFILL=1 routes every call it applies to into the kernel; each test checks, through
the kernel's call counter (torch.ops.hires_lmm._cpu_prefill_calls), that it ran."""
import pytest
import torch

from hires_lmm import ops, reference
import test_flash_attn as tfa
from conftest import DTYPES

pytestmark = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                                reason="the fused prefill kernel needs AVX-512")


@pytest.fixture(autouse=True)
def force_prefill(monkeypatch):
    monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)
    monkeypatch.delenv("HIRES_LMM_ATTN_MATH", raising=False)
    monkeypatch.setenv("HIRES_LMM_CPU_PREFILL", "1")


def _calls():
    return torch.ops.hires_lmm._cpu_prefill_calls()


def _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    if layout == "fused":  # q a slice of a fused (B, S, Hq + 2 Hkv, D) projection
        q = r(B, Sq, Hq + 2, D)[:, :, :Hq]
    elif layout == "heads_first":  # (B, H, S, D) memory seen as (B, S, H, D)
        q = r(B, Hq, Sq, D).transpose(1, 2)
    else:
        q = r(B, Sq, Hq, D)
    return q, r(B, Sk, Hkv, D), r(B, Sk, Hkv, D)


# (B, Sq, Sk, Hq, Hkv, D), causal, window
CASES = [
    ((2, 37, 91, 6, 2, 72), True, (-1, -1)),     # GQA 3, Sq < Sk, odd D
    ((1, 300, 300, 8, 2, 64), True, (-1, -1)),   # GQA 8/2, several q and key blocks
    ((1, 129, 200, 4, 1, 40), False, (-1, -1)),  # MQA, D 40
    ((1, 97, 33, 2, 2, 64), False, (-1, -1)),    # Sq > Sk unmasked (every row sees every key)
    ((2, 64, 64, 2, 2, 128), False, (16, 0)),    # sliding window
    ((1, 50, 130, 2, 2, 256), False, (20, 5)),   # window both sides, D 256
    ((3, 48, 49, 2, 2, 8), False, (-1, 3)),      # right window only, D 8
    ((1, 200, 260, 2, 2, 72), False, (70, -1)),  # left window only
    ((1, 5, 300, 3, 3, 128), True, (-1, -1)),    # few rows, many keys
    ((1, 1, 7, 128, 1, 64), True, (-1, -1)),     # Sq = 1 (128 rows per kv head: not the decode kernel)
    ((1, 20, 33, 2, 1, 512), True, (-1, -1)),    # the largest head dim routed here
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])) + ("-causal" if c[1] else "")
                         + ("" if c[2] == (-1, -1) else f"-w{c[2][0]}_{c[2][1]}"))
def test_prefill_vs_reference(case, dtype):
    (B, Sq, Sk, Hq, Hkv, D), causal, window = case
    q, k, v = _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=Sq + 3 * Sk + D)
    n0 = _calls()
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert _calls() == n0 + 1, "the fused prefill kernel did not run"
    ref, ref_lse, _ = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal,
                                                window_size=window, return_attn_probs=True)
    assert out.shape == q.shape and out.is_contiguous()
    tfa._check(out, ref, tfa._same_dtype(q, k, v, D ** -0.5, causal, window), dtype)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq) and lse.is_contiguous()
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["fused", "heads_first"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_noncontiguous_q_and_scale(layout, dtype):
    q, k, v = _qkv(2, 70, 83, 4, 2, 64, dtype, seed=11, layout=layout)
    k, v = k.transpose(1, 2).contiguous().transpose(1, 2), v[:, :, :, :]  # k strided too
    assert not q.is_contiguous() and not k.is_contiguous()
    for scale in (0.3, -0.2):  # a negative scale flips which key is the row's max
        n0 = _calls()
        out = ops.flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
        assert _calls() == n0 + 1
        ref = reference.flash_attn_func(q.double(), k.double(), v.double(), softmax_scale=scale, causal=True)
        tfa._check(out, ref, tfa._same_dtype(q, k, v, scale, True), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_prefill_varlen(dtype):
    """flash_attn_varlen_func runs the kernel per sequence (query lengths 1..300, Sq <= Sk causal)."""
    lq, lk = [1, 3, 300, 17], [5, 3, 301, 40]
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lq), 4, 40, generator=gen).to(dtype)
    k = torch.randn(sum(lk), 2, 40, generator=gen).to(dtype)
    v = torch.randn(sum(lk), 2, 40, generator=gen).to(dtype)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32)
    ck = torch.tensor([0] + list(torch.tensor(lk).cumsum(0)), dtype=torch.int32)
    n0 = _calls()
    out, lse, _ = ops.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True,
                                             return_attn_probs=True)
    assert _calls() == n0 + len(lq)
    ref, ref_lse, _ = reference.flash_attn_varlen_func(q.double(), k.double(), v.double(), cq, ck, max(lq),
                                                       max(lk), causal=True, return_attn_probs=True)
    tfa._check(out, ref, tfa._same_dtype_varlen(q, k, v, cq, ck, 40 ** -0.5, True), dtype)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,causal,window", [((2, 45, 60, 4, 2, 72), True, (-1, -1)),
                                                 ((1, 64, 64, 3, 1, 64), False, (10, 10))])
def test_prefill_fwd_bwd(shape, causal, window, dtype):
    """Autograd through the kernel: its o / lse feed the CPU backward (ATen's flash backward)."""
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = (t.requires_grad_(True) for t in _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=Sq + D))
    g = torch.randn(B, Sq, Hq, D, generator=torch.Generator().manual_seed(9)).to(dtype)
    n0 = _calls()
    out = ops.flash_attn_func(q, k, v, causal=causal, window_size=window)
    assert _calls() == n0 + 1
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference.flash_attn_func(q64, k64, v64, causal=causal, window_size=window)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), g.double())
    tol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    tfa._check(out.detach(), ref.detach(), tfa._same_dtype(q.detach(), k.detach(), v.detach(), D ** -0.5,
                                                           causal, window), dtype)
    for name, a, b in zip("qkv", grads, ref_grads):
        assert a.dtype == dtype and torch.isfinite(a.float()).all(), name
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"d{name}: max err {err:.3e}"


def test_prefill_nonfinite_goes_to_twin(monkeypatch):
    """A NaN / inf in v (also under masked keys), or in q: the kernel's result is not used and the
    call equals the twin's (HIRES_LMM_CPU_TWIN=1), NaN positions included."""
    q, k, v = _qkv(1, 40, 50, 2, 2, 64, torch.float32, seed=3)
    v[0, 49, 0, 5] = float("inf")  # masked for the first causal rows: the twin keeps them finite
    q2 = q.clone()
    q2[0, 3, 1, 0] = float("nan")
    for case, (qq, vv) in enumerate(((q, v), (q2, v.nan_to_num(posinf=0.0)))):
        n0 = _calls()
        out, lse, _ = ops.flash_attn_func(qq, k, vv, causal=True, return_attn_probs=True)
        assert _calls() == n0  # no result of the kernel was used
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
        t_out, t_lse, _ = ops.flash_attn_func(qq, k, vv, causal=True, return_attn_probs=True)
        monkeypatch.delenv("HIRES_LMM_CPU_TWIN")
        torch.testing.assert_close(out, t_out, equal_nan=True, atol=0, rtol=0)
        torch.testing.assert_close(lse, t_lse, equal_nan=True, atol=0, rtol=0)
        if case == 0:  # only the last row sees key 49
            assert torch.isfinite(out[0, :39]).all() and not torch.isfinite(out[0, 39, 0]).all()


def test_prefill_env_off_and_twin(monkeypatch):
    """HIRES_LMM_CPU_PREFILL=0 and HIRES_LMM_CPU_TWIN=1 keep the kernel out; same result (to fp32
    rounding) as the ATen path."""
    q, k, v = _qkv(1, 64, 64, 4, 4, 64, torch.float32, seed=8)
    n0 = _calls()
    ours = ops.flash_attn_func(q, k, v, causal=True)
    assert _calls() == n0 + 1
    for env in ("HIRES_LMM_CPU_PREFILL", "HIRES_LMM_CPU_TWIN"):
        monkeypatch.setenv("HIRES_LMM_CPU_PREFILL", "1")
        monkeypatch.setenv(env, "0" if env == "HIRES_LMM_CPU_PREFILL" else "1")
        other = ops.flash_attn_func(q, k, v, causal=True)
        assert _calls() == n0 + 1
        torch.testing.assert_close(ours, other, atol=2e-6, rtol=1e-5)
        monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)


@pytest.mark.parametrize("amx", ["1", "0"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[5], CASES[6], CASES[9], CASES[10]],
                         ids=lambda c: "x".join(map(str, c[0])))
def test_prefill_bf16_amx_and_avx512(case, amx, monkeypatch):
    """bf16 runs on AMX tiles where the CPU has them (P rounded to bf16 for P V, as ATen's bf16
    kernel); HIRES_LMM_CPU_PREFILL_AMX=0 runs the AVX-512 fp32 kernel instead (CPUs without AMX).
    Both within the criterion; they agree to bf16 output rounding."""
    monkeypatch.setenv("HIRES_LMM_CPU_PREFILL_AMX", amx)
    (B, Sq, Sk, Hq, Hkv, D), causal, window = case
    q, k, v = _qkv(B, Sq, Sk, Hq, Hkv, D, torch.bfloat16, seed=Sq + D + 1)
    n0 = _calls()
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
    assert _calls() == n0 + 1
    ref, ref_lse, _ = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal,
                                                window_size=window, return_attn_probs=True)
    tfa._check(out, ref, tfa._same_dtype(q, k, v, D ** -0.5, causal, window), torch.bfloat16)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-5)
    monkeypatch.setenv("HIRES_LMM_CPU_PREFILL_AMX", "0" if amx == "1" else "1")
    other = ops.flash_attn_func(q, k, v, causal=causal, window_size=window)
    torch.testing.assert_close(out.float(), other.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 200, 230, 4, 1, 64), (2, 150, 150, 4, 2, 128)], ids=["mqa", "gqa"])
def test_prefill_thread_layouts(shape, dtype):
    """Both work layouts at 2 threads: one (batch, kv head) pair per thread's share (packed in the
    thread's own buffer), and fewer pairs than threads (MQA, B=1: a packing pass, then (batch,
    q head, q block) items); each bitwise equal to the 1-thread result (the same per-row order)."""
    B, Sq, Sk, Hq, Hkv, D = shape
    q, k, v = _qkv(B, Sq, Sk, Hq, Hkv, D, dtype, seed=D)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            n0 = _calls()
            outs.append(ops.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)[:2])
            assert _calls() == n0 + 1
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    ref = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=True)
    tfa._check(outs[1][0], ref, tfa._same_dtype(q, k, v, D ** -0.5, True), dtype)


def test_prefill_long_keys_call_buffer():
    """A packed K / V above 2^22 floats (20000 keys, D=128) goes to a buffer of the call (not the
    thread's kept one), in both work layouts; fp16 (routed at any size up to the pack cap)."""
    q, k, v = _qkv(1, 8, 20000, 2, 1, 128, torch.float16, seed=1)
    ref = reference.flash_attn_func(q.double(), k.double(), v.double())
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            n0 = _calls()
            out = ops.flash_attn_func(q, k, v)
            assert _calls() == n0 + 1
            tfa._check(out, ref, tfa._same_dtype(q, k, v, 128 ** -0.5, False), torch.float16)
    finally:
        torch.set_num_threads(threads)
