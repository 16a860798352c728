"""flash_attn_with_kvcache: decode over a dense KV cache with an in-place append (flash-attn's
semantics), against the fp64 reference, flash_attn_func on the sliced cache, and bad input.

Accuracy criterion as tests/test_flash_attn.py (flash-attn's): max |ours - ref64| <=
2 * max |same - ref64| + atol, `same` = plain PyTorch attention in the input dtype.
Stale cache rows (past each sequence's length) hold NaN: they must never be read."""
import math

import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference
from conftest import DEVICES, DTYPES, HAS_CUDA, NO_CUDA_REASON


@pytest.fixture(autouse=True)
def _cpu_twin(monkeypatch):
    """CPU calls in this file run the CPU twin of the CUDA kernel (HIRES_LMM_CPU_TWIN=1: the proof
    of the CUDA tiling); tests/test_cpu_paths.py runs these tests on the default CPU path."""
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")


ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
OP = torch.ops.hires_lmm.flash_attn_with_kvcache.default


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(device)


def _same_dtype(q, k, v, scale, causal):
    """One batch element in q's dtype (no upcast): q (Sq,Hq,D), k/v (L,Hkv,D)."""
    Sq, Hq, _ = q.shape
    L, Hkv = k.shape[0], k.shape[1]
    kh, vh = k.transpose(0, 1), v.transpose(0, 1)
    if Hq != Hkv:
        kh, vh = kh.repeat_interleave(Hq // Hkv, 0), vh.repeat_interleave(Hq // Hkv, 0)
    s = (q.transpose(0, 1) @ kh.transpose(-1, -2)) * scale
    if causal:
        i, j = torch.arange(Sq).view(-1, 1), torch.arange(L).view(1, -1)
        s = s.masked_fill(j > i + (L - Sq), float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ vh).transpose(0, 1)


def _err(a, b):
    return 0.0 if a.numel() == 0 else (a.double().cpu() - b.double().cpu()).abs().max().item()


def _make(B, Sq, S_cache, Hq, Hkv, D, lens, snew, dtype, device, seed):
    """q, caches (rows past each length = NaN), new k/v (or None), cache_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    q = _rand((B, Sq, Hq, D), dtype, device, gen)
    kc = _rand((B, S_cache, Hkv, D), dtype, device, gen)
    vc = _rand((B, S_cache, Hkv, D), dtype, device, gen)
    for b, n in enumerate(lens):
        kc[b, n:] = float("nan")
        vc[b, n:] = float("nan")
    k = v = None
    if snew is not None:
        k, v = _rand((B, snew, Hkv, D), dtype, device, gen), _rand((B, snew, Hkv, D), dtype, device, gen)
    cs = torch.tensor(lens, dtype=torch.int32, device=device)
    return q, kc, vc, k, v, cs


# (name, Sq, S_cache, Hq, Hkv, D, lens (B=3), Snew or None)
CASES = [
    ("decode-gqa", 1, 77, 4, 2, 64, [0, 40, 76], 1),          # 0 and full-minus-Snew
    ("decode-noappend", 1, 130, 2, 2, 64, [0, 129, 130], None),  # L_b = 0: zeros
    ("chunk5-gqa3", 5, 70, 6, 2, 48, [0, 33, 65], 5),
    ("sq3-snew0", 3, 9, 2, 1, 64, [2, 0, 9], 0),              # causal rows that see no key
    ("sq1-mqa-d128", 1, 200, 8, 1, 128, [150, 7, 199], 1),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0])
def test_kvcache_vs_reference(case, causal, dtype, device):
    _, Sq, S_cache, Hq, Hkv, D, lens, snew = case
    q, kc, vc, k, v, cs = _make(3, Sq, S_cache, Hq, Hkv, D, lens, snew, dtype, device, seed=Sq + D + S_cache)
    kc0, vc0 = kc.clone(), vc.clone()
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=cs, causal=causal)
    assert out.shape == q.shape and out.dtype == dtype and out.device == q.device
    # the append, exactly: new rows at cache_seqlens[b], every other row untouched
    n_new = 0 if snew is None else snew
    for b, n in enumerate(lens):
        if n_new:
            assert torch.equal(kc[b, n:n + n_new], k[b]) and torch.equal(vc[b, n:n + n_new], v[b])
        for cache, old in ((kc, kc0), (vc, vc0)):
            torch.testing.assert_close(cache[b, :n], old[b, :n], atol=0, rtol=0)
            torch.testing.assert_close(cache[b, n + n_new:], old[b, n + n_new:], atol=0, rtol=0,
                                       equal_nan=True)
    # the reference mutates fp64 copies of the original caches the same way
    kr, vr = kc0.double().cpu(), vc0.double().cpu()
    ref64 = reference.flash_attn_with_kvcache(
        q.double().cpu(), kr, vr, None if k is None else k.double().cpu(),
        None if v is None else v.double().cpu(), cs.cpu(), None, causal)
    assert torch.equal(kr.isnan(), kc.cpu().isnan())
    err, base = _err(out, ref64), 0.0
    for b, n in enumerate(lens):
        L = n + n_new
        same = _same_dtype(q[b].cpu(), kc[b, :L].cpu(), vc[b, :L].cpu(), D ** -0.5, causal)
        base = max(base, _err(same, ref64[b]))
    assert torch.isfinite(out.float()).all()
    assert err <= 2 * base + ATOL[dtype], f"max err {err:.3e} > 2 * {base:.3e} + {ATOL[dtype]:.0e}"
    if causal:
        for b, n in enumerate(lens):  # rows i < Sq - L_b see no key -> exactly 0
            assert (out[b, : max(0, Sq - n - n_new)].float() == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,causal", [(1, True), (4, True), (4, False)])
def test_kvcache_equals_flash_attn_func_on_slice(sq, causal, dtype, device):
    """Batch element b gives what flash_attn_func gives on k_cache[b, :L_b] (same kernel, same
    tiles): ragged lengths in one batch change nothing for each sequence."""
    lens, snew = [0, 61, 123], sq
    q, kc, vc, k, v, cs = _make(3, sq, 130, 4, 2, 64, lens, snew, dtype, device, seed=sq)
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs, causal=causal)
    for b, n in enumerate(lens):
        L = n + snew
        alone = ops.flash_attn_func(q[b:b + 1], kc[b:b + 1, :L], vc[b:b + 1, :L], causal=causal)
        torch.testing.assert_close(out[b:b + 1], alone, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_batch_invariant(dtype, device):
    """Batching is exact: each sequence's output equals its output alone (B=1, its own cache row,
    the same cache size), bitwise, with the default split-KV choice (MQA decode over 400 slots:
    one sequence alone has few work items, so the heuristic splits)."""
    lens = [5, 200, 398]
    q, kc, vc, k, v, cs = _make(3, 1, 400, 4, 1, 64, lens, 1, dtype, device, seed=12)
    parts = [(q[b:b + 1].clone(), kc[b:b + 1].clone(), vc[b:b + 1].clone(), k[b:b + 1], v[b:b + 1],
              cs[b:b + 1]) for b in range(3)]
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
    for b, args in enumerate(parts):
        torch.testing.assert_close(out[b:b + 1], ops.flash_attn_with_kvcache(*args), atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("sq,causal", [(1, True), (3, True), (2, False)])
def test_kvcache_split_kv(sq, causal, splits, device, monkeypatch):
    """Split-KV (decode): forced split counts over per-sequence lengths from one K block (where
    most splits are empty) to the whole cache."""
    monkeypatch.setenv("HIRES_LMM_ATTN_SPLITS", str(splits))
    dtype = torch.bfloat16
    lens = [0, 50 - sq, 389 - sq]
    q, kc, vc, k, v, cs = _make(3, sq, 390, 4, 2, 64, lens, sq, dtype, device, seed=splits)
    kr, vr = kc.double().cpu(), vc.double().cpu()
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs, causal=causal)
    ref64 = reference.flash_attn_with_kvcache(q.double().cpu(), kr, vr, k.double().cpu(),
                                              v.double().cpu(), cs.cpu(), None, causal)
    base = max(_err(_same_dtype(q[b].cpu(), kc[b, :n + sq].cpu(), vc[b, :n + sq].cpu(), 0.125, causal),
                    ref64[b]) for b, n in enumerate(lens))
    assert _err(out, ref64) <= 2 * base + ATOL[dtype]


def test_kvcache_int_seqlens_and_none():
    """cache_seqlens as a Python int; None (no append) means the whole cache."""
    q, kc, vc, k, v, cs = _make(3, 2, 40, 2, 2, 64, [17, 17, 17], 2, torch.float32, "cpu", seed=1)
    kc2, vc2 = kc.clone(), vc.clone()
    a = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=17)
    b = ops.flash_attn_with_kvcache(q, kc2, vc2, k, v, cache_seqlens=cs)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert torch.equal(kc[:, 17:19], k)
    full = torch.randn(3, 40, 2, 64)
    torch.testing.assert_close(ops.flash_attn_with_kvcache(q, full, full, causal=True),
                               ops.flash_attn_func(q, full, full, causal=True), atol=0, rtol=0)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_math_fallback(causal, monkeypatch):
    """The ATen fallback (CUDA: fp32 and head dims without a kernel), forced on the CPU; stale NaN
    rows must not leak through 0 * NaN."""
    monkeypatch.setenv("HIRES_LMM_ATTN_MATH", "1")
    lens = [0, 12, 36]
    q, kc, vc, k, v, cs = _make(3, 4, 40, 4, 2, 80, lens, 4, torch.float32, "cpu", seed=2)
    kr, vr = kc.double(), vc.double()
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs, causal=causal)
    ref = reference.flash_attn_with_kvcache(q.double(), kr, vr, k.double(), v.double(), cs, None, causal)
    assert _err(out, ref) < 1e-5
    assert torch.equal(kc[2, 36:40], k[2])


def test_kvcache_reference_backend():
    q, kc, vc, k, v, cs = _make(3, 1, 30, 2, 1, 64, [3, 0, 29], 1, torch.float32, "cpu", seed=4)
    kc2, vc2 = kc.clone(), vc.clone()
    ours = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs, softmax_scale=0.3)
    with hires_lmm.use_backend("reference"):
        ref = ops.flash_attn_with_kvcache(q, kc2, vc2, k, v, cs, softmax_scale=0.3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0, equal_nan=True)


def test_kvcache_noncontiguous():
    """A cache in (B, H, S, D) storage seen as (B, S, H, D) and a strided q: appended in place
    into the caller's storage, read correctly."""
    gen = torch.Generator().manual_seed(9)
    kc = torch.randn(2, 2, 50, 64, generator=gen).transpose(1, 2)
    vc = torch.randn(2, 2, 50, 64, generator=gen).transpose(1, 2)
    q = torch.randn(2, 4, 3, 64, generator=gen).transpose(1, 2)
    k, v = torch.randn(2, 3, 2, 64, generator=gen), torch.randn(2, 3, 2, 64, generator=gen)
    cs = torch.tensor([5, 47], dtype=torch.int32)
    kr, vr = kc.double(), vc.double()
    out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
    ref = reference.flash_attn_with_kvcache(q.double(), kr, vr, k.double(), v.double(), cs, None, True)
    assert torch.equal(kc[1, 47:50], k[1]) and torch.equal(vc[0, 5:8], v[0])
    assert _err(out, ref) < 1e-5


