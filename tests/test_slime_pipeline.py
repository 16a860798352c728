"""SliME end to end (hires_lmm.load -> logits / generate / chat) on small random checkpoints in
the released layout (config.json "model_type": "llava_llama", "mm_projector_type": "gated",
sharded safetensors + index holding the LLM, model.mm_projector.* (GatedAdapters) and
model.sampler.post_qformer.* (Resampler), the spec 6.2 key names), one SliME-7B-like folder with
a SentencePiece Vicuna tokenizer and the CLIP tower inside the shards, one SliME-8B-like folder
with a Llama-3-style tokenizer.json (llama3 template) and the tower in its own folder.

The reference is composed here: CLIPVisionModel hidden_states[-2][:, 1:], the spec's formulas
for the gate (2.2), nn.MultiheadAttention resamplers (2.1, 3.1; RefResampler of
test_slime_modules), raster order (3.2), the summed-cosine router and the top-p prefix + 1 with
the double (first commit) or single (HEAD) softmax (3.3-3.4), the [global ; ',' ; kept] block
spliced LLaVA's way (4), LlamaForCausalLM(inputs_embeds=...). The views come from
models.slime.slice_image, checked against the spec's UHD table in test_slime_modules."""
import json
import os

import pytest
import torch
from torch import nn

import hires_lmm
from lmm_test_utils import (SYSTEM, _CACHE_KW, _train_tokenizer, _write_safetensors_shards,
                            _write_tokenizer_files, build_llama3_tokenizer)
from test_slime_modules import RefResampler

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from PIL import Image  # noqa: E402

from hires_lmm.models.slime import slice_image  # noqa: E402

PATCH, G = 56, 4                # tiny CLIP: 56 px, 14 px patches -> 4 x 4 = 16 tokens a view
D, H, Q, TOPP = 128, 64, 4, 0.7  # CLIP width (8 heads of 16 / 128 -> 1 head), LLM width, 2x2 queries


def _config(vocab, sep, **extra):
    d = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
         "vocab_size": vocab, "hidden_size": H, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
         "tie_word_embeddings": False, "torch_dtype": "float32",
         "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_vision_select_layer": -2,
         "mm_vision_select_feature": "patch", "mm_hidden_size": D, "mm_projector_type": "gated",
         "mm_learnable_gated": -1, "mm_resampler_type": "cosine", "mm_resampler_dim": Q,
         "mm_resampler_topp": TOPP, "mm_resampler_temp": 1.0, "mm_patch_merge_type": "spatial",
         "image_aspect_ratio": "anyres", "seperator": sep, "use_local_only": False,
         "use_global_only": False, "tokenizer_padding_side": "right",
         "tokenizer_model_max_length": 1024, "mm_use_im_start_end": False,
         "mm_use_im_patch_token": False}
    d.update(extra)
    return d


