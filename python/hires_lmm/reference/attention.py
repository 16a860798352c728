"""PyTorch references of the attention family with flash-attn 2's signatures and semantics.
Computed in fp32 (fp64 when the inputs are fp64: the tests' ground truth), returned in q's dtype.

Masks (flash-attn): causal and the sliding window are aligned bottom-right when Sq != Sk: key j
is visible to query i iff i + Sk - Sq - left <= j <= i + Sk - Sq + right (window_size =
(left, right), -1 unbounded; causal means right = 0). GQA/MQA: Hq % Hkv == 0, query head h reads
kv head h // (Hq // Hkv). softcap > 0: scores = softcap * tanh(scale * q.k / softcap).

Non-finite rule (the project's: exact IEEE arithmetic on the formula): a query row that sees no
key outputs 0 and lse -inf; every other row is softmax(s) v over its visible keys, so a NaN/inf
reaching a visible score or a visible v row gives NaN/inf in that row only (a row whose visible
scores are all -inf is 0/0 = NaN). lse = m + log(sum exp(s - m)), m the row max (NaN when a score
is NaN or +inf)."""
import math
import numbers

import torch

__all__ = ["flash_attn_func", "flash_attn_varlen_func"]


# ---- argument rules shared with hires_lmm.ops ------------------------------------------------------
def _check_unsupported(op, dropout_p, alibi_slopes):
    """flash-attn arguments this library does not implement: NotImplementedError naming them."""
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"{op}: argument 'dropout_p' must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"{op}: argument 'dropout_p' must be 0.0 (attention dropout is not "
                                  f"implemented; pass 0.0 in eval as flash-attn users do), got {dropout_p}")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{op}: argument 'alibi_slopes' is not supported (ALiBi is not "
                                  f"implemented), got {type(alibi_slopes).__name__}")


def _window_pair(op, window_size):
    """window_size -> (left, right) ints >= -1."""
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        raise TypeError(f"{op}: argument 'window_size' must be a pair of ints (left, right), "
                        f"got {window_size!r}")
    left, right = int(window_size[0]), int(window_size[1])
    if left < -1 or right < -1:
        raise ValueError(f"{op}: argument 'window_size' must be (left, right) with each >= -1 "
                         f"(-1: unbounded), got {window_size!r}")
    # a bound past every sequence length constrains nothing: keep it within int64
    return min(left, 2**62), min(right, 2**62)


def _check_softcap(op, softcap):
    if (not isinstance(softcap, numbers.Real) or isinstance(softcap, bool)
            or not math.isfinite(softcap) or softcap < 0):
        raise ValueError(f"{op}: argument 'softcap' must be a finite value >= 0 (0: off), got {softcap!r}")
    return float(softcap)


# ---- the formula -------------------------------------------------------------------------------------
def _visible(Sq, Sk, causal, left, right, device):
    """(Sq, Sk) bool: key j visible to query i."""
    i = torch.arange(Sq, device=device).view(-1, 1)
    j = torch.arange(Sk, device=device).view(1, -1)
    center = i + (Sk - Sq)
    vis = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
    right = 0 if causal else right
    if right >= 0:
        vis &= j <= center + right
    if left >= 0:
        vis &= j >= center - left
    return vis


