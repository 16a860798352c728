"""hires_lmm.accelerate on small random Hugging Face models: outputs before vs after within
tolerance, the patched paths are taken (call counts), idempotence, undo, and the fallbacks."""
import copy
import logging
import sys

import pytest
import torch

import hires_lmm
from hires_lmm import accelerate
from conftest import DEVICES

transformers = pytest.importorskip("transformers")
qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")

# relative to the largest output magnitude (before vs after, same dtype)
RTOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def _close(got, ref, dtype):
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= RTOL[dtype] * max(scale, 1e-6), (err, scale)


def _counts():
    return dict(accelerate.call_counts)


@pytest.fixture(autouse=True)
def _clear_counts():
    accelerate.call_counts.clear()
    yield


# ---- models -----------------------------------------------------------------------------------
def _convnext(dtype, device, drop_path_rate=0.0):
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=4, hidden_sizes=[16, 24, 40],
                                      depths=[2, 1, 2], num_stages=3, layer_scale_init_value=1e-6,
                                      drop_path_rate=drop_path_rate, image_size=32)
    torch.manual_seed(0)
    m = transformers.ConvNextModel(cfg)
    with torch.no_grad():  # non-trivial layer scales, so the blocks matter
        for layer in m.modules():
            if type(layer).__name__ == "ConvNextLayer":
                layer.layer_scale_parameter.copy_(torch.rand_like(layer.layer_scale_parameter) + 0.5)
    return m.eval().to(device=device, dtype=dtype)


def _llama(dtype, device, attn="sdpa", **kw):
    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   attn_implementation=attn, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)


def _clip(dtype, device):
    cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    return transformers.CLIPVisionModel(cfg).eval().to(device=device, dtype=dtype)


def _qwen3vl(dtype, device):
    cfg = transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VLTextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    torch.manual_seed(0)
    return qwen3_vl.Qwen3VLTextModel(cfg).eval().to(device=device, dtype=dtype)


def _qwen3vl_inputs(dtype, device):
    B, S = 3, 13
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 2:9] = True
    mask[2, [1, 4, 5, 11]] = True
    mask = mask.to(device)
    g = torch.Generator().manual_seed(1)
    embeds = torch.randn(B, S, 64, generator=g).to(device=device, dtype=dtype)
    levels = [torch.randn(int(mask.sum()), 64, generator=g).to(device=device, dtype=dtype)
              for _ in range(3)]
    return dict(inputs_embeds=embeds, visual_pos_masks=mask, deepstack_visual_embeds=levels)


