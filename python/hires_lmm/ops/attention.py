"""Attention family: flash attention with flash-attn 2's layouts and signatures (kernels/attention/,
csrc/attention.cpp)."""
from .._backend import use_reference
from ..reference import attention as _ref_attn

import torch

from ._register import check_fake_devices, op, overload

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]

# The common call (no dropout, no ALiBi, no window, no softcap) is recognised by exact types and
# values before the full argument checks (which then run only for other values): a call's fixed
# cost matters for decode-sized work.
_NUM = (float, int)  # not bool: flash-attn's dropout_p / softcap are numbers
_NO_WINDOW = (-1, -1)  # exactly (int, int): other forms take the full checks
_op = overload  # torch.ops.hires_lmm.<name>.default, looked up once


def _plain(dropout_p, window_size, softcap, alibi_slopes) -> bool:
    return (type(dropout_p) in _NUM and dropout_p == 0 and alibi_slopes is None
            and type(window_size) is tuple and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int and window_size == _NO_WINDOW
            and type(softcap) in _NUM and softcap == 0)


def _options(op_name, dropout_p, window_size, softcap, alibi_slopes):
    """(left, right, softcap) of a call, checked; the common plain call (no dropout, window,
    softcap or ALiBi) takes the short path (a few type checks on the hot path)."""
    if _plain(dropout_p, window_size, softcap, alibi_slopes):
        return -1, -1, 0.0
    _ref_attn._check_unsupported(op_name, dropout_p, alibi_slopes)
    left, right = _ref_attn._window_pair(op_name, window_size)
    return left, right, _ref_attn._check_softcap(op_name, softcap)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal: bool = False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic: bool = False,
                    return_attn_probs: bool = False):
    """o = softmax(s) v with s = q k^T * scale (softcap > 0: softcap * tanh(q k^T * scale / softcap))
    over the visible keys; online softmax in fp32, O(S) memory. flash-attn 2's signature and
    argument order (`flash_attn_func(q, k, v, 0.0, causal=True)` works as there).

    q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) -> o (B,Sq,Hq,D) contiguous, q's dtype. Hq % Hkv == 0
    (GQA/MQA: q head h reads kv head h // (Hq // Hkv)). scale defaults to 1/sqrt(D).
    Visible keys (bottom-right aligned, flash-attn): j with i + Sk - Sq - left <= j <= i + Sk - Sq
    + right for window_size = (left, right), -1 unbounded; causal = right 0. A row that sees no key
    outputs 0 (lse -inf); NaN/inf reaching a row's visible scores give NaN there.
    return_attn_probs=True -> (o, softmax_lse, None): softmax_lse (B,Hq,Sq) fp32, natural log of
    sum_j exp(s_ij) (no gradient flows through it). dropout_p must be 0.0 and alibi_slopes None
    (NotImplementedError otherwise); deterministic is accepted (the forward is deterministic).
    Dtypes float32/float16/bfloat16, equal for q, k, v; last dim must be contiguous (else copied).
    CPU: any head dim <= 512. CUDA: tensor-core kernel for fp16/bf16 with D in {64, 128}; fp32 and
    other head dims run an ATen fallback (same result, O(S^2) memory).
    Backward: FlashAttention-2's (hires_lmm::flash_attn_bwd): saves q, k, v, o and softmax_lse
    only and recomputes P tile by tile, O(S) extra memory (fp32 dQ accumulator (B,Sq,Hq,D) and
    D = rowsum(dO * o)); fp32 accumulation; dK/dV summed over a GQA group; softcap through
    tanh's derivative; rows that see no key contribute nothing. CPU: ATen's CPU flash backward
    where the forward's ATen path applies (fp16/bf16 computed in fp32), else the twin of the CUDA
    kernel (any dtype, D <= 512; README "CPU paths"); CUDA: sm_80 kernel for fp16/bf16, D in {64, 128} (compiled, never run
    on a GPU yet), ATen O(S^2) math otherwise."""
    left, right, softcap = _options("flash_attn_func", dropout_p, window_size, softcap, alibi_slopes)
    if use_reference():
        out, lse = _ref_attn._flash_attn_fwd(q, k, v, softmax_scale, causal, left, right, softcap)
    else:
        out, lse = _op("flash_attn_func")(q, k, v, softmax_scale, causal, left, right, softcap)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           dropout_p=0.0, softmax_scale=None, causal: bool = False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic: bool = False,
                           return_attn_probs: bool = False):
    """flash_attn_func over packed sequences (flash-attn 2's varlen signature): q (total_q,Hq,D),
    k/v (total_k,Hkv,D), cu_seqlens_q/k (B+1,) int32 prefix sums starting at 0 (sequence b is
    tokens cu[b]:cu[b+1]); max_seqlen_q/k >= every length (a bound only: the work follows the real
    lengths; a bound below a real length is an error). Causal and window alignment are per
    sequence. Tokens past cu_seqlens_q[-1] get 0 (lse -inf). return_attn_probs=True ->
    (o, softmax_lse (Hq,total_q) fp32, None). The cu_seqlens value checks cost one device->host
    copy on CUDA (hires_lmm.set_value_checks(False) skips them). Backward as flash_attn_func's
    (hires_lmm::flash_attn_varlen_bwd; saves q, k, v, cu_seqlens, o, softmax_lse); tokens past
    cu_seqlens_q[-1] / cu_seqlens_k[-1] get zero gradients."""
    left, right, softcap = _options("flash_attn_varlen_func", dropout_p, window_size, softcap, alibi_slopes)
    if use_reference():
        out, lse = _ref_attn._flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                    max_seqlen_k, softmax_scale, causal, left, right, softcap)
    else:
        out, lse = _op("flash_attn_varlen_func")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                max_seqlen_k, softmax_scale, causal, left, right, softcap)
    return (out, lse, None) if return_attn_probs else out


