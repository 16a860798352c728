"""Property-based fuzzing of every non-attention op (hypothesis), run family by family in a
subprocess by tests/test_fuzz_ops.py so that a crash (segfault, abort) is a test failure.

    python tests/fuzz_ops_lib.py <family> <device>      family: deepstack | convnext | select

For each op: (1) random valid inputs (odd sizes, 1, tails; contiguous, padded-row, strided and
permuted views; every dtype, mixed where the op allows it; NaN / inf / huge values at random
places) compared with hires_lmm.reference within the dtype tolerances of tests/conftest.py, with
the same non-finite pattern (README "Non-finite values"); (2) generated bad input (wrong dtype,
rank, size, device (meta, through the fake kernel and through the CPU kernel itself), scalars out
of range, index values out of range) that must raise ValueError/TypeError/RuntimeError whose
message names the argument. Example counts are multiplied by $HIRES_LMM_FUZZ_SCALE (--fuzz-long).
Settings: deadline=None, derandomize=True (reproducible), no example database."""
import faulthandler
import math
import os
import sys
import traceback

import torch
from hypothesis import HealthCheck, given, settings, strategies as st

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import TOL  # noqa: E402

import hires_lmm  # noqa: E402
from hires_lmm import ops, reference as R  # noqa: E402
from hires_lmm.reference import select as RS  # noqa: E402

SCALE = int(os.environ.get("HIRES_LMM_FUZZ_SCALE", "1"))
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SIZES = [1, 2, 3, 5, 7, 8, 9, 16, 17, 31, 33, 64]
ERRORS = (ValueError, TypeError, RuntimeError)
NAN, INF = float("nan"), float("inf")
SPECIALS = [NAN, INF, -INF, 1e30, -1e30, 0.0]
NONFINITE = [NAN, INF, -INF, 0.0]
# 1e30: a finite value whose square overflows fp32 (the norms' and cosines' fp64 path), small
# enough that no sum of a few of them overflows (sums of overflowing terms depend on the order)


def fuzz_settings(n):
    return settings(max_examples=n * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


# ---- drawing inputs --------------------------------------------------------------------------
def draw_size(data, label, sizes=SIZES):
    return data.draw(st.sampled_from(sizes), label=label)


def draw_tensor(data, shape, dtype, device, label, *, scale=1.0, shift=0.0, specials=True,
                special_values=SPECIALS, layouts=None):
    """A tensor of `shape` with values randn * scale (a drawn seed), a few drawn special values,
    in a drawn memory layout (a view of a bigger tensor: same values, other strides)."""
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label=f"{label} seed")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(shape, generator=g) * scale + shift
    n = v.numel()
    if specials and n > 0:
        k = data.draw(st.sampled_from([0, 0, 0, 1, 2]), label=f"{label} #specials")
        flat = v.view(-1)
        for _ in range(k):
            flat[data.draw(st.integers(0, n - 1), label=f"{label} special at")] = data.draw(
                st.sampled_from(special_values), label=f"{label} special")
    v = v.to(dtype)
    layout = data.draw(st.sampled_from(layouts or ["contig", "padded", "step", "perm"]),
                       label=f"{label} layout")
    return as_layout(v, layout).to(device)


def as_layout(v, layout):
    """The same values as `v` in another memory layout."""
    if v.dim() == 0 or layout == "contig":
        return v.contiguous()
    if layout == "padded":  # rows longer than the last dim (unit last stride)
        big = torch.zeros(*v.shape[:-1], v.shape[-1] + 3, dtype=v.dtype)
        big[..., :v.shape[-1]] = v
        return big[..., :v.shape[-1]]
    if layout == "step":  # every other element of the last dim
        big = torch.zeros(*v.shape[:-1], 2 * v.shape[-1], dtype=v.dtype)
        big[..., ::2] = v
        return big[..., ::2]
    if layout == "perm":  # leading dims stored transposed
        if v.dim() < 2:
            return v.contiguous()
        return v.transpose(0, -1).contiguous().transpose(0, -1)
    raise ValueError(layout)


def bool_tensor(data, shape, label, device):
    seed = data.draw(st.integers(0, 2 ** 31 - 1), label=f"{label} seed")
    density = data.draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]), label=f"{label} density")
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < density
    layout = data.draw(st.sampled_from(["contig", "perm"]), label=f"{label} layout")
    return as_layout(m, layout).to(device)


