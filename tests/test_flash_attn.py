"""flash_attn_func / flash_attn_varlen_func against the fp64 reference.

Accuracy criterion (flash-attn's): max |ours - ref64| <= 2 * max |same - ref64| + atol, where
`same` is a plain PyTorch attention computed in the input dtype (matmuls and softmax in that
dtype) on the CPU."""
import math

import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference
from hires_lmm.reference import attention as _ref_attn
from conftest import DEVICES, DTYPES, HAS_CUDA, NO_CUDA_REASON


@pytest.fixture(autouse=True)
def _cpu_twin(monkeypatch):
    """CPU calls in this file run the CPU twin of the CUDA kernel (HIRES_LMM_CPU_TWIN=1: the proof
    of the CUDA tiling); tests/test_cpu_paths.py runs these tests on the default CPU path."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")


ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _same_dtype(q, k, v, scale, causal, window=(-1, -1), softcap=0.0):
    """Attention computed in q's dtype (no upcast): the baseline the kernel must not exceed 2x.
    (Finite inputs only: rows that see no key -> 0.)"""
    B, Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if Hq != Hkv:
        kh = kh.repeat_interleave(Hq // Hkv, 1)
        vh = vh.repeat_interleave(Hq // Hkv, 1)
    s = (qh @ kh.transpose(-1, -2))
    s = torch.tanh(s * (scale / softcap)) * softcap if softcap else s * scale
    if causal or window != (-1, -1):
        vis = _ref_attn._visible(Sq, Sk, causal, window[0], window[1], q.device)
        s = s.masked_fill(~vis, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vh).transpose(1, 2)


def _same_dtype_varlen(q, k, v, cu_q, cu_k, scale, causal, window=(-1, -1), softcap=0.0):
    out = torch.zeros_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(cq) - 1):
        out[cq[b]:cq[b + 1]] = _same_dtype(q[None, cq[b]:cq[b + 1]], k[None, ck[b]:ck[b + 1]],
                                           v[None, ck[b]:ck[b + 1]], scale, causal, window, softcap)[0]
    return out


def _err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def _check(out, ref64, same, dtype):
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    err, base = _err(out, ref64), _err(same, ref64)
    assert err <= 2 * base + ATOL[dtype], f"max err {err:.3e} > 2 * {base:.3e} + {ATOL[dtype]:.0e}"


# (B, Sq, Sk, Hq, Hkv, D)
DENSE = [
    (1, 1, 1, 2, 2, 64),
    (2, 33, 33, 4, 2, 64),      # GQA
    (1, 77, 129, 4, 1, 128),    # MQA, Sq < Sk
    (1, 129, 77, 2, 2, 64),     # Sq > Sk: causal rows with no visible key
    (1, 577, 577, 2, 2, 64),    # CLIP-L length
    (2, 33, 577, 2, 2, 128),
    (1, 65, 64, 1, 1, 80),      # odd head dim
    (1, 7, 19, 3, 1, 96),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", DENSE, ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_dense(shape, causal, dtype, device):
    B, Sq, Sk, Hq, Hkv, D = shape
    gen = torch.Generator().manual_seed(Sq * 31 + Sk + D)
    q = _rand((B, Sq, Hq, D), dtype, device, gen)
    k = _rand((B, Sk, Hkv, D), dtype, device, gen)
    v = _rand((B, Sk, Hkv, D), dtype, device, gen)
    out = ops.flash_attn_func(q, k, v, causal=causal)
    assert out.shape == q.shape and out.device == q.device
    ref64 = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=causal)
    same = _same_dtype(q.cpu(), k.cpu(), v.cpu(), 1.0 / math.sqrt(D), causal)
    _check(out, ref64, same, dtype)
    if causal and Sq > Sk:  # rows i < Sq - Sk see no key -> exactly 0
        assert (out[:, : Sq - Sk].float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_long_2049(causal, device):
    """One long case (2049 tokens) in bf16: many K/V blocks, a 1-row tail block."""
    gen = torch.Generator().manual_seed(2049)
    dtype = torch.bfloat16
    q = _rand((1, 2049, 1, 64), dtype, device, gen)
    k = _rand((1, 2049, 1, 64), dtype, device, gen)
    v = _rand((1, 2049, 1, 64), dtype, device, gen)
    out = ops.flash_attn_func(q, k, v, causal=causal)
    ref64 = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=causal)
    _check(out, ref64, _same_dtype(q.cpu(), k.cpu(), v.cpu(), 0.125, causal), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq", [1, 2, 5, 16])
def test_flash_attn_decode(sq, dtype, device):
    """Decode: a few queries against a KV cache (causal, bottom-right: the last query sees all)."""
    gen = torch.Generator().manual_seed(sq)
    q = _rand((2, sq, 8, 128), dtype, device, gen)
    k = _rand((2, 300, 2, 128), dtype, device, gen)
    v = _rand((2, 300, 2, 128), dtype, device, gen)
    out = ops.flash_attn_func(q, k, v, causal=True)
    ref64 = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=True)
    _check(out, ref64, _same_dtype(q.cpu(), k.cpu(), v.cpu(), 128 ** -0.5, True), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("sq,causal", [(1, False), (3, True), (70, True)])
def test_flash_attn_split_kv(sq, causal, splits, dtype, device, monkeypatch):
    """Split-KV (the decode path): forced split counts, incl. splits left empty by causal
    skipping and more splits than some Q blocks have K blocks; result within the same bound."""
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", str(splits))
    gen = torch.Generator().manual_seed(sq * 10 + splits)
    q = _rand((2, sq, 4, 64), dtype, device, gen)
    k = _rand((2, 390, 2, 64), dtype, device, gen)
    v = _rand((2, 390, 2, 64), dtype, device, gen)
    out = ops.flash_attn_func(q, k, v, causal=causal)
    ref64 = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(), causal=causal)
    _check(out, ref64, _same_dtype(q.cpu(), k.cpu(), v.cpu(), 0.125, causal), dtype)


def test_flash_attn_split_kv_no_keys(monkeypatch):
    """Causal Sq > Sk with splits: rows that see no key stay exactly 0 through the combine."""
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", "4")
    q = torch.randn(1, 300, 2, 64)
    k, v = torch.randn(1, 260, 2, 64), torch.randn(1, 260, 2, 64)
    out = ops.flash_attn_func(q, k, v, causal=True)
    assert (out[:, :40] == 0).all()
    ref64 = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=True)
    assert _err(out, ref64) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_attn_noncontiguous_and_scale(dtype, device):
    gen = torch.Generator().manual_seed(7)
    # (B, H, S, D) storage viewed as (B, S, H, D); k with a strided last dim (copied inside)
    q = _rand((2, 4, 37, 64), dtype, device, gen).transpose(1, 2)
    k = _rand((2, 50, 2, 128), dtype, device, gen)[..., ::2]
    v = _rand((2, 2, 50, 64), dtype, device, gen).transpose(1, 2)
    assert not q.is_contiguous() and k.stride(-1) == 2
    out = ops.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True)
    assert out.is_contiguous()
    ref64 = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(), softmax_scale=0.3, causal=True)
    _check(out, ref64, _same_dtype(q.cpu(), k.cpu(), v.cpu(), 0.3, True), dtype)


VARLEN = [
    # (q lengths, k lengths, Hq, Hkv, D)
    ([0, 1, 77, 33, 129], [5, 1, 77, 64, 0], 4, 2, 64),
    ([1, 3, 70], [200, 3, 65], 2, 1, 128),
    ([17], [17], 3, 3, 96),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", VARLEN, ids=lambda c: f"{len(c[0])}seqs-d{c[4]}")
def test_flash_attn_varlen(case, causal, dtype, device):
    lq, lk, Hq, Hkv, D = case
    gen = torch.Generator().manual_seed(sum(lq) + D)
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q = _rand((sum(lq), Hq, D), dtype, device, gen)
    k = _rand((sum(lk), Hkv, D), dtype, device, gen)
    v = _rand((sum(lk), Hkv, D), dtype, device, gen)
    out = ops.flash_attn_varlen_func(q, k, v, cu_q.to(device), cu_k.to(device), max(lq), max(lk),
                                     causal=causal)
    assert out.shape == q.shape
    ref64 = reference.flash_attn_varlen_func(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                             cu_q, cu_k, max(lq), max(lk), causal=causal)
    same = _same_dtype_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, D ** -0.5, causal)
    _check(out, ref64, same, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_varlen_matches_dense(device):
    """Packed equal-length sequences give the dense op's result (same tiling, same rounding)."""
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float16
    q = _rand((3, 45, 4, 64), dtype, device, gen)
    k = _rand((3, 70, 2, 64), dtype, device, gen)
    v = _rand((3, 70, 2, 64), dtype, device, gen)
    dense = ops.flash_attn_func(q, k, v, causal=True)
    cu_q = torch.arange(0, 4 * 45, 45, dtype=torch.int32, device=device)
    cu_k = torch.arange(0, 4 * 70, 70, dtype=torch.int32, device=device)
    packed = ops.flash_attn_varlen_func(q.reshape(-1, 4, 64), k.reshape(-1, 2, 64), v.reshape(-1, 2, 64),
                                        cu_q, cu_k, 45, 70, causal=True)
    torch.testing.assert_close(packed.view_as(dense), dense, atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_math_fallback(causal, monkeypatch):
    """The ATen fallback (CUDA: fp32 and head dims without a kernel), forced on the CPU."""
    monkeypatch.setenv("HIRES_LMM_ATTN_MATH", "1")
    gen = torch.Generator().manual_seed(21)
    q, k, v = torch.randn(2, 40, 4, 80, generator=gen), torch.randn(2, 30, 2, 80, generator=gen), \
        torch.randn(2, 30, 2, 80, generator=gen)
    out = ops.flash_attn_func(q, k, v, causal=causal)
    ref = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal)
    assert _err(out, ref) < 1e-5
    lq, lk = [0, 1, 33, 6], [4, 1, 20, 0]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    q, k, v = torch.randn(sum(lq) + 3, 4, 64), torch.randn(sum(lk), 2, 64), torch.randn(sum(lk), 2, 64)
    out = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 20, causal=causal)
    ref = reference.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, 33, 20, causal=causal)
    assert _err(out[: sum(lq)], ref[: sum(lq)]) < 1e-5
    assert (out[sum(lq):] == 0).all()  # tokens past cu_seqlens_q[-1] belong to no sequence


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_empty_and_no_keys(device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # CUDA: the kernel, not the fallback
    q = torch.randn(1, 5, 2, 64, dtype=dtype, device=device)
    k = torch.randn(1, 0, 2, 64, dtype=dtype, device=device)
    assert (ops.flash_attn_func(q, k, k) == 0).all()
    assert (ops.flash_attn_func(q, k, k, causal=True) == 0).all()
    assert ops.flash_attn_func(q[:, :0], q, q).shape == (1, 0, 2, 64)
    cu_q = torch.tensor([0, 5], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 0], dtype=torch.int32, device=device)
    assert (ops.flash_attn_varlen_func(q[0], k[0], k[0], cu_q, cu_k, 5, 0) == 0).all()


