"""Llama against Hugging Face LlamaForCausalLM on small random configs saved as safetensors:
logits (RoPE variants, GQA, tied/untied, sharded), DeepStack-L against HF plus a hook-based
injection after layers 0..L-1, KV-cache decoding, greedy generate, strict loading errors."""
import json
import os

import zlib

import pytest
import torch

import hires_lmm
from hires_lmm.models import KVCache, Llama, LlamaConfig
from conftest import DEVICES

transformers = pytest.importorskip("transformers")

HAS_FA = hasattr(torch.ops.hires_lmm, "flash_attn_func")
BACKENDS = ["reference", pytest.param("kernels", marks=pytest.mark.skipif(
    not HAS_FA, reason="torch.ops.hires_lmm.flash_attn_func not built in this branch yet"))]

VOCAB = 97
ROPES = {
    "none": None,
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def _hf_config(rope="none", tied=False, layers=3, bias=False, max_pos=64):
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_pos,
              rms_norm_eps=1e-5, tie_word_embeddings=tied, attention_bias=bias, mlp_bias=bias,
              attn_implementation="eager")
    if ROPES[rope] is not None:
        kw["rope_scaling"] = dict(ROPES[rope])
    return transformers.LlamaConfig(**kw)


_CACHE = {}


def _pair(tmp_path_factory, rope="none", tied=False, layers=3, bias=False, shard=False):
    """(HF model fp32 eval, checkpoint dir) for one variant; built once per session."""
    key = (rope, tied, layers, bias, shard)
    if key not in _CACHE:
        torch.manual_seed(zlib.crc32(repr(key).encode()) % 1000)  # not hash(): salted per process
        hf = transformers.LlamaForCausalLM(_hf_config(rope, tied, layers, bias)).eval()
        # random norms so a wrong norm weight cannot hide
        with torch.no_grad():
            for n, p in hf.named_parameters():
                if "norm" in n or n.endswith("bias"):
                    p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in n else 0.1 * torch.randn_like(p))
        d = str(tmp_path_factory.mktemp("llama"))
        hf.save_pretrained(d, safe_serialization=True, **({"max_shard_size": "40KB"} if shard else {}))
        _CACHE[key] = (hf, d)
    return _CACHE[key]


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rope,tied,shard,bias", [
    ("none", True, False, False), ("llama3", False, True, False), ("linear", False, False, True)])
