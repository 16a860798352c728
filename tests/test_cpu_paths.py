"""The default CPU paths (README "CPU paths") against the fp64 reference, with the criteria of the
twin's own tests (tests/test_flash_attn*.py, test_convnext_ops.py, which run the CPU twin of the
CUDA kernels with HIRES_LMM_CPU_TWIN=1): attention and its varlen / kvcache forms through ATen's
CPU flash kernel where it gives our semantics (the twin elsewhere: softcap, rows that see no key,
non-finite scores or outputs), dwconv_layernorm through its fused AVX2/FMA CPU kernel (ATen's conv
and LayerNorm in fp32 where that kernel does not apply).
Here HIRES_LMM_CPU_TWIN is unset: these calls take the default path."""
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference
import test_convnext_ops as tcv
import test_flash_attn as tfa
import test_flash_attn_kvcache as tkv
from conftest import DTYPES


@pytest.fixture(autouse=True)
def default_cpu_path(monkeypatch):
    monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)
    monkeypatch.delenv("HIRES_LMM_ATTN_MATH", raising=False)


# ---- attention -----------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", tfa.DENSE, ids=lambda s: "x".join(map(str, s)))
def test_attention_dense(shape, causal, dtype):
    tfa.test_flash_attn_dense(shape, causal, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", tfa.WINDOWED, ids=lambda c: "x".join(map(str, c[0])) + f"-w{c[1][0]}_{c[1][1]}"
                         + ("-causal" if c[2] else "") + (f"-cap{c[3]:g}" if c[3] else ""))
