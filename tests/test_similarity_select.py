"""similarity_topk / similarity_topp / gather_tokens against a PyTorch port of SliME's selector
(TextGuidedRouterCosine + TextGuidedSampler, specs/slime.md 3.3-3.4), on both backends, every
dtype, CPU and (marked gpu) CUDA."""
import pytest
import torch
import torch.nn.functional as F

import hires_lmm
from hires_lmm import ops, reference as R

from conftest import DEVICES, DTYPES

SHAPES = [  # (B, N, T, D)
    (1, 1, 1, 1),
    (2, 7, 3, 5),
    (3, 97, 19, 33),
    (1, 144, 64, 128),
    (2, 300, 5, 24),
]


# ---- the PyTorch port of SliME's code (the tests' ground truth) ----------------------------------
def slime_router_scores(local, text, mask):
    """TextGuidedRouterCosine: broadcast cosine over (N, T, D), masked sum over the text."""
    sim = F.cosine_similarity(local.float().unsqueeze(2), text.float().unsqueeze(1), dim=-1)
    if mask is not None:
        sim = sim * mask.float().unsqueeze(1)
    return sim.sum(-1)


def slime_probs(scores, double_softmax, temp=1.0):
    """TextGuidedSampler: softmax(S / 0.5) in the first commit (checkpoints), then softmax(./temp)."""
    s = torch.softmax(scores / 0.5, dim=-1) if double_softmax else scores
    return torch.softmax(s / temp, dim=-1)


def slime_cumsum(probs):
    sp, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    return torch.cumsum(sp.double(), dim=-1), order


# ---- checkers: by values, not only by index equality ------------------------------------------
def check_topk(idx, local, text, mask, k, atol):
    ref = slime_router_scores(local, text, mask).cpu()
    idx = idx.cpu()
    B, N = ref.shape
    assert idx.shape == (B, k) and idx.dtype == torch.long
    for b in range(B):
        row = idx[b]
        assert (row >= 0).all() and (row < N).all()
        assert (row[1:] > row[:-1]).all(), "indices must be strictly ascending"
        chosen = torch.zeros(N, dtype=torch.bool)
        chosen[row] = True
        if k < N:
            assert ref[b][chosen].min() >= ref[b][~chosen].max() - atol, (
                f"row {b}: a dropped token scores higher than a kept one")


def check_topp(idx, lengths, local, text, mask, p, double_softmax, atol=1e-5, scores=None):
    if scores is None:
        scores = slime_router_scores(local, text, mask).cpu()
    probs = slime_probs(scores, double_softmax)
    cum, _ = slime_cumsum(probs)
    idx, lengths = idx.cpu(), lengths.cpu()
    B, N = probs.shape
    assert idx.shape == (B, N) and lengths.shape == (B,)
    for b in range(B):
        K = int(lengths[b])
        c_lo = int((cum[b] <= p - atol).sum())
        c_hi = int((cum[b] <= p + atol).sum())
        assert min(c_lo + 1, N) <= K <= min(c_hi + 1, N), f"row {b}: K={K}, expected {min(c_lo + 1, N)}"
        row = idx[b, :K]
        assert (idx[b, K:] == -1).all()
        assert (row >= 0).all() and (row < N).all()
        assert (row[1:] > row[:-1]).all()
        chosen = torch.zeros(N, dtype=torch.bool)
        chosen[row] = True
        if K < N:
            assert probs[b][chosen].min() >= probs[b][~chosen].max() - 1e-6


def make(shape, dtype, device, seed=0):
    B, N, T, D = shape
    g = torch.Generator().manual_seed(seed)
    local = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    text = torch.randn(B, T, D, generator=g).to(dtype).to(device)
    return local, text


