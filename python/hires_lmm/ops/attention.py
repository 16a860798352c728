"""Attention family: flash attention with flash-attn's layouts (kernels/attention/,
csrc/attention.cpp)."""
from .. import reference as _ref
from .._backend import use_reference
import torch

from ._register import op, register_reference_backward

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def flash_attn_func(q, k, v, softmax_scale=None, causal: bool = False):
    """o = softmax(q k^T * scale [+ causal mask]) v, online softmax in fp32, O(S) memory.

    q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) -> o (B,Sq,Hq,D) contiguous, q's dtype. Hq % Hkv == 0
    (GQA/MQA: q head h reads kv head h // (Hq // Hkv)). scale defaults to 1/sqrt(D). Causal is
    aligned bottom-right (query i sees keys j <= i + Sk - Sq); a row that sees no key outputs 0.
    Dtypes float32/float16/bfloat16, equal for q, k, v; last dim must be contiguous (else copied).
    CPU: any head dim <= 512. CUDA: tensor-core kernel for fp16/bf16 with D in {64, 128}; fp32 and
    other head dims run an ATen fallback (same result, O(S^2) memory). Backward recomputes through
    hires_lmm.reference (O(S^2) memory)."""
    if use_reference():
        return _ref.flash_attn_func(q, k, v, softmax_scale, causal)
    return op("flash_attn_func")(q, k, v, softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, softmax_scale=None, causal: bool = False):
    """flash_attn_func over packed sequences: q (total_q,Hq,D), k/v (total_k,Hkv,D),
    cu_seqlens_q/k (B+1,) int32 prefix sums starting at 0 (sequence b is tokens
    cu[b]:cu[b+1]); max_seqlen_q/k >= every length (they size the CUDA grid: no host sync).
    Causal alignment is per sequence. Tokens past cu_seqlens_q[-1] get 0. The cu_seqlens value
    checks cost one device->host copy on CUDA (hires_lmm.set_value_checks(False) skips them)."""
    if use_reference():
        return _ref.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, softmax_scale, causal)
    return op("flash_attn_varlen_func")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, softmax_scale, causal)


# ---- fake kernels (shapes only; torch.compile and meta tensors) ----------------------------
@torch.library.register_fake("hires_lmm::flash_attn_func")
def _(q, k, v, softmax_scale=None, causal=False):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


@torch.library.register_fake("hires_lmm::flash_attn_varlen_func")
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
      causal=False):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


# ---- autograd: backward recomputes the forward with the reference and differentiates it -------
register_reference_backward("flash_attn_func", _ref.flash_attn_func)
register_reference_backward("flash_attn_varlen_func", _ref.flash_attn_varlen_func)


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
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k, v)):
        raise RuntimeError("flash_attn_with_kvcache: not differentiable (a decode-time op that "
                           "writes its caches in place); call it under torch.no_grad() or use "
                           "flash_attn_func for training")
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    if use_reference():
        return _ref.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens,
                                            softmax_scale, causal)
    return op("flash_attn_with_kvcache")(q, k_cache, v_cache, k, v, cache_seqlens, softmax_scale,
                                         causal)


@torch.library.register_fake("hires_lmm::flash_attn_with_kvcache")
def _(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, softmax_scale=None, causal=True):
    # the in-place append into k_cache/v_cache is declared in the schema (Tensor(a!)); shapes only
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)
