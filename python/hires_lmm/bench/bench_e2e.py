"""End to end ConvLLaVA (family `e2e`): image preprocessing, tower + projector, time to first
token, decode steps at batch 1 and 8, against the same model composed from Hugging Face pieces
(ConvNextModel -> Linear/GELU/Linear -> LlamaForCausalLM with attn_implementation "eager" and
"sdpa"), all on the same random weights, side by side in one run.

  GPU (quick=False): ConvLLaVA-1536 shapes, bf16: the 5-stage ConvNeXt-L tower (669M params) at
       1536 px -> 576 visual rows, mlp2x_gelu 3072 -> 4096, Llama-2-7B (32 layers, 4096, MHA),
       a prompt of 64 text tokens + 576 visual rows, decode with 128 tokens already generated.
       Targets (issue 10): time to first token >= 2x and decode >= 2x the sdpa reference.
  CPU / quick: a tiny config (5-stage tower 16..96 at 128 px, 2-layer Llama 128 wide), fp32:
       seconds, a smoke run of the same code.

Cases (one line per reference; times are per call):
  e2e_preprocess    PIL image (2048x1536, or 160x120 quick) -> (1, 3, N, N): ours
                    (models.convllava_preprocess) vs transformers' CLIPImageProcessor after
                    expand2square; max_err = max abs difference.
  e2e_tower         pixels -> projected visual rows (tower + projector).
  e2e_ttft          pixels + prompt ids -> first token id on the host: tower, projector, splice,
                    prefill (packed, logits of the last token only), argmax, .item(); HF runs
                    logits_to_keep=1.
  e2e_decode        one decode step for B sequences (tokens/s = B * 1e6 / "ours us"), KV cache at
                    prompt + 128 tokens. On CUDA "ours" replays the captured CUDA graph and a
                    second line runs the same step eagerly (cuda_graph=False). HF: one step with
                    its DynamicCache (cropped back after each call).
Peak memory of one time-to-first-token run (ours and HF sdpa) is printed as a `#` line on CUDA.
max_err of ttft / decode: max |ours - hf_sdpa| / max |hf_sdpa| over the logits.
"""
from typing import List

import torch
from torch import nn

from .. import use_backend
from .common import Case

DECODE_CONTEXT = 128          # tokens already generated when a decode step is timed


def _configs(quick: bool):
    from .bench_convnext_tower import CONVLLAVA_1536, TINY
    if quick:
        llm = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                   rms_norm_eps=1e-5)
        return TINY, 128, llm, 24, (160, 120)
    llm = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
               rms_norm_eps=1e-5)
    return CONVLLAVA_1536, 1536, llm, 64, (2048, 1536)


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max()).item()