def uneven_mask(B, T, device):
    # row b keeps its first max(1, T - 3b) text tokens (uneven prompt lengths, right padding)
    lens = torch.tensor([max(1, T - 3 * b) for b in range(B)])
    return (torch.arange(T).view(1, -1) < lens.view(-1, 1)).to(device)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_topk(shape, dtype, device, backend):
    hires_lmm.set_backend(backend)
    B, N, T, D = shape
    local, text = make(shape, dtype, device)
    for mask in (None, uneven_mask(B, T, device)):
        ref = R.similarity_scores(local, text, mask)
        for k in sorted({1, max(1, N // 3), N}):
            idx, scores = ops.similarity_topk(local, text, k, mask)
            assert scores.dtype == torch.float32 and scores.shape == (B, N)
            torch.testing.assert_close(scores.cpu(), ref.cpu(), atol=1e-4 * max(1, T), rtol=1e-4)
            check_topk(idx, local, text, mask, k, atol=2e-4 * max(1, T))
            if backend == "kernels" and dtype == torch.float32 and device == "cpu":
                ridx, _ = R.similarity_topk(local, text, k, mask)
                # well-separated random scores: the same set
                assert torch.equal(idx, ridx)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_softmax", [True, False])
def test_topp(shape, dtype, device, backend, double_softmax):
    hires_lmm.set_backend(backend)
    B, N, T, D = shape
    local, text = make(shape, dtype, device, seed=1)
    pre = 0.5 if double_softmax else None
    for mask in (None, uneven_mask(B, T, device)):
        for p in (0.05, 0.5, 0.95, 1.0):
            idx, lengths = ops.similarity_topp(local, text, p, mask, 1.0, pre)
            assert idx.dtype == torch.long and lengths.dtype == torch.long
            check_topp(idx, lengths, local, text, mask, p, double_softmax)


def test_topp_rules_cpu():
    # "prefix <= p plus one more", "all when every sum <= p", and K close to ceil(p N) for the
    # double softmax (near-uniform probabilities, specs/slime.md 3.4)
    local, text = make((1, 864, 16, 64), torch.float32, "cpu", seed=3)
    idx, lengths = ops.similarity_topp(local, text, 1.0, None, 1.0, 0.5)
    assert int(lengths[0]) == 864 and torch.equal(idx[0], torch.arange(864))
    idx, lengths = ops.similarity_topp(local, text, 0.95, None, 1.0, 0.5)
    assert abs(int(lengths[0]) - 821) <= 2
    # first probability alone above p -> exactly one token: the best one
    local = torch.zeros(1, 5, 4)
    local[0, :, 0] = 1.0
    local[0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    text = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]]).repeat(1, 50, 1)  # score 50 for token 3, 0 else
    idx, lengths = ops.similarity_topp(local, text, 0.5, None, 1.0, None)
    assert lengths.tolist() == [1] and idx.tolist() == [[3, -1, -1, -1, -1]]


@pytest.mark.parametrize("device", DEVICES)
def test_ties_go_to_lower_index(device):
    # tokens 0..9 identical (equal scores), token 10 better: k = 4 keeps 10 and 0, 1, 2
    D = 8
    base = torch.randn(D)
    local = base.repeat(1, 11, 1).clone()
    text = torch.randn(1, 3, D)
    local[0, 10] = text[0].sum(0)  # the best match
    local, text = local.to(device), text.to(device)
    idx, scores = ops.similarity_topk(local, text, 4)
    assert idx.cpu().tolist() == [[0, 1, 2, 10]]
    # all text masked: every score is 0, the first k win; top-p on uniform probabilities
    mask = torch.zeros(1, 3, dtype=torch.bool, device=device)
    idx, scores = ops.similarity_topk(local, text, 3, mask)
    assert idx.cpu().tolist() == [[0, 1, 2]] and (scores == 0).all()
    idx, lengths = ops.similarity_topp(local, text, 0.5, mask, 1.0, None)
    K = int(lengths[0])
    assert K in (5, 6, 7) and idx[0, :K].cpu().tolist() == list(range(K))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_and_mixed_dtypes(device):
    big = torch.randn(2, 40, 64, device=device)
    local = big[:, ::2, :]                      # token stride 128
    text = torch.randn(2, 6, 64, device=device)[..., :].transpose(1, 2).contiguous().transpose(1, 2)
    text = text.to(torch.bfloat16)
    mask = torch.ones(4, 6, dtype=torch.bool, device=device)[::2]  # non-contiguous mask
    idx, scores = ops.similarity_topk(local, text, 7, mask)
    torch.testing.assert_close(scores.cpu(), R.similarity_scores(local, text, mask).cpu(), atol=1e-4, rtol=1e-4)
    check_topk(idx, local, text, mask, 7, atol=1e-4)
    odd = torch.randn(2, 20, 65, device=device)[..., 1:]   # rows not 16-byte aligned
    idx, lengths = ops.similarity_topp(odd, text.float(), 0.7, None, 1.0, None)
    check_topp(idx, lengths, odd, text.float(), None, 0.7, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_tokens(device, dtype):
    tokens = torch.randn(2, 13, 24).to(dtype).to(device)
    idx = torch.tensor([[0, 5, 12, -1], [3, -1, -1, -1]], device=device)
    out = ops.gather_tokens(tokens, idx)
    assert out.shape == (2, 4, 24) and out.dtype == dtype
    torch.testing.assert_close(out, R.gather_tokens(tokens, idx), atol=0, rtol=0)
    assert (out[1, 1:] == 0).all() and torch.equal(out[0, 1], tokens[0, 5])
    # with a non-contiguous token tensor, and the output of similarity_topp
    t2 = torch.randn(2, 30, 16).to(dtype).to(device)[:, ::3]
    text = torch.randn(2, 4, 16).to(dtype).to(device)
    sel, lengths = ops.similarity_topp(t2, text, 0.9)
    torch.testing.assert_close(ops.gather_tokens(t2, sel), R.gather_tokens(t2, sel), atol=0, rtol=0)


def test_bad_input():
    local, text = torch.randn(2, 10, 8), torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="'k'"):
        ops.similarity_topk(local, text, 11)
    with pytest.raises(RuntimeError, match="'k'"):
        ops.similarity_topk(local, text, 0)
    with pytest.raises(RuntimeError, match="text_embeds.*hidden size"):
        ops.similarity_topk(local, torch.randn(2, 3, 9), 2)
    with pytest.raises(RuntimeError, match="text_embeds.*batch"):
        ops.similarity_topk(local, torch.randn(1, 3, 8), 2)
    with pytest.raises(RuntimeError, match="local_tokens"):
        ops.similarity_topk(torch.randn(10, 8), text, 2)
    with pytest.raises(RuntimeError, match="local_tokens"):
        ops.similarity_topk(local.to(torch.int32), text, 2)
    with pytest.raises(RuntimeError, match="text_mask"):
        ops.similarity_topk(local, text, 2, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="text_mask"):
        ops.similarity_topk(local, text, 2, torch.ones(2, 3))
    for p in (0.0, -0.1, 1.5):
        with pytest.raises(RuntimeError, match="'p'"):
            ops.similarity_topp(local, text, p)
    with pytest.raises(RuntimeError, match="temperature"):
        ops.similarity_topp(local, text, 0.9, None, 0.0)
    with pytest.raises(RuntimeError, match="presoftmax_temperature"):
        ops.similarity_topp(local, text, 0.9, None, 1.0, -1.0)
    with pytest.raises(RuntimeError, match="text_embeds"):
        ops.similarity_topp(local, torch.randn(2, 0, 8), 0.9)
    with pytest.raises(RuntimeError, match="indices"):
        ops.gather_tokens(local, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(RuntimeError, match="indices"):
        ops.gather_tokens(local, torch.tensor([[0, -2], [1, 2]]))
    with pytest.raises(RuntimeError, match="indices"):
        ops.gather_tokens(local, torch.tensor([[0, 1]], dtype=torch.int32))


def test_autograd_and_opcheck():
    local = torch.randn(2, 9, 6, requires_grad=True)
    text = torch.randn(2, 4, 6, requires_grad=True)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0]], dtype=torch.bool)
    _, s = ops.similarity_topk(local, text, 3, mask)
    g = torch.randn_like(s)
    gl, gt = torch.autograd.grad(s, (local, text), g)
    rl, rt = torch.autograd.grad(R.similarity_scores(local, text, mask), (local, text), g)
    torch.testing.assert_close(gl, rl)
    torch.testing.assert_close(gt, rt)
    tok = torch.randn(2, 9, 6, requires_grad=True)
    idx = torch.tensor([[0, 4, -1], [8, -1, -1]])
    out = ops.gather_tokens(tok, idx)
    (gtok,) = torch.autograd.grad(out, tok, torch.ones_like(out))
    assert gtok[0, 0].eq(1).all() and gtok[0, 1].eq(0).all() and gtok[1, 8].eq(1).all()

    loc, txt = torch.randn(2, 9, 6), torch.randn(2, 4, 6)
    torch.library.opcheck(torch.ops.hires_lmm.similarity_topk, (loc, txt, 3, mask))
    # with grads: the aot test sums every output into one accumulator that starts as the int64
    # indices and cannot take the float scores in place (a harness limit), so it is left out here
    torch.library.opcheck(torch.ops.hires_lmm.similarity_topk, (local, text, 3, None),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.hires_lmm.similarity_topp, (loc, txt, 0.9, mask, 1.0, 0.5))
    torch.library.opcheck(torch.ops.hires_lmm.similarity_topp, (loc, txt, 0.5, None, 2.0, None))
    torch.library.opcheck(torch.ops.hires_lmm.gather_tokens, (tok, idx))


