"""Attention family: flash attention with flash-attn's layouts (kernels/attention/,
csrc/attention.cpp)."""
from .. import reference as _ref
from .._backend import use_reference
from ._register import op

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def flash_attn_func(q, k, v, softmax_scale=None, causal: bool = False):
    """softmax(q k^T * scale) v with online softmax in fp32 and O(S) memory.
    q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) with Hq % Hkv == 0; causal aligned bottom-right."""
    if use_reference():
        return _ref.flash_attn_func(q, k, v, softmax_scale, causal)
    return op("flash_attn_func")(q, k, v, softmax_scale, causal)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int,
                           max_seqlen_k: int, softmax_scale=None, causal: bool = False):
    """Packed sequences: q (total_q,Hq,D), k/v (total_k,Hkv,D), cu_seqlens_* (B+1,) int32."""
    if use_reference():
        return _ref.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, softmax_scale, causal)
    return op("flash_attn_varlen_func")(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                        max_seqlen_k, softmax_scale, causal)
