"""select family: SliME's text-guided token selection (kernels/select/, csrc/select.cpp).

scores[b,i] = sum over unmasked t of cos(local[b,i], text[b,t]) is computed as one matrix-vector
product per batch row, (local[b,i]/|local[b,i]|) . sum_t text[b,t]/|text[b,t]|, with no N x T
matrix; the selection (sort, softmax, prefix sums) runs on the device with no host sync, so the
ops are CUDA-graph capturable and their output shapes are static:
  similarity_topk -> indices (B,k), scores (B,N);  similarity_topp -> indices (B,N) padded
  with -1 past lengths[b], lengths (B,). See hires_lmm.reference.select for the exact rules
(cosine eps, ties, the cumulative-sum rounding)."""
import torch

from .. import reference as _ref
from .._backend import use_reference
from ._register import check_fake_devices, op, register_reference_backward

__all__ = ["similarity_topk", "similarity_topp", "gather_tokens"]


def similarity_topk(local_tokens, text_embeds, k: int, text_mask=None):
    """The k local tokens most similar to the text, in their original order.

    local_tokens (B,N,D), text_embeds (B,T,D) float32/float16/bfloat16 (same dtype not
    required), text_mask (B,T) bool or None (all text tokens count), 1 <= k <= N.
    Returns (indices (B,k) int64 ascending, scores (B,N) float32) with
    scores[b,i] = sum over unmasked t of cos(local[b,i], text[b,t]); ties go to the lower index,
    a NaN score ranks after every other (README "Non-finite values").
    Gradients flow to local_tokens and text_embeds through `scores`."""
    if use_reference():
        return _ref.similarity_topk(local_tokens, text_embeds, k, text_mask)
    return op("similarity_topk")(local_tokens, text_embeds, k, text_mask)


def similarity_topp(local_tokens, text_embeds, p: float, text_mask=None, temperature: float = 1.0,
                    presoftmax_temperature=0.5):
    """SliME's adaptive top-p selection (specs/slime.md 3.4).

    probs = softmax(s / temperature), s = softmax(scores / presoftmax_temperature) (the first
    released code, matching the checkpoints; default 0.5) or s = scores when
    presoftmax_temperature is None (the code at HEAD); both in fp64 from the fp32 scores. Rank by
    score descending (ties to the lower index; a NaN score ranks last with probability 0), keep
    the positions whose cumulative sum (fp64, rounded to fp32) <= float32(p) plus one more (all
    N when every sum <= p), return them ascending. p in (0, 1].
    Returns (indices (B,N) int64: kept indices ascending then -1, lengths (B,) int64)."""
    if use_reference():
        return _ref.similarity_topp(local_tokens, text_embeds, p, text_mask, temperature,
                                    presoftmax_temperature)
    return op("similarity_topp")(local_tokens, text_embeds, p, text_mask, temperature,
                                 presoftmax_temperature)


def gather_tokens(tokens, indices):
    """out[b,j] = tokens[b, indices[b,j]], zeros where indices[b,j] == -1 (the padding of
    similarity_topp). tokens (B,N,D) float32/float16/bfloat16 (float64 is refused), indices
    (B,K) int64 in [-1, N).
    Returns (B,K,D) of tokens' dtype; take out[b, :lengths[b]] for a ragged row."""
    if use_reference():
        return _ref.gather_tokens(tokens, indices)
    return op("gather_tokens")(tokens, indices)


# ---- fake kernels: every output shape is static ------------------------------------------
@torch.library.register_fake("hires_lmm::similarity_topk")
def _(local_tokens, text_embeds, k, text_mask=None):
    check_fake_devices("similarity_topk", local_tokens=local_tokens, text_embeds=text_embeds,
                       text_mask=text_mask)
    B, N = local_tokens.shape[0], local_tokens.shape[1]
    return (local_tokens.new_empty((B, k), dtype=torch.long),
            local_tokens.new_empty((B, N), dtype=torch.float32))


@torch.library.register_fake("hires_lmm::similarity_topp")
def _(local_tokens, text_embeds, p, text_mask=None, temperature=1.0, presoftmax_temperature=0.5):
    check_fake_devices("similarity_topp", local_tokens=local_tokens, text_embeds=text_embeds,
                       text_mask=text_mask)
    B, N = local_tokens.shape[0], local_tokens.shape[1]
    return (local_tokens.new_empty((B, N), dtype=torch.long),
            local_tokens.new_empty((B,), dtype=torch.long))


@torch.library.register_fake("hires_lmm::gather_tokens")
def _(tokens, indices):
    check_fake_devices("gather_tokens", tokens=tokens, indices=indices)
    return tokens.new_empty((tokens.shape[0], indices.shape[1], tokens.shape[2]))


# ---- autograd: scores and gathered tokens are differentiable; indices are not --------------
register_reference_backward("similarity_topk", _ref.similarity_topk)
register_reference_backward("gather_tokens", _ref.gather_tokens)
