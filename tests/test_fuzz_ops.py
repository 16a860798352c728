"""Property-based fuzzing of every non-attention op against hires_lmm.reference (issue 8), and the
regressions it is meant to keep fixed.

The fuzzers live in tests/fuzz_ops_lib.py and run one family per subprocess, so that a crash
(segfault, abort) in a kernel or a binding is a failing test, not a dead test run. Example counts
are small by default (CI); `pytest --fuzz-long` multiplies them (tests/conftest.py)."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference as R

from conftest import HAS_CUDA, NO_CUDA_REASON

HERE = os.path.dirname(os.path.abspath(__file__))


def run_family(family, device):
    env = dict(os.environ)
    # the subprocess imports the very hires_lmm this process imported (installed or source tree)
    src = os.path.dirname(os.path.dirname(os.path.abspath(hires_lmm.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, os.path.join(HERE, "fuzz_ops_lib.py"), family, device],
                          capture_output=True, text=True, env=env, timeout=1800)
    report = f"--- stdout\n{proc.stdout[-20000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    assert proc.returncode >= 0, f"the {family} fuzzer crashed (signal {-proc.returncode})\n{report}"
    assert proc.returncode == 0, f"the {family} fuzzer found failures\n{report}"
    assert "FAIL" not in proc.stdout and proc.stdout.count("ok ") >= 3, report


@pytest.mark.parametrize("family", ["deepstack", "convnext", "select"])
def test_fuzz_family_cpu(family):
    run_family(family, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("family", ["deepstack", "convnext", "select"])
def test_fuzz_family_cuda(family):
    run_family(family, "cuda")


# ---- mixed devices: a meta tensor among real ones is refused by the fake kernel, naming it -----
def _op_cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    h, e, i, w, b = r(2, 3, 8), r(2, 8), torch.tensor([1, 4]), r(8), r(8)
    x, dw, c = r(1, 5, 5, 4), r(4, 1, 7, 7), r(4)
    loc, txt, m = r(2, 6, 8), r(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    return [
        ("deepstack_inject", ops.deepstack_inject, [h, e, i], ["hidden", "visual_embeds", "visual_index"]),
        ("deepstack_inject_rms_norm", ops.deepstack_inject_rms_norm, [h, e, i, w, 1e-6],
         ["hidden", "visual_embeds", "visual_index", "weight", None]),
        ("deepstack_inject_layer_norm", ops.deepstack_inject_layer_norm, [h, e, i, w, b, 1e-6],
         ["hidden", "visual_embeds", "visual_index", "weight", "bias", None]),
        ("rms_norm", ops.rms_norm, [h, w, 1e-6], ["x", "weight", None]),
        ("layer_norm", ops.layer_norm, [h, w, b, 1e-6], ["x", "weight", "bias", None]),
        ("dwconv_layernorm", ops.dwconv_layernorm, [x, dw, c, c, c, 1e-6],
         ["x", "dw_weight", "dw_bias", "ln_weight", "ln_bias", None]),
        ("convnext_block", ops.convnext_block, [x, dw, c, c, c, r(16, 4), r(16), r(4, 16), c, c, 1e-6],
         ["x", "dw_weight", "dw_bias", "ln_weight", "ln_bias", "fc1_weight", "fc1_bias", "fc2_weight",
          "fc2_bias", "gamma", None]),
        ("similarity_topk", ops.similarity_topk, [loc, txt, 2, m], ["local_tokens", "text_embeds", None, "text_mask"]),
        ("similarity_topp", ops.similarity_topp, [loc, txt, 0.5, m], ["local_tokens", "text_embeds", None, "text_mask"]),
        ("gather_tokens", ops.gather_tokens, [loc, torch.tensor([[0, -1], [5, 2]])], ["tokens", "indices"]),
    ]


@pytest.mark.parametrize("case", _op_cases(), ids=lambda c: c[0])
def test_meta_mixed_with_cpu_is_refused(case):
    name, fn, args, names = case
    fn(*args)  # the valid call works
    for k, n in enumerate(names):
        if n is None:
            continue
        bad = list(args)
        bad[k] = bad[k].to("meta")
        with pytest.raises(RuntimeError, match=f"{name}: argument .*'{n}'.*one device"):
            fn(*bad)
        # the op's own CPU kernel (what the dispatcher would run without the fake kernel)
        with pytest.raises(RuntimeError, match=f"'{n}'"):
            getattr(torch.ops.hires_lmm, name).default.redispatch(
                torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *bad)
    # all on meta: shapes only, no error
    out = fn(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    for o in (out if isinstance(out, tuple) else (out,)):
        assert o.device.type == "meta"


# ---- regressions of issue 8 (deterministic, fast) ------------------------------------------------
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_dwconv_inf_weight_leaves_border_finite(backend):
    hires_lmm.set_backend(backend)
    C = 4
    x = torch.randn(1, 9, 9, C)
    w = torch.randn(C, 1, 7, 7) * 0.1
    w[1, 0, 0, 0] = float("inf")  # tap (-3, -3): pixels with h < 3 or w < 3 read it on the padding
    args = (w, None, torch.ones(C), torch.zeros(C))
    out = ops.dwconv_layernorm(x, *args)
    fin = torch.isfinite(out).all(-1)[0]  # (H, W) pixel finite?
    expect = torch.ones(9, 9, dtype=torch.bool)
    expect[3:, 3:] = False
    assert torch.equal(fin, expect)
    blk = ops.convnext_block(x, *args, torch.randn(8, C), None, torch.randn(C, 8), None, None)
    assert torch.equal(torch.isfinite(blk).all(-1)[0], expect)
    torch.testing.assert_close(out, R.dwconv_layernorm(x, *args), equal_nan=True, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_norms_of_huge_rows_are_computed_not_bias(dtype, backend):
    hires_lmm.set_backend(backend)
    D = 37
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, D, generator=g)
    x = (base * torch.tensor([[1.0], [1e20], [3e37]])).to(dtype)
    w, b = torch.rand(D, generator=g).to(dtype) + 0.5, torch.randn(D, generator=g).to(dtype)
    xd = x.double()
    ln = (xd - xd.mean(-1, keepdim=True)) / torch.sqrt(xd.var(-1, unbiased=False, keepdim=True) + 1e-5)
    ln = (ln * w.double() + b.double()).to(dtype)
    rms = (w.double() * (xd / torch.sqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).double()).to(dtype)
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ops.layer_norm(x, w, b, 1e-5).float(), ln.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6).float(), rms.float(), atol=atol, rtol=atol)
    idx = torch.tensor([1, 2])
    e = torch.zeros(2, D, dtype=dtype)
    n1, _ = ops.deepstack_inject_layer_norm(x, e, idx, w, b, 1e-5)
    n2, _ = ops.deepstack_inject_rms_norm(x, e, idx, w, 1e-6)
    torch.testing.assert_close(n1.float(), ln.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(n2.float(), rms.float(), atol=atol, rtol=atol)
    # a dwconv output that large (x ~ 1e30, weights ~ 1): the LayerNorm is still the exact one
    C = 5
    xc = (torch.randn(1, 3, 3, C, generator=g) * 1e30).to(dtype)
    dw = torch.zeros(C, 1, 7, 7, dtype=dtype)
    dw[:, 0, 3, 3] = 1  # identity conv
    got = ops.dwconv_layernorm(xc, dw, None, torch.ones(C, dtype=dtype), None, 1e-6)
    xcd = xc.double()
    want = (xcd - xcd.mean(-1, keepdim=True)) / torch.sqrt(xcd.var(-1, unbiased=False, keepdim=True))
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_nan_scores_rank_last(backend):
    hires_lmm.set_backend(backend)
    g = torch.Generator().manual_seed(0)
    local = torch.randn(1, 6, 8, generator=g)
    text = torch.randn(1, 3, 8, generator=g)
    local[0, 1, 2] = float("nan")
    local[0, 4, 0] = float("inf")  # inf / |inf| is NaN too
    idx, scores = ops.similarity_topk(local, text, 4)
    assert torch.isnan(scores[0, [1, 4]]).all() and torch.isfinite(scores[0, [0, 2, 3, 5]]).all()
    assert idx.tolist() == [[0, 2, 3, 5]]
    idx, scores = ops.similarity_topk(local, text, 5)
    assert idx.tolist() == [[0, 1, 2, 3, 5]]  # the first NaN (lower index) after every finite one
    idx, lengths = ops.similarity_topp(local, text, 1.0)
    assert lengths.tolist() == [6]  # NaN tokens have probability 0: kept last, when all are kept
    for p in (0.3, 0.9, 0.999999):
        idx, lengths = ops.similarity_topp(local, text, p)
        kept = set(idx[0, :int(lengths[0])].tolist())
        assert not kept & {1, 4} or {0, 2, 3, 5} <= kept  # a NaN is never kept before a finite one
    # a masked text token holding NaN is not read; an unmasked one makes every score NaN
    text[0, 2, 0] = float("nan")
    mask = torch.tensor([[True, True, False]])
    _, s = ops.similarity_topk(local, text, 1, mask)
    assert torch.isfinite(s[0, [0, 2, 3, 5]]).all()
    _, s = ops.similarity_topk(local, text, 1)
    assert torch.isnan(s).all()


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_huge_tokens_have_their_cosine(backend):
    hires_lmm.set_backend(backend)
    local = torch.tensor([[[3e20, 4e20], [3.0, 4.0]]])
    text = torch.tensor([[[1.0, 0.0], [0.0, 2e25]]])
    _, s = ops.similarity_topk(local, text, 1)
    torch.testing.assert_close(s, torch.tensor([[1.4, 1.4]]), atol=1e-6, rtol=1e-6)


def fp64_topp_count(scores, p, temperature=1.0, pre=None):
    """The fp64 rule, independently of hires_lmm: numpy softmax(es), descending, cumsum <= p."""
    s = scores.astype(np.float64)
    if pre is not None:
        e = np.exp(s / pre - (s / pre).max())
        s = e / e.sum()
    e = np.exp(s / temperature - (s / temperature).max())
    q = np.sort(e / e.sum())[::-1]
    c = int((np.cumsum(q) <= p).sum())
    return min(c + 1, len(q))


@pytest.mark.parametrize("pre", [None, 0.5])
def test_topp_large_n_keeps_the_fp64_count(pre):
    N = 8193
    g = torch.Generator().manual_seed(5)
    local = torch.randn(2, N, 16, generator=g)
    text = torch.randn(2, 4, 16, generator=g)
    # row 1: every text token masked -> every score 0 -> uniform: 4096 cumsums <= 0.5, keep 4097
    mask = torch.tensor([[True] * 4, [False] * 4])
    idx, lengths = ops.similarity_topp(local, text, 0.5, mask, 1.0, pre)
    _, scores = ops.similarity_topk(local, text, 1, mask)
    for b in range(2):
        assert int(lengths[b]) == fp64_topp_count(scores[b].numpy(), 0.5, 1.0, pre)
    assert int(lengths[1]) == 4097 and torch.equal(idx[1, :4097], torch.arange(4097))
    ri, rl = R.similarity_topp(local, text, 0.5, mask, 1.0, pre)
    assert torch.equal(rl, lengths) and torch.equal(ri, idx)


def test_topp_count_matches_fp64_rule_over_many_rows():
    # many random rows at the boundary-sensitive size: the kernels' count is the fp64 count
    g = torch.Generator().manual_seed(11)
    local = torch.randn(6, 8193, 8, generator=g)
    text = torch.randn(6, 3, 8, generator=g)
    for p in (0.5, 0.9):
        _, lengths = ops.similarity_topp(local, text, p, None, 1.0, None)
        _, scores = ops.similarity_topk(local, text, 1)
        for b in range(6):
            assert int(lengths[b]) == fp64_topp_count(scores[b].numpy(), p), (b, p)


def test_gather_reference_with_no_tokens():
    tokens = torch.zeros(2, 0, 5)
    idx = torch.full((2, 3), -1, dtype=torch.long)
    want = torch.zeros(2, 3, 5)
    assert torch.equal(R.gather_tokens(tokens, idx), want)
    assert torch.equal(ops.gather_tokens(tokens, idx), want)


def test_float64_is_refused_as_documented():
    h = torch.randn(2, 4)
    with pytest.raises(RuntimeError, match="'visual_embeds' must be float32, float16 or bfloat16"):
        ops.deepstack_inject(h, torch.randn(1, 4, dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(RuntimeError, match="'tokens' must be float32, float16 or bfloat16"):
        ops.gather_tokens(torch.randn(1, 3, 4, dtype=torch.float64), torch.tensor([[0]]))
    for fn in (ops.deepstack_inject, ops.gather_tokens):
        assert "float64 is refused" in fn.__doc__