# ---- fake kernels (shapes only; torch.compile and meta tensors) ----------------------------
@torch.library.register_fake("hires_lmm::flash_attn_func")
def _(q, k, v, softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0):
    check_fake_devices("flash_attn_func", q=q, k=k, v=v)
    B, Sq, Hq, _D = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((B, Hq, Sq), dtype=torch.float32, device=q.device))


@torch.library.register_fake("hires_lmm::flash_attn_varlen_func")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
      causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0):
    check_fake_devices("flash_attn_varlen_func", q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q,
                       cu_seqlens_k=cu_seqlens_k)
    total_q, Hq, _D = q.shape
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty((Hq, total_q), dtype=torch.float32, device=q.device))


# ---- autograd: FlashAttention-2's backward (csrc/attention_bwd.cpp). The forward saves only q, k,
# v, out and softmax_lse; hires_lmm::flash_attn_bwd / flash_attn_varlen_bwd recompute P tile by tile
# (O(S) extra memory: an fp32 dQ accumulator and D = rowsum(dO * O)). softmax_lse is marked
# non-differentiable (no gradient flows through it). Every case of the forward is covered (causal,
# window, softcap through tanh's derivative, GQA/MQA, varlen); CUDA fp32 and head dims other than
# 64/128 run the binding's ATen O(S^2) math.
def _register_flash_backward(name: str, bwd_name: str, n_tensors: int) -> None:
    def setup_context(ctx, inputs, output):
        out, lse = output
        ctx.save_for_backward(*inputs[:n_tensors], out, lse)
        ctx.others = inputs[n_tensors:]
        ctx.mark_non_differentiable(lse)

    def backward(ctx, grad_out, _grad_lse):
        saved = ctx.saved_tensors
        nones = [None] * (n_tensors + len(ctx.others))
        if grad_out is None or not any(ctx.needs_input_grad[:3]):
            return tuple(nones)
        q, k, v = saved[:3]
        extra = saved[3:n_tensors]  # varlen: cu_seqlens_q, cu_seqlens_k
        out, lse = saved[n_tensors:]
        dq, dk, dv = op(bwd_name)(grad_out, q, k, v, out, lse, *extra, *ctx.others)
        nones[0] = dq if ctx.needs_input_grad[0] else None
        nones[1] = dk if ctx.needs_input_grad[1] else None
        nones[2] = dv if ctx.needs_input_grad[2] else None
        return tuple(nones)

    torch.library.register_autograd(f"hires_lmm::{name}", backward, setup_context=setup_context)