def test_attention_window_softcap_lse(case, dtype):
    tfa.test_flash_attn_window_softcap_lse(case, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", tfa.VARLEN, ids=lambda c: f"{len(c[0])}seqs-d{c[4]}")
def test_attention_varlen(case, causal, dtype):
    tfa.test_flash_attn_varlen(case, causal, dtype, "cpu")


def test_attention_varlen_matches_dense():
    tfa.test_flash_attn_varlen_matches_dense("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_noncontiguous_and_scale(dtype):
    tfa.test_flash_attn_noncontiguous_and_scale(dtype, "cpu")


def test_attention_empty_and_no_keys():
    tfa.test_flash_attn_empty_and_no_keys("cpu")


def test_attention_nonfinite_rule(monkeypatch):
    tfa.test_flash_attn_nonfinite_rule(monkeypatch)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("case", tkv.CASES, ids=lambda c: c[0])
def test_kvcache(case, causal, dtype):
    tkv.test_kvcache_vs_reference(case, causal, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sq,causal", [(1, True), (4, True), (4, False)])
def test_kvcache_equals_flash_attn_func_on_slice(sq, causal, dtype):
    tkv.test_kvcache_equals_flash_attn_func_on_slice(sq, causal, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_default_matches_twin(dtype, monkeypatch):
    """Both CPU paths agree at an odd GQA, bottom-right causal shape (lse too)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 37, 6, 72, generator=g).to(dtype)
    k = torch.randn(2, 91, 2, 72, generator=g).to(dtype)
    v = torch.randn(2, 91, 2, 72, generator=g).to(dtype)
    op = torch.ops.hires_lmm.flash_attn_func
    o1, l1 = op(q, k, v, None, True, 40, -1, 0.0)
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    o2, l2 = op(q, k, v, None, True, 40, -1, 0.0)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(o1.float(), o2.float(), atol=tol, rtol=0)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)


def test_nonfinite_v_stays_in_its_rows():
    """A NaN/inf v row reaches only the rows that see its key (causal, Sq < Sk): the default path
    sends non-finite input to the twin."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 20, 2, 32, generator=g) for _ in range(3))
    k = torch.randn(1, 30, 2, 32, generator=g)
    v = torch.randn(1, 30, 2, 32, generator=g)
    v[0, 25, 1, 3] = float("inf")
    v[0, 27, 0, 0] = float("nan")
    out = ops.flash_attn_func(q, k, v, causal=True)
    ref = reference.flash_attn_func(q.double(), k.double(), v.double(), causal=True)
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin)
    assert fin[0, :15].all() and not fin[0, 15:].all()  # row i sees keys <= i + 10
    torch.testing.assert_close(out[fin].double(), ref[fin], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,hq,hkv,d,causal,window", [
    (1, 77, 8, 2, 72, False, (-1, -1)),    # decode, GQA 4, D not a multiple of 16
    (3, 40, 4, 1, 64, True, (-1, -1)),     # MQA, causal rows with different key ranges
    (4, 2, 2, 2, 16, True, (-1, -1)),      # causal Sq > Sk: rows that see no key -> 0, lse -inf
    (2, 50, 6, 3, 24, False, (9, 0)),      # sliding window
])
def test_small_q_kernel_matches_twin(sq, sk, hq, hkv, d, causal, window, dtype, monkeypatch):
    """The decode-shaped CPU kernel (Sq <= 4: query heads grouped per kv head) against the twin,
    o and lse, with and without a NaN in a v row that only some rows see."""
    g = torch.Generator().manual_seed(sq * 100 + sk)
    q = torch.randn(2, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(2, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(2, sk, hkv, d, generator=g).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for poison in (False, True):
        if poison:
            v[1, sk - 1, 0, 1] = float("nan")
        o1, l1, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
        o2, l2, _ = ops.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)
        monkeypatch.delenv("HIRES_LMM_CPU_TWIN")
        assert torch.equal(o1.isnan(), o2.isnan())
        torch.testing.assert_close(o1.float().nan_to_num(), o2.float().nan_to_num(), atol=tol, rtol=0)
        torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kvcache_decode_kernel_matches_twin(dtype, monkeypatch):
    """Ragged decode with an in-place append: the CPU kernel reads only the L_b keys of each
    sequence (stale NaN rows past L_b stay unread) and appends exactly as the twin."""
    g = torch.Generator().manual_seed(11)
    B, S, hq, hkv, d = 3, 40, 8, 2, 64
    q = torch.randn(B, 2, hq, d, generator=g).to(dtype)
    kc = torch.randn(B, S, hkv, d, generator=g).to(dtype)
    vc = torch.randn(B, S, hkv, d, generator=g).to(dtype)
    kc[:, 30:] = float("nan")
    vc[:, 30:] = float("nan")
    kn, vn = (torch.randn(B, 2, hkv, d, generator=g).to(dtype) for _ in range(2))
    lens = torch.tensor([0, 17, 28], dtype=torch.int32)
    kc2, vc2 = kc.clone(), vc.clone()
    with torch.no_grad():
        o1 = ops.flash_attn_with_kvcache(q, kc, vc, kn, vn, lens, causal=True)
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
        o2 = ops.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, lens, causal=True)
    assert torch.equal(kc.nan_to_num(7.0), kc2.nan_to_num(7.0))
    assert torch.equal(vc.nan_to_num(7.0), vc2.nan_to_num(7.0))
    assert torch.isfinite(o1).all()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(o1.float(), o2.float(), atol=tol, rtol=0)


@pytest.mark.skipif(not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
                    reason="the check reads an ELF file; torch without OpenMP has no OpenMP pool to share")
def test_extension_links_openmp():
    """at::parallel_for is header code: an extension compiled without OpenMP runs every range on the
    calling thread (so no CPU kernel here would use a second thread). The build links OpenMP."""
    so = Path(hires_lmm._C.__file__)
    out = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in out or "libomp" in out or "libiomp" in out, out


@pytest.fixture
def threads():
    """Sets the intra-op thread count for one test (the decode kernel's key split depends on it)."""
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("nthreads", [2, 5])
@pytest.mark.parametrize("sq,sk,hq,hkv,d,causal,window", [
    (1, 513, 4, 1, 64, False, (-1, -1)),   # MQA decode: keys split in 2 / 4 chunks
    (3, 300, 6, 2, 96, True, (-1, -1)),    # GQA 3, causal rows; 2 threads: no split (2 kv heads)
    (2, 700, 2, 1, 33, False, (400, 0)),   # window: keys before 298 seen by no row, 2-3 chunks after
    (4, 260, 2, 1, 128, True, (-1, -1)),   # chunk length 130 (W = 260, 2 chunks)
])
def test_small_q_key_split_matches_twin(sq, sk, hq, hkv, d, causal, window, nthreads, dtype, threads,
                                        monkeypatch):
    """The decode kernel with its keys split over threads (fewer kv heads than threads: chunks of
    >= 128 keys, merged by log-sum-exp) against the twin (o, lse), and against the unsplit kernel
    (1 thread); a NaN in a v row reaches exactly the twin's rows; an inf in q goes to the twin."""
    g = torch.Generator().manual_seed(sq * 1000 + sk + d)
    q = torch.randn(1, sq, hq, d, generator=g).to(dtype)
    k = torch.randn(1, sk, hkv, d, generator=g).to(dtype)
    v = torch.randn(1, sk, hkv, d, generator=g).to(dtype)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]

    def run(twin, n):
        threads(n)
        if twin:
            monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
        try:
            return ops.flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True)[:2]
        finally:
            monkeypatch.delenv("HIRES_LMM_CPU_TWIN", raising=False)

    for poison in (None, "v", "q"):
        if poison == "v":
            v[0, sk - 5, 0, 2] = float("nan")  # the last chunk: seen by every row (window right 0)
        if poison == "q":
            q[0, 0, 0, 1] = float("inf")
        o1, l1 = run(False, nthreads)
        o2, l2 = run(True, nthreads)
        assert torch.equal(o1.isnan(), o2.isnan())
        assert poison is None or o1.isnan().any()
        torch.testing.assert_close(o1.float().nan_to_num(), o2.float().nan_to_num(), atol=tol, rtol=0)
        torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5, equal_nan=True)
        if poison is None:  # split vs unsplit: the same sums in another order
            o0, l0 = run(False, 1)
            torch.testing.assert_close(o1.float(), o0.float(), atol=tol, rtol=0)
            torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["none", "k_nan", "q_nan", "v_nan", "overflow"])
