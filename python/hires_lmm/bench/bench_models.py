"""End-to-end model stages against Hugging Face.

llama_deepstack_prefill: one prefill of a random Llama (GPU: 4 layers of Llama-2-7B width, 2048
tokens, 576 visual rows, 3 DeepStack levels, bf16) through hires_lmm.models.Llama (injection fused
into the next RMSNorm, our flash attention) against HF LlamaForCausalLM with the Qwen3-VL
injection done by forward hooks after layers 0..2 (clone + masked add), with HF's "sdpa" and
"eager" attention. Both share the same weight tensors and return logits for every position.
max_err is the relative error max|ours - hf_sdpa| / max|hf_sdpa| of the logits (bf16 vs bf16).
quick=True: a tiny config on CPU."""
import torch

import hires_lmm
from .common import Case


def _configs(device, quick):
    if quick:
        return dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256), 1, 96, 24
    return dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                rms_norm_eps=1e-5), 1, 2048, 576


def _flops(cfg, B, S):
    D, I, L, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    H, Hkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = D // H
    per_tok_layer = 2 * (D * H * hd + 2 * D * Hkv * hd + H * hd * D + 3 * D * I)
    attn = 4 * B * H * S * S * hd / 2                   # causal
    return B * S * (L * per_tok_layer + 2 * D * V) + L * attn


def cases(device, quick):
    import transformers
    from hires_lmm.models import Llama, LlamaConfig
    from hires_lmm.models.llama import _llama_key

    dtype = torch.bfloat16
    cfg_kw, B, S, n_vis = _configs(device, quick)
    levels_n = 3
    torch.manual_seed(0)
    with torch.device(device):
        hf_cfg = transformers.LlamaConfig(**cfg_kw, attn_implementation="sdpa")
        hf = transformers.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    ours = _build_ours(Llama, LlamaConfig, _llama_key, hf)

    g = torch.Generator().manual_seed(0)
    D = cfg_kw["hidden_size"]
    emb = (0.02 * torch.randn(B, S, D, generator=g)).to(dtype).to(device)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, 35:35 + n_vis] = True                        # LLaVA: system prompt, then the image
    mask = mask.to(device)
    levels = [(0.02 * torch.randn(B * n_vis, D, generator=g)).to(dtype).to(device)
              for _ in range(levels_n)]

    for k in range(levels_n):                            # Qwen3-VL's _deepstack_process as hooks
        def hook(mod, args, out, e=levels[k]):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[mask, :] = h[mask, :] + e.to(h.dtype)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        hf.model.layers[k].register_forward_hook(hook)

    has_fa = hasattr(torch.ops.hires_lmm, "flash_attn_func")
    backend = "kernels" if has_fa else "reference"       # before the attention kernels are merged

    @torch.no_grad()
    def run_ours():
        with hires_lmm.use_backend(backend):
            return ours(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels)

    @torch.no_grad()
    def run_hf(impl):
        hf.config._attn_implementation = impl
        for layer in hf.model.layers:
            layer.self_attn.config._attn_implementation = impl
        return hf(inputs_embeds=emb).logits

    def rel_err():
        a, b = run_ours().float(), run_hf("sdpa").float()
        return ((a - b).abs().max() / b.abs().max()).item()

    name = (f"L{cfg_kw['num_hidden_layers']} D{D} B{B} S{S} nv={n_vis} ds=3"
            + ("" if has_fa else " (ref attn)"))
    return [Case("llama_deepstack_prefill", name, dtype, run_ours,
                 {"hf_sdpa": lambda: run_hf("sdpa"), "hf_eager": lambda: run_hf("eager")},
                 flops=_flops(cfg_kw, B, S), max_err=rel_err, tol=3e-2)]


def _build_ours(Llama, LlamaConfig, key_map, hf):
    """Our Llama on the HF model's own weight tensors (no copy)."""
    cfg = LlamaConfig.from_dict(hf.config.to_dict())
    with torch.device("meta"):
        m = Llama(cfg)
    sd = {key_map(k): v for k, v in hf.state_dict().items() if key_map(k) is not None}
    m.load_state_dict(sd, strict=True, assign=True)
    return m.eval()