_register_flash_backward("flash_attn_func", "flash_attn_bwd", 3)
_register_flash_backward("flash_attn_varlen_func", "flash_attn_varlen_bwd", 5)


@torch.library.register_fake("hires_lmm::flash_attn_bwd")
def _(dout, q, k, v, out, softmax_lse, softmax_scale=None, causal=False, window_size_left=-1,
      window_size_right=-1, softcap=0.0):
    check_fake_devices("flash_attn_bwd", dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


@torch.library.register_fake("hires_lmm::flash_attn_varlen_bwd")
def _(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
      softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1, softcap=0.0):
    check_fake_devices("flash_attn_varlen_bwd", dout=dout, q=q, k=k, v=v, out=out,
                       softmax_lse=softmax_lse, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


# ---- flash_attn_with_kvcache (decode over a dense KV cache) ------------------------------------
__all__ += ["flash_attn_with_kvcache"]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            softmax_scale=None, causal: bool = True):
    """Attention of q over a KV cache, appending new keys/values in place first (flash-attn's
    `flash_attn_with_kvcache` names and semantics, without paging, rotary or cache_batch_idx).

    q (B,Sq,Hq,D); k_cache/v_cache (B,S_cache,Hkv,D), same dtype as q, Hq % Hkv == 0.
    k/v (B,Snew,Hkv,D) or None: written IN PLACE into k_cache/v_cache at rows
    cache_seqlens[b] .. cache_seqlens[b]+Snew-1 of batch b (needs cache_seqlens). Then
      o[b,i] = softmax_j(scale * q[b,i] . k_cache[b,j]) v_cache[b,j]  over j < L_b,
      L_b = cache_seqlens[b] + Snew  (cache_seqlens None: L_b = S_cache),
    and, for causal, j <= i + L_b - Sq (aligned bottom-right per batch element); a row that sees
    no key gives 0. cache_seqlens: int32 (B,) tensor on q's device, or a Python int (the same for
    every b); every L_b <= S_cache (checked: free on CPU, one device->host copy on CUDA, skipped
    with hires_lmm.set_value_checks(False) and during CUDA-graph capture; unchecked overflows are
    clamped into the cache, never written out of bounds). scale defaults to 1/sqrt(D).
    Returns o (B,Sq,Hq,D) contiguous, q's dtype.

    NOTE: causal defaults to True here (decode); flash-attn's own default is causal=False.
    For Sq == 1 causal makes no difference.

    Paths as flash_attn_func (CPU twin; CUDA sm_80 tensor-core kernel for fp16/bf16 with D in
    {64, 128}, split-KV for decode, never the sm_90a kernel; ATen fallback otherwise). No host
    sync on CUDA with value checks off: the append and L_b stay on the device (graph capturable).
    Batching is exact: a sequence's output is bitwise independent of the other sequences in the
    batch (for a given S_cache; the split-KV count never depends on B).
    Not differentiable (a decode-time op): requesting gradients raises (here and in the op's
    Autograd kernel, so torch.ops.hires_lmm.flash_attn_with_kvcache too)."""
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    if use_reference():
        # (the op's Autograd kernel makes this check for the compiled path)
        if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                           for t in (q, k_cache, v_cache, k, v)):
            raise RuntimeError("flash_attn_with_kvcache: not differentiable (a decode-time op that "
                               "writes its caches in place); call it under torch.no_grad() or use "
                               "flash_attn_func for training")
        return _ref_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens,
                                                 softmax_scale, causal)
    return _op("flash_attn_with_kvcache")(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale,
                                          causal)


@torch.library.register_fake("hires_lmm::flash_attn_with_kvcache")
def _(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None, causal=True):
    # the in-place append into k_cache/v_cache is declared in the schema (Tensor(a!)); shapes only
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