def test_prefill_finiteness_pass_in_parallel(poison, dtype, threads, monkeypatch):
    """The ATen path's one pass over q, k and v (>= 256K elements: split over 2 threads, the poisoned
    element in the last segment of its tensor) decides as the twin: o and lse against the twin."""
    threads(2)
    g = torch.Generator().manual_seed(8)
    q = torch.randn(1, 601, 4, 64, generator=g).to(dtype)
    k = torch.randn(1, 601, 2, 64, generator=g).to(dtype)
    v = torch.randn(1, 601, 2, 64, generator=g).to(dtype)
    if poison == "k_nan":
        k[0, 590, 1, 63] = float("nan")  # rows >= 590 of q heads 2, 3 see it
    elif poison == "q_nan":
        q[0, 599, 3, 5] = float("nan")
    elif poison == "v_nan":
        v[0, 550, 0, 7] = float("nan")  # causal: rows >= 550 see it
    elif poison == "overflow":  # finite inputs, scores beyond fp32 for every row that sees key 600
        k[0, 600] = 3e18 if dtype != torch.float16 else 6e4
        q = q * (3e18 if dtype != torch.float16 else 6e4)
    o1, l1, _ = ops.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    o2, l2, _ = ops.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(o1.isnan(), o2.isnan()) and torch.equal(o1.isinf(), o2.isinf())
    assert poison in ("none", "overflow") or o1.isnan().any()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    fin = torch.isfinite(o2)
    torch.testing.assert_close(o1[fin].float(), o2[fin].float(), atol=tol, rtol=0)
    torch.testing.assert_close(l1, l2, atol=1e-4, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kvcache_key_split_batch_invariant(dtype, threads):
    """MQA decode at 4 threads over ragged lengths (0, 1 and 2-4 key chunks): each sequence's output
    equals its output alone, bitwise (1, 2 or 4 key chunks from one sequence's own length), and the fp64
    reference."""
    threads(4)
    lens = [0, 255, 256, 700]
    q, kc, vc, k, v, cs = tkv._make(4, 1, 710, 4, 1, 64, lens, 1, dtype, "cpu", seed=21)
    parts = [(q[b:b + 1].clone(), kc[b:b + 1].clone(), vc[b:b + 1].clone(), k[b:b + 1], v[b:b + 1],
              cs[b:b + 1]) for b in range(4)]
    ref = reference.flash_attn_with_kvcache(q.double(), kc.double(), vc.double(), k.double(), v.double(),
                                            cs, None, True)
    with torch.no_grad():
        out = ops.flash_attn_with_kvcache(q, kc, vc, k, v, cs)
        for b, args in enumerate(parts):
            torch.testing.assert_close(out[b:b + 1], ops.flash_attn_with_kvcache(*args), atol=0, rtol=0)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0)


