"""DeepStack injection + norm ops against hires_lmm.reference (HF's formulas)."""
import pytest
import torch

import hires_lmm
from hires_lmm import ops, reference as ref
from conftest import DEVICES, DTYPES, HAS_CUDA, NO_CUDA_REASON, tol

# (rows, hidden): odd row counts; hidden sizes on the vector path (multiples of 8) and off it.
SHAPES = [(1, 64), (7, 8192), (19, 100), (97, 4096), (577, 1000), (577, 64), (33, 1536)]


def make(rows, D, dtype, device, nv=None, edtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, D, generator=g).to(dtype).to(device)
    nv = max(1, rows // 3) if nv is None else nv
    index = torch.randperm(rows, generator=g)[:nv].sort().values.to(device)
    embeds = torch.randn(nv, D, generator=g).to(edtype or dtype).to(device)
    weight = (1 + 0.1 * torch.randn(D, generator=g)).to(dtype).to(device)
    bias = (0.1 * torch.randn(D, generator=g)).to(dtype).to(device)
    return hidden, embeds, index, weight, bias


def hf_inject(hidden, embeds, mask):
    out = hidden.clone()
    out[mask] = out[mask] + embeds.to(hidden.dtype)
    return out


def assert_close(a, b, dtype):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", SHAPES)
def test_inject_bit_exact_with_hf(device, dtype, rows, D):
    hidden, embeds, index, _, _ = make(rows, D, dtype, device)
    mask = torch.zeros(rows, dtype=torch.bool, device=device)
    mask[index] = True
    out = ops.deepstack_inject(hidden, embeds, index)
    assert torch.equal(out, hf_inject(hidden, embeds, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("edtype", DTYPES)
def test_inject_other_embed_dtype(device, dtype, edtype):
    hidden, embeds, index, weight, _ = make(19, 256, dtype, device, edtype=edtype)
    mask = torch.zeros(19, dtype=torch.bool, device=device)
    mask[index] = True
    expect = hf_inject(hidden, embeds, mask)
    assert torch.equal(ops.deepstack_inject(hidden, embeds, index), expect)
    normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert torch.equal(injected, expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", SHAPES)
def test_inject_rms_norm(device, dtype, rows, D):
    hidden, embeds, index, weight, _ = make(rows, D, dtype, device)
    normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    rn, ri = ref.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert normed.dtype == dtype and normed.shape == hidden.shape
    assert torch.equal(injected, ri)
    # fp32 reference of the normalisation for the error bound
    assert_close(normed, rn, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,D", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_inject_layer_norm(device, dtype, rows, D, with_bias):
    hidden, embeds, index, weight, bias = make(rows, D, dtype, device)
    bias = bias if with_bias else None
    normed, injected = ops.deepstack_inject_layer_norm(hidden, embeds, index, weight, bias, 1e-5)
    rn, ri = ref.deepstack_inject_layer_norm(hidden, embeds, index, weight, bias, 1e-5)
    assert torch.equal(injected, ri)
    assert_close(normed, rn, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_norms_match_hf_modules(device, dtype):
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    x = torch.randn(3, 7, 96).to(dtype).to(device)
    hf = LlamaRMSNorm(96, eps=1e-5).to(device).to(dtype)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.1 * torch.randn(96))
        assert_close(ops.rms_norm(x, hf.weight, 1e-5), hf(x), dtype)
        ln = torch.nn.LayerNorm(96, eps=1e-5).to(device)
        ln.weight.copy_(1 + 0.1 * torch.randn(96))
        ln.bias.copy_(0.1 * torch.randn(96))
        expect = ln(x.float()).to(dtype)
        got = ops.layer_norm(x, ln.weight.to(dtype), ln.bias.to(dtype), 1e-5)
        assert_close(got, expect, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_visual_index_row_major(device):
    mask = torch.zeros(3, 9, dtype=torch.bool, device=device)
    mask[0, [2, 3, 4]] = True           # sample 0: 3 tokens
    mask[2, [0, 8]] = True              # sample 1 has none, sample 2: 2 tokens (uneven)
    idx = ops.visual_index(mask)
    assert idx.dtype == torch.int64
    assert idx.tolist() == [2, 3, 4, 18, 26]
    hidden = torch.randn(3, 9, 32, device=device)
    embeds = torch.randn(5, 32, device=device)
    assert torch.equal(ops.deepstack_inject(hidden, embeds, idx), hf_inject(hidden, embeds, mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_visual_rows_is_identity(device, dtype):
    hidden, _, _, weight, _ = make(19, 128, dtype, device)
    embeds = torch.empty(0, 128, dtype=dtype, device=device)
    index = torch.empty(0, dtype=torch.int64, device=device)
    assert torch.equal(ops.deepstack_inject(hidden, embeds, index), hidden)
    normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert torch.equal(injected, hidden)
    assert torch.equal(normed, ops.rms_norm(hidden, weight, 1e-6))
    # an empty hidden launches nothing and returns empty outputs
    empty = torch.empty(0, 128, dtype=dtype, device=device)
    assert ops.deepstack_inject_rms_norm(empty, embeds, index, weight, 1e-6)[0].shape == (0, 128)


@pytest.mark.parametrize("device", DEVICES)
def test_leading_shapes_and_non_contiguous(device):
    base = torch.randn(2, 64, 9, device=device)         # (B, D, S) -> hidden (B, S, D) is a transpose view
    hidden = base.transpose(1, 2)
    assert not hidden.is_contiguous()
    mask = torch.zeros(2, 9, dtype=torch.bool, device=device)
    mask[1, 3:7] = True
    idx = ops.visual_index(mask)
    embeds = torch.randn(4, 64, device=device)
    w = torch.randn(64, device=device)
    normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, idx, w, 1e-6)
    rn, ri = ref.deepstack_inject_rms_norm(hidden.contiguous(), embeds, idx, w, 1e-6)
    assert injected.shape == (2, 9, 64) and injected.is_contiguous()
    assert torch.equal(injected, ri)
    assert_close(normed, rn, torch.float32)
    # row-strided view (a slice of a wider buffer): no copy needed, still right
    wide = torch.randn(4, 5, 96, device=device)
    h2 = wide[..., :64]
    m2 = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    m2 = m2.to(device)
    i2 = ops.visual_index(m2)
    e2 = torch.randn(i2.numel(), 64, device=device)
    assert torch.equal(ops.deepstack_inject(h2, e2, i2), hf_inject(h2, e2, m2))
    # embeds with a row stride (a slice of a concatenated buffer, as vLLM's transport)
    cat = torch.randn(i2.numel(), 3 * 64, device=device)
    e3 = cat[:, 64:128]
    assert torch.equal(ops.deepstack_inject(h2, e3, i2), hf_inject(h2, e3, m2))


@pytest.mark.parametrize("device", DEVICES)
def test_reference_backend_switch(device):
    hidden, embeds, index, weight, _ = make(19, 64, torch.float32, device)
    with hires_lmm.use_backend("reference"):
        assert hires_lmm.get_backend() == "reference"
        a = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    b = ref.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert hires_lmm.get_backend() == "kernels"
    with pytest.raises(ValueError, match="name"):
        hires_lmm.set_backend("fast")


BAD = [
    ("index out of range", lambda h, e, i, w: (h, e, torch.tensor([0, 1, h.shape[0]]), w), "visual_index"),
    ("negative index", lambda h, e, i, w: (h, e, torch.tensor([-1, 1, 2]), w), "visual_index"),
    ("unsorted index", lambda h, e, i, w: (h, e, torch.tensor([2, 1, 3]), w), "visual_index"),
    ("duplicate index", lambda h, e, i, w: (h, e, torch.tensor([1, 1, 3]), w), "visual_index"),
    ("row count", lambda h, e, i, w: (h, e[:2], i, w), "visual_embeds"),
    ("hidden size", lambda h, e, i, w: (h, e[:, :16], i, w), "visual_embeds"),
    ("int hidden", lambda h, e, i, w: (h.to(torch.int32), e, i, w), "hidden"),
    ("int32 index", lambda h, e, i, w: (h, e, i.to(torch.int32), w), "visual_index"),
    ("2-D index", lambda h, e, i, w: (h, e, i.view(1, -1), w), "visual_index"),
    ("1-D embeds", lambda h, e, i, w: (h, e[0], i, w), "visual_embeds"),
    ("int embeds", lambda h, e, i, w: (h, e.to(torch.int64), i, w), "visual_embeds"),
    ("weight dtype", lambda h, e, i, w: (h, e, i, w.double()), "weight"),
    ("weight shape", lambda h, e, i, w: (h, e, i, w[:10]), "weight"),
]


@pytest.mark.parametrize("name,mutate,arg", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, mutate, arg):
    h = torch.randn(7, 32)
    e = torch.randn(3, 32)
    i = torch.tensor([0, 2, 5])
    w = torch.randn(32)
    h2, e2, i2, w2 = mutate(h, e, i, w)
    with pytest.raises(RuntimeError, match=f"argument '{arg}'"):
        ops.deepstack_inject_rms_norm(h2, e2, i2, w2, 1e-6)
    if arg != "weight":
        with pytest.raises(RuntimeError, match=f"argument '{arg}'"):
            ops.deepstack_inject(h2, e2, i2)


def test_bad_norm_inputs():
    x = torch.randn(4, 32)
    with pytest.raises(RuntimeError, match="argument 'bias'"):
        ops.layer_norm(x, torch.ones(32), torch.zeros(31), 1e-5)
    with pytest.raises(RuntimeError, match="argument 'x'"):
        ops.rms_norm(torch.ones(4, 32, dtype=torch.int64), torch.ones(32), 1e-5)
    with pytest.raises(RuntimeError, match="argument 'eps'"):
        ops.rms_norm(x, torch.ones(32), -1.0)
    with pytest.raises(RuntimeError, match="argument 'visual_pos_masks'"):
        ops.visual_index(torch.ones(2, 3))


def test_value_checks_can_be_turned_off():
    hidden, embeds, index, weight, _ = make(19, 64, torch.float32, "cpu")
    hires_lmm.set_value_checks(False)
    out = ops.deepstack_inject(hidden, embeds, index)  # valid input still right
    mask = torch.zeros(19, dtype=torch.bool)
    mask[index] = True
    assert torch.equal(out, hf_inject(hidden, embeds, mask))
    hires_lmm.set_value_checks(True)
    with pytest.raises(RuntimeError, match="visual_index"):
        ops.deepstack_inject(hidden, embeds, index.flip(0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_reference(device, dtype):
    def run(fn):
        hidden, embeds, index, weight, bias = make(19, 96, dtype, device, seed=3)
        leaves = [t.requires_grad_() for t in (hidden, embeds, weight, bias)]
        normed, injected = fn["ln"](hidden, embeds, index, weight, bias, 1e-5)
        n2, i2 = fn["rms"](hidden, embeds, index, weight, 1e-6)
        o3 = fn["inj"](hidden, embeds, index)
        loss = (normed.float() ** 2).sum() + (injected.float() * 0.5).sum() + n2.float().sum() \
            + (i2.float() ** 2).sum() + (o3.float() * 3).sum()
        loss.backward()
        return [t.grad for t in leaves]

    ours = run({"ln": ops.deepstack_inject_layer_norm, "rms": ops.deepstack_inject_rms_norm,
                "inj": ops.deepstack_inject})
    theirs = run({"ln": ref.deepstack_inject_layer_norm, "rms": ref.deepstack_inject_rms_norm,
                  "inj": ref.deepstack_inject})
    for a, b in zip(ours, theirs):
        assert a is not None
        atol, rtol = tol(dtype)
        torch.testing.assert_close(a.float(), b.float(), atol=atol * 10, rtol=rtol * 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    hidden, embeds, index, weight, bias = make(7, 64, dtype, device)
    hidden.requires_grad_()
    embeds.requires_grad_()
    weight.requires_grad_()
    lib = torch.ops.hires_lmm
    torch.library.opcheck(lib.deepstack_inject, (hidden, embeds, index))
    torch.library.opcheck(lib.deepstack_inject_rms_norm, (hidden, embeds, index, weight, 1e-6))
    torch.library.opcheck(lib.deepstack_inject_layer_norm, (hidden, embeds, index, weight, bias, 1e-5))
    torch.library.opcheck(lib.deepstack_inject_layer_norm, (hidden, embeds, index, weight, None, 1e-5))
    torch.library.opcheck(lib.rms_norm, (hidden, weight, 1e-6))
    torch.library.opcheck(lib.layer_norm, (hidden, weight, bias, 1e-5))
    mask = torch.zeros(2, 5, dtype=torch.bool, device=device)
    mask[1, 2:4] = True
    torch.library.opcheck(lib.visual_index, (mask,),
                          test_utils=("test_schema", "test_faketensor"))


def test_compile_fullgraph():
    def f(h, e, i, w):
        n, inj = ops.deepstack_inject_rms_norm(h, e, i, w, 1e-6)
        return n * 2, inj

    hidden, embeds, index, weight, _ = make(19, 64, torch.float32, "cpu")
    got = torch.compile(f, fullgraph=True, backend="eager")(hidden, embeds, index, weight)
    want = f(hidden, embeds, index, weight)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_build_info():
    info = hires_lmm.build_info()
    assert info["version"] == hires_lmm.__version__
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    for op in ["deepstack_inject", "deepstack_inject_rms_norm", "deepstack_inject_layer_norm",
               "rms_norm", "layer_norm", "visual_index"]:
        assert "cpu" in info["kernels"][op]
        assert ("cuda" in info["kernels"][op]) == (info["cuda"] is not None)


# ---- GPU-only behaviour ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("offset"), [0, 1])
def test_gpu_scalar_and_vector_paths(dtype, offset):
    rows, D = 97, 4096
    buf = torch.randn(rows * D + offset, device="cuda").to(dtype)
    hidden = buf[offset:].view(rows, D)  # offset 1: misaligned -> the scalar path
    _, embeds, index, weight, _ = make(rows, D, dtype, "cuda")
    normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    rn, ri = ref.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert torch.equal(injected, ri)
    assert_close(normed, rn, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gpu_cuda_graph_capture():
    hidden, embeds, index, weight, _ = make(577, 1024, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)  # warm-up
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        normed, injected = ops.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    hidden.copy_(torch.randn_like(hidden))
    g.replay()
    torch.cuda.synchronize()
    rn, ri = ref.deepstack_inject_rms_norm(hidden, embeds, index, weight, 1e-6)
    assert torch.equal(injected, ri)
    assert_close(normed, rn, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason=NO_CUDA_REASON)
def test_gpu_mixed_devices_rejected():
    h = torch.randn(7, 32, device="cuda")
    with pytest.raises(RuntimeError, match="argument 'visual_embeds'"):
        ops.deepstack_inject(h, torch.randn(3, 32), torch.tensor([0, 2, 5], device="cuda"))
    with pytest.raises(RuntimeError, match="argument 'visual_index'"):
        ops.deepstack_inject(h, torch.randn(3, 32, device="cuda"), torch.tensor([0, 2, 5]))
