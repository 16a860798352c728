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
    return out


def _inf(fn):
    with torch.inference_mode():
        return fn()


def _cache_kw(model) -> str:
    import inspect
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"
