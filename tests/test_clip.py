"""ClipVisionTower against Hugging Face CLIPVisionModel hidden_states[select][:, 1:] on a small
random config: CLIPVisionConfig and full CLIPConfig checkpoints, key prefixes (none,
vision_model., LLaVA's model.vision_tower.vision_tower.), DeepStack-V against a hook-based
PyTorch reference, bf16, bad input."""
import json
import os

import pytest
import torch

import hires_lmm
from hires_lmm.models import ClipVisionConfig, ClipVisionTower
from conftest import DEVICES

transformers = pytest.importorskip("transformers")

HAS_FA = hasattr(torch.ops.hires_lmm, "flash_attn_func")
BACKENDS = ["reference", pytest.param("kernels", marks=pytest.mark.skipif(
    not HAS_FA, reason="torch.ops.hires_lmm.flash_attn_func not built in this branch yet"))]

C, LAYERS, IMG, PATCH = 64, 4, 28, 7          # 16 patches + CLS = 17 tokens (odd), head dim 16
N = (IMG // PATCH) ** 2

_VISION_KW = dict(hidden_size=C, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
                  image_size=IMG, patch_size=PATCH, layer_norm_eps=1e-5, attn_implementation="eager")


def _randomize(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn_like(p) if n.endswith("weight") else 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


_CACHE = {}


def _vision(tmp_path_factory):
    """(HF CLIPVisionModel, its saved dir, its state dict with 'vision_model.'-free keys)."""
    if "vision" not in _CACHE:
        torch.manual_seed(0)
        hf = _randomize(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**_VISION_KW))).eval()
        d = str(tmp_path_factory.mktemp("clipv"))
        hf.save_pretrained(d, safe_serialization=True)
        sd = {k.replace("vision_model.", "", 1) if k.startswith("vision_model.") else k: v
              for k, v in hf.state_dict().items()}
        _CACHE["vision"] = (hf, d, sd)
    return _CACHE["vision"]


def _save(d, config: dict, sd: dict):
    from safetensors.torch import save_file
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(d, "model.safetensors"))
    return d


def _hf_feats(hf, x, select=-2):
    with torch.no_grad():
        return hf(pixel_values=x, output_hidden_states=True).hidden_states[select][:, 1:]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("select", [-2, -1, 1])
def test_matches_hf_clip_vision_model(tmp_path_factory, backend, select):
    hf, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend(backend)
    tower = ClipVisionTower.from_pretrained(d)
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        out = tower(x, select_layer=select)
    ref = _hf_feats(hf, x, select)
    assert out.shape == (3, N, C)
    assert _rel(out, ref) < 1e-4


@pytest.mark.parametrize("prefix", ["vision_model.", "model.vision_tower.vision_tower.vision_model."])
def test_prefixes_and_llava_checkpoint(tmp_path_factory, tmp_path, prefix):
    hf, d, sd = _vision(tmp_path_factory)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    ck = {prefix + k: v for k, v in sd.items()}
    ck[prefix + "embeddings.position_ids"] = torch.arange(N + 1)[None]        # old buffer
    if prefix.startswith("model."):                                           # LLaVA: LLM + projector
        ck["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(4, 4)
        ck["model.mm_projector.0.weight"] = torch.zeros(4, 4)
        ck["lm_head.weight"] = torch.zeros(4, 4)
    tower = ClipVisionTower.from_pretrained(_save(str(tmp_path / "ck"), cfg, ck))
    x = torch.randn(2, 3, IMG, IMG)
    hires_lmm.set_backend("reference")
    with torch.no_grad():
        assert _rel(tower(x), _hf_feats(hf, x)) < 1e-4


def test_full_clip_config_with_text_tower(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, vocab_size=50),
        vision_config={k: v for k, v in _VISION_KW.items() if k != "attn_implementation"},
        projection_dim=16)
    hf = transformers.CLIPModel(cfg).eval()
    _randomize(hf.vision_model)
    d = str(tmp_path / "clip")
    hf.save_pretrained(d, safe_serialization=True)
    with open(os.path.join(d, "config.json")) as f:
        assert "vision_config" in json.load(f)
    hires_lmm.set_backend("reference")
    tower = ClipVisionTower.from_pretrained(d)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert _rel(tower(x), ref) < 1e-4


