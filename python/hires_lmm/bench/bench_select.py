"""SliME's text-guided selector (similarity_topk / similarity_topp + gather_tokens) against
  slime_eager     : SliME's own formulation (broadcast cosine over N x T x D, masked sum,
                    softmax(es), sort, cumsum, prefix + 1, sort ascending, gather)
  torch_efficient : normalize, one matmul, masked sum, topk, sort, gather
  torch_compile   : torch_efficient under torch.compile (CUDA only)
Model shape: N = 1008 local tokens (7 crops x 144), T = 64 prompt tokens, D = 4096, k = 576, bf16
(and fp32 on the CPU).
Ours includes the gather, like the references."""
import torch
import torch.nn.functional as F

from hires_lmm import ops, reference as ref
from .common import Case


def slime_topp(local, text, mask, p, pre=0.5, temp=1.0):
    out = []
    for b in range(local.shape[0]):
        sim = F.cosine_similarity(local[b].unsqueeze(1), text[b].unsqueeze(0), dim=-1)  # (N, T, D) broadcast
        s = (sim * mask[b].to(sim.dtype)).sum(-1)
        if pre is not None:
            s = torch.softmax(s / pre, dim=-1)
        probs = torch.softmax(s / temp, dim=-1)
        sp, si = torch.sort(probs, descending=True)
        keep = torch.cumsum(sp, dim=-1) <= p
        n = int(keep.sum()) + 1 if not bool(keep.all()) else keep.numel()
        out.append(local[b][torch.sort(si[:n]).values])
    return out


def slime_topk(local, text, mask, k):
    sim = F.cosine_similarity(local.unsqueeze(2), text.unsqueeze(1), dim=-1)            # (B, N, T) via N x T x D
    s = (sim * mask.unsqueeze(1).to(sim.dtype)).sum(-1)
    idx = torch.sort(torch.sort(s, dim=-1, descending=True).indices[:, :k], dim=-1).values
    return torch.gather(local, 1, idx.unsqueeze(-1).expand(-1, -1, local.shape[-1]))


def efficient_topk(local, text, mask, k):
    ln = F.normalize(local, dim=-1)
    tn = F.normalize(text, dim=-1) * mask.unsqueeze(-1).to(text.dtype)
    s = torch.bmm(ln, tn.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1).float()
    idx = torch.sort(torch.topk(s, k, dim=-1).indices, dim=-1).values
    return torch.gather(local, 1, idx.unsqueeze(-1).expand(-1, -1, local.shape[-1]))


def efficient_topp(local, text, mask, p, pre=0.5):
    ln = F.normalize(local, dim=-1)
    tn = F.normalize(text, dim=-1) * mask.unsqueeze(-1).to(text.dtype)
    s = torch.bmm(ln, tn.sum(1, keepdim=True).transpose(1, 2)).squeeze(-1).float()
    probs = torch.softmax(torch.softmax(s / pre, dim=-1), dim=-1)
    sp, si = torch.sort(probs, dim=-1, descending=True)
    n = torch.clamp((torch.cumsum(sp, dim=-1) <= p).sum(-1) + 1, max=s.shape[-1])
    keep = torch.arange(s.shape[-1], device=s.device).unsqueeze(0) < n.unsqueeze(1)
    idx = torch.sort(torch.where(keep, si, s.shape[-1]), dim=-1).values      # kept ascending, pads last
    valid = idx < s.shape[-1]
    g = torch.gather(local, 1, idx.clamp(max=s.shape[-1] - 1).unsqueeze(-1).expand(-1, -1, local.shape[-1]))
    return g * valid.unsqueeze(-1).to(g.dtype), n


def _ours_topk(local, text, mask, k):
    idx, _ = ops.similarity_topk(local, text, k, mask)
    return ops.gather_tokens(local, idx)


def _ours_topp(local, text, mask, p):
    idx, lengths = ops.similarity_topp(local, text, p, mask, 1.0, 0.5)
    return ops.gather_tokens(local, idx), lengths


def _cases_one(device, dtype, name, B, N, T, D, k):
    """The cases of one (dtype, shape), in a function of their own so that the lambdas bind this
    call's tensors (closures in a loop body would all see the last iteration's)."""
    out = []
    g = torch.Generator().manual_seed(0)
    local = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    text = torch.randn(B, T, D, generator=g).to(dtype).to(device)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, T - T // 8:] = False                           # right-padded prompts
    mask = mask.to(device)
    el = local.element_size()
    moved = B * N * D * el + B * T * D * el + B * k * D * el * 2

    def err_scores():
        _, s = ops.similarity_topk(local, text, k, mask)
        return (s - ref.similarity_scores(local, text, mask)).abs().max().item()

    def err_topp():
        _, n = ops.similarity_topp(local, text, 0.95, mask, 1.0, 0.5)
        _, rn = ref.similarity_topp(local, text, 0.95, mask, 1.0, 0.5)
        return (n.cpu() - rn.cpu()).abs().max().item()

    refs_k = {"slime_eager": lambda: slime_topk(local, text, mask, k),
              "torch_efficient": lambda: efficient_topk(local, text, mask, k)}
    refs_p = {"slime_eager": lambda: slime_topp(local, text, mask, 0.95),
              "torch_efficient": lambda: efficient_topp(local, text, mask, 0.95)}
    if device == "cuda":
        ck, cp = torch.compile(efficient_topk), torch.compile(efficient_topp)
        refs_k["torch_compile"] = lambda: ck(local, text, mask, k)
        refs_p["torch_compile"] = lambda: cp(local, text, mask, 0.95)
    out += [
        Case("similarity_topk+gather", name, dtype, lambda: _ours_topk(local, text, mask, k), refs_k,
             bytes=moved, max_err=err_scores, tol=1e-3),
        Case("similarity_topp+gather", name.rsplit(" k", 1)[0] + " p0.95", dtype,
             lambda: _ours_topp(local, text, mask, 0.95), refs_p,
             bytes=B * N * D * el * 3 + B * T * D * el, max_err=err_topp, tol=1.0),
    ]
    return out


def cases(device, quick):
    if quick:
        shapes = [("B1 N288 T16 D256 k144", 1, 288, 16, 256, 144)]
    else:
        shapes = [("B1 N1008 T64 D4096 k576", 1, 1008, 64, 4096, 576),
                  ("B4 N1008 T64 D4096 k576", 4, 1008, 64, 4096, 576)]
    dtypes = [torch.bfloat16, torch.float32] if device == "cpu" else [torch.bfloat16]
    out = []
    for dtype in dtypes:
        for name, B, N, T, D, k in shapes:
            out += _cases_one(device, dtype, name, B, N, T, D, k)
    return out