def test_flash_attn_matches_reference_backend():
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 40, 2, 64, generator=gen) for _ in range(3))
    ours = ops.flash_attn_func(q, k, v, causal=True)
    with hires_lmm.use_backend("reference"):
        ref = ops.flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


# ---- autograd and opcheck ------------------------------------------------------------------------
def test_flash_attn_grad():
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 19, 4, 64, generator=gen, requires_grad=True)
    k = torch.randn(1, 23, 2, 64, generator=gen, requires_grad=True)
    v = torch.randn(1, 23, 2, 64, generator=gen, requires_grad=True)
    g = torch.randn(1, 19, 4, 64, generator=gen)
    ops.flash_attn_func(q, k, v, causal=True).backward(g)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.flash_attn_func(*leaves, causal=True).backward(g.double())
    for ours, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def test_flash_attn_varlen_grad():
    gen = torch.Generator().manual_seed(6)
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    q = torch.randn(17, 2, 64, generator=gen, requires_grad=True)
    k = torch.randn(17, 1, 64, generator=gen, requires_grad=True)
    v = torch.randn(17, 1, 64, generator=gen, requires_grad=True)
    g = torch.randn(17, 2, 64, generator=gen)
    ops.flash_attn_varlen_func(q, k, v, cu, cu, 12, 12, causal=True).backward(g)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.flash_attn_varlen_func(*leaves, cu, cu, 12, 12, causal=True).backward(g.double())
    for ours, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def test_flash_attn_opcheck():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 9, 4, 64, generator=gen, requires_grad=True)
    k = torch.randn(2, 11, 2, 64, generator=gen, requires_grad=True)
    v = torch.randn(2, 11, 2, 64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.hires_lmm.flash_attn_func.default, (q, k, v, 0.2, True))
    # window + softcap (softmax_lse is the second output, without gradient)
    torch.library.opcheck(torch.ops.hires_lmm.flash_attn_func.default, (q, k, v, 0.2, False, 5, 3, 2.0),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_flash_attn_varlen_opcheck():
    gen = torch.Generator().manual_seed(9)
    cu_q = torch.tensor([0, 3, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 8], dtype=torch.int32)
    q = torch.randn(10, 2, 64, generator=gen, requires_grad=True)
    k = torch.randn(8, 1, 64, generator=gen, requires_grad=True)
    v = torch.randn(8, 1, 64, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.hires_lmm.flash_attn_varlen_func.default,
                          (q, k, v, cu_q, cu_k, 7, 6, None, False, 2, 1, 1.5))


def test_flash_attn_compile_fullgraph():
    q, k, v = (torch.randn(1, 20, 2, 64) for _ in range(3))
    fn = torch.compile(lambda a, b, c: ops.flash_attn_func(a, b, c, causal=True), fullgraph=True,
                       backend="eager")
    torch.testing.assert_close(fn(q, k, v), ops.flash_attn_func(q, k, v, causal=True))


# ---- bad input -------------------------------------------------------------------------------------
def _qkv(B=1, S=8, Hq=4, Hkv=2, D=64, dtype=torch.float32):
    return (torch.randn(B, S, Hq, D, dtype=dtype), torch.randn(B, S, Hkv, D, dtype=dtype),
            torch.randn(B, S, Hkv, D, dtype=dtype))


def test_flash_attn_bad_input():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="argument 'k'.*head_dim"):
        ops.flash_attn_func(q, k[..., :32], v)
    with pytest.raises(RuntimeError, match="argument 'v'.*head_dim"):
        ops.flash_attn_func(q, k, v[..., :32])
    with pytest.raises(RuntimeError, match="argument 'k'.*heads_q % heads_kv"):
        ops.flash_attn_func(q[:, :, :3], k, v)
    with pytest.raises(RuntimeError, match="argument 'v'.*dtype"):
        ops.flash_attn_func(q, k, v.half())
    with pytest.raises(RuntimeError, match="argument 'q'.*float32, float16 or bfloat16"):
        ops.flash_attn_func(q.double(), k.double(), v.double())
    with pytest.raises(RuntimeError, match="argument 'q'.*4-D"):
        ops.flash_attn_func(q[0], k, v)
    with pytest.raises(RuntimeError, match="argument 'k'.*batch"):
        ops.flash_attn_func(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(RuntimeError, match="argument 'v'.*tokens"):
        ops.flash_attn_func(q, k, v[:, :3])
    with pytest.raises(RuntimeError, match="argument 'q'.*up to 512"):
        ops.flash_attn_func(*(torch.randn(1, 2, 1, 520) for _ in range(3)))


def test_flash_attn_varlen_bad_input():
    q, k, v = (torch.randn(10, 2, 64) for _ in range(3))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    f = ops.flash_attn_varlen_func
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_q'.*int32"):
        f(q, k, v, cu.long(), cu, 6, 6)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_k'.*1-D"):
        f(q, k, v, cu, cu.view(1, 3), 6, 6)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_k'.*entries"):
        f(q, k, v, cu, cu[:2], 6, 6)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_q'.*nondecreasing"):
        f(q, k, v, torch.tensor([0, 6, 4], dtype=torch.int32), cu, 6, 6)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_k'.*start at 0"):
        f(q, k, v, cu, torch.tensor([1, 4, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_q'.*only 10 tokens"):
        f(q, k, v, torch.tensor([0, 4, 12], dtype=torch.int32), cu, 8, 6)
    with pytest.raises(RuntimeError, match="argument 'max_seqlen_q'"):
        f(q, k, v, cu, cu, 5, 6)
    with pytest.raises(RuntimeError, match="argument 'k'.*head_dim"):
        f(q, k[..., :32], v, cu, cu, 6, 6)
    with pytest.raises(RuntimeError, match="argument 'q'.*3-D"):
        f(q[None], k, v, cu, cu, 6, 6)


# ---- CUDA specifics ---------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_flash_attn_cuda_matches_cpu_twin(D, dtype):
    """The CUDA kernel and its CPU twin walk the same tiles: results agree to a few ulps."""
    gen = torch.Generator().manual_seed(D)
    q = _rand((2, 200, 4, D), dtype, "cpu", gen)
    k = _rand((2, 333, 2, D), dtype, "cpu", gen)
    v = _rand((2, 333, 2, D), dtype, "cpu", gen)
    for causal in (False, True):
        cpu = ops.flash_attn_func(q, k, v, causal=causal)
        gpu = ops.flash_attn_func(q.cuda(), k.cuda(), v.cuda(), causal=causal).cpu()
        ulp = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(gpu.float(), cpu.float(), atol=ulp, rtol=ulp)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_flash_attn_cuda_window_softcap_matches_cpu_twin(D, dtype):
    """Windows (block skipping on both sides), softcap and lse: the CUDA kernel against its twin."""
    gen = torch.Generator().manual_seed(D + 1)
    q = _rand((2, 200, 4, D), dtype, "cpu", gen)
    k = _rand((2, 333, 2, D), dtype, "cpu", gen)
    v = _rand((2, 333, 2, D), dtype, "cpu", gen)
    ulp = 1e-2 if dtype == torch.bfloat16 else 2e-3
    for causal, window, softcap in [(True, (70, -1), 0.0), (False, (100, 3), 20.0), (False, (-1, 0), 0.0),
                                    (True, (-1, -1), 5.0)]:
        cpu, cpu_lse, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                              return_attn_probs=True)
        gpu, gpu_lse, _ = ops.flash_attn_func(q.cuda(), k.cuda(), v.cuda(), causal=causal, window_size=window,
                                              softcap=softcap, return_attn_probs=True)
        torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=ulp, rtol=ulp)
        torch.testing.assert_close(gpu_lse.cpu(), cpu_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_flash_attn_cuda_varlen_huge_bound_and_nonfinite():
    """CUDA: a 2**40 max_seqlen bound sizes the grid by the real tokens; NaN rule as on the CPU."""
    dtype = torch.bfloat16
    cu = torch.tensor([0, 100, 101, 357], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(357, 4, 128, dtype=dtype, device="cuda") for _ in range(3))
    exp = ops.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True)
    got = ops.flash_attn_varlen_func(q, k, v, cu, cu, 2**40, 2**40, causal=True)
    torch.testing.assert_close(got, exp, atol=0, rtol=0)
    qn = q.clone()
    qn[5, 1, 0] = float("nan")
    o, lse, _ = ops.flash_attn_varlen_func(qn, k, v, cu, cu, 256, 256, causal=True, return_attn_probs=True)
    assert torch.isnan(o[5, 1]).all() and torch.isnan(lse[1, 5])
    o[5, 1] = exp[5, 1]
    torch.testing.assert_close(o, exp, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_flash_attn_cuda_varlen_graph_capture():
    """Varlen launches without a host sync: capturable in a CUDA graph (value checks skip)."""
    dtype = torch.bfloat16
    cu = torch.tensor([0, 100, 101, 357], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(357, 4, 128, dtype=dtype, device="cuda") for _ in range(3))
    eager = ops.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(graph):
        out = ops.flash_attn_varlen_func(q, k, v, cu, cu, 256, 256, causal=True)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_flash_attn_cuda_misaligned_contiguous_views():
    """Contiguous tensors the 16-byte cp.async cannot read directly (storage offset not a multiple
    of 8 elements; an odd stride on a size-1 dim) are copied by the binding, not passed through."""
    dtype = torch.bfloat16
    B, S, H, D = 2, 70, 2, 64
    gen = torch.Generator().manual_seed(7)
    base = [_rand((B * S * H * D + 1,), dtype, "cuda", gen) for _ in range(3)]
    q, k, v = (x[1:].view(B, S, H, D) for x in base)  # contiguous, data_ptr % 16 == 2
    assert q.is_contiguous() and q.data_ptr() % 16 != 0
    out = ops.flash_attn_func(q, k, v, causal=True)
    exp = ops.flash_attn_func(q.clone(), k.clone(), v.clone(), causal=True)
    torch.testing.assert_close(out, exp, atol=0, rtol=0)
    q1 = torch.as_strided(_rand((S * H * D,), dtype, "cuda", gen), (1, S, H, D), (3, H * D, D, 1))
    assert q1.is_contiguous() and q1.stride(0) % 8 != 0
    out = ops.flash_attn_func(q1, k[:1].clone(), v[:1].clone())
    torch.testing.assert_close(out, ops.flash_attn_func(q1.clone(), k[:1].clone(), v[:1].clone()), atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_flash_attn_cuda_large_prefill():
    """Llama-like prefill (S=2048, 32 heads, D=128, causal) and a CLIP-L batch against fp64."""
    for (B, S, H, D, causal) in [(1, 2048, 32, 128, True), (8, 577, 16, 64, False)]:
        gen = torch.Generator().manual_seed(S)
        q, k, v = (_rand((B, S, H, D), torch.bfloat16, "cuda", gen) for _ in range(3))
        out = ops.flash_attn_func(q, k, v, causal=causal)
        ref64 = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal)
        same = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal).transpose(1, 2)
        _check(out, ref64, same, torch.bfloat16)


HAS_SM90 = (HAS_CUDA and hires_lmm.build_info().get("sm90a_kernels", False)
            and torch.cuda.get_device_capability() == (9, 0))


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_SM90, reason="needs an sm_90 device and a build with sm_90a kernels")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2, 2), (2, 77, 129, 4, 1), (1, 129, 77, 2, 2),
                                   (2, 577, 577, 4, 2), (1, 2049, 2049, 2, 2), (1, 5, 1000, 8, 2)],
                         ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_sm90(shape, causal, D, dtype, monkeypatch):
    """The opt-in sm_90a kernel (TMA + wgmma, HIRES_LMM_ATTN_SM90=1) against fp64 and the sm_80 kernel."""
    B, Sq, Sk, Hq, Hkv = shape
    gen = torch.Generator().manual_seed(Sq + Sk + D)
    q = _rand((B, Sq, Hq, D), dtype, "cuda", gen)
    k = _rand((B, Sk, Hkv, D), dtype, "cuda", gen)
    v = _rand((B, Sk, Hkv, D), dtype, "cuda", gen)
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", "1")  # the sm_90a kernel has no split-KV
    base, base_lse, _ = ops.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    monkeypatch.setenv("HIRES_LMM_ATTN_SM90", "1")
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    torch.testing.assert_close(lse, base_lse, atol=1e-3, rtol=1e-4)  # the sm_90a kernel writes lse too
    ref64 = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal)
    _check(out, ref64, _same_dtype(q.cpu(), k.cpu(), v.cpu(), D ** -0.5, causal), dtype)
    ulp = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(out.float(), base.float(), atol=ulp, rtol=ulp)
    if causal and Sq > Sk:
        assert (out[:, : Sq - Sk].float() == 0).all()


