"""Swap hires_lmm kernels into an existing Hugging Face `transformers` model, in place.

    model = transformers.LlamaForCausalLM.from_pretrained(...)
    hires_lmm.accelerate(model)                 # same object back, outputs within tolerance
    model._hires_lmm_patched                    # {"attention": 16, "rms_norm": 33, ...}
    hires_lmm.accelerate(model, undo=True)      # back to the original forwards

What is patched (each family can be turned off by its keyword):

- convnext: every `ConvNextLayer` (transformers.models.convnext) runs `ops.convnext_block` (NHWC
  inside: the NCHW input is permuted as a view, the output is returned as an NCHW-shaped view of
  an NHWC tensor, so consecutive layers chain without copies). Layer scale
  (`layer_scale_parameter`, or None) and the layer's LayerNorm eps are passed through. Falls back
  to HF's forward when stochastic depth is active (training with drop_path > 0) or when x and
  the parameters differ in dtype/device. Layers whose structure differs (not a 7x7 depthwise conv
  with padding 3, no biases, channels_first norm, an activation other than exact GELU) are not
  patched at all.
- norms: `LlamaRMSNorm` and `Qwen3VLTextRMSNorm` (and any module of that exact form: `weight`,
  `variance_epsilon`, class name ending in "RMSNorm" from modeling_llama / modeling_qwen3_vl)
  run `ops.rms_norm`; plain `nn.LayerNorm`s (exact type, not subclasses such as ConvNext's
  channels_first norm) with a 1-D normalized shape and an affine weight run `ops.layer_norm`.
  At call time a dtype mismatch between input and weight (e.g. fp32 weights with a bf16 input,
  where HF promotes), another device, an empty input or a hidden size above 16384 takes the
  original forward.
- attention: registers "hires_lmm" in `transformers.AttentionInterface` (and, as its mask
  function, HF's `sdpa_mask`, which yields no mask when there is no padding) and switches the
  model with `model.set_attn_implementation("hires_lmm")`. The function calls
  `ops.flash_attn_func` on (B,S,H,D) views (no transpose copies, GQA without repeat_kv), causal
  from the `is_causal` kwarg or the module's `is_causal` (decode with one query is non-causal,
  like SDPA), `scaling` passed through. It falls back to the module's original implementation
  ("sdpa" or "eager"; anything else -> "sdpa") when:
    * an attention mask is present (padding, packed sequences, custom 4-D masks; with an "eager"
      original the boolean mask is turned into the additive mask eager expects),
    * dropout > 0 (training with attention dropout),
    * `output_attentions` is requested, or softcap / sliding_window / sinks (`s_aux`) /
      position_bias / a paged cache are passed,
    * q, k, v differ in dtype or are not float32/float16/bfloat16, k and v differ in head dim,
      Hq is not a multiple of Hkv, or the head dim exceeds 512.
  Works for Llama (causal, GQA), CLIP (non-causal, `scale`) and Qwen3-VL (text: causal GQA;
  vision: HF splits by cu_seqlens for non-flash implementations and calls us per image).
- deepstack: `Qwen3VLTextModel._deepstack_process` runs `ops.deepstack_inject` (bit-exact with
  HF), computing `ops.visual_index(visual_pos_masks)` once per mask (cached on the module while
  the same mask tensor, unmodified, is passed again: one host sync per forward, not per level).

Idempotent: a second call on a patched model returns it unchanged. Reversible:
`accelerate(model, undo=True)` restores the original forwards and attention implementations.
`model._hires_lmm_patched` reports what was patched (module counts per family);
`accelerate.call_counts` (a Counter) counts kernel calls and fallbacks at run time (in eager
mode; under torch.compile the patched forwards trace into the graph and count once, at trace
time).
"""
from __future__ import annotations

import collections
import sys
import types

import torch
from torch import nn

from . import ops

__all__ = ["accelerate"]

ATTN_NAME = "hires_lmm"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NORM_DIM = 16384
_MAX_HEAD_DIM = 512

# Kernel calls and fallbacks since import (or since .clear()): keys "attention",
# "attention_fallback", "rms_norm", "layer_norm", "convnext", "deepstack" and "<family>_fallback".
call_counts: collections.Counter = collections.Counter()


# ---- norms ------------------------------------------------------------------------------------
def _rms_norm_forward(self, hidden_states):
    w = self.weight
    if (hidden_states.dtype != w.dtype or hidden_states.device != w.device
            or hidden_states.numel() == 0 or hidden_states.shape[-1] != w.numel()
            or w.numel() > _MAX_NORM_DIM or w.dtype not in _FLOAT_DTYPES):
        call_counts["rms_norm_fallback"] += 1
        return type(self).forward(self, hidden_states)
    call_counts["rms_norm"] += 1
    return ops.rms_norm(hidden_states, w, float(self.variance_epsilon))