def cases(device: str, quick: bool) -> List[Case]:
    import transformers
    from PIL import Image
    from ..models import convllava_preprocess, expand2square, Llama, LlamaConfig
    from ..models.convnext import ConvNeXtTower
    from ..models.llama import StaticKVCache, _llama_key
    from ..generation import _DecodeStep
    from .bench_convnext_tower import _hf_model

    if device == "cpu":
        quick = True                          # a 7B model is not a CPU benchmark
    tcfg, res, lcfg, n_text, img_size = _configs(quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = "kernels"
    out: List[Case] = []

    # -- preprocessing (host) --
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(img_size[1], img_size[0], 3, generator=g) * 255)
                          .to(torch.uint8).numpy())
    proc_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    proc = proc_cls(size={"shortest_edge": res}, crop_size={"height": res, "width": res},
                    resample=3, do_convert_rgb=True)

    def pre_ours():
        return convllava_preprocess(img, res)

    def pre_hf():
        return proc(expand2square(img), return_tensors="pt")["pixel_values"]

    out.append(Case("e2e_preprocess", f"{img_size[0]}x{img_size[1]} -> {res}x{res}", torch.float32,
                    pre_ours, {"hf_clip_processor": pre_hf},
                    max_err=lambda: (pre_ours() - pre_hf().float()).abs().max().item(), tol=1e-4))

    # -- models on shared random weights --
    hf_tower = _hf_model(tcfg, device, dtype)
    D = lcfg["hidden_size"]
    torch.manual_seed(1)
    with torch.device(device):
        proj = nn.Sequential(nn.Linear(tcfg.hidden_sizes[-1], D), nn.GELU(), nn.Linear(D, D))
        hf_llm = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**lcfg, attn_implementation="sdpa"))
    proj = proj.to(dtype).eval()
    hf_llm = hf_llm.to(dtype).eval()
    tower = ConvNeXtTower.from_state_dict(hf_tower.state_dict(), dtype=dtype, device=device)
    with torch.device("meta"):
        llm = Llama(LlamaConfig.from_dict(hf_llm.config.to_dict()))
    llm.load_state_dict({_llama_key(k): v for k, v in hf_llm.state_dict().items()
                         if _llama_key(k) is not None}, strict=True, assign=True)
    llm.eval()

    pixels = pre_ours().to(device=device, dtype=dtype)
    n_vis = tcfg.grid(res, res)[0] * tcfg.grid(res, res)[1]
    ids = torch.randint(3, lcfg["vocab_size"], (n_text,), generator=g).to(device)
    at = 35 if n_text > 35 else n_text // 2                # LLaVA: system prompt, then the image
    S = n_text + n_vis
    case_name = (f"{'tiny' if quick else 'convllava1536+7B'} {res}px {n_vis} rows + {n_text} text")

    def set_impl(impl):
        hf_llm.config._attn_implementation = impl
        for layer in hf_llm.model.layers:
            layer.self_attn.config._attn_implementation = impl

    def rows_ours():
        with use_backend(backend):
            return proj(tower(pixels))[0]

    def rows_hf():
        h = hf_tower(pixels).last_hidden_state
        return proj(h.permute(0, 2, 3, 1).reshape(1, -1, h.shape[1]))[0]

    def embeds(rows):
        e = llm.embed_tokens(ids)
        return torch.cat([e[:at], rows.to(e.dtype), e[at:]], 0)

    def ttft_ours():
        with torch.inference_mode(), use_backend(backend):
            e = embeds(rows_ours())
            cache = StaticKVCache(llm.config, 1, S + 1, dtype, device)
            cu = torch.tensor([0, S], dtype=torch.int32, device=device)
            logits = llm.forward_packed(e, cu, S, cache)
            return int(logits.argmax(-1)[0]), logits

    def ttft_hf(impl):
        set_impl(impl)
        with torch.inference_mode():
            e = embeds(rows_hf())[None]
            logits = hf_llm(inputs_embeds=e, use_cache=True, logits_to_keep=1).logits[:, -1]
            return int(logits.argmax(-1)[0]), logits

    out.append(Case("e2e_tower", case_name, dtype, lambda: _inf(rows_ours),
                    {"hf_eager": lambda: _inf(rows_hf)},
                    max_err=lambda: _rel(_inf(rows_ours), _inf(rows_hf)),
                    tol=3e-2 if dtype == torch.bfloat16 else 1e-4))
    out.append(Case("e2e_ttft", case_name, dtype, ttft_ours,
                    {"hf_sdpa": lambda: ttft_hf("sdpa"), "hf_eager": lambda: ttft_hf("eager")},
                    max_err=lambda: _rel(ttft_ours()[1], ttft_hf("sdpa")[1]),
                    tol=5e-2 if dtype == torch.bfloat16 else 1e-3))
    if device == "cuda":
        for name, fn in (("ours", ttft_ours), ("hf_sdpa", lambda: ttft_hf("sdpa"))):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            print(f"# e2e_ttft {case_name}: peak memory above the weights, {name}: {peak:.2f} GiB")

    # -- decode steps at batch 1 and 8 --
    ctx = S + DECODE_CONTEXT
    for B in (1, 8):
        with torch.inference_mode():
            e = (0.02 * torch.randn(B * ctx, D, generator=g)).to(device=device, dtype=dtype)
            cache = StaticKVCache(llm.config, B, ctx + 1, dtype, device)
            cu = torch.arange(0, B + 1, dtype=torch.int32, device=device) * ctx
            with use_backend(backend):
                llm.forward_packed(e, cu, ctx, cache)
            saved = cache.seqlens.clone()
            hf_e = e.view(B, ctx, D)
            set_impl("sdpa")
            r = hf_llm(inputs_embeds=hf_e, use_cache=True, logits_to_keep=1)
            past = getattr(r, "past_key_values", None) or getattr(r, "cache")
        tok = torch.randint(3, lcfg["vocab_size"], (B,), generator=g).to(device)
        variants = [("", device == "cuda")] + ([(" eager", False)] if device == "cuda" else [])
        for suffix, graph in variants:
            step = _DecodeStep(llm, cache, graph)

            def ours(step=step, cache=cache, saved=saved, tok=tok):
                with torch.inference_mode(), use_backend(backend):
                    cache.seqlens.copy_(saved)           # the same position every call
                    return step(tok)

            def hf_step(impl, B=B, past=past, tok=tok):
                set_impl(impl)
                with torch.inference_mode():
                    r = hf_llm(input_ids=tok[:, None], use_cache=True, logits_to_keep=1,
                               **{_cache_kw(hf_llm): past}).logits[:, -1]
                    past.crop(-1)                 # drop the token just added
                    return r

            out.append(Case("e2e_decode", f"{case_name} B={B} ctx={ctx}{suffix}", dtype, ours,
                            {"hf_sdpa": lambda f=hf_step: f("sdpa"),
                             "hf_eager": lambda f=hf_step: f("eager")},
                            max_err=lambda o=ours, f=hf_step: _rel(o().clone(), f("sdpa")),
                            tol=5e-2 if dtype == torch.bfloat16 else 1e-3))
    return out + _family_cases(device, quick)


