"""Convergence test in the spirit of Liger-Kernel's: a mini multimodal model -- a ConvNeXt tower
with a 5th stage (ConvLLaVA) feeding a mini Llama through DeepStack-L (the tower's tokens are the
visual rows' input embeddings and two more projections are the DeepStack levels) -- trained 20
AdamW steps on fixed random data, once on the kernels backend (our forward and backward kernels:
norm_backward, whatever attention/convnext backward is registered) and once on the reference
backend (plain PyTorch autograd through hires_lmm.reference). CPU, fp32.

Stated tolerance: the two loss curves agree to a relative 1e-4 at every step, and every final
parameter to an absolute 5e-4 (parameters are O(1) and move by up to 0.06; the kernels and the
reference differ by fp32 rounding order only, which AdamW's normalised steps amplify where a
gradient is near 0). Measured on this CPU: loss curves within 4.3e-7 relative, parameters within
8.0e-5 (reference-recompute attention backward) and 1.0e-4 (the flash_attn_bwd kernel)."""
import copy

import pytest
import torch
import torch.nn as nn

from torch.utils._python_dispatch import TorchDispatchMode

import hires_lmm
from hires_lmm.models.convnext import ConvNeXtConfig, ConvNeXtTower
from hires_lmm.models.llama import Llama, LlamaConfig

STEPS = 20
LOSS_RTOL = 1e-4
PARAM_ATOL = 5e-4


class MiniLMM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tower = ConvNeXtTower(ConvNeXtConfig(hidden_sizes=(8, 12, 16, 16, 24), depths=(1, 1, 1, 1, 1),
                                                  num_stages=5, patch_size=2))
        self.llm = Llama(LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=48,
                                     num_hidden_layers=3, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8))
        self.proj = nn.ModuleList(nn.Linear(24, 32) for _ in range(3))  # embeds + 2 DeepStack levels

    def forward(self, pixels, input_ids, mask):
        tokens = self.tower(pixels).reshape(-1, 24)                   # (Nv, C_last), row-major
        embeds = self.llm.embed_tokens(input_ids)
        flat = embeds.reshape(-1, embeds.shape[-1])
        rows = mask.reshape(-1).nonzero().view(-1)
        embeds = flat.index_put((rows,), self.proj[0](tokens)).view(embeds.shape)
        levels = [self.proj[1](tokens), self.proj[2](tokens)]
        return self.llm(inputs_embeds=embeds, visual_pos_masks=mask, deepstack_visual_embeds=levels)


def _init(model: nn.Module, gen: torch.Generator):
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "gamma":
                p.fill_(0.5)
            elif p.dim() == 1 and ("norm" in name or leaf == "ln_weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 1:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in ** 0.5)


def _data(gen):
    B, S = 2, 10
    pixels = torch.randn(B, 3, 64, 64, generator=gen)             # 64 / (2 * 16) = 2 -> 2 x 2 tokens
    input_ids = torch.randint(0, 48, (B, S), generator=gen)
    targets = torch.randint(0, 48, (B, S), generator=gen)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, 2:6] = True                                            # 4 visual tokens per sequence
    return pixels, input_ids, targets, mask


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _train(model, data, backend, log=None):
    pixels, input_ids, targets, mask = data
    hires_lmm.set_backend(backend)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses = []
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        if step == 0 and log is not None:   # record the ops of one step (forward and backward)
            with log:
                logits = model(pixels, input_ids, mask)
                loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                   targets.reshape(-1))
                loss.backward()
        else:
            logits = model(pixels, input_ids, mask)
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{backend}: no/bad grad {name}"
        opt.step()
        losses.append(loss.item())
    hires_lmm.set_backend("kernels")
    return losses


def test_convergence_kernels_vs_reference():
    gen = torch.Generator().manual_seed(0)
    base = MiniLMM()
    _init(base, gen)
    data = _data(gen)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    log = _OpLog()
    loss_k = _train(ours, data, "kernels", log)
    # the kernels run was really on our kernels, backward included (convnext_block's backward is
    # the op hires_lmm.convnext_block_backward: the conv output recomputed with ATen, then
    # norm_backward and dwconv_backward inside it, below the logging mode)
    for name in ("hires_lmm.rms_norm", "hires_lmm.deepstack_inject_rms_norm", "hires_lmm.layer_norm",
                 "hires_lmm.convnext_block", "hires_lmm.flash_attn_func",
                 "hires_lmm.norm_backward", "hires_lmm.convnext_block_backward"):
        assert name in log.names, (name, sorted(n for n in log.names if "hires" in n))
    loss_r = _train(ref, data, "reference")
    # it trains: the loss falls clearly over 20 steps (random targets: memorisation)
    assert loss_r[-1] < 0.8 * loss_r[0], loss_r
    torch.testing.assert_close(torch.tensor(loss_k), torch.tensor(loss_r), rtol=LOSS_RTOL, atol=0)
    worst = max((p - q).abs().max().item()
                for p, q in zip(ours.parameters(), ref.parameters()))
    assert worst <= PARAM_ATOL, f"largest parameter difference {worst}"
    # and they moved: the comparison is not between two untouched copies
    moved = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), base.parameters()))
    assert moved > 20 * PARAM_ATOL, moved