# ---- flash-attn 2 API: argument order, window_size, softcap, softmax_lse --------------------------
def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_readme_calls(device):
    """The calls of flash-attn's README, verbatim: dropout_p is the 4th positional argument."""
    from hires_lmm.ops import flash_attn_func, flash_attn_varlen_func
    gen = torch.Generator().manual_seed(90)
    dtype = torch.bfloat16
    q = _rand((2, 97, 4, 64), dtype, device, gen)
    k = _rand((2, 130, 2, 64), dtype, device, gen)
    v = _rand((2, 130, 2, 64), dtype, device, gen)
    q64, k64, v64 = (t.double().cpu() for t in (q, k, v))
    out = flash_attn_func(q, k, v, 0.0, causal=True)  # 0.0 is dropout_p, not the scale
    _check(out, reference.flash_attn_func(q64, k64, v64, causal=True),
           _same_dtype(q.cpu(), k.cpu(), v.cpu(), 0.125, True), dtype)
    out = flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(64, 0))
    _check(out, reference.flash_attn_func(q64, k64, v64, causal=True, window_size=(64, 0)),
           _same_dtype(q.cpu(), k.cpu(), v.cpu(), 0.125, True, (64, 0)), dtype)
    out, lse, probs = flash_attn_func(q, k, v, 0.0, 0.1, False, (-1, -1), 0.0, None, False, True)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (2, 4, 97)
    lens = [0, 31, 66]
    cu_q, cu_k = _cu(lens).to(device), _cu([5, 0, 125]).to(device)
    qv, kv, vv = q[0, :97], k[0], v[0]
    out = flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, 66, 125, 0.0, causal=True)
    ref = reference.flash_attn_varlen_func(qv.double().cpu(), kv.double().cpu(), vv.double().cpu(),
                                           cu_q.cpu(), cu_k.cpu(), 66, 125, causal=True)
    same = _same_dtype_varlen(qv.cpu(), kv.cpu(), vv.cpu(), cu_q.cpu(), cu_k.cpu(), 0.125, True)
    _check(out, ref, same, dtype)