# ---- norms and DeepStack injection (AVX2 default path; fp32 layer_norm through ATen) -------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [8, 203, 1024])
def test_inject_norms_match_twin(dtype, dim, monkeypatch):
    """Every roundings-per-element of the twin, in the vectorized default path; the statistics
    differ only in summation order. A huge row takes the fp64 redo on both."""
    g = torch.Generator().manual_seed(dim)
    hidden = torch.randn(3, 7, dim, generator=g).to(dtype)
    hidden[1, 2] = 3e38 if dtype != torch.float16 else 6e4
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[0, 2:5] = True
    mask[2, 6] = True
    idx = ops.visual_index(mask)
    emb = torch.randn(int(mask.sum()), dim, generator=g).to(torch.float32)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    b = (0.1 * torch.randn(dim, generator=g)).to(dtype)

    def run():
        return (ops.deepstack_inject_rms_norm(hidden, emb, idx, w, 1e-6),
                ops.deepstack_inject_layer_norm(hidden, emb, idx, w, b, 1e-6),
                ops.deepstack_inject(hidden, emb, idx), ops.rms_norm(hidden, w, 1e-6),
                ops.layer_norm(hidden, w, b, 1e-6))
    fast = run()
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    twin = run()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    flat = lambda t: [x for y in t for x in (y if isinstance(y, tuple) else (y,))]
    for a, b_ in zip(flat(fast), flat(twin)):
        assert torch.equal(a.isfinite(), b_.isfinite())
        torch.testing.assert_close(a.float(), b_.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(fast[0][1], twin[0][1], atol=0, rtol=0)  # injected: exact
    torch.testing.assert_close(fast[2], twin[2], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("offset", [1e4, 6e4])
def test_layer_norm_large_offset_rows(dtype, offset):
    """fp16/bf16 rows far from zero (offset + N(0, 1)): the default CPU path keeps fp32 statistics
    accurate (the last-ulp error of a rounding), where ATen's CPU LayerNorm in these dtypes measured
    0.08-1.3 off the fp64 result here; the reason this path does not route to ATen (README)."""
    g = torch.Generator().manual_seed(3)
    x = (offset + torch.randn(4, 1024, generator=g)).to(dtype)
    w = (1 + 0.1 * torch.randn(1024, generator=g)).to(dtype)
    b = (0.1 * torch.randn(1024, generator=g)).to(dtype)
    want = torch.nn.functional.layer_norm(x.double(), (1024,), w.double(), b.double(), 1e-5)
    got = ops.layer_norm(x, w, b, 1e-5).double()
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


# ---- dwconv_layernorm ----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", tcv.SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dwconv_layernorm(dtype, shape, bias):
    tcv.test_dwconv_layernorm("cpu", dtype, shape, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2, 70, 8), (1, 2, 7, 4096), (1, 2, 3, 12288)])
def test_dwconv_layernorm_segments(dtype, shape):
    tcv.test_dwconv_layernorm_segments("cpu", dtype, shape)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dwconv_layernorm_noncontiguous(dtype):
    tcv.test_dwconv_layernorm_noncontiguous("cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", tcv.TILE_EDGES, ids=lambda s: "x".join(map(str, s)))
def test_dwconv_layernorm_tile_edges(dtype, shape):
    tcv.test_dwconv_layernorm_tile_edges("cpu", dtype, shape)