class Ref:
    def __init__(self, clip, mlp, res_g, res_l, w_gate, llm, encode, sep, template):
        self.clip, self.mlp, self.res_g, self.res_l, self.w_gate = clip, mlp, res_g, res_l, w_gate
        self.llm, self.encode_text, self.sep, self.template = llm, encode, sep, template

    def prompt_ids(self, q):
        if self.template == "vicuna_v1":
            prompt = f"{SYSTEM} USER: <image>\n{q} ASSISTANT:"
        else:
            prompt = (f"<|start_header_id|>user<|end_header_id|>\n\n<image>\n{q}<|eot_id|>"
                      f"<|start_header_id|>assistant<|end_header_id|>\n\n")
        a, b = [self.encode_text(c) for c in prompt.split("<image>")]
        return a + [-200] + b[1:]

    @torch.no_grad()
    def visual(self, image, ids, double=True):
        views, (cols, rows) = slice_image(image, PATCH)
        F_ = self.clip(views, output_hidden_states=True).hidden_states[-2][:, 1:]   # 1.1
        x = F_[0]                                                                   # 2.2
        p = torch.softmax(x @ self.w_gate, -1)
        g = p / (p.sum(-1, keepdim=True) + 1e-6)
        glob = g[:, :1] * self.mlp(x) + g[:, 1:] * self.mlp(self.res_g(x[None])[0])
        loc = self.mlp(self.res_l(F_[1:]))                                          # 3.1
        q = int(Q ** 0.5)
        loc = loc.view(rows, cols, q, q, H).permute(0, 2, 1, 3, 4).reshape(-1, H)  # 3.2
        emb = self.llm.get_input_embeddings()
        text = emb(torch.tensor([i for i in ids if i != -200]))
        S = nn.functional.cosine_similarity(loc[:, None], text[None], dim=-1).sum(-1)   # 3.3
        s = torch.softmax(S / 0.5, -1) if double else S                            # 3.4
        pr = torch.softmax(s / 1.0, -1)
        srt, order = torch.sort(pr, descending=True)
        keep = min(int((srt.cumsum(0) <= TOPP).sum()) + 1, len(srt))
        idx = torch.sort(order[:keep]).values
        sep = emb(torch.tensor([self.sep]))
        return torch.cat([glob, sep, loc[idx]])                                     # 4

    @torch.no_grad()
    def embeds(self, image, q, double=True):
        ids = self.prompt_ids(q)
        at = ids.index(-200)
        emb = self.llm.get_input_embeddings()
        return torch.cat([emb(torch.tensor(ids[:at])), self.visual(image, ids, double),
                          emb(torch.tensor(ids[at + 1:]))])[None]

    @torch.no_grad()
    def greedy(self, image, q, n):
        out = self.llm(inputs_embeds=self.embeds(image, q), use_cache=True)
        past, toks = out.past_key_values, []
        for _ in range(n):
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            out = self.llm(input_ids=torch.tensor([[t]]), use_cache=True, **{_CACHE_KW: past})
            past = out.past_key_values
        return toks


def _rand_(module, seed, scale=0.15):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("slime")
    clip = _rand_(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=D // 64,
        image_size=PATCH, patch_size=14)), 1, 0.05).eval()
    tower = root / "clip-vit-tiny"
    clip.save_pretrained(str(tower), safe_serialization=True)
    torch.manual_seed(2)
    mlp = nn.Sequential(nn.Linear(D, H), nn.GELU(), nn.Linear(H, H)).eval()
    res_g, res_l = RefResampler(G, D, D // 128).eval(), RefResampler(int(Q ** 0.5), D, D // 128).eval()
    w_gate = torch.randn(D, 2) * 0.3
    visual_sd = {**{f"model.mm_projector.projection.{k}": v for k, v in mlp.state_dict().items()},
                 **{f"model.mm_projector.attn.{k}": v for k, v in res_g.state_dict().items()},
                 "model.mm_projector.w_gate": w_gate, "model.mm_projector.w_noise": torch.zeros(D, 2),
                 "model.mm_projector.mean": torch.zeros(1), "model.mm_projector.std": torch.ones(1),
                 **{f"model.sampler.post_qformer.{k}": v for k, v in res_l.state_dict().items()}}
    g = torch.Generator().manual_seed(5)
    images = [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy())
              for w, h in ((150, 90), (64, 64), (97, 200))]
    out = {"images": images, "tower": str(tower)}

    # SliME-7B-like: SentencePiece, vicuna_v1, the tower inside the shards
    tokdir = str(root / "tok")
    _train_tokenizer(tokdir)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokdir, "tokenizer.model"))
    sep = sp.encode(",")[-1]
    llm = _rand_(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=sp.get_piece_size(), hidden_size=H, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, attn_implementation="eager")), 3).eval()
    d = root / "SliME-vicuna-tiny"
    d.mkdir()
    tower_sd = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
                for k, v in clip.state_dict().items()}          # LLaVA's names, as released
    _write_safetensors_shards(str(d), {**llm.state_dict(), **visual_sd, **tower_sd})
    with open(d / "config.json", "w") as fh:
        json.dump(_config(sp.get_piece_size(), sep, bos_token_id=1, eos_token_id=2), fh)
    with open(os.path.join(tokdir, "tokenizer.model"), "rb") as src, open(d / "tokenizer.model", "wb") as dst:
        dst.write(src.read())
    _write_tokenizer_files(str(d))
    out["vicuna"] = (str(d), Ref(clip, mlp, res_g, res_l, w_gate, llm,
                                 lambda c: [1] + sp.encode(c), sep, "vicuna_v1"), sp)

    # SliME-8B-like: tokenizer.json (Llama-3 style), llama3 template, tower in its own folder
    d3 = root / "SliME-Llama3-tiny"
    tk = build_llama3_tokenizer(str(d3))
    sep3 = tk.encode(",").ids[-1]
    llm3 = _rand_(transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tk.get_vocab_size(), hidden_size=H, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        rms_norm_eps=1e-5, attn_implementation="eager")), 4).eval()
    _write_safetensors_shards(str(d3), {**llm3.state_dict(), **visual_sd})
    eot = tk.token_to_id("<|eot_id|>")
    with open(d3 / "config.json", "w") as fh:
        json.dump(_config(tk.get_vocab_size(), sep3, eos_token_id=eot), fh)
    out["llama3"] = (str(d3), Ref(clip, mlp, res_g, res_l, w_gate, llm3,
                                  lambda c: tk.encode(c).ids, sep3, "llama3"), tk)
    return out