# ---- checking outputs ------------------------------------------------------------------------
def assert_match(got, want, dtype, what, scale=1.0):
    """Same shape and dtype, the same NaN and +-inf positions, finite values within TOL."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g, w = got.detach().float().cpu(), want.detach().float().cpu()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), (
        f"{what}: NaN at {torch.nonzero(torch.isnan(g) != torch.isnan(w))[:5].tolist()} "
        f"(ours NaN: {torch.isnan(g).sum()}, reference NaN: {torch.isnan(w).sum()})")
    assert torch.equal(g[torch.isinf(w)], w[torch.isinf(w)]) and torch.equal(torch.isinf(g), torch.isinf(w)), (
        f"{what}: inf positions differ")
    fin = torch.isfinite(w)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(g[fin], w[fin], atol=atol * scale, rtol=rtol * scale, msg=lambda m: f"{what}: {m}")


def assert_same_bits(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, what
    torch.testing.assert_close(got.cpu(), want.cpu(), atol=0, rtol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


def expect_error(fn, names, what):
    """fn() must raise ValueError/TypeError/RuntimeError whose message names one of `names`."""
    try:
        fn()
    except ERRORS as e:
        msg = str(e)
        assert any(f"'{n}'" in msg or f" {n} " in msg or f"{n}:" in msg for n in names), (
            f"{what}: the error does not name {names}: {msg[:300]}")
        return
    raise AssertionError(f"{what}: no error raised")


def to_meta_via_fake(op_fn, args, i):
    """The public op with argument i on the meta device (the fake kernel runs)."""
    a = list(args)
    a[i] = a[i].to("meta")
    return lambda: op_fn(*a)


def to_meta_via_cpu_kernel(op_name, args, i):
    """The op's own CPU kernel (no fake kernel in the way) with argument i on the meta device."""
    a = list(args)
    a[i] = a[i].to("meta")
    overload = getattr(torch.ops.hires_lmm, op_name).default
    ks = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    return lambda: overload.redispatch(ks, *a)


def device_cases(op_name, op_fn, args, names):
    """Every tensor argument moved to meta, through the fake kernel and through the CPU kernel."""
    for i, (a, n) in enumerate(zip(args, names)):
        if isinstance(a, torch.Tensor) and a.device.type == "cpu":
            expect_error(to_meta_via_fake(op_fn, args, i), [n], f"{op_name} {n} on meta (fake)")
            expect_error(to_meta_via_cpu_kernel(op_name, args, i), [n], f"{op_name} {n} on meta (CPU kernel)")


def mutated(args, i, new):
    a = list(args)
    a[i] = new
    return a


# ---- deepstack family ------------------------------------------------------------------------
def deepstack_case(data, device, with_embeds=True):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    D = draw_size(data, "D")
    lead = data.draw(st.lists(st.sampled_from([1, 2, 3, 5]), min_size=1, max_size=3), label="lead")
    hidden = draw_tensor(data, (*lead, D), dtype, device, "hidden")
    rows = math.prod(lead)
    embeds = index = None
    if with_embeds:
        nv = data.draw(st.integers(0, rows), label="Nv")
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="index seed")
        index = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:nv].sort().values
        index = index.to(device)
        edtype = data.draw(st.sampled_from(DTYPES), label="embeds dtype")
        embeds = draw_tensor(data, (nv, D), edtype, device, "visual_embeds")
    # Special weights only where no input row is huge: a huge row normalizes its moderate entries
    # to ~1e-30 * (x - mean) with a mean that no fp64 order computes exactly (1e30 absorbs the
    # small terms), and a huge or infinite weight would amplify that rounding into the output.
    huge = any(bool((t.float().abs() > 1e20).any()) for t in (hidden, embeds) if t is not None)
    # (Nor huge weights: they turn the fp32 absolute tolerance of a normalized value near 0 into a
    # relative error of 1e30 * 1e-7.)
    weight = draw_tensor(data, (D,), dtype, device, "weight", shift=1.0, specials=not huge,
                         special_values=NONFINITE, layouts=["contig", "step"])
    bias = data.draw(st.sampled_from([True, False]), label="bias")
    bias = draw_tensor(data, (D,), dtype, device, "bias", scale=0.2, specials=not huge,
                       special_values=NONFINITE, layouts=["contig", "step"]) if bias else None
    eps = data.draw(st.sampled_from([1e-6, 1e-5, 0.1]), label="eps")
    return dtype, hidden, embeds, index, weight, bias, eps


