"""PyTorch references of the select family (SliME's text-guided token selection), written the way
SliME's own code computes them (llava/model/multimodal_resampler/builder.py,
TextGuidedRouterCosine + TextGuidedSampler; specs/slime.md 3.3-3.4): a broadcast cosine over
(N, T, D), a masked sum over the text tokens, softmax(es), a descending sort, a cumulative sum.

Definitions shared with the kernels (csrc/cpu/select.cpp, kernels/select/similarity_select.cuh):
  cos(a, b)  = a/max(|a|, 1e-8) . b/max(|b|, 1e-8)        (F.cosine_similarity, eps 1e-8)
  scores     = sum over unmasked t of cos(local[b,i], text[b,t]), fp32, shape (B, N)
  ranking    = by score, descending; ties to the lower index (stable sort); a NaN score ranks
               after every other score, -inf included (README "Non-finite values"); kept indices
               are returned ascending
  top-p      = probabilities in fp64 from the fp32 scores (softmax is monotone, so ranking by
               score is ranking by probability); a NaN score has probability 0 in both softmaxes
               (a row of NaN scores has all probabilities 0); cumulative sums in ranking order
               accumulated in fp64, rounded to fp32 and compared with float32(p) (the rounding
               makes ties such as uniform probabilities with p = k/N decide the same way whatever
               the summation order); K = min(c + 1, N) where c = number of ranked positions
               whose cumulative sum <= p
  padding    = indices past lengths[b] are -1; gather_tokens writes zeros for them."""
import torch
import torch.nn.functional as F

__all__ = ["similarity_scores", "similarity_topk", "similarity_topp", "gather_tokens"]

COS_EPS = 1e-8


def similarity_scores(local_tokens, text_embeds, text_mask=None):
    """(B,N,D), (B,T,D), (B,T) bool -> (B,N) fp32: SliME's broadcast cosine and masked sum."""
    # fp64 cosines: exact for every finite fp32 input (F.cosine_similarity in fp32 gives 0 for
    # |x| > ~1e19, a finite wrong value; README "Non-finite values"); a non-finite input gives NaN
    lf = local_tokens.double()
    tf = text_embeds.double()
    sim = F.cosine_similarity(lf.unsqueeze(2), tf.unsqueeze(1), dim=-1, eps=COS_EPS)  # (B,N,T)
    if text_mask is not None:
        # a masked text token is not read (a NaN/inf in it reaches no score): a select, not a product
        sim = torch.where(text_mask.unsqueeze(1), sim, torch.zeros((), dtype=sim.dtype,
                                                                   device=sim.device))
    return sim.sum(-1).float()


def _rank_desc(values):
    """Indices sorting `values` (B,N) descending, ties to the lower index, NaN after every other
    value (-inf included; torch.sort alone would put NaN first)."""
    nan = torch.isnan(values)
    order = torch.sort(values.masked_fill(nan, float("-inf")), dim=-1, descending=True,
                       stable=True).indices
    # the NaNs (now -inf) after every real value, real -inf included: a stable sort on the flag
    last = torch.sort(torch.gather(nan, -1, order).to(torch.uint8), dim=-1, stable=True).indices
    return torch.gather(order, -1, last)


def similarity_topk(local_tokens, text_embeds, k, text_mask=None):
    """-> (indices (B,k) int64 ascending, scores (B,N) fp32)."""
    scores = similarity_scores(local_tokens, text_embeds, text_mask)
    top = _rank_desc(scores.detach())[:, :k]
    return torch.sort(top, dim=-1).values, scores


def topp_probabilities(scores, temperature=1.0, presoftmax_temperature=0.5):
    """SliME's router probabilities: optional softmax(S / presoftmax_temperature) (the first
    released code), then softmax(. / temperature). fp64; a NaN score has probability 0 in both
    softmaxes."""
    s = scores.double()
    nan = torch.isnan(s)
    s = s.masked_fill(nan, float("-inf"))
    if presoftmax_temperature is not None:
        s = torch.softmax(s / presoftmax_temperature, dim=-1).masked_fill(nan, float("-inf"))
    # a row of NaN scores only: softmax of -inf everywhere is NaN; its probabilities are 0
    return torch.softmax(s / temperature, dim=-1).masked_fill(nan, 0.0)


def topp_count(probs, p, scores=None):
    """Kept count K per row: rank (by `scores` when given, else by `probs`; descending, ties to the
    lower index, NaN last), cumulative sum in fp64 rounded to fp32, the positions with
    cumsum <= float32(p) plus one more, all when every cumsum <= p. -> (order, K)."""
    order = _rank_desc(probs if scores is None else scores)
    sorted_p = torch.gather(probs.double(), -1, order)
    cum = torch.cumsum(sorted_p, dim=-1).float()
    c = (cum <= torch.tensor(p, dtype=torch.float32)).sum(-1)
    return order, torch.clamp(c + 1, max=probs.shape[-1])


def similarity_topp(local_tokens, text_embeds, p, text_mask=None, temperature=1.0,
                    presoftmax_temperature=0.5):
    """-> (indices (B,N) int64: the kept tokens ascending, then -1; lengths (B,) int64)."""
    B, N = local_tokens.shape[0], local_tokens.shape[1]
    scores = similarity_scores(local_tokens, text_embeds, text_mask)
    probs = topp_probabilities(scores, temperature, presoftmax_temperature)
    order, K = topp_count(probs, p, scores.detach())
    indices = torch.full((B, N), -1, dtype=torch.long, device=local_tokens.device)
    for b in range(B):
        kb = int(K[b])
        indices[b, :kb] = torch.sort(order[b, :kb]).values
    return indices, K.to(torch.long)


def gather_tokens(tokens, indices):
    """tokens (B,N,D), indices (B,K) int64 in [0,N) or -1 -> (B,K,D): tokens[b, indices[b,j]],
    zeros where indices[b,j] == -1."""
    if tokens.shape[1] == 0:  # nothing to gather: every index is -1 (padding)
        return tokens.new_zeros((tokens.shape[0], indices.shape[1], tokens.shape[2]))
    valid = indices >= 0
    idx = indices.clamp(min=0)
    out = torch.gather(tokens, 1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