@pytest.fixture(scope="module")
def models(world):
    return {"vicuna": hires_lmm.load(world["vicuna"][0]),
            "llama3": hires_lmm.load(world["llama3"][0], vision_tower=world["tower"])}


def _close(got, want, tol=1e-4):
    assert got.shape == want.shape, (got.shape, want.shape)
    err = (got - want).abs().max().item()
    assert err <= tol * max(1.0, want.abs().max().item()), err


def test_family_template_selector(models):
    v, l3 = models["vicuna"], models["llama3"]
    assert type(v).__name__ == "SliME" and v.conv_template == "vicuna_v1"
    assert l3.conv_template == "llama3"
    assert v.selector == "double_softmax" and v.config.visual.global_grid == G


@pytest.mark.parametrize("which", ["vicuna", "llama3"])
@pytest.mark.parametrize("selector", ["double_softmax", "single_softmax"])
def test_logits_match_reference(world, models, which, selector):
    path, ref, _ = world[which]
    m = models[which] if selector == "double_softmax" else hires_lmm.load(
        path, vision_tower=world["tower"], selector=selector)
    assert m.selector == selector
    q = "What is the total amount?"
    for im in world["images"][:2]:
        want = ref.llm(inputs_embeds=ref.embeds(im, q, double=selector == "double_softmax")).logits[0]
        got = m.logits([im], [q])[0]
        _close(got, want)
        assert got.shape[0] == len(ref.prompt_ids(q)) - 1 + ref.visual(
            im, ref.prompt_ids(q), selector == "double_softmax").shape[0]
    assert m.prompt_ids(q, 1) == ref.prompt_ids(q)


def test_selector_drops_tokens(world):
    """With topp 0.7 both variants drop local tokens, and the count is the spec's prefix + 1."""
    path, ref, _ = world["vicuna"]
    im = world["images"][0]
    ids = ref.prompt_ids("Describe the chart.")
    n_local = slice_image(im, PATCH)[0].shape[0] - 1
    for double in (True, False):
        k = ref.visual(im, ids, double).shape[0] - G * G - 1
        assert 0 < k < n_local * Q


@pytest.mark.parametrize("which", ["vicuna", "llama3"])
def test_greedy_16_steps_match_reference(world, models, which):
    _, ref, _ = world[which]
    im, q = world["images"][2], "Describe the chart."
    want = ref.greedy(im, q, 16)
    out = models[which].generate([im], [q], max_new_tokens=16, temperature=0)[0]
    got = out["token_ids"]
    assert got == want[:len(got)]
    assert len(got) == 16 or out["finish_reason"] == "eos"


def test_batch_equals_each_alone(world, models):
    m = models["vicuna"]
    images = world["images"]
    reqs = [(images[0], "Hi?"), (None, "What is the total amount on the invoice? One number."),
            (images[2], "Describe the chart."), (images[1], "What colour is the cat?")]
    kw = dict(max_new_tokens=8, temperature=0)
    batch = m.generate([r[0] for r in reqs], [r[1] for r in reqs], **kw)
    alone = [m.generate([im], [q], **kw)[0] for im, q in reqs]
    assert batch == alone


def test_bad_selector(world):
    with pytest.raises(ValueError, match="argument 'selector'"):
        hires_lmm.load(world["vicuna"][0], selector="triple")


def test_stream(world, models):
    m = models["llama3"]
    kw = dict(max_new_tokens=10, temperature=0)
    im = world["images"][1]
    assert "".join(m.chat(im, "Describe it.", stream=True, **kw)) == m.chat(im, "Describe it.", **kw)