# ---- parity + the paths taken -----------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_convnext_model(device, dtype):
    m = _convnext(dtype, device)
    x = torch.randn(2, 3, 32, 32).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref = m(x)
        assert hires_lmm.accelerate(m) is m
        assert m._hires_lmm_patched["convnext"] == 5
        assert m._hires_lmm_patched["layer_norm"] == 1  # the pooler's nn.LayerNorm
        got = m(x)
    assert _counts()["convnext"] == 5 and "convnext_fallback" not in _counts()
    _close(got.last_hidden_state, ref.last_hidden_state, dtype)
    _close(got.pooler_output, ref.pooler_output, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama(device, dtype):
    m = _llama(dtype, device)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = m(ids).logits
        hires_lmm.accelerate(m)
        assert m.config._attn_implementation == "hires_lmm"
        assert m._hires_lmm_patched["attention"] == 2 and m._hires_lmm_patched["rms_norm"] == 5
        got = m(ids).logits
    c = _counts()
    assert c["attention"] == 2 and c["rms_norm"] == 5 and "attention_fallback" not in c
    _close(got, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_llama_generate_with_kv_cache(device):
    """Prefill (causal) then decode (one query row, all keys) through our kernel."""
    m = _llama(torch.float32, device)
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(2)).to(device)
    ref = m.generate(ids, max_new_tokens=6, do_sample=False)
    hires_lmm.accelerate(m)
    got = m.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, ref)
    assert _counts()["attention"] == 2 * 6 and "attention_fallback" not in _counts()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_clip_vision(device, dtype):
    m = _clip(dtype, device)
    x = torch.randn(2, 3, 32, 32).to(device=device, dtype=dtype)
    with torch.no_grad():
        ref = m(x, output_hidden_states=True)
        hires_lmm.accelerate(m)
        # pre_layrnorm, 2 x (layer_norm1, layer_norm2), post_layernorm
        assert m._hires_lmm_patched["layer_norm"] == 6 and m._hires_lmm_patched["attention"] == 2
        got = m(x, output_hidden_states=True)
    c = _counts()
    assert c["attention"] == 2 and c["layer_norm"] == 6 and "attention_fallback" not in c
    _close(got.last_hidden_state, ref.last_hidden_state, dtype)
    _close(got.hidden_states[-2], ref.hidden_states[-2], dtype)
    _close(got.pooler_output, ref.pooler_output, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qwen3vl_text_with_deepstack(device, dtype):
    m = _qwen3vl(dtype, device)
    inputs = _qwen3vl_inputs(dtype, device)
    with torch.no_grad():
        ref = m(**inputs).last_hidden_state
        plain = m(inputs_embeds=inputs["inputs_embeds"]).last_hidden_state
        hires_lmm.accelerate(m)
        p = m._hires_lmm_patched
        # 4 layers x (input, post-attention, q_norm, k_norm) + final norm
        assert p["deepstack"] == 1 and p["attention"] == 4 and p["rms_norm"] == 17
        got = m(**inputs).last_hidden_state
    c = _counts()
    assert c["deepstack"] == 3 and c["attention"] == 4 and c["rms_norm"] == 4 * 4 + 1
    assert "attention_fallback" not in c and "deepstack_fallback" not in c
    _close(got, ref, dtype)
    assert not torch.allclose(ref, plain)  # DeepStack changed the result


@pytest.mark.parametrize("device", DEVICES)
def test_qwen3vl_deepstack_alone_is_bit_exact(device):
    """With only the injection swapped in, a whole forward is bit-identical with HF, and the
    visual index is built once per forward (cached for the 3 levels)."""
    m = _qwen3vl(torch.float32, device)
    inputs = _qwen3vl_inputs(torch.float32, device)
    calls = []
    real = hires_lmm.ops.visual_index
    with torch.no_grad():
        ref = m(**inputs).last_hidden_state
        hires_lmm.accelerate(m, attention=False, norms=False)
        hires_lmm.ops.visual_index = lambda mask: (calls.append(1), real(mask))[1]
        try:
            got = m(**inputs).last_hidden_state
        finally:
            hires_lmm.ops.visual_index = real
    assert torch.equal(got, ref)
    assert _counts()["deepstack"] == 3 and len(calls) == 1



@pytest.mark.parametrize("device", DEVICES)
def test_qwen3vl_full_model_with_vision(device):
    """Qwen3VLForConditionalGeneration end to end: vision blocks (per-image attention, LayerNorms,
    DeepStack mergers) and the text model with DeepStack, all patched through one call."""
    from transformers.models.qwen3_vl import configuration_qwen3_vl as qc
    text = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                max_position_embeddings=256,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": [2, 3, 3]})
    vis = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
               num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2])
    cfg = qc.Qwen3VLConfig(text_config=text, vision_config=vis, image_token_id=90,
                           video_token_id=91, vision_start_token_id=92, vision_end_token_id=93)
    torch.manual_seed(0)
    m = qwen3_vl.Qwen3VLForConditionalGeneration(cfg).eval().to(device)
    grid = torch.tensor([[1, 8, 8], [1, 4, 4]], device=device)  # 16 + 4 merged tokens
    g = torch.Generator().manual_seed(6)
    pix = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * 4 * 4, generator=g).to(device)
    ids = torch.randint(0, 80, (2, 30), generator=g)
    ids[0, 2], ids[0, 3:19], ids[0, 19] = 92, 90, 93
    ids[1, 5], ids[1, 6:10], ids[1, 10] = 92, 90, 93
    ids = ids.to(device)
    inputs = dict(input_ids=ids, pixel_values=pix, image_grid_thw=grid,
                  mm_token_type_ids=(ids == 90).int())
    with torch.no_grad():
        ref = m(**inputs).logits
        hires_lmm.accelerate(m)
        assert m.config.vision_config._attn_implementation == "hires_lmm"
        assert m.config.text_config._attn_implementation == "hires_lmm"
        got = m(**inputs).logits
    c = _counts()
    # vision: 3 blocks x 2 images (HF splits by cu_seqlens), text: 4 layers
    assert c["attention"] == 3 * 2 + 4 and c["deepstack"] == 3 and c["layer_norm"] == 10
    assert "attention_fallback" not in c
    _close(got, ref, torch.float32)