# (B, Sq, Sk, Hq, Hkv, D), window, causal, softcap
WINDOWED = [
    ((1, 97, 97, 2, 1, 64), (16, 0), False, 0.0),
    ((2, 33, 129, 4, 2, 64), (40, 7), False, 0.0),      # Sq < Sk, both bounds
    ((1, 129, 77, 2, 2, 80), (5, -1), True, 0.0),       # Sq > Sk: rows with no key; odd D
    ((1, 70, 70, 3, 1, 64), (-1, 3), False, 0.0),       # right bound only
    ((1, 7, 19, 2, 2, 96), (-1, -1), True, 5.0),        # softcap
    ((2, 65, 200, 4, 4, 64), (100, 100), False, 30.0),  # window + softcap, multi-block
    ((1, 1, 300, 8, 2, 128), (70, -1), True, 0.0),      # decode with a left window (no GQA folding)
    ((1, 1, 300, 8, 2, 128), (-1, 2), False, 2.0),      # decode, right window only (GQA folding)
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", WINDOWED, ids=lambda c: "x".join(map(str, c[0])) + f"-w{c[1][0]}_{c[1][1]}"
                         + ("-causal" if c[2] else "") + (f"-cap{c[3]:g}" if c[3] else ""))
def test_flash_attn_window_softcap_lse(case, dtype, device):
    (B, Sq, Sk, Hq, Hkv, D), window, causal, softcap = case
    gen = torch.Generator().manual_seed(Sq * 7 + Sk + D)
    q = _rand((B, Sq, Hq, D), dtype, device, gen)
    k = _rand((B, Sk, Hkv, D), dtype, device, gen)
    v = _rand((B, Sk, Hkv, D), dtype, device, gen)
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                      return_attn_probs=True)
    ref, ref_lse, _ = reference.flash_attn_func(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                                causal=causal, window_size=window, softcap=softcap,
                                                return_attn_probs=True)
    _check(out, ref, _same_dtype(q.cpu(), k.cpu(), v.cpu(), D ** -0.5, causal, window, softcap), dtype)
    assert lse.dtype == torch.float32 and lse.shape == (B, Hq, Sq) and lse.device == q.device
    # lse is computed from fp32 scores of the (rounded) inputs: close to fp64 in every dtype;
    # rows that see no key are -inf in both
    torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("sq,window,causal", [(3, (50, 0), False), (3, (30, 40), False), (3, (-1, -1), True),
                                              (1, (-1, -1), True), (1, (-1, 9), False)])