def _inf(fn):
    with torch.inference_mode():
        return fn()


def _cache_kw(model) -> str:
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---- DeepStack-L, DeepStack-L-HD, SliME-7B (issue 11) ------------------------------------------
# Whole models on random weights, from a PIL image and prompt ids to the first token:
#   e2e_ttft "deepstack-l ...", "deepstack-l-hd ...", "slime-7b ...": ours (ClipVisionTower,
#       kernels) against the Hugging Face-composed pipeline: CLIPVisionModel (sdpa) for the tower,
#       the family's glue (projector, stacks / adapters, resampler, selector) in PyTorch
#       (hires_lmm reference backend), LlamaForCausalLM (sdpa) with forward pre-hooks adding the
#       DeepStack stacks before their layers. Both start from the same PIL image (the views are
#       cut by the same code). GPU: CLIP-L/336 + Llama-2-7B shapes, bf16, 1024x768 image; CPU:
#       a tiny CLIP (128 wide, 56 px views) and the tiny Llama above with 6 layers.
#   e2e_deepstack_claim: DeepStack's claim (specs/deepstack.md 4.1): DeepStack-L prefill of 64
#       text + 576 visual rows with 4 stacks added before layers 1..4 ("ours") against a
#       LLaVA-style prefill of 64 text + 5 x 576 visual rows (reference "llava_5x576"), the
#       visual rows given (the tower encodes the same 5 views in both). Time to first token of
#       the LLM part, and the KV-cache bytes of each (the StaticKVCache tensors' sizes, in the
#       case name; on CUDA also the peak memory of each prefill as `#` lines). `--plot` draws the
#       pair with the other speedups.
def _family_configs(quick: bool):
    if quick:
        clip = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=2, image_size=56, patch_size=14)
        llm = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=6,
                   num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=8192,
                   rms_norm_eps=1e-5)
        return clip, llm, 24, (160, 120), 4
    clip = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14)
    llm = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
               rms_norm_eps=1e-5)
    return clip, llm, 64, (1024, 768), 144


class _HFClipAsTower(nn.Module):
    """CLIPVisionModel behind ClipVisionTower's call (hidden_states[select][:, 1:])."""

    def __init__(self, hf, config):
        super().__init__()
        import types
        self.hf, self.config = hf, config
        self.embeddings = types.SimpleNamespace(
            patch_embedding=types.SimpleNamespace(weight=next(hf.parameters())))

    def forward(self, x, select_layer=-2):
        return self.hf(pixel_values=x, output_hidden_states=True).hidden_states[select_layer][:, 1:]