def test_clip_full_model_text_is_causal():
    tc = transformers.CLIPTextConfig(vocab_size=99, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                     pad_token_id=1)
    vc = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4, image_size=32,
                                       patch_size=8)
    cfg = transformers.CLIPConfig(text_config=tc.to_dict(), vision_config=vc.to_dict(),
                                  projection_dim=32)
    torch.manual_seed(0)
    m = transformers.CLIPModel(cfg).eval()
    ids = torch.randint(2, 99, (2, 9), generator=torch.Generator().manual_seed(7))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(input_ids=ids, pixel_values=x)
        hires_lmm.accelerate(m)
        got = m(input_ids=ids, pixel_values=x)
    assert _counts()["attention"] == 4 and "attention_fallback" not in _counts()
    for k in ("logits_per_image", "text_embeds", "image_embeds"):
        _close(got[k], ref[k], torch.float32)


# ---- idempotence, undo, selection -------------------------------------------------------------
def test_idempotent_and_undo():
    m = _llama(torch.float32, "cpu")
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    norm = m.model.norm
    with torch.no_grad():
        ref = m(ids).logits
        hires_lmm.accelerate(m)
        fwd = norm.forward
        report = dict(m._hires_lmm_patched)
        assert hires_lmm.accelerate(m) is m  # second call: nothing
        assert norm.forward == fwd and m._hires_lmm_patched == report
        accelerate.call_counts.clear()
        once = m(ids).logits
        assert _counts()["rms_norm"] == 5 and _counts()["attention"] == 2  # not wrapped twice
        hires_lmm.accelerate(m, undo=True)
        assert "forward" not in norm.__dict__ and not hasattr(m, "_hires_lmm_patched")
        assert m.config._attn_implementation == "sdpa"
        accelerate.call_counts.clear()
        back = m(ids).logits
        assert _counts() == {}
        hires_lmm.accelerate(m, undo=True)  # undo twice: nothing
        hires_lmm.accelerate(m)             # and again
        again = m(ids).logits
    assert torch.equal(back, ref)
    _close(once, ref, torch.float32)
    assert torch.equal(again, once)


def test_families_can_be_turned_off():
    m = _llama(torch.float32, "cpu")
    hires_lmm.accelerate(m, attention=False)
    assert m._hires_lmm_patched["attention"] == 0 and m.config._attn_implementation == "sdpa"
    assert m._hires_lmm_patched["rms_norm"] == 5
    c = _convnext(torch.float32, "cpu")
    hires_lmm.accelerate(c, convnext=False, norms=False)
    assert c._hires_lmm_patched["convnext"] == 0 and c._hires_lmm_patched["layer_norm"] == 0


def test_deepcopy_of_patched_model_runs():
    m = hires_lmm.accelerate(_clip(torch.float32, "cpu"))
    m2 = copy.deepcopy(m)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m2(x).last_hidden_state, m(x).last_hidden_state)


# ---- fallbacks --------------------------------------------------------------------------------
def _padded(side, seed=4):
    """2 rows of 10 tokens; row 0 has 3 pad tokens on `side`, row 1 none."""
    ids = torch.randint(1, 101, (2, 10), generator=torch.Generator().manual_seed(seed))
    am = torch.ones(2, 10, dtype=torch.long)
    if side == "left":
        am[0, :3] = 0
    else:
        am[0, 7:] = 0
    ids[am == 0] = 0
    return ids, am


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attn,side", [("sdpa", "left"), ("sdpa", "right"), ("eager", "left")])
def test_padding_runs_varlen(attn, side, device):
    """Pure left/right padding: valid tokens packed through flash_attn_varlen_func; logits at
    valid positions match the unpatched model (and at pad positions too against SDPA)."""
    m = _llama(torch.float32, device, attn=attn)
    ids, am = _padded(side)
    ids, am = ids.to(device), am.to(device)
    valid = am.bool()
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        hires_lmm.accelerate(m)
        got = m(ids, attention_mask=am).logits
        nopad = m(ids[1:]).logits  # no padding -> the dense kernel
    c = _counts()
    assert c["attention_varlen"] == 2 and c["attention"] == 2 + 2
    assert "attention_fallback" not in c
    _close(got[valid], ref[valid], torch.float32)
    if attn == "sdpa":  # pad rows too: all-masked rows are 0 and right-pad rows see valid keys
        _close(got, ref, torch.float32)
    _close(nopad[0], ref[1], torch.float32)