def _layer_norm_forward(self, x):
    w, b = self.weight, self.bias
    if (x.dtype != w.dtype or x.device != w.device or (b is not None and b.dtype != w.dtype)
            or x.numel() == 0 or x.shape[-1] != w.numel() or w.numel() > _MAX_NORM_DIM
            or w.dtype not in _FLOAT_DTYPES):
        call_counts["layer_norm_fallback"] += 1
        return type(self).forward(self, x)
    call_counts["layer_norm"] += 1
    return ops.layer_norm(x, w, b, float(self.eps))


def _is_hf_rms_norm(m) -> bool:
    cls = type(m)
    return (cls.__name__ in ("LlamaRMSNorm", "Qwen3VLTextRMSNorm")
            and cls.__module__.startswith("transformers.models.")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
            and hasattr(m, "variance_epsilon"))


def _is_plain_layer_norm(m) -> bool:
    return (type(m) is nn.LayerNorm and len(m.normalized_shape) == 1
            and m.weight is not None)


# ---- ConvNext ---------------------------------------------------------------------------------
def _convnext_layer_ok(m) -> bool:
    conv, ln = getattr(m, "dwconv", None), getattr(m, "layernorm", None)
    fc1, fc2 = getattr(m, "pwconv1", None), getattr(m, "pwconv2", None)
    if not all(isinstance(t, nn.Module) for t in (conv, ln, fc1, fc2)):
        return False
    C = conv.in_channels
    act = getattr(m, "act", None)
    exact_gelu = ((isinstance(act, nn.GELU) and act.approximate == "none")
                  or (type(act).__name__ == "GELUActivation"
                      and getattr(act, "act", None) is nn.functional.gelu))
    return (isinstance(conv, nn.Conv2d) and conv.out_channels == C and conv.groups == C
            and tuple(conv.kernel_size) == (7, 7) and tuple(conv.stride) == (1, 1)
            and tuple(conv.padding) == (3, 3) and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros" and conv.bias is not None
            and getattr(ln, "data_format", "channels_last") == "channels_last"
            and isinstance(ln, nn.LayerNorm) and tuple(ln.normalized_shape) == (C,)
            and ln.weight is not None and ln.bias is not None
            and isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)
            and fc1.in_features == C and fc2.out_features == C
            and fc2.in_features == fc1.out_features
            and fc1.bias is not None and fc2.bias is not None and exact_gelu)


def _convnext_forward(self, features):
    dp = self.drop_path
    drop_active = self.training and getattr(dp, "drop_prob", 0.0) > 0.0
    gamma = self.layer_scale_parameter
    params = [self.dwconv.weight, self.dwconv.bias, self.layernorm.weight, self.layernorm.bias,
              self.pwconv1.weight, self.pwconv1.bias, self.pwconv2.weight, self.pwconv2.bias]
    if gamma is not None:
        params.append(gamma)
    if (drop_active or features.dim() != 4 or features.dtype not in _FLOAT_DTYPES
            or any(p.dtype != features.dtype or p.device != features.device for p in params)):
        call_counts["convnext_fallback"] += 1
        return type(self).forward(self, features)
    call_counts["convnext"] += 1
    x = features.permute(0, 2, 3, 1)  # (N,C,H,W) -> (N,H,W,C), a view
    y = ops.convnext_block(x, self.dwconv.weight, self.dwconv.bias, self.layernorm.weight,
                           self.layernorm.bias, self.pwconv1.weight, self.pwconv1.bias,
                           self.pwconv2.weight, self.pwconv2.bias, gamma, float(self.layernorm.eps))
    return y.permute(0, 3, 1, 2)


def _is_hf_convnext_layer(m) -> bool:
    cls = type(m)
    return (cls.__name__ == "ConvNextLayer" and cls.__module__.startswith("transformers.models.")
            and hasattr(m, "layer_scale_parameter") and _convnext_layer_ok(m))


# ---- DeepStack --------------------------------------------------------------------------------
def _deepstack_forward(self, hidden_states, visual_pos_masks, visual_embeds):
    mask = visual_pos_masks.to(hidden_states.device)
    if (hidden_states.dtype not in _FLOAT_DTYPES or mask.dtype != torch.bool
            or tuple(mask.shape) != tuple(hidden_states.shape[:-1])
            or not visual_embeds.is_floating_point()):
        call_counts["deepstack_fallback"] += 1
        return type(self)._deepstack_process(self, hidden_states, visual_pos_masks, visual_embeds)
    cache = self.__dict__.get("_hires_lmm_index_cache")
    if cache is not None and cache[0] is mask and cache[1] == mask._version:
        idx = cache[2]
    else:
        idx = ops.visual_index(mask)
        self.__dict__["_hires_lmm_index_cache"] = (mask, mask._version, idx)
    call_counts["deepstack"] += 1
    return ops.deepstack_inject(hidden_states, visual_embeds.to(hidden_states.device), idx)