def fuzz_deepstack_valid(device):
    @fuzz_settings(40)
    @given(st.data())
    def inject_and_norms(data):
        dtype, hidden, embeds, index, weight, bias, eps = deepstack_case(data, device)
        assert_same_bits(ops.deepstack_inject(hidden, embeds, index),
                         R.deepstack_inject(hidden, embeds, index), "deepstack_inject")
        which = data.draw(st.sampled_from(["rms", "layer"]), label="norm")
        if which == "rms":
            got = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, eps)
            want = R.deepstack_inject_rms_norm(hidden, embeds, index, weight, eps)
        else:
            got = ops.deepstack_inject_layer_norm(hidden, embeds, index, weight, bias, eps)
            want = R.deepstack_inject_layer_norm(hidden, embeds, index, weight, bias, eps)
        assert_same_bits(got[1], want[1], f"deepstack_inject_{which}_norm injected")
        assert_match(got[0], want[0], dtype, f"deepstack_inject_{which}_norm normed")

    @fuzz_settings(30)
    @given(st.data())
    def norms(data):
        dtype, x, _, _, weight, bias, eps = deepstack_case(data, device, with_embeds=False)
        assert_match(ops.rms_norm(x, weight, eps), R.rms_norm(x, weight, eps), dtype, "rms_norm")
        assert_match(ops.layer_norm(x, weight, bias, eps), R.layer_norm(x, weight, bias, eps),
                     dtype, "layer_norm")

    @fuzz_settings(15)
    @given(st.data())
    def visual_index(data):
        shape = (draw_size(data, "B", [1, 2, 3]), draw_size(data, "S"))
        m = bool_tensor(data, shape, "mask", device)
        assert torch.equal(ops.visual_index(m).cpu(), R.visual_index(m).cpu())

    return [inject_and_norms, norms, visual_index]


