"""DeepStack parity with the real implementation: Hugging Face Qwen3-VL's text model.

`Qwen3VLTextModel._deepstack_process` is the reference the spec quotes (clone, masked gather, add,
scatter). Our op must be bit-identical with it, alone and inside a whole forward pass of a small
random Qwen3-VL text model with three DeepStack levels and uneven visual counts per sample."""
import pytest
import torch

from hires_lmm import ops
from conftest import DEVICES

transformers = pytest.importorskip("transformers")
qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl")


def _tiny_model(dtype, device):
    cfg = transformers.models.qwen3_vl.configuration_qwen3_vl.Qwen3VLTextConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    torch.manual_seed(0)
    return qwen3_vl.Qwen3VLTextModel(cfg).eval().to(device=device, dtype=dtype)


def _mask(B, S, device):
    m = torch.zeros(B, S, dtype=torch.bool)
    m[0, 2:9] = True          # 7 visual tokens
    m[2, [1, 4, 5, 11]] = True  # 4, not contiguous; sample 1 has none
    return m.to(device)


def _ours(hidden, mask, embeds):
    return ops.deepstack_inject(hidden, embeds, ops.visual_index(mask))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("edtype", [torch.float32, torch.bfloat16])
def test_bit_exact_with_deepstack_process(device, dtype, edtype):
    model = _tiny_model(torch.float32, device)
    mask = _mask(3, 13, device)
    hidden = torch.randn(3, 13, 64, device=device).to(dtype)
    embeds = torch.randn(int(mask.sum()), 64, device=device).to(edtype)
    expect = model._deepstack_process(hidden, mask, embeds)
    assert torch.equal(_ours(hidden, mask, embeds), expect)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_forward_with_our_injection(device, dtype):
    """Swapping HF's injection for ours leaves a whole DeepStack forward pass bit-identical."""
    model = _tiny_model(dtype, device)
    B, S = 3, 13
    mask = _mask(B, S, device)
    embeds = torch.randn(B, S, 64, device=device).to(dtype)
    levels = [torch.randn(int(mask.sum()), 64, device=device).to(dtype) for _ in range(3)]
    with torch.no_grad():
        expect = model(inputs_embeds=embeds, visual_pos_masks=mask,
                       deepstack_visual_embeds=levels).last_hidden_state
        plain = model(inputs_embeds=embeds).last_hidden_state
        calls = []

        def counted(h, m, e):
            calls.append(1)
            return _ours(h, m, e)

        model._deepstack_process = counted  # instance attribute shadows the method
        got = model(inputs_embeds=embeds, visual_pos_masks=mask,
                    deepstack_visual_embeds=levels).last_hidden_state
    assert len(calls) == 3  # after decoder layers 0, 1, 2
    assert torch.equal(got, expect)
    assert not torch.equal(expect, plain)  # the levels did change the result