def test_compile_fullgraph():
    local, text = torch.randn(1, 20, 8), torch.randn(1, 5, 8)

    def f(l, t):
        idx, lengths = ops.similarity_topp(l, t, 0.9)
        return ops.gather_tokens(l, idx), lengths

    got = torch.compile(f, fullgraph=True, backend="eager")(local, text)
    exp = f(local, text)
    torch.testing.assert_close(got[0], exp[0])
    assert torch.equal(got[1], exp[1])


# ---- CUDA-only limits and paths (run on the next GPU session) ------------------------------------



@pytest.mark.parametrize("N,T,D", [(8192, 3, 64), (100, 4, 16384), (1008, 64, 4096), (5000, 2, 24),
                                   (3000, 3, 64)])  # 3000: exactly 48 KiB of dynamic smem
@pytest.mark.gpu
def test_cuda_limits_against_cpu_twin(N, T, D):
    if not torch.cuda.is_available() or hires_lmm.build_info()["cuda"] is None:
        pytest.skip("no CUDA device / CPU-only build")
    local, text = make((2, N, T, D), torch.bfloat16, "cpu", seed=4)
    mask = uneven_mask(2, T, "cpu")
    k = max(1, (N * 4) // 7)
    i_cpu, s_cpu = ops.similarity_topk(local, text, k, mask)
    i_gpu, s_gpu = ops.similarity_topk(local.cuda(), text.cuda(), k, mask.cuda())
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, atol=1e-4 * T, rtol=1e-4)
    for b in range(2):  # the same selection up to near-ties, by the values
        chosen = torch.zeros(N, dtype=torch.bool)
        chosen[i_gpu[b].cpu()] = True
        assert (i_gpu[b, 1:] > i_gpu[b, :-1]).all()
        if k < N:
            assert s_cpu[b][chosen].min() >= s_cpu[b][~chosen].max() - 2e-4 * T
    for pre in (0.5, None):
        i_gpu, n_gpu = ops.similarity_topp(local.cuda(), text.cuda(), 0.9, mask.cuda(), 1.0, pre)
        check_topp(i_gpu, n_gpu, local, text, mask, 0.9, pre is not None, scores=s_cpu)


