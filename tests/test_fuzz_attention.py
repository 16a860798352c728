"""Property-based tests (hypothesis) of flash_attn_func / flash_attn_varlen_func.

Valid input: random shapes (odd sizes, GQA/MQA, Sq != Sk, empty key sets, varlen with empty
sequences and tokens past cu_seqlens_q[-1]), non-contiguous views, every dtype, causal, sliding
windows, softcap, explicit scales, forced split-KV, the ATen fallback and huge max_seqlen bounds,
against the fp64 reference with flash-attn's tolerance rule (tests/test_flash_attn.py):
max |ours - ref64| <= 2 * max |same-dtype PyTorch - ref64| + atol; softmax_lse against the fp64
lse; rows that see no key exactly 0 / -inf.
Bad input: one argument of a valid call is corrupted; the call must raise ValueError, TypeError,
RuntimeError or NotImplementedError whose message names that argument. The bad-input and varlen
properties run in a subprocess (with a timeout), so a crash or a hang fails the test instead of
killing pytest.

Small by default (derandomized, well under 30 s); `pytest --fuzz-long` runs 10x more examples."""
import contextlib
import math
import os
import subprocess
import sys
import traceback

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import hires_lmm
from hires_lmm import ops, reference
from hires_lmm.reference import attention as _ref_attn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}
ERRORS = (ValueError, TypeError, RuntimeError, NotImplementedError)
N_DENSE, N_VARLEN, N_BAD = 30, 20, 60  # examples per property (x10 under --fuzz-long)


