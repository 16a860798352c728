"""PyTorch references of the attention family with flash-attn's layouts and semantics.
Computed in fp32 (fp64 when the inputs are fp64: the tests' ground truth), returned in q's dtype.

Causal masks are aligned bottom-right when Sq != Sk (query i sees keys j <= i + Sk - Sq), as
flash-attn >= 2.1; a query row that sees no key outputs zeros. GQA/MQA: Hq % Hkv == 0, query head
h reads kv head h // (Hq // Hkv)."""
import math

import torch

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


def _attend(q, k, v, scale, causal):
    # q (Sq, Hq, D), k/v (Sk, Hkv, D) -> (Sq, Hq, D)
    acc = torch.promote_types(q.dtype, torch.float32)
    Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[0], k.shape[1]
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kf) * scale
    if causal:
        i = torch.arange(Sq, device=q.device).view(-1, 1)
        j = torch.arange(Sk, device=q.device).view(1, -1)
        s = s.masked_fill(j > i + (Sk - Sq), float("-inf"))
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows with no visible key
    return torch.einsum("hqk,khd->qhd", p, vf)


def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    """q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) -> (B,Sq,Hq,D); scale defaults to 1/sqrt(D)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    out = torch.stack([_attend(q[b], k[b], v[b], scale, causal) for b in range(q.shape[0])])
    return out.to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False):
    """Packed sequences: q (total_q,Hq,D), k/v (total_k,Hkv,D), cu_seqlens_* (B+1,) int32."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b in range(len(cq) - 1):
        out[cq[b]:cq[b + 1]] = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]],
                                       scale, causal).to(q.dtype)
    return out


__all__ += ["flash_attn_with_kvcache"]


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None,
                            softmax_scale=None, causal=True):
    """KV-cache attention (flash-attn semantics): q (B,Sq,Hq,D), k_cache/v_cache (B,S_cache,Hkv,D).
    New k/v (B,Snew,Hkv,D) are written into the caches IN PLACE at rows cache_seqlens[b] ..
    cache_seqlens[b]+Snew-1; batch b then attends to its first L_b = cache_seqlens[b] + Snew keys
    (cache_seqlens None: all S_cache), causal aligned bottom-right (j <= i + L_b - Sq)."""
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    B, S_cache = q.shape[0], k_cache.shape[1]
    if isinstance(cache_seqlens, int):
        cache_seqlens = [cache_seqlens] * B
    lens = cache_seqlens.tolist() if isinstance(cache_seqlens, torch.Tensor) else cache_seqlens
    snew = 0
    if k is not None:
        if lens is None:
            raise ValueError("flash_attn_with_kvcache: argument 'cache_seqlens' must be given with 'k' and 'v'")
        snew = k.shape[1]
        for b in range(B):
            if lens[b] < 0 or lens[b] + snew > S_cache:
                raise ValueError(f"flash_attn_with_kvcache: argument 'cache_seqlens' overflows the cache "
                                 f"at batch element {b}: {lens[b]} + {snew} > {S_cache}")
            k_cache[b, lens[b]:lens[b] + snew] = k[b]
            v_cache[b, lens[b]:lens[b] + snew] = v[b]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    for b in range(B):
        L = S_cache if lens is None else lens[b] + snew
        out[b] = _attend(q[b], k_cache[b, :L], v_cache[b, :L], scale, causal).to(q.dtype)
    return out