def test_padding_plan_left_right_bidirectional():
    """The plan read from HF masks: pure padding -> varlen (causal or not, queries kept), a
    hole in the middle or a window that cuts -> fallback."""
    A = sys.modules["hires_lmm.accelerate"]
    from transformers.masking_utils import causal_mask_function, sdpa_mask
    from transformers.masking_utils import sliding_window_causal_mask_function as swin

    def plan(am, fn=causal_mask_function, q_offset=0, Sq=None, window=None):
        B, S = am.shape  # S keys (cache slots included)
        Sq = Sq or S - q_offset
        m = sdpa_mask(batch_size=B, q_length=Sq, kv_length=S, q_offset=q_offset, kv_offset=0,
                      mask_function=fn, attention_mask=am.bool(), allow_is_causal_skip=False)
        return A._build_padding_plan(m[:, 0], B, Sq, S, window)

    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    p, r = plan(am)
    assert r is None and p.causal and not p.all_q
    assert p.cu_q.tolist() == [0, 3, 8, 11] and p.cu_k.tolist() == [0, 3, 8, 11]
    assert p.qs.tolist() == [2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2] and (p.max_q, p.max_k) == (5, 5)
    p, r = plan(am, q_offset=4)  # decode step: one query row each, sees every valid key
    assert r is None and p.all_q and p.cu_q.tolist() == [0, 1, 2, 3]
    assert p.cu_k.tolist() == [0, 3, 8, 11]
    assert plan(am, fn=lambda *a: torch.tensor(True))[0].all_q  # bidirectional: every query
    hole = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]])
    assert plan(hole)[1] == "mask_not_padding"
    assert plan(torch.ones(1, 5, dtype=torch.long), fn=swin(2))[1] == "mask_not_padding"
    # ... unless the kernel takes the window: then it is read as causal + window
    p, r = plan(torch.ones(1, 5, dtype=torch.long), fn=swin(2), window=2)
    assert r is None and p.dense and p.causal and p.window_size == (1, 0)
    p, r = plan(am, fn=swin(2), window=2)  # window + left padding (+ right: pad queries)
    assert r == "mask_not_padding"
    p, r = plan(am[:2], fn=swin(2), window=2)
    assert r is None and not p.dense and p.window_size == (1, 0) and p.cu_k.tolist() == [0, 3, 8]
    # a static cache: 8 slots, 5 filled (left padded), decode of the 5th token
    st = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 0]])
    p, r = plan(st, q_offset=4, Sq=1)
    assert r is None and p.ks.tolist() == [1, 2, 3, 4] and p.cu_q.tolist() == [0, 1]
    # its prefill with 2 queries at slots 3, 4 (chunked): causal, offset read from the filled slots
    p, r = plan(st, q_offset=3, Sq=2)
    assert r is None and p.causal and p.qs.tolist() == [0, 1] and p.cu_k.tolist() == [0, 4]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_generate_matches(side, caplog):
    """generate() on a padded batch: left padding runs varlen in prefill and decode; right
    padding runs varlen in prefill, then HF appends after the pads (a hole: logged fallback)."""
    m = _llama(torch.float32, "cpu")
    ids, am = _padded(side, seed=11)
    kw = dict(attention_mask=am, max_new_tokens=4, do_sample=False, pad_token_id=0)
    ref = m.generate(ids, **kw)
    hires_lmm.accelerate(m)
    A = sys.modules["hires_lmm.accelerate"]
    A._logged_reasons.discard(("attention", "mask_not_padding"))
    with caplog.at_level(logging.WARNING, logger="hires_lmm.accelerate"):
        got = m.generate(ids, **kw)
    assert torch.equal(got, ref)
    c = _counts()
    if side == "left":
        assert c["attention_varlen"] == 2 * 4 and "attention_fallback" not in c
    else:
        assert c["attention_varlen"] == 2 and c["attention_fallback_mask_not_padding"] == 2 * 3
        logged = [r for r in caplog.records if "mask_not_padding" in r.getMessage()]
        assert len(logged) == 1  # once per reason, not per call