# ---- autograd stance, opcheck, compile ------------------------------------------------------------
def test_kvcache_not_differentiable():
    """Asking for gradients is an error (wrapper and raw op), not silent None gradients; the
    append bumps the caches' version counters like any in-place op."""
    q, kc, vc, k, v, cs = _make(1, 1, 8, 2, 2, 64, [3], 1, torch.float32, "cpu", seed=5)
    with pytest.raises(RuntimeError, match="not differentiable"):
        ops.flash_attn_with_kvcache(q.requires_grad_(True), kc, vc, k, v, cs)
    with pytest.raises(RuntimeError, match="not differentiable"):
        OP(q, kc, vc, k.requires_grad_(True), v, cs, None, True)
    with torch.no_grad():
        assert ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs).shape == q.shape
    q, k = q.detach(), k.detach()
    ver = (kc._version, vc._version)
    OP(q, kc, vc, k, v, cs, None, True)
    assert kc._version > ver[0] and vc._version > ver[1]


def test_kvcache_opcheck():
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(2, 3, 4, 64, generator=gen)
    kc, vc = torch.randn(2, 20, 2, 64, generator=gen), torch.randn(2, 20, 2, 64, generator=gen)
    k, v = torch.randn(2, 3, 2, 64, generator=gen), torch.randn(2, 3, 2, 64, generator=gen)
    cs = torch.tensor([4, 17], dtype=torch.int32)
    torch.library.opcheck(OP, (q, kc, vc, k, v, cs, 0.2, True))
    torch.library.opcheck(OP, (q, kc, vc, None, None, cs, None, False))


