"""SliME modules (hires_lmm.models.slime) against PyTorch references built from the spec
(specs/slime.md) with nn.MultiheadAttention, and the slicing rules."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import hires_lmm
from hires_lmm import reference as R
from hires_lmm.models import (GatedAdapters, Resampler, SliMEConfig, SliMEVisual, anyres_grid,
                              raster_order, slice_image)
from hires_lmm.models.slime import CLIP_MEAN, CLIP_STD

from conftest import DEVICES

BACKENDS = ["reference", "kernels"]


def use_backend_on(backend, device):
    """Switch the backend; skip the kernels backend where flash_attn_func has no kernel yet."""
    if backend == "kernels":
        kernels = hires_lmm.build_info()["kernels"].get("flash_attn_func", [])
        if not hasattr(torch.ops.hires_lmm, "flash_attn_func") or device not in kernels:
            pytest.skip(f"the flash_attn_func kernel is not in this build for {device} yet")
    hires_lmm.set_backend(backend)


# ---- anyres_grid ---------------------------------------------------------------------------
def uhd_port(W, H, patch=336):
    """Independent port of select_best_resolution_uhd (llava/mm_utils.py) from the spec text."""
    scale = min(math.ceil(W * H / patch ** 2), 6)
    scale = 2 if scale == 1 else scale
    ns = (scale, scale + 1) if scale <= 2 else (scale - 1, scale, scale + 1)
    cands = [(i, n // i) for n in ns for i in range(1, n + 1) if n % i == 0]

    def merit(c):
        cw, ch = c[0] * patch, c[1] * patch
        s = min(cw / W, ch / H)
        eff = min(int(W * s) * int(H * s), W * H)
        return (eff, -(cw * ch - eff))
    return max(cands, key=merit)  # max keeps the first of equal candidates


SPEC_TABLE = [((336, 336), (1, 2)), ((500, 375), (2, 1)), ((640, 480), (2, 2)), ((800, 600), (3, 2)),
              ((1024, 768), (3, 2)), ((1920, 1080), (3, 2)), ((1024, 1024), (2, 3)),
              ((3000, 1000), (5, 1))]


@pytest.mark.parametrize("size,grid", SPEC_TABLE)
def test_anyres_grid_spec_table(size, grid):
    assert anyres_grid(*size) == grid


def test_anyres_grid_many_sizes():
    sizes = [(1, 1), (2, 3), (17, 9), (100, 100), (336, 335), (337, 336), (672, 336), (336, 672),
             (10000, 10), (10, 10000), (20000, 200), (200, 20000), (4000, 4000), (1000, 3000),
             (2017, 1133), (5000, 2000), (823, 824)]
    rng = np.random.default_rng(0)
    sizes += [tuple(int(v) for v in rng.integers(1, 4000, size=2)) for _ in range(150)]
    for W, H in sizes:
        cols, rows = anyres_grid(W, H)
        assert (cols, rows) == uhd_port(W, H), (W, H)
        assert 2 <= cols * rows <= 7
    assert anyres_grid(1, 1) == (1, 2)             # tiny: still two crops
    assert anyres_grid(20000, 200) == (7, 1)       # very wide
    assert anyres_grid(200, 20000) == (1, 7)       # very tall
    assert anyres_grid(4000, 4000) == (2, 3)       # over 6 x 336^2: 6 crops at most for squares
    with pytest.raises(ValueError, match="width"):
        anyres_grid(0, 10)


# ---- slice_image -------------------------------------------------------------------------------
def clip_processor_reference(img):
    CLIPImageProcessor = pytest.importorskip("transformers").CLIPImageProcessor
    proc = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return proc(images=img, return_tensors="pt")["pixel_values"][0]


def test_slice_image_shapes_and_values():
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8))
    views, grid = slice_image(img)
    assert grid == (2, 1) and views.shape == (3, 3, 336, 336) and views.dtype == torch.float32
    # global view: a plain resize (aspect not kept), CLIP-normalised like CLIPImageProcessor
    torch.testing.assert_close(views[0], clip_processor_reference(img.resize((336, 336))), atol=1e-5, rtol=1e-5)
    # crops of the aspect-kept, black-padded canvas, row-major
    canvas_w, canvas_h = 672, 336
    s = min(canvas_w / 500, canvas_h / 375)       # height-bound: new size (ceil(500 s), 336)
    nw = min(math.ceil(500 * s), canvas_w)
    canvas = Image.new("RGB", (canvas_w, canvas_h))
    canvas.paste(img.resize((nw, 336)), ((canvas_w - nw) // 2, 0))
    for c in range(2):
        crop = canvas.crop((c * 336, 0, (c + 1) * 336, 336))
        torch.testing.assert_close(views[1 + c], clip_processor_reference(crop), atol=1e-5, rtol=1e-5)


def test_slice_image_black_padding_and_order():
    img = Image.new("RGB", (500, 300), (255, 255, 255))  # grid 2x1, resized to 560x336, pasted at x=56
    views, grid = slice_image(img)
    assert grid == (2, 1) and views.shape[0] == 3
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    black, white = (0 - mean) / std, (1 - mean) / std
    torch.testing.assert_close(views[1][:, :, :56], black.expand(3, 336, 56))
    torch.testing.assert_close(views[1][:, :, 57:], white.expand(3, 336, 279))
    torch.testing.assert_close(views[2][:, :, :279], white.expand(3, 336, 279))
    torch.testing.assert_close(views[2][:, :, 281:], black.expand(3, 336, 55))
    # tall image: rows outer, cols inner
    tall = Image.new("RGB", (300, 900), (0, 0, 0))
    tall.paste(Image.new("RGB", (300, 450), (255, 255, 255)), (0, 0))
    views, (cols, rows) = slice_image(tall)
    assert cols == 1 and rows == 3 and views.shape[0] == 4
    assert views[1].mean() > views[3].mean()


# ---- Resampler ---------------------------------------------------------------------------------
def abs_pos_reference(pos, L):
    src, tgt = int(math.sqrt(pos.shape[0])), int(math.sqrt(L))
    if src == tgt:
        return pos
    x = F.interpolate(pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2), size=(tgt, tgt),
                      mode="bicubic", align_corners=False)
    return x.permute(0, 2, 3, 1).flatten(0, 2).to(pos.dtype)


class RefResampler(nn.Module):
    """Spec 2.1 with nn.MultiheadAttention (seq-first, as the original)."""

    def __init__(self, grid, E, H):
        super().__init__()
        self.query = nn.Parameter(torch.randn(grid * grid, E) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(grid * grid, E))
        self.attn = nn.MultiheadAttention(E, H)
        self.ln_q = nn.LayerNorm(E, eps=1e-6)
        self.ln_kv = nn.LayerNorm(E, eps=1e-6)
        self.ln_post = nn.LayerNorm(E, eps=1e-6)
        with torch.no_grad():
            for ln in (self.ln_q, self.ln_kv, self.ln_post):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.1)
            self.attn.in_proj_bias.normal_(0, 0.1)
            self.attn.out_proj.bias.normal_(0, 0.1)

    def forward(self, x):
        B, L = x.shape[:2]
        pos_k = abs_pos_reference(self.pos_embed, L)
        xn = self.ln_kv(x).permute(1, 0, 2)
        q = self.ln_q(self.query).unsqueeze(1).repeat(1, B, 1) + self.pos_embed.unsqueeze(1)
        out = self.attn(q, xn + pos_k.unsqueeze(1), xn, need_weights=False)[0]
        return self.ln_post(out.permute(1, 0, 2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,L", [(12, 576), (24, 576), (4, 49)])
def test_resampler_matches_nn_multihead_attention(backend, grid, L, device):
    use_backend_on(backend, device)
    torch.manual_seed(0)
    E, H = 256, 2  # head dim 128, as SliME's 1024 / 8
    ref = RefResampler(grid, E, H).to(device)
    ours = Resampler(grid, E, H, E).to(device)
    ours.load_state_dict(ref.state_dict(), strict=True)  # the same key names
    x = torch.randn(2, L, E, device=device)
    with torch.no_grad():
        if device == "cpu" or backend == "reference":
            torch.testing.assert_close(ours(x), ref(x), atol=5e-5, rtol=5e-5)
            torch.testing.assert_close(ours(x[0]), ref(x[:1]), atol=5e-5, rtol=5e-5)  # 2-D input
        xb = x.to(torch.bfloat16)
        got = ours.to(torch.bfloat16)(xb).float()
        assert (got - ref(x)).abs().max() < 0.15


def test_resampler_keys_and_sincos():
    r = Resampler(12, 1024, 8, 1024)
    shapes = {k: tuple(v.shape) for k, v in r.state_dict().items()}
    assert shapes == {"pos_embed": (144, 1024), "query": (144, 1024), "attn.in_proj_weight": (3072, 1024),
                      "attn.in_proj_bias": (3072,), "attn.out_proj.weight": (1024, 1024),
                      "attn.out_proj.bias": (1024,), "ln_q.weight": (1024,), "ln_q.bias": (1024,),
                      "ln_kv.weight": (1024,), "ln_kv.bias": (1024,), "ln_post.weight": (1024,),
                      "ln_post.bias": (1024,)}
    pe = r.pos_embed
    # MAE table: token (row 0, col 3): first half from the column coordinate, sin then cos
    assert torch.allclose(pe[3, 0], torch.tensor(math.sin(3.0))) and torch.allclose(pe[3, 256], torch.tensor(math.cos(3.0)))
    assert torch.allclose(pe[12, 0], torch.tensor(0.0)) and torch.allclose(pe[12, 512], torch.tensor(math.sin(1.0)))


# ---- GatedAdapters -----------------------------------------------------------------------------
def ref_gated(x, mlp, resampler, w_gate):
    """Spec 2.1-2.3 (inference): gate only 576-token inputs; g = softmax(x W_g) / (sum + 1e-6)."""
    if not (x.shape[0] == 576 or x.shape[1] == 576):
        return mlp(x)
    p = torch.softmax(x @ w_gate, dim=-1)
    g = p / (p.sum(-1, keepdim=True) + 1e-6)
    e0 = mlp(x)
    e1 = mlp(resampler(x.unsqueeze(0) if x.dim() == 2 else x))
    e1 = e1[0] if x.dim() == 2 else e1
    return g[..., :1] * e0 + g[..., 1:] * e1


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_adapters(backend):
    use_backend_on(backend, "cpu")
    torch.manual_seed(1)
    D, Hd = 128, 48
    ref_res = RefResampler(24, D, 2)
    mlp = nn.Sequential(nn.Linear(D, Hd), nn.GELU(), nn.Linear(Hd, Hd))
    w_gate = torch.randn(D, 2) * 0.2
    ours = GatedAdapters(D, Hd, grid_size=24, num_heads=2)
    sd = {f"projection.{k}": v for k, v in mlp.state_dict().items()}
    sd.update({f"attn.{k}": v for k, v in ref_res.state_dict().items()})
    sd.update({"w_gate": w_gate, "w_noise": torch.zeros(D, 2), "mean": torch.zeros(1), "std": torch.ones(1)})
    ours.load_state_dict(sd, strict=True)
    with torch.no_grad():
        for shape in [(576, D), (1, 576, D), (2, 576, D)]:
            x = torch.randn(*shape)
            torch.testing.assert_close(ours(x), ref_gated(x, mlp, ref_res, w_gate), atol=3e-5, rtol=3e-5)
        # local tokens (n, 144, D): MLP only, no gate
        x = torch.randn(3, 144, D)
        torch.testing.assert_close(ours(x), mlp(x), atol=1e-6, rtol=1e-6)
        # zero-initialised gate: a 50/50 mix
        ours.w_gate.zero_()
        x = torch.randn(576, D)
        g = ours.gates(x)
        torch.testing.assert_close(g, torch.full_like(g, 0.5 / (1 + 1e-6)))


# ---- local branch ------------------------------------------------------------------------------
def test_raster_order():
    cols, rows, q, H = 3, 2, 2, 1
    n = cols * rows
    # token value = global (row, col) position id in the (rows*q) x (cols*q) grid
    local = torch.empty(n, q * q, H)
    for r in range(rows):
        for c in range(cols):
            for i in range(q):
                for j in range(q):
                    local[r * cols + c, i * q + j, 0] = (r * q + i) * (cols * q) + (c * q + j)
    out = raster_order(local, (cols, rows))
    assert out[:, 0].tolist() == list(range(n * q * q))
    with pytest.raises(ValueError, match="local"):
        raster_order(local, (2, 2))


@pytest.mark.parametrize("pre", [0.5, None])
def test_slime_visual_block(pre):
    hires_lmm.set_backend("reference")
    torch.manual_seed(2)
    cfg = SliMEConfig.from_dict({"hidden_size": 32, "mm_hidden_size": 128, "mm_resampler_dim": 16,
                                 "mm_resampler_topp": 0.9, "seperator": 11}, presoftmax_temperature=pre)
    model = SliMEVisual(cfg).eval()
    grid = (3, 2)
    feats = torch.randn(1 + 6, 576, 128)
    text = torch.randn(9, 32)
    sep = torch.randn(32)
    with torch.no_grad():
        out = model(feats, grid, text, sep)
        g = model.projector(feats[0])
        local = raster_order(model.projector.projection(model.sampler(feats[1:])), grid)
        idx, lengths = R.similarity_topp(local[None], text[None], 0.9, None, 1.0, pre)
    K = int(lengths[0])
    assert out.shape == (576 + 1 + K, 32) and local.shape == (6 * 16, 32)
    torch.testing.assert_close(out[:576], g)
    torch.testing.assert_close(out[576], sep)
    torch.testing.assert_close(out[577:], local[idx[0, :K]])


def test_slime_visual_load_checkpoint():
    cfg = SliMEConfig(hidden_size=32, mm_hidden_size=128, mm_resampler_dim=16)
    src = SliMEVisual(cfg)
    sd = {}
    for k, v in src.state_dict().items():
        pre = "model.mm_projector." if k.startswith("projector.") else "model.sampler.post_qformer."
        sd[pre + k.split(".", 1)[1]] = v.clone()
    sd["model.embed_tokens.weight"] = torch.zeros(3, 32)  # other keys are ignored
    dst = SliMEVisual(cfg)
    dst.load_checkpoint(sd)
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    bad = dict(sd)
    del bad["model.mm_projector.w_gate"]
    bad["model.sampler.post_qformer.query"] = torch.zeros(5, 128)
    bad["model.sampler.post_qformer.kv_proj.weight"] = torch.zeros(128, 128)
    with pytest.raises(ValueError, match="(?s)missing.*w_gate.*unexpected.*kv_proj.*mis-shaped.*query"):
        dst.load_checkpoint(bad)
    with pytest.raises(ValueError, match="mm_projector_type"):
        SliMEConfig.from_dict({"mm_projector_type": "mlp2x_gelu"})


def test_slime_visual_from_pretrained(tmp_path):
    from safetensors.torch import save_file
    hires_lmm.set_backend("reference")
    cfg = {"hidden_size": 32, "mm_hidden_size": 128, "mm_resampler_dim": 16, "mm_resampler_topp": 0.95,
           "mm_resampler_temp": 1.0, "seperator": 11, "mm_projector_type": "gated",
           "mm_resampler_type": "cosine", "model_type": "llava_llama"}
    (tmp_path / "config.json").write_text(__import__("json").dumps(cfg))
    src = SliMEVisual(SliMEConfig.from_dict(cfg)).eval()
    sd = {}
    for k, v in src.state_dict().items():
        pre = "model.mm_projector." if k.startswith("projector.") else "model.sampler.post_qformer."
        sd[pre + k.split(".", 1)[1]] = v.clone().contiguous()
    sd["model.embed_tokens.weight"] = torch.zeros(3, 32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    model = SliMEVisual.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert model.config.seperator == 11 and model.config.presoftmax_temperature == 0.5
    feats, text, sep = torch.randn(5, 576, 128), torch.randn(7, 32), torch.randn(32)
    with torch.no_grad():
        torch.testing.assert_close(model(feats, (2, 2), text, sep), src(feats, (2, 2), text, sep))
    del sd["model.mm_projector.w_gate"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="w_gate"):
        SliMEVisual.from_pretrained(str(tmp_path))