def _family_cases(device: str, quick: bool) -> List[Case]:
    import transformers
    from PIL import Image
    from ..generation import pack_deepstack
    from ..lmm.deepstack_vl import DeepStackConfig, DeepStackVL
    from ..lmm.slime import SliME, SliMEModelConfig
    from ..models.clip import ClipVisionConfig, ClipVisionTower
    from ..models.llama import LlamaConfig, StaticKVCache, _llama_key
    from ..models.slime import SliMEConfig, SliMEVisual

    ccfg, lcfg, n_text, img_size, res_dim = _family_configs(quick)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out: List[Case] = []
    g = torch.Generator().manual_seed(0)
    img = Image.fromarray((torch.rand(img_size[1], img_size[0], 3, generator=g) * 255)
                          .to(torch.uint8).numpy())
    torch.manual_seed(1)
    with torch.device(device):
        hf_clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            **ccfg, attn_implementation="sdpa"))
        hf_llm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **lcfg, attn_implementation="sdpa"))
    hf_clip, hf_llm = hf_clip.to(dtype).eval(), hf_llm.to(dtype).eval()
    D, Dc = lcfg["hidden_size"], ccfg["hidden_size"]
    clip_cfg = ClipVisionConfig.from_dict(hf_clip.config.to_dict())
    with torch.device("meta"):
        tower = ClipVisionTower(clip_cfg)
    tower.load_state_dict({k.removeprefix("vision_model."): v for k, v in hf_clip.state_dict().items()
                           if "position_ids" not in k}, strict=True, assign=True)
    llm_sd = {_llama_key(k): v for k, v in hf_llm.state_dict().items() if _llama_key(k) is not None}
    llm_cfg = LlamaConfig.from_dict(hf_llm.config.to_dict())
    with torch.device(device):
        proj = nn.Sequential(nn.Linear(Dc, D), nn.GELU(), nn.Linear(D, D)).to(dtype).eval()
    ids = torch.randint(3, lcfg["vocab_size"], (n_text,), generator=g).tolist()
    at = 35 if n_text > 35 else n_text // 2
    ids = ids[:at] + [-200] + ids[at:]

    def build(kind):
        if kind == "slime":
            vis_cfg = SliMEConfig(hidden_size=D, mm_hidden_size=Dc, mm_resampler_dim=res_dim,
                                  seperator=min(1919, lcfg["vocab_size"] - 1),
                                  image_size=ccfg["image_size"],
                                  global_grid=ccfg["image_size"] // ccfg["patch_size"])
            with torch.device("meta"):
                m = SliME(SliMEModelConfig(llm=llm_cfg, visual=vis_cfg, mm_vision_tower="clip"), None)
            with torch.device(device):
                m.visual = SliMEVisual(vis_cfg).to(dtype)
        else:
            cfg = DeepStackConfig(llm=llm_cfg, mm_hidden_size=Dc, mm_vision_tower="clip",
                                  is_anyres_deepstack=kind == "hd")
            with torch.device("meta"):
                m = DeepStackVL(cfg, None)
            m.mm_projector = proj
            if kind == "hd":
                m.image_newline = nn.Parameter(0.02 * torch.randn(D, device=device, dtype=dtype))
        m.llm.load_state_dict(llm_sd, strict=True, assign=True)
        m.vision_tower = tower
        return m.eval()

    def ttft_ours(m):
        with torch.inference_mode(), use_backend("kernels"):
            rows, st = m.encode(img, ids)
            x, spans = m.splice(ids, [rows], return_positions=True)
            S = x.shape[0]
            idx, levels = pack_deepstack([m._deepstack_entry(spans, [st], S)], [S], x.device)
            cache = StaticKVCache(m.llm.config, 1, S + 1, dtype, device)
            cu = torch.tensor([0, S], dtype=torch.int32, device=device)
            logits = m.llm.forward_packed(x, cu, S, cache, visual_index=idx,
                                          deepstack_visual_embeds=levels,
                                          deepstack_layers=m.deepstack_layers if levels else None)
            return int(logits.argmax(-1)[0]), logits

    def ttft_hf(m):
        ours_tower = m.vision_tower
        m.vision_tower = _HFClipAsTower(hf_clip, clip_cfg)
        try:
            with torch.inference_mode(), use_backend("reference"):
                rows, st = m.encode(img, ids)
                x, spans = m.splice(ids, [rows], return_positions=True)
        finally:
            m.vision_tower = ours_tower
        hooks = []
        for k, layer in enumerate(m.deepstack_layers or ()):
            def pre(mod, args, kwargs, k=k):
                h = (args[0] if args else kwargs["hidden_states"]).clone()
                a, n = spans[0]
                h[0, a:a + n] += st[k].to(h.dtype)
                return ((h,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})
            hooks.append(hf_llm.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
        try:
            with torch.inference_mode():
                logits = hf_llm(inputs_embeds=x[None], logits_to_keep=1).logits[:, -1]
        finally:
            for h in hooks:
                h.remove()
        return int(logits.argmax(-1)[0]), logits

    size = "tiny" if quick else "clip-l336+7B"
    for kind, name in (("l", "deepstack-l"), ("hd", "deepstack-l-hd"), ("slime", "slime-7b")):
        m = build(kind)
        out.append(Case("e2e_ttft", f"{name} {size} {img_size[0]}x{img_size[1]} + {n_text} text",
                        dtype, lambda m=m: ttft_ours(m), {"hf_sdpa": lambda m=m: ttft_hf(m)},
                        max_err=lambda m=m: _rel(ttft_ours(m)[1], ttft_hf(m)[1]),
                        tol=5e-2 if dtype == torch.bfloat16 else 1e-3))

    # DeepStack's claim: 576 context rows + 4 stacks vs all 5 x 576 rows in the sequence
    n_vis = (ccfg["image_size"] // ccfg["patch_size"]) ** 2 if quick else 576
    llm = build("l").llm
    with torch.inference_mode():
        text = llm.embed_tokens(torch.tensor([i for i in ids if i >= 0], device=device))
        vis = (0.02 * torch.randn(5 * n_vis, D, generator=g)).to(device=device, dtype=dtype)
    ds_x = torch.cat([text[:at], vis[:n_vis], text[at:]])
    ds_idx = torch.arange(at, at + n_vis, device=device)
    ds_levels = list(vis[n_vis:].view(4, n_vis, D).unbind(0))
    long_x = torch.cat([text[:at], vis, text[at:]])
    kv = {}

    def prefill(x, **kw):
        with torch.inference_mode(), use_backend("kernels"):
            S = x.shape[0]
            cache = StaticKVCache(llm.config, 1, S + 1, dtype, device)
            kv[S] = sum(t.numel() * t.element_size() for t in cache.k + cache.v)
            cu = torch.tensor([0, S], dtype=torch.int32, device=device)
            return int(llm.forward_packed(x, cu, S, cache, **kw).argmax(-1)[0])

    ours = lambda: prefill(ds_x, visual_index=ds_idx, deepstack_visual_embeds=ds_levels,  # noqa: E731
                           deepstack_layers=[1, 2, 3, 4])
    ref = lambda: prefill(long_x)                                                          # noqa: E731
    ours(), ref()                                  # also records each StaticKVCache's bytes
    name = (f"{size} {n_text} text + {n_vis} rows + 4 stacks vs {n_text} text + 5x{n_vis} rows "
            f"(KV cache {kv[ds_x.shape[0]] / 2 ** 20:.1f} vs {kv[long_x.shape[0]] / 2 ** 20:.1f} MiB)")
    out.append(Case("e2e_deepstack_claim", name, dtype, ours, {"llava_5x576": ref}))
    print(f"# e2e_deepstack_claim {name}")
    if device == "cuda":
        for label, fn in (("deepstack-l", ours), ("llava-style", ref)):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            print(f"# e2e_deepstack_claim peak memory above the weights, {label}: "
                  f"{(torch.cuda.max_memory_allocated() - base) / 2 ** 30:.2f} GiB")
    return out