def test_kvcache_compile_fullgraph():
    """torch.compile traces the op (fake kernel + declared mutation) and keeps the in-place append."""
    q, kc, vc, k, v, cs = _make(2, 1, 24, 4, 2, 64, [3, 10], 1, torch.float32, "cpu", seed=6)
    kc, vc = kc.nan_to_num(0.0), vc.nan_to_num(0.0)
    kc2, vc2 = kc.clone(), vc.clone()
    fn = torch.compile(lambda *a: ops.flash_attn_with_kvcache(*a), fullgraph=True, backend="eager")
    out = fn(q, kc, vc, k, v, cs)
    exp = ops.flash_attn_with_kvcache(q, kc2, vc2, k, v, cs)
    torch.testing.assert_close(out, exp, atol=0, rtol=0)
    torch.testing.assert_close(kc, kc2, atol=0, rtol=0)
    torch.testing.assert_close(vc, vc2, atol=0, rtol=0)


# ---- bad input -----------------------------------------------------------------------------------
def test_kvcache_bad_input():
    q, kc, vc, k, v, cs = _make(2, 1, 16, 4, 2, 64, [3, 9], 1, torch.float32, "cpu", seed=7)
    f = ops.flash_attn_with_kvcache
    bad = [
        ("argument 'q'.*float32, float16 or bfloat16", (q.double(), kc.double(), vc.double())),
        ("argument 'k_cache'.*dtype", (q, kc.half(), vc)),
        ("argument 'v_cache'.*dtype", (q, kc, vc.half())),
        ("argument 'q'.*4-D", (q[0], kc, vc)),
        ("argument 'k_cache'.*4-D", (q, kc[0], vc)),
        ("argument 'k_cache'.*head_dim", (q, kc[..., :32], vc[..., :32])),
        ("argument 'v_cache'.*shape of 'k_cache'", (q, kc, vc[:, :8])),
        ("argument 'k_cache'.*batch", (q, kc[:1], vc[:1])),
        ("argument 'k_cache'.*heads_q % heads_kv", (q[:, :, :3], kc, vc)),
        ("argument 'v'.*together", (q, kc, vc, k, None, cs)),
        ("argument 'k'.*together", (q, kc, vc, None, v, cs)),
        ("argument 'k'.*heads_kv", (q, kc, vc, k[:, :, :1], v[:, :, :1], cs)),
        ("argument 'v'.*dtype", (q, kc, vc, k, v.half(), cs)),
        ("argument 'v'.*new tokens", (q, kc, vc, k, torch.cat([v, v], 1), cs)),
        ("argument 'k'.*more than the cache length",
         (q, kc, vc, torch.zeros(2, 17, 2, 64), torch.zeros(2, 17, 2, 64), cs)),
        ("argument 'cache_seqlens'.*must be given", (q, kc, vc, k, v, None)),
        ("argument 'cache_seqlens'.*int32", (q, kc, vc, k, v, cs.long())),
        ("argument 'cache_seqlens'.*1-D", (q, kc, vc, k, v, cs[:1])),
        ("argument 'cache_seqlens'.*overflows the cache: batch element 1", (q, kc, vc, k, v, cs + 7)),
        ("argument 'cache_seqlens'.*>= 0", (q, kc, vc, k, v, cs - 4)),
        ("argument 'cache_seqlens'.*overflows", (q, kc, vc, None, None, cs + 8)),
        ("argument 'q'.*up to 512", (torch.randn(1, 1, 1, 520), torch.randn(1, 4, 1, 520),
                                     torch.randn(1, 4, 1, 520))),
    ]
    for pattern, args in bad:
        before = kc.clone()
        with pytest.raises(RuntimeError, match=pattern):
            f(*args)
        assert torch.equal(kc.nan_to_num(7.0), before.nan_to_num(7.0)), pattern  # nothing written
    hires_lmm.set_value_checks(False)  # CPU: the values are read anyway, so still checked
    with pytest.raises(RuntimeError, match="overflows"):
        f(q, kc, vc, k, v, cs + 7)