def test_dwconv_layernorm_padding_taps():
    tcv.test_dwconv_layernorm_padding_taps("cpu")


@pytest.mark.parametrize("dtype", DTYPES)
def test_dwconv_default_matches_twin(dtype, monkeypatch):
    """The fused CPU kernel (C % 8 == 0) and the twin agree at an odd shape with batch 2."""
    C = 48
    p = tcv.make_params(C, 8, dtype, "cpu", seed=3)
    x = tcv.make_x((2, 7, 11, C), dtype, "cpu", seed=4)
    a = ops.dwconv_layernorm(x, *tcv.dwln_args(p), 1e-6)
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    b = ops.dwconv_layernorm(x, *tcv.dwln_args(p), 1e-6)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=0)


def test_dwconv_nonfinite_on_the_fused_cpu_kernel():
    """C % 8 == 0 takes the fused CPU kernel: a NaN input reaches only the pixels whose window reads
    it, a pixel of huge conv outputs is normalized in fp64 (not set to the bias), and an inf weight
    (which that kernel declines: it multiplies the padding) leaves the border pixels finite."""
    C = 16
    g = torch.Generator().manual_seed(6)
    ones, zeros = torch.ones(C), torch.zeros(C)
    w = torch.randn(C, 1, 7, 7, generator=g) * 0.2
    x = torch.randn(1, 12, 12, C, generator=g)
    x[0, 1, 10, 5] = float("nan")
    out = ops.dwconv_layernorm(x, w, None, ones, zeros)
    fin = torch.isfinite(out).all(-1)[0]
    expect = torch.ones(12, 12, dtype=torch.bool)
    expect[0:5, 7:12] = False  # rows 1 +- 3, columns 10 +- 3 inside the image
    assert torch.equal(fin, expect)
    want = reference.dwconv_layernorm(x, w, None, ones, zeros)
    torch.testing.assert_close(out, want, equal_nan=True, atol=1e-5, rtol=1e-5)
    xh = torch.randn(1, 4, 5, C, generator=g) * 1e30
    wi = torch.zeros(C, 1, 7, 7)
    wi[:, 0, 3, 3] = 1.0  # identity conv: var ~ 1e60 overflows fp32
    xd = xh.double()
    want = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True))
    torch.testing.assert_close(ops.dwconv_layernorm(xh, wi, None, ones, zeros).double(), want,
                               atol=1e-5, rtol=1e-5)
    w[1, 0, 0, 0] = float("inf")
    out = ops.dwconv_layernorm(x.nan_to_num(0.0), w, None, ones, zeros)
    fin = torch.isfinite(out).all(-1)[0]
    expect = torch.ones(12, 12, dtype=torch.bool)
    expect[3:, 3:] = False
    assert torch.equal(fin, expect)


# ---- the norms' vectorized rows: odd D, hard rows, non-finite rows, chunk edges ------------------
def _hard_rows(dtype, dim, g):
    """Rows of (6, dim): N(0, 1); offset 1e4 + N(0, 1) (fp32 / fp16) or 3e4 (bf16); a constant row;
    tiny values (1e-3 N(0, 1)); a row far larger than the rest (1e3 N(0, 1)); N(0, 1) with its
    first 8 elements + 40 (the LayerNorm's one-pass shift is then far from the mean: its second
    pass)."""
    x = torch.randn(6, dim, generator=g, dtype=torch.float64)
    x[1] += 3e4 if dtype == torch.bfloat16 else 1e4
    x[2] = 0.3
    x[3] *= 1e-3
    x[4] *= 1e3
    x[5, :8] += 40
    return x.to(dtype)


def _ln64(x, w, b, eps):
    return torch.nn.functional.layer_norm(x.double(), (x.shape[-1],), w.double(),
                                          None if b is None else b.double(), eps)


def _rms64(x, w, eps):
    # LlamaRMSNorm's rounding of x * rstd to x's dtype, everything else exact
    xd = x.double()
    y = xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)
    return w.double() * y.to(x.dtype).double()