def fuzz_deepstack_bad(device):
    @fuzz_settings(40)
    @given(st.data())
    def bad(data):
        dtype, hidden, embeds, index, weight, bias, eps = deepstack_case(data, device)
        if bias is None:
            bias = torch.zeros_like(weight)
        D = hidden.shape[-1]
        rows = hidden.numel() // D
        nv = index.numel()
        which = data.draw(st.sampled_from(["inject", "rms", "layer", "rms_norm", "layer_norm"]), label="op")
        if which == "inject":
            name, fn = "deepstack_inject", ops.deepstack_inject
            args, names = [hidden, embeds, index], ["hidden", "visual_embeds", "visual_index"]
        elif which == "rms":
            name, fn = "deepstack_inject_rms_norm", ops.deepstack_inject_rms_norm
            args = [hidden, embeds, index, weight, eps]
            names = ["hidden", "visual_embeds", "visual_index", "weight", "eps"]
        elif which == "layer":
            name, fn = "deepstack_inject_layer_norm", ops.deepstack_inject_layer_norm
            args = [hidden, embeds, index, weight, bias, eps]
            names = ["hidden", "visual_embeds", "visual_index", "weight", "bias", "eps"]
        elif which == "rms_norm":
            name, fn = "rms_norm", ops.rms_norm
            args, names = [hidden, weight, eps], ["x", "weight", "eps"]
        else:
            name, fn = "layer_norm", ops.layer_norm
            args, names = [hidden, weight, bias, eps], ["x", "weight", "bias", "eps"]
        pos = {n: i for i, n in enumerate(names)}
        cases = []  # (argument, new value)
        for n in names:
            i = pos[n]
            a = args[i]
            if n in ("hidden", "x"):
                cases += [(n, a.double()), (n, a.to(torch.int32)), (n, a.reshape(-1)[0])]
                if D > 1:
                    cases.append((n, a[..., :-1]))  # hidden size no longer matches the others
            elif n == "visual_embeds":
                cases += [(n, a.double()), (n, a.to(torch.int64)), (n, a.unsqueeze(0)),
                          (n, torch.zeros(nv + 1, D, dtype=a.dtype)),
                          (n, torch.zeros(nv, D + 1, dtype=a.dtype))]
            elif n == "visual_index":
                cases += [(n, a.to(torch.int32)), (n, a.view(1, -1)),
                          (n, torch.full((nv,), rows, dtype=torch.long)) if nv else (n, a.float()),
                          (n, torch.full((nv,), -1, dtype=torch.long)) if nv else (n, a.view(1, -1))]
                if nv >= 2:
                    cases.append((n, a.flip(0)))  # not increasing
            elif n in ("weight", "bias"):
                cases += [(n, a.double()), (n, a[:-1] if D > 1 else a.repeat(2)), (n, a.view(1, -1))]
                other = torch.float16 if dtype != torch.float16 else torch.bfloat16
                cases.append((n, a.to(other)))
            elif n == "eps":
                cases += [(n, -1.0), (n, NAN)]
        arg, new = data.draw(st.sampled_from(cases), label="mutation")
        expect_error(lambda: fn(*mutated(args, pos[arg], new)), [arg], f"{name} bad '{arg}'")
        if data.draw(st.booleans(), label="device cases"):
            device_cases(name, fn, args, names)

    @fuzz_settings(15)
    @given(st.data())
    def unchecked_index_values(data):
        # value checks off (hires_lmm.set_value_checks(False)): out-of-range or unsorted index
        # values give unspecified rows but never a read outside the tensors (no crash)
        dtype, hidden, embeds, index, weight, bias, eps = deepstack_case(data, device)
        rows = hidden.numel() // hidden.shape[-1]
        nv = index.numel()
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="bad index seed")
        bad_index = torch.randint(-2 ** 40, 2 ** 40, (nv,), generator=torch.Generator().manual_seed(seed))
        bad_index[: nv // 2] = torch.arange(nv // 2) + rows  # just past the end
        hires_lmm.set_value_checks(False)
        try:
            out = ops.deepstack_inject_rms_norm(hidden, embeds, bad_index.to(device), weight, eps)
        finally:
            hires_lmm.set_value_checks(True)
        assert out[0].shape == hidden.shape and out[1].shape == hidden.shape

    return [bad, unchecked_index_values]


# ---- convnext family -------------------------------------------------------------------------
def convnext_case(data, device, block):
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    B = draw_size(data, "B", [1, 2])
    H, W = draw_size(data, "H", [1, 2, 3, 5, 7, 8, 9, 12]), draw_size(data, "W", [1, 2, 3, 5, 7, 8, 9, 12])
    C = draw_size(data, "C", [1, 2, 3, 5, 8, 9, 16, 17, 24])
    x = draw_tensor(data, (B, H, W, C), dtype, device, "x", layouts=["contig", "padded", "step", "perm"])
    p = dict(dw_weight=draw_tensor(data, (C, 1, 7, 7), dtype, device, "dw_weight", scale=0.1,
                                   layouts=["contig"]))
    opt = lambda label, shape, scale, special=False: (  # noqa: E731
        draw_tensor(data, shape, dtype, device, label, scale=scale, specials=special, layouts=["contig", "step"])
        if data.draw(st.booleans(), label=f"has {label}") else None)
    p["dw_bias"] = opt("dw_bias", (C,), 0.1)
    p["ln_weight"] = draw_tensor(data, (C,), dtype, device, "ln_weight", shift=1.0, specials=False,
                                 layouts=["contig", "step"])
    p["ln_bias"] = opt("ln_bias", (C,), 0.1)
    if block:
        F_ = draw_size(data, "F", [1, 3, 4 * C, 8, 17])
        p["fc1_weight"] = draw_tensor(data, (F_, C), dtype, device, "fc1_weight", scale=C ** -0.5,
                                      specials=False, layouts=["contig", "padded", "perm"])
        p["fc1_bias"] = opt("fc1_bias", (F_,), 0.2)
        p["fc2_weight"] = draw_tensor(data, (C, F_), dtype, device, "fc2_weight", scale=F_ ** -0.5,
                                      specials=False, layouts=["contig", "padded", "perm"])
        p["fc2_bias"] = opt("fc2_bias", (C,), 0.2)
        p["gamma"] = opt("gamma", (C,), 0.5)
    eps = data.draw(st.sampled_from([1e-6, 1e-5]), label="eps")
    return dtype, x, p, eps


DWLN = ["dw_weight", "dw_bias", "ln_weight", "ln_bias"]
BLOCK = DWLN + ["fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "gamma"]
BLOCK_SCALE = {torch.float32: 1.0, torch.float16: 2.0, torch.bfloat16: 2.0}  # test_convnext_ops
# fp32: the LayerNorm divides the conv's rounding (fp32 taps in another order than the
# reference's) by the pixel's std, which is small against |y| for a few channels (C = 2): the
# fuzz allows 8x the fp32 tolerance there (far below the fp16/bf16 tolerances)
LN_FP32_SCALE = 8.0


def fuzz_convnext_valid(device):
    @fuzz_settings(30)
    @given(st.data())
    def dwconv_layernorm(data):
        dtype, x, p, eps = convnext_case(data, device, block=False)
        args = [p[n] for n in DWLN]
        assert_match(ops.dwconv_layernorm(x, *args, eps), R.dwconv_layernorm(x, *args, eps), dtype,
                     "dwconv_layernorm", LN_FP32_SCALE if dtype == torch.float32 else 1.0)

    @fuzz_settings(20)
    @given(st.data())
    def convnext_block(data):
        dtype, x, p, eps = convnext_case(data, device, block=True)
        args = [p[n] for n in BLOCK]
        assert_match(ops.convnext_block(x, *args, eps), R.convnext_block(x, *args, eps), dtype,
                     "convnext_block", LN_FP32_SCALE if dtype == torch.float32 else BLOCK_SCALE[dtype])

    return [dwconv_layernorm, convnext_block]


def fuzz_convnext_bad(device):
    @fuzz_settings(40)
    @given(st.data())
    def bad(data):
        block = data.draw(st.booleans(), label="block")
        dtype, x, p, eps = convnext_case(data, device, block=block)
        names = ["x"] + (BLOCK if block else DWLN) + ["eps"]
        args = [x] + [p[n] for n in names[1:-1]] + [eps]
        # make every optional parameter present so that each can be mutated
        C = x.shape[-1]
        for i, n in enumerate(names):
            if args[i] is None:
                F_ = args[names.index("fc1_weight")].shape[0] if block else C
                args[i] = torch.zeros(F_ if n == "fc1_bias" else C, dtype=dtype, device=device)
        name, fn = ("convnext_block", ops.convnext_block) if block else ("dwconv_layernorm", ops.dwconv_layernorm)
        cases = []
        for i, n in enumerate(names):
            a = args[i]
            if n == "eps":
                cases += [(n, -1.0), (n, NAN)]
                continue
            cases += [(n, a.double()), (n, a.unsqueeze(0))]
            if n != "x":
                other = torch.float16 if dtype != torch.float16 else torch.bfloat16
                cases.append((n, a.to(other)))
            if n == "x":
                cases += [(n, a.to(torch.int32)), (n, a[..., 0]),
                          (n, torch.zeros(*a.shape[:-1], C + 1, dtype=dtype))]  # channel mismatch
            elif n == "dw_weight":
                cases += [(n, torch.zeros(C, 1, 5, 5, dtype=dtype)), (n, torch.zeros(C, 2, 7, 7, dtype=dtype)),
                          (n, torch.zeros(C + 1, 1, 7, 7, dtype=dtype))]
            elif n in ("fc1_weight", "fc2_weight"):
                cases += [(n, torch.zeros(a.shape[0], a.shape[1] + 1, dtype=dtype)), (n, a.t()) if a.shape[0] != a.shape[1] else (n, a[0])]
            else:
                cases.append((n, torch.zeros(a.shape[0] + 1, dtype=dtype)))
        arg, new = data.draw(st.sampled_from(cases), label="mutation")
        expect_error(lambda: fn(*mutated(args, names.index(arg), new)), [arg], f"{name} bad '{arg}'")
        if data.draw(st.booleans(), label="device cases"):
            device_cases(name, fn, args, names)

    return [bad]


# ---- select family ---------------------------------------------------------------------------
def select_case(data, device):
    B = draw_size(data, "B", [1, 2, 3])
    N = draw_size(data, "N", [1, 2, 3, 7, 16, 33, 64, 97])
    T = draw_size(data, "T", [1, 2, 3, 5, 9])
    D = draw_size(data, "D", [1, 2, 3, 8, 17, 24, 64])
    ldt = data.draw(st.sampled_from(DTYPES), label="local dtype")
    tdt = data.draw(st.sampled_from(DTYPES), label="text dtype")
    # a few distinct values only (integers / 2) in some cases: exact ties in the scores
    local = draw_tensor(data, (B, N, D), ldt, device, "local_tokens")
    if data.draw(st.booleans(), label="ties"):
        local = (local.float() * 2).round().div(2).to(ldt)
    text = draw_tensor(data, (B, T, D), tdt, device, "text_embeds")
    mask = bool_tensor(data, (B, T), "text_mask", device) if data.draw(st.booleans(), label="mask") else None
    return local, text, mask


def check_scores(scores, local, text, mask):
    want = R.similarity_scores(local, text, mask)
    T = text.shape[1]
    assert_match(scores, want, torch.float32, "scores", scale=10 * max(1, T))  # fp32 vs fp64 cosines


def fuzz_select_valid(device):
    @fuzz_settings(30)
    @given(st.data())
    def topk(data):
        local, text, mask = select_case(data, device)
        N = local.shape[1]
        k = data.draw(st.integers(1, N), label="k")
        idx, scores = ops.similarity_topk(local, text, k, mask)
        check_scores(scores, local, text, mask)
        # the selection of OUR scores by the reference rule (ranking, ties, NaN last): exact
        want = torch.sort(RS._rank_desc(scores.cpu())[:, :k], dim=-1).values
        assert torch.equal(idx.cpu(), want), f"topk indices {idx.tolist()} != {want.tolist()}"

    @fuzz_settings(30)
    @given(st.data())
    def topp(data):
        local, text, mask = select_case(data, device)
        p = data.draw(st.sampled_from([0.05, 0.3, 0.5, 0.9, 0.95, 1.0]) | st.floats(1e-3, 1.0), label="p")
        temp = data.draw(st.sampled_from([1.0, 0.5, 2.0]), label="temperature")
        pre = data.draw(st.sampled_from([0.5, None, 0.1]), label="presoftmax_temperature")
        idx, lengths = ops.similarity_topp(local, text, p, mask, temp, pre)
        _, scores = ops.similarity_topk(local, text, 1, mask)  # the same CPU/CUDA scores
        check_scores(scores, local, text, mask)
        sc = scores.cpu()
        probs = RS.topp_probabilities(sc, temp, pre)
        order, K = RS.topp_count(probs, p, sc)
        assert torch.equal(lengths.cpu(), K), f"lengths {lengths.tolist()} != {K.tolist()}"
        B, N = sc.shape
        want = torch.full((B, N), -1, dtype=torch.long)
        for b in range(B):
            want[b, :K[b]] = torch.sort(order[b, :K[b]]).values
        assert torch.equal(idx.cpu(), want)

    @fuzz_settings(20)
    @given(st.data())
    def gather(data):
        B = draw_size(data, "B", [1, 2, 3])
        N = draw_size(data, "N", [0, 1, 2, 5, 17])
        D = draw_size(data, "D", [1, 3, 8, 17])
        K = draw_size(data, "K", [0, 1, 3, 9])
        dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
        tokens = draw_tensor(data, (B, N, D), dtype, device, "tokens")
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="indices seed")
        indices = torch.randint(-1, max(N, 0), (B, K), generator=torch.Generator().manual_seed(seed))
        if N == 0:
            indices.fill_(-1)
        indices = indices.to(device)
        assert_same_bits(ops.gather_tokens(tokens, indices), R.gather_tokens(tokens, indices), "gather_tokens")

    return [topk, topp, gather]


def fuzz_select_bad(device):
    @fuzz_settings(40)
    @given(st.data())
    def bad(data):
        local, text, mask = select_case(data, device)
        B, N, D = local.shape
        T = text.shape[1]
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
        which = data.draw(st.sampled_from(["topk", "topp", "gather"]), label="op")
        if which == "gather":
            idx = torch.zeros(B, 2, dtype=torch.long, device=device)
            name, fn, args, names = "gather_tokens", ops.gather_tokens, [local, idx], ["tokens", "indices"]
            cases = [("tokens", local.double()), ("tokens", local.to(torch.int32)), ("tokens", local[0]),
                     ("indices", idx.to(torch.int32)), ("indices", idx[0]), ("indices", idx.float()),
                     ("indices", torch.zeros(B + 1, 2, dtype=torch.long)),
                     ("indices", torch.full((B, 2), N, dtype=torch.long)),
                     ("indices", torch.full((B, 2), -2, dtype=torch.long))]
        else:
            if which == "topk":
                name, fn = "similarity_topk", ops.similarity_topk
                args, names = [local, text, 1, mask], ["local_tokens", "text_embeds", "k", "text_mask"]
                scal = [("k", 0), ("k", N + 1), ("k", -1)]
            else:
                name, fn = "similarity_topp", ops.similarity_topp
                args = [local, text, 0.5, mask, 1.0, 0.5]
                names = ["local_tokens", "text_embeds", "p", "text_mask", "temperature", "presoftmax_temperature"]
                scal = [("p", 0.0), ("p", 1.5), ("p", NAN), ("p", -0.1), ("temperature", 0.0),
                        ("temperature", -1.0), ("temperature", NAN), ("presoftmax_temperature", 0.0),
                        ("presoftmax_temperature", -2.0)]
            cases = scal + [
                ("local_tokens", local.double()), ("local_tokens", local.to(torch.int32)),
                ("local_tokens", local[0]), ("local_tokens", local[:, :0]), ("local_tokens", local[:, :, :0]),
                ("text_embeds", text.double()), ("text_embeds", text.to(torch.int64)), ("text_embeds", text[0]),
                ("text_embeds", torch.zeros(B + 1, T, D, dtype=text.dtype)),
                ("text_embeds", torch.zeros(B, T, D + 1, dtype=text.dtype)),
                ("text_embeds", text[:, :0]),
                ("text_mask", mask.int()), ("text_mask", mask[0]),
                ("text_mask", torch.ones(B, T + 1, dtype=torch.bool)),
                ("text_mask", torch.ones(B + 1, T, dtype=torch.bool))]
        arg, new = data.draw(st.sampled_from(cases), label="mutation")
        expect_error(lambda: fn(*mutated(args, names.index(arg), new)), [arg], f"{name} bad '{arg}'")
        if data.draw(st.booleans(), label="device cases"):
            device_cases(name, fn, args, names)

    @fuzz_settings(15)
    @given(st.data())
    def unchecked_gather_values(data):
        # value checks off: indices outside [-1, N) give zero rows, never a read outside tokens
        local, _, _ = select_case(data, device)
        B, N, D = local.shape
        seed = data.draw(st.integers(0, 2 ** 31 - 1), label="bad indices seed")
        idx = torch.randint(-2 ** 40, 2 ** 40, (B, 5), generator=torch.Generator().manual_seed(seed))
        idx[:, 0] = N
        idx[:, 1] = -2
        hires_lmm.set_value_checks(False)
        try:
            out = ops.gather_tokens(local, idx.to(device))
        finally:
            hires_lmm.set_value_checks(True)
        assert out.shape == (B, 5, D) and bool((out.float().cpu() == 0).all())

    return [bad, unchecked_gather_values]


FAMILIES = {
    "deepstack": (fuzz_deepstack_valid, fuzz_deepstack_bad),
    "convnext": (fuzz_convnext_valid, fuzz_convnext_bad),
    "select": (fuzz_select_valid, fuzz_select_bad),
}


def run(family, device):
    """Runs every fuzzer of a family; returns the number of failures (reported on stdout)."""
    torch.manual_seed(0)
    hires_lmm.set_backend("kernels")
    hires_lmm.set_value_checks(True)
    failures = 0
    for make in FAMILIES[family]:
        for test in make(device):
            try:
                test()
                print(f"ok   {family}/{make.__name__}/{test.__name__}", flush=True)
            except Exception:  # noqa: BLE001 - report every failing fuzzer, not only the first
                failures += 1
                print(f"FAIL {family}/{make.__name__}/{test.__name__}\n{traceback.format_exc()}", flush=True)
    return failures


if __name__ == "__main__":
    faulthandler.enable()  # a crash prints the Python stack (the drawn example's op) to stderr
    fam, dev = sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "cpu"
    sys.exit(1 if run(fam, dev) else 0)