# ---- CUDA specifics --------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D", [64, 128])
def test_kvcache_cuda_matches_cpu_twin(D, dtype):
    lens = [0, 300, 1022]
    for sq in (1, 7):
        q, kc, vc, k, v, cs = _make(3, sq, 1024 + sq, 8, 2, D, lens, sq, dtype, "cpu", seed=D + sq)
        kg, vg = kc.cuda(), vc.cuda()
        cpu = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
        gpu = ops.flash_attn_with_kvcache(q.cuda(), kg, vg, k.cuda(), v.cuda(), cs.cuda()).cpu()
        assert torch.equal(kg.cpu().nan_to_num(0.0), kc.nan_to_num(0.0))
        ulp = 1e-2 if dtype == torch.bfloat16 else 2e-3
        torch.testing.assert_close(gpu.float(), cpu.float(), atol=ulp, rtol=ulp)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fp32: the ATen fallback
def test_kvcache_cuda_graph_decode(dtype):
    """A decode step (append + attention + cache_seqlens += 1) captured once in a CUDA graph and
    replayed: no host sync inside (value checks skip during capture); equals eager steps."""
    B, S, H, D = 3, 512, 8, 128
    gen = torch.Generator().manual_seed(0)
    kc = _rand((B, S, 2, D), dtype, "cuda", gen)
    vc = _rand((B, S, 2, D), dtype, "cuda", gen)
    kc_e, vc_e = kc.clone(), vc.clone()
    cs = torch.tensor([0, 100, 300], dtype=torch.int32, device="cuda")
    cs_e = cs.clone()
    q = torch.zeros(B, 1, H, D, dtype=dtype, device="cuda")
    k = torch.zeros(B, 1, 2, D, dtype=dtype, device="cuda")
    v = torch.zeros_like(k)

    def step():
        o = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
        cs.add_(1)
        return o

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the graph (then undo its effect on cs)
        step()
        cs.sub_(1)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()  # recorded, not run: cs is unchanged
    for t in range(3):
        for x in (q, k, v):
            x.copy_(_rand(x.shape, dtype, "cpu", gen))
        graph.replay()
        exp = ops.flash_attn_with_kvcache(q, kc_e, vc_e, k, v, cs_e)
        cs_e.add_(1)
        torch.cuda.synchronize()
        torch.testing.assert_close(out, exp, atol=0, rtol=0)
        assert torch.equal(cs, cs_e) and torch.equal(kc, kc_e) and torch.equal(vc, vc_e)