def _is_hf_qwen3vl_text_model(m) -> bool:
    cls = type(m)
    return (cls.__name__ == "Qwen3VLTextModel" and cls.__module__.startswith("transformers.models.")
            and hasattr(cls, "_deepstack_process"))


# ---- attention --------------------------------------------------------------------------------
def _attn_unsupported(query, key, value, attention_mask, dropout, kwargs) -> str | None:
    if attention_mask is not None:
        return "mask"
    if dropout and dropout > 0.0:
        return "dropout"
    if kwargs.get("output_attentions", False):
        return "output_attentions"
    for name in ("softcap", "sliding_window", "s_aux", "position_bias", "cache"):
        if kwargs.get(name) is not None:
            return name
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "shape"
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _FLOAT_DTYPES:
        return "dtype"
    if not (query.device == key.device == value.device):
        return "device"
    D = query.shape[-1]
    if key.shape[-1] != D or value.shape[-1] != D or D > _MAX_HEAD_DIM:
        return "head_dim"
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or key.shape[1] != value.shape[1]:
        return "heads"
    return None


def _fallback_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                        kwargs):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    orig = getattr(module, "_hires_lmm_fallback_attn", "sdpa")
    if is_causal is not None:
        kwargs = dict(kwargs, is_causal=is_causal)
    if orig == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is not None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            Sq, Sk = query.shape[2], key.shape[2]
            if attention_mask is None and causal and Sq > 1:
                # sdpa_mask skipped the causal mask (no padding); eager relies on the mask alone
                if Sk > Sq:  # empty static-cache slots, as in hires_attention_forward
                    key, value, Sk = key[:, :, :Sq], value[:, :, :Sq], Sq
                attention_mask = torch.ones(Sq, Sk, dtype=torch.bool,
                                            device=query.device).tril()[None, None]
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                # our mask function is sdpa_mask (True = attend); eager adds a float mask
                attention_mask = torch.where(attention_mask, 0.0,
                                             torch.finfo(query.dtype).min).to(query.dtype)
            return fn(module, query, key, value, attention_mask, dropout=dropout,
                      scaling=scaling, **kwargs)
    fn = sdpa_attention_forward
    if orig not in ("eager", "sdpa", ATTN_NAME):
        fn = AttentionInterface._global_mapping.get(orig, sdpa_attention_forward)
        if orig.startswith("flash_attention"):
            fn = sdpa_attention_forward  # their masks differ from sdpa_mask's: use SDPA
    return fn(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
              **kwargs)


def hires_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, is_causal: bool | None = None,
                            **kwargs):
    """transformers attention function: query (B,Hq,Sq,D), key/value (B,Hkv,Sk,D) ->
    (attn_output (B,Sq,Hq,D), None) through ops.flash_attn_func; see the module docstring for
    when it falls back to the module's original implementation."""
    reason = _attn_unsupported(query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        call_counts["attention_fallback"] += 1
        call_counts["attention_fallback_" + reason] += 1
        return _fallback_attention(module, query, key, value, attention_mask, dropout, scaling,
                                   is_causal, kwargs)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Sq, Sk = query.shape[2], key.shape[2]
    causal = bool(causal) and Sq > 1  # one query row sees every key (decode), as SDPA
    if causal and Sk > Sq:
        # no mask with Sk > Sq > 1 only happens for a prefill into an empty static cache: the
        # keys past Sq are empty slots (SDPA slices them off the same way)
        key, value = key[:, :, :Sq], value[:, :, :Sq]
    call_counts["attention"] += 1
    out = ops.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scaling, causal=causal)
    return out, None


_registered = False


def _register_attention():
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, hires_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def _all_configs(config):
    out, todo = [], [config]
    while todo:
        c = todo.pop()
        if any(c is o for o in out):
            continue
        out.append(c)
        for k in getattr(c, "sub_configs", {}) or {}:
            sub = getattr(c, k, None)
            if sub is not None and hasattr(sub, "_attn_implementation_internal"):
                todo.append(sub)
    return out