NORM_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [1, 7, 77, 1000, 4096])
def test_norm_rows_against_fp64(dtype, dim, monkeypatch):
    """layer_norm (with and without bias) and rms_norm on the default CPU path against the fp64
    formula (one rounding; RMS with LlamaRMSNorm's rounding of x * rstd), and against the twin: odd
    and tail-only D, a row far from zero (ATen's 16-bit CPU LayerNorm errs there), a constant row
    (LayerNorm gives exactly bias), tiny and large rows."""
    g = torch.Generator().manual_seed(dim)
    x = _hard_rows(dtype, dim, g)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    b = (0.1 * torch.randn(dim, generator=g)).to(dtype)
    tol = NORM_TOL[dtype]
    got = [ops.layer_norm(x, w, b, 1e-5), ops.layer_norm(x, w, None, 1e-5), ops.rms_norm(x, w, 1e-6)]
    want = [_ln64(x, w, b, 1e-5), _ln64(x, w, None, 1e-5), _rms64(x, w, 1e-6)]
    for y, yd in zip(got, want):
        assert y.dtype == dtype and y.shape == x.shape
        # one rounding of the fp64 value (RMS: two), plus the fp32 statistics' last bits
        err = (y.double() - yd).abs() / (yd.abs() + 1)
        assert err.max().item() <= tol, (err.max().item(), err.amax(-1))
    if dim > 1:  # the constant row: x - mean is exactly 0, the output exactly bias (D = 1: every row)
        assert torch.equal(got[0][2], b) and torch.equal(got[1][2], torch.zeros_like(b))
    monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
    twin = [ops.layer_norm(x, w, b, 1e-5), ops.layer_norm(x, w, None, 1e-5), ops.rms_norm(x, w, 1e-6)]
    for y, t in zip(got, twin):
        rows = [0, 3, 4, 5]  # the twin's mean is not exact on the offset and constant rows
        torch.testing.assert_close(y[rows].float(), t[rows].float(), atol=2 * tol, rtol=2 * tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_norm_nonfinite_rows(dtype):
    """README "Non-finite values" on the vectorized rows: a NaN / inf in x reaches its row only, as
    the fp64 formula gives it (LayerNorm: all NaN; RMS with an inf: NaN at the inf, 0 elsewhere); a
    row whose fp32 statistic overflows (|x| ~ the dtype's max / 4) is redone in fp64 and stays
    finite and right; a NaN weight reaches its column only."""
    g = torch.Generator().manual_seed(5)
    dim = 77
    x = torch.randn(5, dim, generator=g).to(dtype)
    x[1, 10] = float("nan")
    x[2, 76] = float("inf")  # in the scalar tail
    x[3] = (torch.randn(dim, generator=g, dtype=torch.float64).clamp(-2, 2) * (torch.finfo(dtype).max / 4)).to(dtype)
    w = (1 + 0.1 * torch.randn(dim, generator=g)).to(dtype)
    b = (0.1 * torch.randn(dim, generator=g)).to(dtype)
    for y, yd in ((ops.layer_norm(x, w, b, 1e-5), _ln64(x, w, b, 1e-5)),
                  (ops.rms_norm(x, w, 1e-6), _rms64(x, w, 1e-6))):
        assert torch.equal(y.isnan(), yd.isnan()) and torch.equal(y.isinf(), yd.isinf())
        assert y[1].isnan().all() and y[[0, 3, 4]].isfinite().all()
        fin = yd.isfinite()
        err = (y.double()[fin] - yd[fin]).abs() / (yd[fin].abs() + 1)
        assert err.max().item() <= NORM_TOL[dtype]
    w2 = w.clone()
    w2[3] = float("nan")
    y = ops.layer_norm(x[[0, 4]], w2, b, 1e-5)
    assert y[:, 3].isnan().all() and y[:, [0, 1, 2, 4]].isfinite().all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_inject_norm_chunk_edges(dtype, monkeypatch):
    """Rows split over two threads (D = 64: 512 rows per grain, 1400 rows): visual rows on both
    sides of the split and at the ends; the default path against the twin, injected exactly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(11)
        hidden = torch.randn(2, 700, 64, generator=g).to(dtype)
        mask = torch.zeros(2, 700, dtype=torch.bool)
        mask[0, 0] = mask[0, 690:] = mask[1, :12] = mask[1, 345:355] = mask[1, 699] = True
        idx = ops.visual_index(mask)
        emb = torch.randn(int(mask.sum()), 64, generator=g).to(torch.bfloat16)
        w = (1 + 0.1 * torch.randn(64, generator=g)).to(dtype)
        b = (0.1 * torch.randn(64, generator=g)).to(dtype)

        def run():
            return (*ops.deepstack_inject_layer_norm(hidden, emb, idx, w, b, 1e-5),
                    *ops.deepstack_inject_rms_norm(hidden, emb, idx, w, 1e-6))
        fast = run()
        monkeypatch.setenv("HIRES_LMM_CPU_TWIN", "1")
        twin = run()
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(fast[1], twin[1]) and torch.equal(fast[3], twin[3])
    tol = NORM_TOL[dtype]
    torch.testing.assert_close(fast[0].float(), twin[0].float(), atol=2 * tol, rtol=2 * tol)
    torch.testing.assert_close(fast[2].float(), twin[2].float(), atol=2 * tol, rtol=2 * tol)


def test_cpu_autograd_partial_grads():
    """The C++ autograd of the norms on the CPU (AutogradCPU): a gradient through one output of
    two (the other undefined), gradients wanted for some inputs only, and no graph under no_grad;
    against the reference's autograd (fp32)."""
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 5, 67, generator=g)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 3:] = True
    idx = ops.visual_index(mask)
    e = torch.randn(int(mask.sum()), 67, generator=g).bfloat16()
    w = 1 + 0.1 * torch.randn(67, generator=g)
    b = 0.1 * torch.randn(67, generator=g)

    def grads(lib, which, wanted):
        leaves = [t.detach().clone().requires_grad_(k in wanted) for k, t in zip("hewb", (h, e, w, b))]
        hh, ee, ww, bb = leaves
        outs = {"ln": lambda: (lib.layer_norm(hh, ww, bb, 1e-5),),
                "rms": lambda: (lib.rms_norm(hh, ww, 1e-6),),
                "inject": lambda: (lib.deepstack_inject(hh, ee, idx),),
                "inject_ln": lambda: lib.deepstack_inject_layer_norm(hh, ee, idx, ww, bb, 1e-5),
                "inject_rms": lambda: lib.deepstack_inject_rms_norm(hh, ee, idx, ww, 1e-6)}[which[0]]()
        loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view(o.shape)).sum()
                   for i, o in enumerate(outs) if i in which[1])
        if not loss.requires_grad:  # the reference: no wanted input reaches this output
            return [None] * 4
        loss.backward()
        return [t.grad for t in leaves]

    for which in [("ln", (0,)), ("rms", (0,)), ("inject", (0,)), ("inject_ln", (0,)), ("inject_ln", (1,)),
                  ("inject_rms", (0,)), ("inject_rms", (0, 1))]:
        uses = {"ln": "hwb", "rms": "hw", "inject": "he", "inject_ln": "hewb", "inject_rms": "hew"}[which[0]]
        for wanted in ("hewb", "w", "e", "hb"):
            if not set(wanted) & set(uses):
                continue
            got, want = grads(ops, which, wanted), grads(reference, which, wanted)
            for k, a, r in zip("hewb", got, want):
                if r is None:  # not reached from the loss; the kernel's formula may give zeros
                    assert a is None or not a.any(), (which, wanted, k)
                else:
                    assert a.dtype == r.dtype
                    torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4, msg=f"{which} {wanted} d{k}")
    hr = h.clone().requires_grad_()
    with torch.no_grad():
        assert ops.layer_norm(hr, w, b, 1e-5).grad_fn is None
        assert all(o.grad_fn is None for o in ops.deepstack_inject_rms_norm(hr, e, idx, w, 1e-6))
    assert ops.layer_norm(h, w, b, 1e-5).grad_fn is None