def test_flash_attn_split_kv_window_lse(sq, window, causal, splits, monkeypatch):
    """Split-KV with windows (splits outside the window stay empty) and lse through the combine;
    sq = 1 with GQA takes the decode layout (query heads as rows)."""
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", str(splits))
    gen = torch.Generator().manual_seed(splits)
    q = _rand((2, sq, 4, 64), torch.float16, "cpu", gen)
    k = _rand((2, 390, 2, 64), torch.float16, "cpu", gen)
    v = _rand((2, 390, 2, 64), torch.float16, "cpu", gen)
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=3.0,
                                      return_attn_probs=True)
    ref, ref_lse, _ = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal,
                                                window_size=window, softcap=3.0, return_attn_probs=True)
    _check(out, ref, _same_dtype(q, k, v, 0.125, causal, window, 3.0), torch.float16)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attn_varlen_window_softcap_lse(dtype, device):
    lq, lk = [0, 1, 77, 33, 129], [5, 1, 77, 64, 0]
    gen = torch.Generator().manual_seed(77)
    cu_q, cu_k = _cu(lq), _cu(lk)
    q = _rand((sum(lq) + 2, 4, 64), dtype, device, gen)  # 2 tokens past cu_seqlens_q[-1]
    k = _rand((sum(lk), 2, 64), dtype, device, gen)
    v = _rand((sum(lk), 2, 64), dtype, device, gen)
    for window, causal, softcap in [((9, 4), True, 10.0), ((-1, 15), False, 1.5)]:
        out, lse, _ = ops.flash_attn_varlen_func(q, k, v, cu_q.to(device), cu_k.to(device), 129, 77,
                                                 causal=causal, window_size=window, softcap=softcap,
                                                 return_attn_probs=True)
        ref, ref_lse, _ = reference.flash_attn_varlen_func(
            q.double().cpu(), k.double().cpu(), v.double().cpu(), cu_q, cu_k, 129, 77, causal=causal,
            window_size=window, softcap=softcap, return_attn_probs=True)
        same = _same_dtype_varlen(q.cpu(), k.cpu(), v.cpu(), cu_q, cu_k, 0.125, causal, window, softcap)
        _check(out, ref, same, dtype)
        assert lse.shape == (4, sum(lq) + 2) and lse.dtype == torch.float32
        torch.testing.assert_close(lse.double().cpu(), ref_lse, atol=2e-4, rtol=1e-5)
        assert (out[sum(lq):] == 0).all() and (lse[:, sum(lq):] == float("-inf")).all()