def test_logits_match_hf(tmp_path_factory, backend, rope, tied, shard, bias):
    hf, d = _pair(tmp_path_factory, rope, tied, shard=shard, bias=bias)
    if shard:
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))
    hires_lmm.set_backend(backend)
    m = Llama.from_pretrained(d)
    assert (m.lm_head is None) == tied
    ids = torch.randint(0, VOCAB, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        out = m(ids)
    assert out.shape == (2, 37, VOCAB)
    assert _rel(out, ref) < 1e-4


def test_dynamic_rope_past_max_positions(tmp_path_factory):
    hf, d = _pair(tmp_path_factory, "dynamic", layers=2)
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    for S in (40, 90):                       # below and above max_position_embeddings = 64
        ids = torch.randint(0, VOCAB, (1, S))
        with torch.no_grad():
            assert _rel(m(ids), hf(ids).logits) < 1e-4


def test_config_from_transformers4_keys():
    d = {"vocab_size": 10, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
         "num_attention_heads": 4, "rope_theta": 500000.0,
         "rope_scaling": {"type": "linear", "factor": 4.0}}
    c = LlamaConfig.from_dict(d)
    assert c.num_key_value_heads == 4 and c.head_dim == 8 and c.rope_theta == 500000.0
    assert c.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(ValueError, match="rope_scaling"):
        LlamaConfig.from_dict({**d, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.from_dict({**d, "num_key_value_heads": 3})


def _visual_mask(B, S):
    """Uneven visual counts per sample, one sample with none, non-contiguous spans."""
    m = torch.zeros(B, S, dtype=torch.bool)
    m[0, 3:9] = True
    m[0, 12:14] = True
    if B > 2:
        m[2, 1:11] = True
    return m                                   # sample 1: no visual tokens


def _hf_with_hooks(hf, mask, levels):
    """HF plus the Qwen3-VL injection after decoder layer k, done in PyTorch by forward hooks."""
    handles = []
    for k, e in enumerate(levels[: len(hf.model.layers)]):
        def hook(mod, args, out, e=e):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[mask, :] = h[mask, :] + e.to(h.dtype)
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handles.append(hf.model.layers[k].register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layers,n_levels", [(3, 3), (2, 3), (3, 1)])
def test_deepstack_matches_hf_hooks(tmp_path_factory, backend, layers, n_levels):
    # (2, 3): the level after the last layer fuses into the final norm, the third is ignored
    hf, d = _pair(tmp_path_factory, "llama3", layers=layers)
    hires_lmm.set_backend(backend)
    m = Llama.from_pretrained(d)
    B, S = 3, 19
    torch.manual_seed(1)
    emb = torch.randn(B, S, 64)
    mask = _visual_mask(B, S)
    levels = [torch.randn(int(mask.sum()), 64) for _ in range(n_levels)]
    handles = _hf_with_hooks(hf, mask, levels)
    try:
        with torch.no_grad():
            ref = hf(inputs_embeds=emb).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = m(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels)
        plain = m(inputs_embeds=emb)
    assert _rel(out, ref) < 1e-4
    assert _rel(plain, ref) > 1e-3              # the injection changed something
    # text-only sample (row 1) sees nothing of the visual rows of other samples
    assert _rel(out[1], plain[1]) < 1e-6


@pytest.mark.parametrize("schedule", [[0, 2, 3], [1, 2], [3]])
def test_deepstack_layers_schedule_matches_hf_pre_hooks(tmp_path_factory, schedule):
    """deepstack_layers: level k added BEFORE decoder layer schedule[k] (3 = before the final
    norm), in forward and in the packed prefill (rows = visual_index of the packed tokens)."""
    from hires_lmm.models.llama import StaticKVCache
    hf, d = _pair(tmp_path_factory, "llama3", layers=3)
    hires_lmm.set_backend("kernels")
    m = Llama.from_pretrained(d)
    B, S = 3, 19
    torch.manual_seed(2)
    emb = torch.randn(B, S, 64)
    mask = _visual_mask(B, S)
    levels = [torch.randn(int(mask.sum()), 64) for _ in schedule]
    handles = []
    for layer, e in zip(schedule, levels):
        def pre(mod, args, kwargs, e=e):
            x = (args[0] if args else kwargs["hidden_states"]).clone()
            x[mask, :] = x[mask, :] + e
            if args:
                return (x,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": x}
        target = hf.model.layers[layer] if layer < 3 else hf.model.norm
        handles.append(target.register_forward_pre_hook(pre, with_kwargs=True))
    try:
        with torch.no_grad():
            ref = hf(inputs_embeds=emb).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = m(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels,
                deepstack_layers=schedule)
        cache = StaticKVCache(m.config, B, S, torch.float32, "cpu")
        cu = torch.arange(B + 1, dtype=torch.int32) * S
        packed = m.forward_packed(emb.reshape(B * S, 64), cu, S, cache, last_only=False,
                                  visual_index=mask.reshape(-1).nonzero()[:, 0],
                                  deepstack_visual_embeds=levels, deepstack_layers=schedule)
    assert _rel(out, ref) < 1e-4
    assert _rel(packed.view(B, S, -1), ref) < 1e-4
    with pytest.raises(ValueError, match="deepstack_layers"):
        m(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels,
          deepstack_layers=[4] * len(levels))


def test_deepstack_no_visual_tokens_is_noop(tmp_path_factory):
    hf, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    with torch.no_grad():
        out = m(ids, visual_pos_masks=mask, deepstack_visual_embeds=[torch.zeros(0, 64)] * 3)
        assert torch.equal(out, m(ids))


def test_deepstack_bad_input(tmp_path_factory):
    _, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    ids = torch.randint(0, VOCAB, (3, 19))
    mask = _visual_mask(3, 19)
    n = int(mask.sum())
    with pytest.raises(ValueError, match="deepstack_visual_embeds"):
        m(ids, visual_pos_masks=mask, deepstack_visual_embeds=[torch.randn(n - 1, 64)])
    with pytest.raises(ValueError, match="deepstack_visual_embeds"):   # no silent broadcast
        m(ids, visual_pos_masks=mask, deepstack_visual_embeds=[torch.randn(1, 64)])
    with pytest.raises(ValueError, match="visual_pos_masks"):
        m(ids, deepstack_visual_embeds=[torch.randn(n, 64)])
    with pytest.raises(ValueError, match="visual_pos_masks"):
        m(ids, visual_pos_masks=mask[:, :5], deepstack_visual_embeds=[torch.randn(n, 64)])
    with pytest.raises(ValueError, match="input_ids"):
        m()


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_decode_equals_full_forward(tmp_path_factory, backend):
    hf, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend(backend)
    m = Llama.from_pretrained(d)
    B, S = 2, 27
    emb = torch.randn(B, S, 64)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, 2:8] = True
    mask[1, 8:10] = True
    levels = [torch.randn(int(mask.sum()), 64) for _ in range(2)]
    with torch.no_grad():
        full = m(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels)
        P = 20                                   # prefill (all visual tokens inside), then steps
        logits, cache = m(inputs_embeds=emb[:, :P], visual_pos_masks=mask[:, :P],
                          deepstack_visual_embeds=levels, use_cache=True)
        parts = [logits]
        logits, cache = m(inputs_embeds=emb[:, P:P + 3], cache=cache)   # a 3-token chunk
        parts.append(logits)
        for t in range(P + 3, S):                # one token at a time; decode injects nothing
            logits, cache = m(inputs_embeds=emb[:, t:t + 1], past_key_values=cache)
            parts.append(logits)
    assert cache.length == S
    assert _rel(torch.cat(parts, 1), full) < 1e-5


@pytest.mark.parametrize("tied", [False, True])
def test_generate_matches_hf_greedy(tmp_path_factory, tied):
    hf, d = _pair(tmp_path_factory, "none" if tied else "llama3", tied=tied)
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(7))
    out = m.generate(ids, max_new_tokens=8)
    assert out.shape == (2, 17)
    assert torch.equal(out[:, :9], ids)
    # Each generated token is HF's greedy choice given the same prefix. Teacher-forced against HF
    # (not token equality with hf.generate) so that a near-tie between two logits, where fp32
    # rounding order may pick either, cannot flip the test; a wrong token still fails it.
    with torch.no_grad():
        logits = hf(out).logits
    for step in range(8):
        pos = 9 + step - 1
        chosen = out[:, 9 + step]
        top = logits[:, pos].max(-1).values
        got = logits[:, pos].gather(1, chosen[:, None]).squeeze(1)
        assert (top - got <= 1e-4 * top.abs().clamp(min=1)).all(), (step, top, got)


def test_bf16_close_to_hf(tmp_path_factory):
    hf, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d, dtype=torch.bfloat16)
    assert m.embed_tokens.weight.dtype == torch.bfloat16
    B, S = 3, 19
    emb = torch.randn(B, S, 64)
    mask = _visual_mask(B, S)
    levels = [torch.randn(int(mask.sum()), 64) for _ in range(3)]   # fp32 levels, cast inside
    handles = _hf_with_hooks(hf, mask, levels)
    try:
        with torch.no_grad():
            ref = hf(inputs_embeds=emb).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        out = m(inputs_embeds=emb.bfloat16(), visual_pos_masks=mask, deepstack_visual_embeds=levels)
    assert out.dtype == torch.bfloat16
    assert _rel(out, ref) < 5e-2


def _rewrite(src, dst, fn):
    """Copy a checkpoint, transforming its state dict with fn(dict) -> dict."""
    from safetensors.torch import load_file, save_file
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file(fn(load_file(os.path.join(src, "model.safetensors"))),
              os.path.join(dst, "model.safetensors"))
    return dst


def test_load_errors_list_every_bad_key(tmp_path_factory, tmp_path):
    _, d = _pair(tmp_path_factory, "none", tied=True)

    def damage(sd):
        sd = dict(sd)
        del sd["model.layers.1.mlp.up_proj.weight"]
        sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
        sd["model.layers.9.extra.weight"] = torch.zeros(2)
        return sd

    bad = _rewrite(d, str(tmp_path / "bad"), damage)
    with pytest.raises(ValueError) as e:
        Llama.from_pretrained(bad)
    msg = str(e.value)
    assert "missing" in msg and "layers.1.mlp.up_proj.weight" in msg
    assert "unexpected" in msg and "model.layers.9.extra.weight" in msg
    assert "mis-shaped" in msg and "q_proj" in msg
    # an old-style checkpoint with rotary inv_freq buffers and a tied lm_head copy still loads
    ok = _rewrite(d, str(tmp_path / "ok"), lambda sd: {
        **sd, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8),
        "lm_head.weight": sd["model.embed_tokens.weight"].clone()})
    Llama.from_pretrained(ok)
    with pytest.raises(FileNotFoundError, match="dir"):
        Llama.from_pretrained(str(tmp_path / "nothing"))


def test_kv_cache_grows():
    c = KVCache(1)
    k = torch.randn(1, 3, 2, 4)
    kk, vv = c.update(0, k, k + 1, 0)
    assert torch.equal(kk, k)
    k2 = torch.randn(1, 5, 2, 4)
    kk, vv = c.update(0, k2, k2 + 1, 3)
    assert kk.shape == (1, 8, 2, 4) and torch.equal(kk[:, :3], k) and torch.equal(vv[:, 3:], k2 + 1)


def test_bench_models_quick_case_runs():
    from hires_lmm.bench.bench_models import cases
    (case,) = cases("cpu", quick=True)
    assert case.ours().shape[-1] == 512
    assert case.max_err() <= case.tol
    assert set(case.references) == {"hf_sdpa", "hf_eager"} and case.flops > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_deepstack_and_decode_on_device(tmp_path_factory, device, backend):
    """bf16 on each device (the CUDA attention kernels take fp16/bf16): DeepStack prefill against
    HF + hooks, then cached decode steps against the full forward."""
    import copy
    hf, d = _pair(tmp_path_factory, "llama3")
    hf = copy.deepcopy(hf).to(device=device, dtype=torch.bfloat16)
    hires_lmm.set_backend(backend)
    m = Llama.from_pretrained(d, dtype=torch.bfloat16, device=device)
    B, S = 3, 19
    torch.manual_seed(3)
    emb = torch.randn(B, S, 64).to(device, torch.bfloat16)
    mask = _visual_mask(B, S).to(device)
    levels = [torch.randn(int(mask.sum()), 64, device=device) for _ in range(3)]
    handles = _hf_with_hooks(hf, mask, levels)
    try:
        with torch.no_grad():
            ref = hf(inputs_embeds=emb).logits
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        full = m(inputs_embeds=emb, visual_pos_masks=mask, deepstack_visual_embeds=levels)
        logits, cache = m(inputs_embeds=emb[:, :15], visual_pos_masks=mask[:, :15],
                          deepstack_visual_embeds=levels, use_cache=True)
        steps = [logits]
        for t in range(15, S):
            logits, cache = m(inputs_embeds=emb[:, t:t + 1], cache=cache)
            steps.append(logits)
    assert full.device.type == device and full.dtype == torch.bfloat16
    assert _rel(full, ref) < 5e-2
    assert _rel(torch.cat(steps, 1), full) < 3e-2


def test_deepstack_gradients_match_hf_hooks(tmp_path_factory):
    """Autograd through the fused injection: d loss / d levels and d loss / d inputs_embeds."""
    hf, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    B, S = 3, 19
    emb = torch.randn(B, S, 64)
    mask = _visual_mask(B, S)
    levels = [torch.randn(int(mask.sum()), 64) for _ in range(2)]
    w = torch.randn(B, S, VOCAB)

    def grads(run):
        e = emb.clone().requires_grad_(True)
        ls = [x.clone().requires_grad_(True) for x in levels]
        (run(e, ls) * w).sum().backward()
        return [e.grad] + [x.grad for x in ls]

    def run_hf(e, ls):
        hs = _hf_with_hooks(hf, mask, ls)
        try:
            return hf(inputs_embeds=e).logits
        finally:
            for h in hs:
                h.remove()

    ours = grads(lambda e, ls: m(inputs_embeds=e, visual_pos_masks=mask, deepstack_visual_embeds=ls))
    ref = grads(run_hf)
    for a, b in zip(ours, ref):
        assert _rel(a, b) < 1e-4


def test_generate_with_deepstack_matches_recompute(tmp_path_factory):
    """generate() (prefill with injection, cached steps without) == argmax of a full forward
    recomputed at every step with the prompt's injection."""
    hf, d = _pair(tmp_path_factory, "llama3")
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    B, S, new = 3, 19, 5
    ids = torch.randint(0, VOCAB, (B, S))
    emb = m.embed_tokens(ids).detach()
    mask = _visual_mask(B, S)
    levels = [torch.randn(int(mask.sum()), 64) for _ in range(3)]
    got = m.generate(None, new, inputs_embeds=emb, visual_pos_masks=mask,
                     deepstack_visual_embeds=levels)
    assert got.shape == (B, new)
    seq = ids
    with torch.no_grad():
        for _ in range(new):
            full_mask = torch.cat([mask, torch.zeros(B, seq.shape[1] - S, dtype=torch.bool)], 1)
            nxt = m(seq, visual_pos_masks=full_mask, deepstack_visual_embeds=levels)[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(got, seq[:, S:])


def test_generate_eos_stops_and_pads(tmp_path_factory):
    _, d = _pair(tmp_path_factory, "none", tied=True)
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    ids = torch.randint(0, VOCAB, (2, 7))
    free = m.generate(ids, 6)
    eos = int(free[0, 7])                          # sample 0 ends at once
    out = m.generate(ids, 6, eos_token_id=eos)
    assert torch.all(out[0, 7:] == eos)
    hit = (free[1, 7:] == eos).nonzero()
    n1 = 6 if len(hit) == 0 else int(hit[0]) + 1   # sample 1 runs until its own eos
    assert torch.equal(out[1, 7:7 + n1], free[1, 7:7 + n1])
    assert out.shape[1] == 7 + n1 if len(hit) else out.shape[1] == 13


def test_generate_dynamic_rope_across_max_positions(tmp_path_factory):
    """Dynamic NTK: decoding past max_position_embeddings re-derives the frequencies per step
    (cached keys keep the old rotation), as HF's dynamic_rope_update does."""
    hf, d = _pair(tmp_path_factory, "dynamic", layers=2)
    hires_lmm.set_backend("reference")
    m = Llama.from_pretrained(d)
    ids = torch.randint(0, VOCAB, (1, 60))
    out = m.generate(ids, max_new_tokens=8)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8,
                      attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert torch.equal(out, ref)
