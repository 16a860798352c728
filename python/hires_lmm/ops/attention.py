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