@pytest.mark.parametrize("window,causal,softcap", [((7, 2), False, 0.0), ((3, -1), True, 4.0)])
def test_flash_attn_math_fallback_window_softcap_lse(window, causal, softcap, monkeypatch):
    """The ATen fallback follows the same window / softcap / lse rules as the kernels."""
    gen = torch.Generator().manual_seed(23)
    q, k, v = (torch.randn(2, n, h, 48, generator=gen) for n, h in ((40, 4), (30, 2), (30, 2)))
    kern = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                               return_attn_probs=True)
    monkeypatch.setenv("HIRES_LMM_ATTN_MATH", "1")
    math_ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                return_attn_probs=True)
    ref = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=causal, window_size=window,
                                    softcap=softcap, return_attn_probs=True)
    for got in (kern, math_):
        assert _err(got[0], ref[0]) < 1e-5
        torch.testing.assert_close(got[1].double(), ref[1], atol=1e-5, rtol=1e-6)
    lq, lk = [0, 9, 33, 6], [4, 1, 20, 0]
    cu_q, cu_k = _cu(lq), _cu(lk)
    q, k, v = torch.randn(sum(lq) + 3, 4, 64), torch.randn(sum(lk), 2, 64), torch.randn(sum(lk), 2, 64)
    o, lse, _ = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 33, 20, causal=causal, window_size=window,
                                           softcap=softcap, return_attn_probs=True)
    ro, rlse, _ = reference.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, 33, 20,
                                                   causal=causal, window_size=window, softcap=softcap,
                                                   return_attn_probs=True)
    assert _err(o, ro) < 1e-5
    torch.testing.assert_close(lse.double(), rlse, atol=1e-5, rtol=1e-6)


