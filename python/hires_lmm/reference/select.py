"""PyTorch references of the select family (SliME's text-guided token selection), written the way
SliME's own code computes them (llava/model/multimodal_resampler/builder.py,
TextGuidedRouterCosine + TextGuidedSampler; specs/slime.md 3.3-3.4): a broadcast cosine over
(N, T, D), a masked sum over the text tokens, softmax(es), a descending sort, a cumulative sum.

Definitions shared with the kernels (csrc/cpu/select.cpp, kernels/select/similarity_select.cuh):
  cos(a, b)  = a/max(|a|, 1e-8) . b/max(|b|, 1e-8)        (F.cosine_similarity, eps 1e-8)
  scores     = sum over unmasked t of cos(local[b,i], text[b,t]), fp32, shape (B, N)
  ties       = the lower index ranks first (stable sort); kept indices are ascending
  top-p      = probabilities in fp32; cumulative sums accumulated in fp64 and rounded to fp32
               (what torch.cumsum does on CPU), compared with float32(p); K = min(c + 1, N)
               where c = number of sorted positions whose cumulative sum <= p
  padding    = indices past lengths[b] are -1; gather_tokens writes zeros for them."""
import torch
import torch.nn.functional as F

__all__ = ["similarity_scores", "similarity_topk", "similarity_topp", "gather_tokens"]

COS_EPS = 1e-8


def similarity_scores(local_tokens, text_embeds, text_mask=None):
    """(B,N,D), (B,T,D), (B,T) bool -> (B,N) fp32: SliME's broadcast cosine and masked sum."""
    lf = local_tokens.float()
    tf = text_embeds.float()
    sim = F.cosine_similarity(lf.unsqueeze(2), tf.unsqueeze(1), dim=-1, eps=COS_EPS)  # (B,N,T)
    if text_mask is not None:
        sim = sim * text_mask.to(sim.dtype).unsqueeze(1)
    return sim.sum(-1)


def _rank_desc(values):
    """Indices sorting `values` (B,N) descending, ties to the lower index."""
    return torch.sort(values, dim=-1, descending=True, stable=True).indices


def similarity_topk(local_tokens, text_embeds, k, text_mask=None):
    """-> (indices (B,k) int64 ascending, scores (B,N) fp32)."""
    scores = similarity_scores(local_tokens, text_embeds, text_mask)
    top = _rank_desc(scores.detach())[:, :k]
    return torch.sort(top, dim=-1).values, scores


def topp_probabilities(scores, temperature=1.0, presoftmax_temperature=0.5):
    """SliME's router probabilities: optional softmax(S / presoftmax_temperature) (the first
    released code), then softmax(. / temperature). fp32."""
    s = scores.float()
    if presoftmax_temperature is not None:
        s = torch.softmax(s / presoftmax_temperature, dim=-1)
    return torch.softmax(s / temperature, dim=-1)


def topp_count(probs, p):
    """Kept count K per row: sort descending (ties to the lower index), cumulative sum, the
    positions with cumsum <= p plus one more, all when every cumsum <= p. -> (order, K)."""
    order = _rank_desc(probs)
    sorted_p = torch.gather(probs, -1, order)
    cum = torch.cumsum(sorted_p.double(), dim=-1).float()
    c = (cum <= torch.tensor(p, dtype=torch.float32)).sum(-1)
    return order, torch.clamp(c + 1, max=probs.shape[-1])


def similarity_topp(local_tokens, text_embeds, p, text_mask=None, temperature=1.0,
                    presoftmax_temperature=0.5):
    """-> (indices (B,N) int64: the kept tokens ascending, then -1; lengths (B,) int64)."""
    B, N = local_tokens.shape[0], local_tokens.shape[1]
    scores = similarity_scores(local_tokens, text_embeds, text_mask)
    probs = topp_probabilities(scores, temperature, presoftmax_temperature)
    order, K = topp_count(probs, p)
    indices = torch.full((B, N), -1, dtype=torch.long, device=local_tokens.device)
    for b in range(B):
        kb = int(K[b])
        indices[b, :kb] = torch.sort(order[b, :kb]).values
    return indices, K.to(torch.long)


def gather_tokens(tokens, indices):
    """tokens (B,N,D), indices (B,K) int64 in [0,N) or -1 -> (B,K,D): tokens[b, indices[b,j]],
    zeros where indices[b,j] == -1."""
    valid = indices >= 0
    idx = indices.clamp(min=0)
    out = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