def _attend(q, k, v, scale, causal, left, right, softcap, exact_nonfinite_v=True):
    """q (Sq, Hq, D), k/v (Sk, Hkv, D) -> o (Sq, Hq, D) and lse (Hq, Sq), in the accumulation dtype.
    exact_nonfinite_v=False skips the (data-dependent) handling of non-finite v rows: the autograd
    recompute uses it so that it traces (its gradients are NaN there anyway)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    Sq, Hq, D = q.shape
    Sk, Hkv = k.shape[0], k.shape[1]
    qf, kf, vf = q.to(acc), k.to(acc), v.to(acc)
    if Hq != Hkv:
        kf = kf.repeat_interleave(Hq // Hkv, dim=1)
        vf = vf.repeat_interleave(Hq // Hkv, dim=1)
    s = torch.einsum("qhd,khd->hqk", qf, kf)
    s = torch.tanh(s * (scale / softcap)) * softcap if softcap != 0 else s * scale
    vis = _visible(Sq, Sk, causal, left, right, q.device)
    s = s.masked_fill(~vis, float("-inf"))
    # one extra -inf column keeps the max defined when Sk == 0 (no data-dependent branch: the
    # autograd recompute of varlen slices traces with unbacked sizes)
    m = torch.nn.functional.pad(s, (0, 1), value=float("-inf")).amax(dim=-1, keepdim=True)  # NaN propagates
    m_use = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    e = torch.exp(s - m_use)
    l = e.sum(dim=-1, keepdim=True)
    lse = (m_use + torch.log(l)).squeeze(-1)
    p = e / l  # l == 0 (every visible score -inf): 0/0 = NaN
    p = torch.where(vis.any(dim=-1).view(1, Sq, 1), p, torch.zeros_like(p))  # rows that see no key
    # o = p v over the visible keys only: a non-finite v row must not reach the rows that mask it
    # (0 * inf), so such rows are added separately under the mask.
    bad = ~torch.isfinite(vf).all(dim=2) if exact_nonfinite_v else None  # (Sk, Hq)
    if bad is not None and bad.any():
        keys = bad.any(dim=1).nonzero().flatten()
        o = torch.einsum("hqk,khd->qhd", p, vf.index_fill(0, keys, 0.0))
        contrib = p[:, :, keys, None] * vf[keys].permute(1, 0, 2)[:, None]  # (H, Sq, n, D)
        contrib = torch.where(vis[None, :, keys, None], contrib, torch.zeros_like(contrib))
        o = o + contrib.sum(dim=2).transpose(0, 1)
    else:
        o = torch.einsum("hqk,khd->qhd", p, vf)
    return o, lse


def _scale(softmax_scale, D):
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)


def _flash_attn_fwd(q, k, v, softmax_scale=None, causal=False, window_size_left=-1,
                    window_size_right=-1, softcap=0.0, *, exact_nonfinite_v=True):
    """The op's schema (torch.ops.hires_lmm.flash_attn_func): q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) ->
    (out (B,Sq,Hq,D) q's dtype, softmax_lse (B,Hq,Sq) fp32 (fp64 for fp64 inputs), no gradient)."""
    scale = _scale(softmax_scale, q.shape[-1])
    outs, lses = [], []
    for b in range(q.shape[0]):
        o, lse = _attend(q[b], k[b], v[b], scale, causal, window_size_left, window_size_right, softcap,
                         exact_nonfinite_v)
        outs.append(o)
        lses.append(lse)
    acc = torch.promote_types(q.dtype, torch.float32)
    if not outs:
        return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                torch.empty(0, q.shape[2], q.shape[1], dtype=acc, device=q.device))
    return torch.stack(outs).to(q.dtype), torch.stack(lses).detach()


def _flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=False, window_size_left=-1, window_size_right=-1,
                           softcap=0.0, *, exact_nonfinite_v=True):
    """The op's schema (torch.ops.hires_lmm.flash_attn_varlen_func): packed q (total_q,Hq,D),
    k/v (total_k,Hkv,D) -> (out (total_q,Hq,D), softmax_lse (Hq,total_q)). Tokens past
    cu_seqlens_q[-1] belong to no sequence: out 0, lse -inf."""
    scale = _scale(softmax_scale, q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc, device=q.device)
    pieces = []
    for b in range(len(cq) - 1):
        o, l = _attend(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], scale, causal,
                       window_size_left, window_size_right, softcap, exact_nonfinite_v)
        pieces.append((cq[b], cq[b + 1], o, l))
    if pieces:  # out-of-place index_put keeps autograd through `out`
        rows = torch.cat([torch.arange(a, e, device=q.device) for a, e, _, _ in pieces])
        out = out.index_put((rows,), torch.cat([o for _, _, o, _ in pieces]).to(q.dtype))
        heads = torch.arange(q.shape[1], device=q.device)[:, None]
        lse = lse.index_put((heads, rows[None, :]), torch.cat([l for _, _, _, l in pieces], dim=1))
    return out, lse.detach()


# ---- public: flash-attn 2 signatures ------------------------------------------------------------------
def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (B,Sq,Hq,D), k/v (B,Sk,Hkv,D) -> out (B,Sq,Hq,D); scale defaults to 1/sqrt(D).
    return_attn_probs=True -> (out, softmax_lse (B,Hq,Sq), None) as flash-attn."""
    _check_unsupported("flash_attn_func", dropout_p, alibi_slopes)
    left, right = _window_pair("flash_attn_func", window_size)
    softcap = _check_softcap("flash_attn_func", softcap)
    out, lse = _flash_attn_fwd(q, k, v, softmax_scale, causal, left, right, softcap)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Packed sequences: q (total_q,Hq,D), k/v (total_k,Hkv,D), cu_seqlens_* (B+1,) int32.
    return_attn_probs=True -> (out, softmax_lse (Hq,total_q), None)."""
    _check_unsupported("flash_attn_varlen_func", dropout_p, alibi_slopes)
    left, right = _window_pair("flash_attn_varlen_func", window_size)
    softcap = _check_softcap("flash_attn_varlen_func", softcap)
    out, lse = _flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                      softmax_scale, causal, left, right, softcap)
    return (out, lse, None) if return_attn_probs else out


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
        out[b] = _attend(q[b], k_cache[b, :L], v_cache[b, :L], scale, causal, -1, -1, 0.0)[0].to(q.dtype)
    return out