def _settings(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@contextlib.contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    for k, v in kv.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---- the baseline of the tolerance rule ----------------------------------------------------------
def _same_dtype(q, k, v, scale, causal, window, softcap):
    """Attention in q's dtype (no upcast) for one sequence: q (Sq,Hq,D), k/v (Sk,Hkv,D)."""
    Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[0], k.shape[1]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if Hq != Hkv:
        kh = kh.repeat_interleave(Hq // Hkv, 0)
        vh = vh.repeat_interleave(Hq // Hkv, 0)
    s = qh @ kh.transpose(-1, -2)
    s = torch.tanh(s * (scale / softcap)) * softcap if softcap else s * scale
    s = s.masked_fill(~_ref_attn._visible(Sq, Sk, causal, window[0], window[1], q.device), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ vh).transpose(0, 1)


def _err(a, b):
    return 0.0 if a.numel() == 0 else (a.double() - b.double()).abs().max().item()


def _check(out, lse, ref, ref_lse, same, dtype, what):
    assert out.dtype == dtype and out.shape == ref.shape, what
    assert torch.isfinite(out.float()).all(), what
    err, base = _err(out, ref), _err(same, ref)
    assert err <= 2 * base + ATOL[dtype], f"{what}: max err {err:.3e} > 2 * {base:.3e} + {ATOL[dtype]:.0e}"
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, what
    assert torch.equal(lse == float("-inf"), ref_lse == float("-inf")), what  # rows without keys
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-4, rtol=1e-5, msg=what)


def _tensor(shape, dtype, layout, gen):
    """A (..., S, H, D) tensor in one of several memory layouts (values from `gen`)."""
    if layout == "bhsd":  # (B, H, S, D) storage seen as (B, S, H, D): non-contiguous
        base = torch.randn(*shape[:-3], shape[-2], shape[-3], shape[-1], generator=gen).to(dtype)
        return base.transpose(-2, -3)
    if layout == "strided_d":  # last dim with stride 2 (the binding copies it)
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen).to(dtype)[..., ::2]
    if layout == "offset":  # a view at a storage offset
        return torch.randn(int(math.prod(shape)) + 3, generator=gen).to(dtype)[3:].view(shape)
    return torch.randn(*shape, generator=gen).to(dtype)


window_bound = st.one_of(st.just(-1), st.integers(0, 80), st.just(2**62))
common = dict(
    dtype=st.sampled_from(DTYPES),
    causal=st.booleans(),
    window=st.tuples(window_bound, window_bound),
    softcap=st.sampled_from([0.0, 0.0, 1.0, 7.5, 50.0]),
    scale=st.one_of(st.none(), st.floats(0.01, 1.0)),
    D=st.sampled_from([8, 16, 40, 64, 72, 128]),
    hkv=st.integers(1, 3),
    group=st.integers(1, 3),
    layout=st.sampled_from(["contig", "bhsd", "strided_d", "offset"]),
    seed=st.integers(0, 2**16),
)


# ---- valid input: dense --------------------------------------------------------------------------
def dense_property(B, Sq, Sk, dtype, causal, window, softcap, scale, D, hkv, group, layout, seed, path):
    gen = torch.Generator().manual_seed(seed)
    Hq = hkv * group
    q = _tensor((B, Sq, Hq, D), dtype, layout, gen)
    k = _tensor((B, Sk, hkv, D), dtype, layout, gen)
    v = _tensor((B, Sk, hkv, D), dtype, "contig", gen)
    env = {"HIRES_LMM_ATTN_MATH": "1" if path == "math" else None,
           "HIRES_LMM_ATTN_SPLITS": path[len("splits"):] if path.startswith("splits") else None}
    with _env(**env):
        out, lse, none = ops.flash_attn_func(q, k, v, 0.0, scale, causal, window, softcap,
                                             return_attn_probs=True)
    assert none is None
    q64, k64, v64 = q.double(), k.double(), v.double()
    ref, ref_lse, _ = reference.flash_attn_func(q64, k64, v64, 0.0, scale, causal, window, softcap,
                                                return_attn_probs=True)
    sc = scale if scale is not None else D ** -0.5
    same = torch.stack([_same_dtype(q[b], k[b], v[b], sc, causal, window, softcap) for b in range(B)])
    what = f"dense B={B} Sq={Sq} Sk={Sk} Hq={Hq} Hkv={hkv} D={D} {dtype} causal={causal} " \
           f"window={window} softcap={softcap} scale={scale} {layout} {path}"
    _check(out, lse, ref, ref_lse, same, dtype, what)


def test_fuzz_flash_attn_dense(request):
    n = N_DENSE * (10 if request.config.getoption("--fuzz-long", default=False) else 1)
    prop = given(B=st.integers(1, 3), Sq=st.integers(1, 70), Sk=st.integers(0, 140),
                 path=st.sampled_from(["kernel", "kernel", "math", "splits2", "splits3"]), **common)
    _settings(n)(prop(dense_property))()


# ---- valid input: varlen (in the subprocess: a huge max_seqlen must neither hang nor overflow) ----
def varlen_property(lens, tail, dtype, causal, window, softcap, scale, D, hkv, group, layout, seed, path,
                    bound):
    gen = torch.Generator().manual_seed(seed)
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q = torch.tensor([0] + torch.tensor(lq).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lk).cumsum(0).tolist(), dtype=torch.int32)
    Hq = hkv * group
    q = _tensor((sum(lq) + tail, Hq, D), dtype, layout, gen)
    k = _tensor((sum(lk), hkv, D), dtype, layout, gen)
    v = _tensor((sum(lk), hkv, D), dtype, "contig", gen)
    mq, mk = (max(lq) + bound, max(lk) + bound) if bound < 2**30 else (bound, bound)
    with _env(HIRES_LMM_ATTN_MATH="1" if path == "math" else None):
        out, lse, _ = ops.flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, 0.0, scale, causal, window,
                                                 softcap, return_attn_probs=True)
    ref, ref_lse, _ = reference.flash_attn_varlen_func(q.double(), k.double(), v.double(), cu_q, cu_k, mq, mk,
                                                       0.0, scale, causal, window, softcap,
                                                       return_attn_probs=True)
    sc = scale if scale is not None else D ** -0.5
    same = torch.zeros_like(q)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for b in range(len(lens)):
        same[cq[b]:cq[b + 1]] = _same_dtype(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], sc,
                                            causal, window, softcap)
    what = f"varlen lens={lens} tail={tail} Hq={Hq} Hkv={hkv} D={D} {dtype} causal={causal} " \
           f"window={window} softcap={softcap} scale={scale} {layout} {path} bound={bound}"
    _check(out, lse, ref, ref_lse, same, dtype, what)
    assert (out[sum(lq):] == 0).all() and (lse[:, sum(lq):] == float("-inf")).all(), what


def run_varlen(n):
    prop = given(lens=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 40)), min_size=1, max_size=4),
                 tail=st.integers(0, 3), path=st.sampled_from(["kernel", "kernel", "math"]),
                 bound=st.sampled_from([0, 0, 5, 2**40, 2**63 - 1]), **common)
    _settings(n)(prop(varlen_property))()