def test_unknown_key_is_an_error(tmp_path_factory, tmp_path):
    _, d, sd = _vision(tmp_path_factory)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    ck = dict(sd)
    ck["encoder.layers.0.extra"] = torch.zeros(2)
    del ck["encoder.layers.2.mlp.fc1.bias"]
    with pytest.raises(ValueError) as e:
        ClipVisionTower.from_pretrained(_save(str(tmp_path / "ck"), cfg, ck))
    assert "encoder.layers.0.extra" in str(e.value) and "encoder.layers.2.mlp.fc1.bias" in str(e.value)


def _hf_deepstack_v(hf, x, stacks, start, select=-2):
    """HF with stack i added to hidden[:, 1:] before encoder layer start+i (forward pre-hooks)."""
    layers = getattr(hf, "vision_model", hf).encoder.layers   # transformers 5 dropped the wrapper
    handles = []
    for i, st in enumerate(stacks):
        def pre(mod, args, kwargs, st=st):
            if args:
                h = args[0].clone()
                h[:, 1:] = h[:, 1:] + st.to(h.dtype)
                return (h,) + tuple(args[1:]), kwargs
            h = kwargs["hidden_states"].clone()
            h[:, 1:] = h[:, 1:] + st.to(h.dtype)
            return args, {**kwargs, "hidden_states": h}
        handles.append(layers[start + i].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return _hf_feats(hf, x, select)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("start,n_stacks", [(1, 2), (0, 3), (2, 2)])
def test_deepstack_v_matches_hooks(tmp_path_factory, backend, start, n_stacks):
    # (2, 2) with select -2 (3 of 4 layers run): the stack before layer 3 cannot reach the output
    hf, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend(backend)
    tower = ClipVisionTower.from_pretrained(d)
    x = torch.randn(2, 3, IMG, IMG)
    stacks = torch.randn(n_stacks, 2, N, C)
    with torch.no_grad():
        out = tower(x, deepstack_stacks=stacks, deepstack_start=start)
        plain = tower(x)
    ref = _hf_deepstack_v(hf, x, stacks, start)
    assert _rel(out, ref) < 1e-4
    assert _rel(plain, ref) > 1e-3


def test_deepstack_v_default_start_and_list(tmp_path_factory):
    hf, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend("reference")
    tower = ClipVisionTower.from_pretrained(d)
    x = torch.randn(1, 3, IMG, IMG)
    stacks = [torch.randn(1, N, C) for _ in range(2)]
    with torch.no_grad():
        out = tower(x, deepstack_stacks=stacks, select_layer=-1)     # default start = LAYERS // 2
    assert _rel(out, _hf_deepstack_v(hf, x, stacks, LAYERS // 2, select=-1)) < 1e-4


def test_bf16_close_to_hf(tmp_path_factory):
    hf, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend("reference")
    tower = ClipVisionTower.from_pretrained(d, dtype=torch.bfloat16)
    x = torch.randn(2, 3, IMG, IMG)
    stacks = torch.randn(2, 2, N, C)
    with torch.no_grad():
        out = tower(x, deepstack_stacks=stacks, deepstack_start=1)
    assert out.dtype == torch.bfloat16
    assert _rel(out, _hf_deepstack_v(hf, x, stacks, 1)) < 5e-2


def test_bad_input(tmp_path_factory):
    _, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend("reference")
    tower = ClipVisionTower.from_pretrained(d)
    x = torch.randn(2, 3, IMG, IMG)
    with pytest.raises(ValueError, match="pixel_values"):
        tower(torch.randn(2, 3, IMG + 1, IMG))
    with pytest.raises(ValueError, match="deepstack_stacks"):
        tower(x, deepstack_stacks=torch.randn(2, 2, N + 1, C), deepstack_start=0)
    with pytest.raises(ValueError, match="deepstack_start"):
        tower(x, deepstack_stacks=torch.randn(2, 2, N, C), deepstack_start=3)
    with pytest.raises(ValueError, match="select_layer"):
        tower(x, select_layer=LAYERS + 2)
    with pytest.raises(ValueError, match="hidden_act"):
        ClipVisionConfig.from_dict({"hidden_act": "relu6"})


def test_config_defaults_and_full_config():
    c = ClipVisionConfig.from_dict({"vision_config": {"hidden_size": 1024, "image_size": 336,
                                                      "patch_size": 14, "num_hidden_layers": 24,
                                                      "num_attention_heads": 16,
                                                      "intermediate_size": 4096},
                                    "text_config": {"hidden_size": 768}})
    assert c.num_patches == 576 and c.head_dim == 64 and c.hidden_act == "quick_gelu"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_deepstack_v_on_device(tmp_path_factory, device, backend):
    import copy
    hf, d, _ = _vision(tmp_path_factory)
    hf = copy.deepcopy(hf).to(device=device, dtype=torch.bfloat16)
    hires_lmm.set_backend(backend)
    tower = ClipVisionTower.from_pretrained(d, dtype=torch.bfloat16, device=device)
    x = torch.randn(2, 3, IMG, IMG, device=device)
    stacks = torch.randn(2, 2, N, C, device=device)
    with torch.no_grad():
        out = tower(x, deepstack_stacks=stacks, deepstack_start=1)
    assert out.device.type == device and out.dtype == torch.bfloat16
    assert _rel(out, _hf_deepstack_v(hf, x, stacks, 1)) < 5e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grid,start", [((2, 2), 0), ((1, 2), 1), ((1, 2), 2)])
def test_forward_deepstack_v_end_to_end(tmp_path_factory, backend, grid, start):
    """Crops through layers [0, start), mosaic + dilated sampling by explicit loops, then HF with
    pre-hooks on the global stream."""
    hf, d, _ = _vision(tmp_path_factory)
    hires_lmm.set_backend(backend)
    tower = ClipVisionTower.from_pretrained(d)
    gh, gw = grid
    B, P = 2, IMG // PATCH
    x = torch.randn(B, 3, IMG, IMG)
    crops = torch.randn(B * gh * gw, 3, IMG, IMG)
    with torch.no_grad():
        out = tower.forward_deepstack_v(x, crops, grid=grid, deepstack_start=start)
        loc = hf(pixel_values=crops, output_hidden_states=True).hidden_states[start][:, 1:]
    stacks = torch.empty(gh * gw, B, P * P, C)
    for b in range(B):
        for i in range(gh):
            for j in range(gw):
                for y in range(P):
                    for xx in range(P):
                        # hires[y*gh + i, xx*gw + j] lies in crop (r, c) at (yy, xc)
                        Y, X = y * gh + i, xx * gw + j
                        r, yy, c, xc = Y // P, Y % P, X // P, X % P
                        stacks[i * gw + j, b, y * P + xx] = loc[b * gh * gw + r * gw + c, yy * P + xc]
    ref = _hf_deepstack_v(hf, x, stacks, start)
    assert _rel(out, ref) < 1e-4
    with pytest.raises(ValueError, match="crop_pixel_values"):
        tower.forward_deepstack_v(x, crops[:-1], grid=grid, deepstack_start=start)


def test_pytorch_bin_checkpoint(tmp_path_factory, tmp_path):
    """LLaVA-era checkpoints ship pytorch_model.bin: read with torch.load(weights_only=True)."""
    hf, d, sd = _vision(tmp_path_factory)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    out = tmp_path / "bin"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg))
    torch.save({"vision_model." + k: v for k, v in sd.items()}, out / "pytorch_model.bin")
    hires_lmm.set_backend("reference")
    tower = ClipVisionTower.from_pretrained(str(out))
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        assert _rel(tower(x), _hf_feats(hf, x)) < 1e-4