def test_flash_attn_unsupported_and_bad_api_args():
    q, k, v = _qkv()
    with pytest.raises(NotImplementedError, match="argument 'dropout_p'"):
        ops.flash_attn_func(q, k, v, 0.1)
    with pytest.raises(NotImplementedError, match="argument 'alibi_slopes'"):
        ops.flash_attn_func(q, k, v, alibi_slopes=torch.ones(4))
    with pytest.raises(NotImplementedError, match="argument 'dropout_p'"):
        ops.flash_attn_varlen_func(q[0], k[0], v[0], _cu([8]), _cu([8]), 8, 8, 0.5)
    with pytest.raises(ValueError, match="argument 'window_size'"):
        ops.flash_attn_func(q, k, v, window_size=(-2, 0))
    with pytest.raises(TypeError, match="argument 'window_size'"):
        ops.flash_attn_func(q, k, v, window_size=4)
    with pytest.raises(ValueError, match="argument 'softcap'"):
        ops.flash_attn_func(q, k, v, softcap=-1.0)
    with pytest.raises(ValueError, match="argument 'softcap'"):
        ops.flash_attn_func(q, k, v, softcap=float("inf"))
    # the op itself checks too (direct torch.ops calls)
    with pytest.raises(RuntimeError, match="argument 'window_size'"):
        torch.ops.hires_lmm.flash_attn_func(q, k, v, None, False, -3, 0, 0.0)
    with pytest.raises(RuntimeError, match="argument 'softcap'"):
        torch.ops.hires_lmm.flash_attn_func(q, k, v, None, False, -1, -1, float("nan"))
    # deterministic is accepted: the forward is deterministic anyway
    torch.testing.assert_close(ops.flash_attn_func(q, k, v, deterministic=True), ops.flash_attn_func(q, k, v))
    with hires_lmm.use_backend("reference"):
        with pytest.raises(NotImplementedError, match="argument 'dropout_p'"):
            ops.flash_attn_func(q, k, v, 0.1)


def test_flash_attn_huge_window_is_unbounded():
    """A window bound at or past the sequence lengths constrains nothing (and never overflows)."""
    q, k, v = _qkv(S=50)
    base = ops.flash_attn_func(q, k, v, causal=True)
    for w in [(50, 0), (2**62, 0), (2**63 - 1, 2**63 - 1), (2**70, 0)]:
        torch.testing.assert_close(ops.flash_attn_func(q, k, v, window_size=(w[0], 0)), base)
    torch.testing.assert_close(ops.flash_attn_func(q, k, v, window_size=(2**63 - 1, 2**63 - 1)),
                               ops.flash_attn_func(q, k, v))


def test_flash_attn_lse_grad():
    gen = torch.Generator().manual_seed(31)
    q = torch.randn(1, 19, 4, 64, generator=gen, requires_grad=True)
    k = torch.randn(1, 23, 2, 64, generator=gen, requires_grad=True)
    v = torch.randn(1, 23, 2, 64, generator=gen, requires_grad=True)
    g = torch.randn(1, 19, 4, 64, generator=gen)
    out, lse, _ = ops.flash_attn_func(q, k, v, causal=True, window_size=(6, -1), softcap=5.0,
                                      return_attn_probs=True)
    assert not lse.requires_grad  # softmax_lse carries no gradient
    out.backward(g)
    leaves = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    reference.flash_attn_func(*leaves, causal=True, window_size=(6, -1), softcap=5.0).backward(g.double())
    for ours, ref in zip((q, k, v), leaves):
        torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-4, rtol=1e-4)


def test_flash_attn_compile_fullgraph_window_lse():
    q, k, v = (torch.randn(1, 20, 2, 64) for _ in range(3))

    def f(a, b, c):
        return ops.flash_attn_func(a, b, c, 0.0, causal=True, window_size=(4, 0), softcap=3.0,
                                   return_attn_probs=True)[:2]

    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    exp = f(q, k, v)
    torch.testing.assert_close(got[0], exp[0])
    torch.testing.assert_close(got[1], exp[1])


# ---- issue 8: every tensor checked against every other; max_seqlen is a bound; devices --------------
@pytest.mark.parametrize("math_path", [False, True])
def test_flash_attn_v_batch_checked(math_path, monkeypatch):
    if math_path:
        monkeypatch.setenv("HIRES_LMM_ATTN_MATH", "1")
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 7, 2, 16)
    for vb in (1, 0, 3):
        with pytest.raises(RuntimeError, match="argument 'v'.*batch"):
            ops.flash_attn_func(q, k, torch.randn(vb, 7, 2, 16))
    with pytest.raises(RuntimeError, match="argument 'v'.*heads"):
        ops.flash_attn_func(q, k, torch.randn(2, 7, 1, 16))
    with pytest.raises(RuntimeError, match="argument 'v'.*tokens"):
        ops.flash_attn_varlen_func(q[0], k[0], torch.randn(6, 2, 16), _cu([5]), _cu([7]), 5, 7)


def test_flash_attn_varlen_huge_max_seqlen_is_a_bound():
    """max_seqlen_* are bounds: 2**40 and 2**63-1 neither hang nor overflow (work follows cu_seqlens)."""
    gen = torch.Generator().manual_seed(40)
    lq, lk = [3, 0, 70], [9, 4, 65]
    q, k, v = (torch.randn(sum(n), h, 32, generator=gen) for n, h in ((lq, 4), (lk, 2), (lk, 2)))
    cu_q, cu_k = _cu(lq), _cu(lk)
    exp = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 70, 65, causal=True)
    ref = reference.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, 70, 65, causal=True)
    assert _err(exp, ref) < 1e-5
    for big in (2**40, 2**63 - 1):
        got = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, big, big, causal=True)
        torch.testing.assert_close(got, exp, atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="argument 'max_seqlen_k'"):
        ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 2**40, 64)


def test_flash_attn_varlen_reference_tail_rows_zero():
    q, k, v = torch.randn(9, 2, 16), torch.randn(4, 2, 16), torch.randn(4, 2, 16)
    out, lse, _ = reference.flash_attn_varlen_func(q, k, v, _cu([2, 3]), _cu([4, 0]), 3, 4,
                                                   return_attn_probs=True)
    assert (out[5:] == 0).all() and (lse[:, 5:] == float("-inf")).all()
    assert (out[2:5] == 0).all()  # the second sequence has no key