def test_custom_float_mask_falls_back():
    """A float (additive) 4-D mask is not read as padding: the original implementation runs."""
    m = _llama(torch.float32, "cpu")
    ids = torch.randint(0, 101, (1, 6), generator=torch.Generator().manual_seed(12))
    mask = torch.zeros(1, 1, 6, 6)
    mask.masked_fill_(torch.ones(6, 6, dtype=torch.bool).triu(1), float("-inf"))
    with torch.no_grad():
        ref = m(ids).logits
        hires_lmm.accelerate(m)
        got = m(ids, attention_mask=mask).logits
    assert _counts()["attention_fallback_mask"] == 2
    _close(got, ref, torch.float32)


def test_attention_dropout_in_training_falls_back():
    m = _llama(torch.float32, "cpu", attention_dropout=0.5)
    hires_lmm.accelerate(m)
    m.train()
    ids = torch.randint(0, 101, (1, 6))
    m(ids)
    assert _counts()["attention_fallback_dropout"] == 2 and "attention" not in _counts()
    accelerate.call_counts.clear()
    m.eval()
    with torch.no_grad():
        m(ids)
    assert _counts()["attention"] == 2


def test_training_gradients_match():
    """With gradients needed, attention stays on the kernel (its FlashAttention-2 backward) and
    the norms stay ours; the gradients match HF's."""
    ref_m = _llama(torch.float32, "cpu").train()
    m = hires_lmm.accelerate(_llama(torch.float32, "cpu").train())
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(5))
    ref_m(ids, labels=ids).loss.backward()
    m(ids, labels=ids).loss.backward()
    c = _counts()
    assert c["attention"] == 2 and not any(k.startswith("attention_fallback") for k in c)
    assert c["rms_norm"] == 5
    for (name, p), q in zip(ref_m.named_parameters(), m.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_convnext_drop_path_in_training_falls_back():
    m = _convnext(torch.float32, "cpu", drop_path_rate=0.3)
    hires_lmm.accelerate(m)
    x = torch.randn(1, 3, 32, 32)
    m.train()
    m(x)
    c = _counts()
    # layer 0 has drop_path 0 (an Identity): it stays on our kernel
    assert c["convnext_fallback"] == 4 and c["convnext"] == 1
    accelerate.call_counts.clear()
    m.eval()
    with torch.no_grad():
        m(x)
    assert _counts()["convnext"] == 5


def test_norm_dtype_mismatch_falls_back():
    """fp32 weights with a bf16 input: HF promotes to fp32; we leave that to HF."""
    m = _llama(torch.float32, "cpu")
    hires_lmm.accelerate(m)
    norm = m.model.norm
    x = torch.randn(2, 5, 64).bfloat16()
    out = norm(x)
    assert out.dtype == torch.float32 and _counts()["rms_norm_fallback"] == 1
    hires_lmm.accelerate(m, undo=True)
    assert torch.equal(norm(x), out)


def test_output_attentions_falls_back_to_eager_weights():
    m = _llama(torch.float32, "cpu", attn="eager")
    ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        ref = m(ids, output_attentions=True)
        hires_lmm.accelerate(m)
        got = m(ids, output_attentions=True)
    assert _counts()["attention_fallback_output_attentions"] == 2 and "attention" not in _counts()
    assert len(got.attentions) == 2
    for a, b in zip(got.attentions, ref.attentions):
        torch.testing.assert_close(a, b)


def test_llama_generate_with_static_cache():
    """Static cache: the prefill has no mask and Sk (cache length) > Sq, so the empty slots are
    sliced off before our kernel (as SDPA does); decode steps carry a mask whose valid keys are
    the filled slots: varlen (dense once the cache is full)."""
    m = _llama(torch.float32, "cpu")
    ids = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(9))
    ref = m.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    hires_lmm.accelerate(m)
    got = m.generate(ids, max_new_tokens=5, do_sample=False, cache_implementation="static")
    assert torch.equal(got, ref)
    c = _counts()
    # cache of 7 + 5 - 1 slots: the last decode step fills it (no empty slot: dense kernel)
    assert c["attention"] == 2 + 2 * 4 and c["attention_varlen"] == 2 * 3
    assert "attention_fallback" not in c