# ---- bad input (in the subprocess) -------------------------------------------------------------------
def _cu(lens):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)


DENSE_BAD = ["v_batch", "v_batch0", "v_heads", "v_tokens", "k_batch", "k_head_dim", "v_head_dim", "k_heads",
             "v_dtype", "k_dtype", "q_dtype", "q_rank", "v_rank", "k_meta", "window_size", "window_type",
             "softcap", "softcap_nan", "dropout_p", "alibi_slopes", "q_head_dim0"]
VARLEN_BAD = ["cu_seqlens_q_dtype", "cu_seqlens_k_len", "cu_seqlens_q_order", "cu_seqlens_k_start",
              "cu_seqlens_q_end", "cu_seqlens_k_end", "max_seqlen_q_small", "max_seqlen_k_small",
              "max_seqlen_k_neg", "cu_seqlens_q_rank", "v_tokens_varlen", "cu_seqlens_k_meta"]


def bad_property(kind, B, Sq, Sk, hkv, group, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    Hq = hkv * group
    q = torch.randn(B, Sq, Hq, D, generator=gen).to(dtype)
    k = torch.randn(B, Sk, hkv, D, generator=gen).to(dtype)
    v = torch.randn(B, Sk, hkv, D, generator=gen).to(dtype)
    other = torch.float16 if dtype != torch.float16 else torch.bfloat16
    kw = {}
    if kind in DENSE_BAD:
        arg = kind.split("_")[0] if kind not in ("window_size", "window_type", "dropout_p", "alibi_slopes",
                                                   "softcap_nan") else kind
        arg = {"window_type": "window_size", "softcap_nan": "softcap"}.get(arg, arg)
        if kind == "v_batch":
            v = torch.randn(B + 1, Sk, hkv, D).to(dtype)
        elif kind == "v_batch0":
            v = torch.randn(0, Sk, hkv, D).to(dtype)
        elif kind == "v_heads":
            v = torch.randn(B, Sk, hkv + 1, D).to(dtype)
        elif kind == "v_tokens":
            v = torch.randn(B, Sk + 1, hkv, D).to(dtype)
        elif kind == "k_batch":
            k = torch.randn(B + 1, Sk, hkv, D).to(dtype)
        elif kind == "k_head_dim":
            k = torch.randn(B, Sk, hkv, D + 8).to(dtype)
        elif kind == "v_head_dim":
            v = torch.randn(B, Sk, hkv, D + 8).to(dtype)
        elif kind == "k_heads":  # heads_kv that does not divide heads_q
            k = torch.randn(B, Sk, Hq + 1, D).to(dtype)
            v = torch.randn(B, Sk, Hq + 1, D).to(dtype)
        elif kind == "v_dtype":
            v = v.to(other)
        elif kind == "k_dtype":
            k = k.to(other)
        elif kind == "q_dtype":
            q, k, v = q.double(), k.double(), v.double()
        elif kind == "q_rank":
            q = q[0]
        elif kind == "v_rank":
            v = v[0]
        elif kind == "k_meta":
            k = k.to("meta")
        elif kind == "q_head_dim0":
            q, k, v = q[..., :0], k[..., :0], v[..., :0]
        elif kind == "window_size":
            kw["window_size"] = (-2 - seed % 5, 3)
        elif kind == "window_type":
            kw["window_size"] = (1.5, 2) if seed % 2 else 7
        elif kind == "softcap":
            kw["softcap"] = -0.5 if seed % 2 else float("inf")
        elif kind == "softcap_nan":
            kw["softcap"] = float("nan")
        elif kind == "dropout_p":
            kw["dropout_p"] = 0.1
        elif kind == "alibi_slopes":
            kw["alibi_slopes"] = torch.ones(Hq)
        call = lambda: ops.flash_attn_func(q, k, v, **kw)  # noqa: E731
    else:
        lens_q = [Sq, max(0, Sq - 1)] * B
        lens_k = [Sk, Sk + 1] * B
        cu_q, cu_k = _cu(lens_q), _cu(lens_k)
        qv = torch.randn(sum(lens_q), Hq, D).to(dtype)
        kv = torch.randn(sum(lens_k), hkv, D).to(dtype)
        vv = torch.randn(sum(lens_k), hkv, D).to(dtype)
        mq, mk = max(lens_q), max(lens_k)
        if kind == "cu_seqlens_q_dtype":
            cu_q = cu_q.long()
        elif kind == "cu_seqlens_k_len":
            cu_k = cu_k[:-1]
        elif kind == "cu_seqlens_q_order":
            cu_q = cu_q.flip(0).contiguous()
            cu_q[0] = 0
        elif kind == "cu_seqlens_k_start":
            cu_k = cu_k + 1
        elif kind == "cu_seqlens_q_end":
            cu_q = cu_q.clone()
            cu_q[-1] += 5
            mq += 5
        elif kind == "cu_seqlens_k_end":
            cu_k = cu_k.clone()
            cu_k[-1] += 3
            mk += 3
        elif kind == "max_seqlen_q_small":
            mq -= 1
        elif kind == "max_seqlen_k_small":
            mk -= 1
        elif kind == "max_seqlen_k_neg":
            mk = -1 - seed
        elif kind == "cu_seqlens_q_rank":
            cu_q = cu_q[None]
        elif kind == "v_tokens_varlen":
            vv = vv[1:]
        elif kind == "cu_seqlens_k_meta":
            cu_k = cu_k.to("meta")
        arg = {"cu_seqlens_q_dtype": "cu_seqlens_q", "cu_seqlens_k_len": "cu_seqlens_k",
               "cu_seqlens_q_order": "cu_seqlens_q", "cu_seqlens_k_start": "cu_seqlens_k",
               "cu_seqlens_q_end": "cu_seqlens_q", "cu_seqlens_k_end": "cu_seqlens_k",
               "max_seqlen_q_small": "max_seqlen_q", "max_seqlen_k_small": "max_seqlen_k",
               "max_seqlen_k_neg": "max_seqlen_k", "cu_seqlens_q_rank": "cu_seqlens_q",
               "v_tokens_varlen": "v", "cu_seqlens_k_meta": "cu_seqlens_k"}[kind]
        call = lambda: ops.flash_attn_varlen_func(qv, kv, vv, cu_q, cu_k, mq, mk)  # noqa: E731
    if kind in ("max_seqlen_q_small", "max_seqlen_k_small") and min(lens_q if "_q_" in kind else lens_k) < 1:
        return  # every sequence empty: nothing to bound
    for backend in ("kernels", "reference") if kind in ("dropout_p", "alibi_slopes", "window_size",
                                                        "window_type", "softcap", "softcap_nan") else ("kernels",):
        with hires_lmm.use_backend(backend):
            try:
                call()
            except ERRORS as e:
                assert f"'{arg}'" in str(e), f"{kind}: error does not name '{arg}': {e}"
            else:
                raise AssertionError(f"{kind} ({backend}): no error")


def run_bad(n):
    prop = given(kind=st.sampled_from(DENSE_BAD + VARLEN_BAD), B=st.integers(1, 3), Sq=st.integers(1, 20),
                 Sk=st.integers(1, 20), hkv=st.integers(1, 3), group=st.integers(1, 3),
                 D=st.sampled_from([8, 16, 64]), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 100))
    _settings(n)(prop(bad_property))()


def test_fuzz_flash_attn_varlen_and_bad_input_subprocess(request):
    """Varlen (huge max_seqlen bounds included) and bad input, in a child process: a crash, a hang
    or a failed property fails this test with the child's output."""
    mult = 10 if request.config.getoption("--fuzz-long", default=False) else 1
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(hires_lmm.__file__)),
                                         env.get("PYTHONPATH", "")])
    try:
        proc = subprocess.run([sys.executable, __file__, str(N_VARLEN * mult), str(N_BAD * mult)],
                              capture_output=True, text=True, timeout=300 * mult, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"fuzz child timed out (a hang): {(e.stdout or '')[-4000:]}")
    assert proc.returncode == 0, (f"fuzz child exited with {proc.returncode} (negative: killed by a signal)\n"
                                  f"{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    assert "varlen ok" in proc.stdout and "bad input ok" in proc.stdout


if __name__ == "__main__":
    hires_lmm.set_backend("kernels")
    hires_lmm.set_value_checks(True)
    try:
        run_varlen(int(sys.argv[1]))
        print("varlen ok", flush=True)
        run_bad(int(sys.argv[2]))
        print("bad input ok", flush=True)
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