def test_flash_attn_meta_mixed_with_real_is_an_error():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="argument 'k'.*meta"):
        ops.flash_attn_func(q, k.to("meta"), v)
    with pytest.raises(RuntimeError, match="argument 'cu_seqlens_k'|argument 'q'"):
        ops.flash_attn_varlen_func(q[0], k[0], v[0], _cu([8]), _cu([8]).to("meta"), 8, 8)
    # all-meta still traces shapes
    o, lse, _ = ops.flash_attn_func(q.to("meta"), k.to("meta"), v.to("meta"), return_attn_probs=True)
    assert o.shape == q.shape and lse.shape == (1, 4, 8) and lse.dtype == torch.float32


# ---- non-finite rule: NaN/inf reach exactly the rows whose formula reads them --------------------------
def _paths(monkeypatch, fn):
    """fn() on the CPU kernel, the ATen fallback and the reference backend."""
    res = {"kernel": fn()}
    monkeypatch.setenv("HIRES_LMM_ATTN_MATH", "1")
    res["math"] = fn()
    monkeypatch.delenv("HIRES_LMM_ATTN_MATH")
    with hires_lmm.use_backend("reference"):
        res["reference"] = fn()
    return res


def _same_pattern(res):
    (_, (o0, l0)), *rest = res.items()
    for name, (o, l) in rest:
        assert torch.equal(torch.isnan(o), torch.isnan(o0)), name
        assert torch.equal(torch.isnan(l), torch.isnan(l0)), name
        fin = torch.isfinite(o0)
        torch.testing.assert_close(o[fin], o0[fin], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(l.nan_to_num(), l0.nan_to_num(), atol=1e-5, rtol=1e-5)


def test_flash_attn_nonfinite_rule(monkeypatch):
    gen = torch.Generator().manual_seed(44)
    B, Sq, Sk, H, D = 1, 12, 9, 2, 16  # causal Sq > Sk: rows 0..2 see no key
    q, k, v = (torch.randn(B, n, H, D, generator=gen) for n in (Sq, Sk, Sk))

    def run(q, k, v, **kw):
        return lambda: tuple(ops.flash_attn_func(q, k, v, return_attn_probs=True, **kw)[:2])

    # NaN in one query row: only that row is NaN
    qn = q.clone()
    qn[0, 6, 1, 3] = float("nan")
    res = _paths(monkeypatch, run(qn, k, v, causal=True))
    _same_pattern(res)
    o, lse = res["kernel"]
    assert torch.isnan(o[0, 6, 1]).all() and torch.isnan(lse[0, 1, 6])
    assert torch.isfinite(o[0, :6]).all() and torch.isfinite(o[0, 7:]).all() and torch.isfinite(o[0, 6, 0]).all()
    # NaN in key 5: rows that see it (causal: i >= 5 + Sq - Sk = 8) are NaN; rows 3..7 finite; 0..2 zero
    kn = k.clone()
    kn[0, 5, 0, 0] = float("nan")
    res = _paths(monkeypatch, run(q, kn, v, causal=True))
    _same_pattern(res)
    o, lse = res["kernel"]
    assert torch.isnan(o[0, 8:, 0]).all() and torch.isfinite(o[0, 3:8]).all() and torch.isfinite(o[0, :, 1]).all()
    assert (o[0, :3] == 0).all() and (lse[0, :, :3] == float("-inf")).all()
    # NaN / inf in v: only rows that see that key (the CPU kernel and the reference read visible rows)
    vn = v.clone()
    vn[0, 5, 0, 2] = float("inf")
    res = _paths(monkeypatch, run(q, k, vn, causal=True))
    _same_pattern(res)
    for o, _ in res.values():
        assert not torch.isfinite(o[0, 8:, 0, 2]).any() and torch.isfinite(o[0, :8]).all()
        assert torch.isfinite(o[0, 8:, 0, :2]).all() and torch.isfinite(o[0, :, 1]).all()
    # varlen: a NaN in one sequence's v never reaches another sequence (all three paths)
    cu = _cu([5, 4])
    vv = torch.randn(9, H, D, generator=gen)
    vv[6, 0, 1] = float("nan")
    res = _paths(monkeypatch, lambda: tuple(ops.flash_attn_varlen_func(
        q[0, :9], k[0], vv, cu, cu, 5, 5, return_attn_probs=True)[:2]))
    _same_pattern(res)
    for o, _ in res.values():
        assert torch.isfinite(o[:5]).all() and torch.isnan(o[5:, 0, 1]).all() and torch.isfinite(o[5:, 1]).all()
    # softmax_scale inf / NaN: every row with a key is NaN, rows with no key stay 0 / -inf
    for scale in (float("inf"), float("nan")):
        res = _paths(monkeypatch, run(q, k, v, causal=True, softmax_scale=scale))
        _same_pattern(res)
        o, lse = res["kernel"]
        assert torch.isnan(o[0, 3:]).all() and (o[0, :3] == 0).all()
        # (a row whose scores are all -inf has lse -inf, else NaN)
        assert (lse[0, :, :3] == float("-inf")).all() and not torch.isfinite(lse[0, :, 3:]).any()
    # every visible score -inf (k = -inf, q > 0): 0/0 = NaN output, lse = -inf
    qp, kinf = q.abs() + 0.1, torch.full_like(k, float("-inf"))
    res = _paths(monkeypatch, run(qp, kinf, v))
    _same_pattern(res)
    o, lse = res["kernel"]
    assert torch.isnan(o).all() and (lse == float("-inf")).all()