def _patch_attention(model, state) -> int:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return 0
    _register_attention()
    saved = {}  # id(config) -> (config, original implementation)
    for m in model.modules():
        if not isinstance(m, PreTrainedModel) or id(m.config) in saved:
            continue
        if not m._can_set_attn_implementation():
            continue
        before = {id(c): (c, c._attn_implementation) for c in _all_configs(m.config)}
        for sub in m.modules():
            if isinstance(sub, PreTrainedModel):
                for c in _all_configs(sub.config):
                    before.setdefault(id(c), (c, c._attn_implementation))
        before = {k: v for k, v in before.items() if k not in saved}
        m.set_attn_implementation(ATTN_NAME)
        saved.update(before)
    state["configs"] = [v for v in saved.values() if v[1] != ATTN_NAME]
    n = 0
    orig_by_config = {id(c): o for c, o in saved.values()}
    for m in model.modules():
        c = getattr(m, "config", None)
        if (c is not None and id(c) in orig_by_config and "Attention" in type(m).__name__
                and not isinstance(m, PreTrainedModel)):
            orig = orig_by_config[id(c)]
            m._hires_lmm_fallback_attn = "sdpa" if orig in (None, ATTN_NAME) else orig
            state["attn_modules"].append(m)
            n += 1
    return n


# ---- entry point ------------------------------------------------------------------------------
def _set_forward(m, name, fn, state):
    m.__dict__[name] = types.MethodType(fn, m)
    m.__dict__["_hires_lmm_orig_" + name] = True
    state["patched"].append((m, name))


def accelerate(model: nn.Module, *, attention: bool = True, norms: bool = True,
               convnext: bool = True, deepstack: bool = True, undo: bool = False) -> nn.Module:
    """Swap hires_lmm kernels into a Hugging Face transformers model in place; returns `model`.

    attention: Llama / CLIP / Qwen3-VL attention -> ops.flash_attn_func through
        transformers.AttentionInterface ("hires_lmm"), with a fallback to the original
        implementation for masks (padding), dropout in training, output_attentions and other
        unsupported cases (module docstring lists them);
    norms: LlamaRMSNorm / Qwen3VLTextRMSNorm -> ops.rms_norm, nn.LayerNorm -> ops.layer_norm
        (when dtypes match);
    convnext: ConvNextLayer -> ops.convnext_block (NHWC inside);
    deepstack: Qwen3VLTextModel._deepstack_process -> ops.deepstack_inject.

    Idempotent (a second call returns the model untouched). `undo=True` restores what a previous
    call patched. Sets `model._hires_lmm_patched` to {"attention", "rms_norm", "layer_norm",
    "convnext", "deepstack"} module counts; `accelerate.call_counts` counts calls at run time."""
    state = model.__dict__.get("_hires_lmm_state")
    if undo:
        if state is None:
            return model
        for m, name in state["patched"]:
            m.__dict__.pop(name, None)
            m.__dict__.pop("_hires_lmm_orig_" + name, None)
            m.__dict__.pop("_hires_lmm_index_cache", None)
        for c, orig in state["configs"]:
            c._attn_implementation_internal = orig
        for m in state["attn_modules"]:
            m.__dict__.pop("_hires_lmm_fallback_attn", None)
        del model.__dict__["_hires_lmm_state"]
        model.__dict__.pop("_hires_lmm_patched", None)
        return model
    if state is not None:
        return model  # already accelerated

    state = {"patched": [], "configs": [], "attn_modules": []}
    counts = {"attention": 0, "rms_norm": 0, "layer_norm": 0, "convnext": 0, "deepstack": 0}
    for m in model.modules():
        d = m.__dict__
        if norms and _is_hf_rms_norm(m) and "_hires_lmm_orig_forward" not in d:
            _set_forward(m, "forward", _rms_norm_forward, state)
            counts["rms_norm"] += 1
        elif norms and _is_plain_layer_norm(m) and "_hires_lmm_orig_forward" not in d:
            _set_forward(m, "forward", _layer_norm_forward, state)
            counts["layer_norm"] += 1
        elif convnext and _is_hf_convnext_layer(m) and "_hires_lmm_orig_forward" not in d:
            _set_forward(m, "forward", _convnext_forward, state)
            counts["convnext"] += 1
        if (deepstack and _is_hf_qwen3vl_text_model(m)
                and "_hires_lmm_orig__deepstack_process" not in d):
            _set_forward(m, "_deepstack_process", _deepstack_forward, state)
            counts["deepstack"] += 1
    if attention:
        counts["attention"] = _patch_attention(model, state)
    model.__dict__["_hires_lmm_state"] = state
    model.__dict__["_hires_lmm_patched"] = counts
    return model


accelerate.call_counts = call_counts