@pytest.mark.gpu
def test_cuda_too_many_tokens_and_graph_capture():
    if not torch.cuda.is_available() or hires_lmm.build_info()["cuda"] is None:
        pytest.skip("no CUDA device / CPU-only build")
    with pytest.raises(RuntimeError, match="local_tokens.*8192"):
        ops.similarity_topk(torch.randn(1, 8193, 8, device="cuda"), torch.randn(1, 2, 8, device="cuda"), 3)
    with pytest.raises(RuntimeError, match="text_embeds.*device"):
        ops.similarity_topk(torch.randn(1, 10, 8, device="cuda"), torch.randn(1, 2, 8), 3)
    with pytest.raises(RuntimeError, match="text_mask.*device"):
        ops.similarity_topk(torch.randn(1, 10, 8, device="cuda"), torch.randn(1, 2, 8, device="cuda"), 3,
                            torch.ones(1, 2, dtype=torch.bool))
    local = torch.randn(2, 1008, 256, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(2, 64, 256, device="cuda", dtype=torch.bfloat16)
    mask = uneven_mask(2, 64, "cuda")
    ops.similarity_topp(local, text, 0.95, mask)  # warm-up outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):  # fails if anything in the ops synchronizes with the host
        idx, lengths = ops.similarity_topp(local, text, 0.95, mask)
        kept = ops.gather_tokens(local, idx)
    local.copy_(torch.randn_like(local))
    g.replay()
    torch.cuda.synchronize()
    ridx, rn = ops.similarity_topp(local, text, 0.95, mask)
    assert torch.equal(idx, ridx) and torch.equal(lengths, rn)
    torch.testing.assert_close(kept, ops.gather_tokens(local, ridx), atol=0, rtol=0)


def test_bench_select_quick(tmp_path):
    import json
    from hires_lmm.bench.__main__ import main
    out = tmp_path / "r.json"
    assert main(["--device", "cpu", "--quick", "--only", "select", "--iters", "3", "--json", str(out)]) == 0
    recs = json.loads(out.read_text())["records"]
    assert {r["reference"] for r in recs} == {"slime_eager", "torch_efficient"}
    assert all(r["ok"] for r in recs)
