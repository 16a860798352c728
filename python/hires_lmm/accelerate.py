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
- norms: every RMSNorm whose forward is LlamaRMSNorm's math, y = weight * cast(x_f32 *
  rsqrt(mean(x_f32^2) + variance_epsilon)) (Llama, Mistral, Qwen2, Qwen2.5-VL, Qwen3, Qwen3-VL,
  Phi-3 and ~150 more classes of transformers 5.24, and remote-code copies), runs
  `ops.rms_norm`. Recognised by the class's forward source: its AST (argument renamed,
  docstring and comments dropped) must equal Llama's, or one of the two spellings that round
  the product with the weight once ((weight * x_f32).to(dtype)). RMSNorms that differ are left
  alone, counted in `rms_norm_skipped` and listed in `model._hires_lmm_skipped`
  ({class name: (count, reason)}, also logged at INFO): Gemma's `x_hat * (1 + weight)`,
  unweighted norms, Gemma3n's optional weight (`with_scale`), Llama4's and Idefics' casts,
  torch.nn.RMSNorm. Plain `nn.LayerNorm`s (exact type, not subclasses such as ConvNext's
  channels_first norm) with a 1-D normalized shape and an affine weight run `ops.layer_norm`.
  At call time a dtype mismatch between input and weight (e.g. fp32 weights with a bf16 input,
  where HF promotes), another device, an empty input or a hidden size above 16384 takes the
  original forward.
- attention: registers "hires_lmm" in `transformers.AttentionInterface` (and, as its mask
  function, HF's `sdpa_mask`, which yields no mask when there is no padding) and switches the
  model with `model.set_attn_implementation("hires_lmm")`. `import hires_lmm` already makes
  the name available (register_attention_with_transformers: a one-shot import hook, so
  transformers is not imported by us), so `from_pretrained(..., attn_implementation=
  "hires_lmm")` works without accelerate() (attention only). The function calls
  `ops.flash_attn_func` on (B,S,H,D) views (no transpose copies, GQA without repeat_kv), causal
  from the `is_causal` kwarg or the module's `is_causal` (decode with one query is non-causal,
  like SDPA), `scaling` passed through. A boolean (B,1,Sq,Sk) mask that is pure padding (each
  row's valid keys one contiguous run: left or right padding, a static cache's empty slots;
  causal or bidirectional; checked exactly against the whole mask, once per mask) runs
  `ops.flash_attn_varlen_func` on the packed valid tokens and scatters back (_padding_plan
  says which rows; causal right padding: the pad queries see all valid keys of their row, as in
  HF's mask, through a second varlen call; pad queries that see no key are 0, as SDPA gives).
  Outputs at valid positions match the unpatched model (with an SDPA original, all of them).
  Training runs the kernel too: the ops' backward is FlashAttention-2's (O(S) memory; the
  packing and scatter of padded batches are differentiable indexing). It falls back to the
  module's original implementation ("sdpa" or "eager"; anything else -> "sdpa") when:
    * the mask is anything else (packed sequences, a sliding window that cuts, a hole, a float
      or custom 4-D mask; with an "eager" original the boolean mask is turned into the additive
      mask eager expects), or under torch.compile / CUDA-graph capture (packing needs
      data-dependent shapes),
    * dropout > 0 (training with attention dropout),
    * `output_attentions` is requested, or sinks (`s_aux`) / position_bias / a paged cache are
      passed, or softcap / a sliding window that cuts when the ops lack flash-attn 2's
      `softcap` / `window_size` arguments (checked once with inspect.signature: the ops of
      issue 9 have them; then HF's softcap is passed as is and its window w as
      window_size=(w - 1, 0), read from the mask like padding),
    * q, k, v differ in dtype or are not float32/float16/bfloat16, k and v differ in head dim,
      Hq is not a multiple of Hkv, or the head dim exceeds 512.
  Each fallback is counted (`attention_fallback_<reason>`) and logged once per reason (WARNING).
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

import ast
import collections
import functools
import importlib.abc
import inspect
import logging
import sys
import textwrap
import types
import weakref

import torch
from torch import nn

from . import ops

__all__ = ["accelerate", "register_attention_with_transformers"]

logger = logging.getLogger(__name__)

ATTN_NAME = "hires_lmm"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_NORM_DIM = 16384
_MAX_HEAD_DIM = 512

# Kernel calls and fallbacks since import (or since .clear()): keys "attention" (of which
# "attention_varlen": padded batches), "rms_norm", "layer_norm", "convnext", "deepstack", and
# "<family>_fallback" with "<family>_fallback_<reason>".
call_counts: collections.Counter = collections.Counter()

_logged_reasons: set = set()


def _note_fallback(family: str, reason: str, why: str) -> None:
    """Count a fallback (`<family>_fallback` and `<family>_fallback_<reason>`) and log it, once per
    (family, reason) per process, at WARNING."""
    call_counts[family + "_fallback"] += 1
    call_counts[family + "_fallback_" + reason] += 1
    if (family, reason) not in _logged_reasons:
        _logged_reasons.add((family, reason))
        logger.warning("hires_lmm.accelerate: %s falls back to the original implementation "
                       "(%s): %s. Logged once; accelerate.call_counts counts every fallback.",
                       family, reason, why)


# ---- norms ------------------------------------------------------------------------------------
def _rms_norm_forward(self, hidden_states):
    w = self.weight
    if hidden_states.dtype != w.dtype or w.dtype not in _FLOAT_DTYPES:
        _note_fallback("rms_norm", "dtype", "the input's dtype differs from the weight's "
                       "(HF promotes to the wider one) or is not a float type")
        return type(self).forward(self, hidden_states)
    if (hidden_states.device != w.device or hidden_states.numel() == 0
            or hidden_states.shape[-1] != w.numel() or w.numel() > _MAX_NORM_DIM):
        _note_fallback("rms_norm", "shape", "another device, an empty input, a last dim other "
                       f"than the weight's or a hidden size above {_MAX_NORM_DIM}")
        return type(self).forward(self, hidden_states)
    call_counts["rms_norm"] += 1
    return ops.rms_norm(hidden_states, w, float(self.variance_epsilon))


def _layer_norm_forward(self, x):
    w, b = self.weight, self.bias
    if (x.dtype != w.dtype or x.device != w.device or (b is not None and b.dtype != w.dtype)
            or x.numel() == 0 or x.shape[-1] != w.numel() or w.numel() > _MAX_NORM_DIM
            or w.dtype not in _FLOAT_DTYPES):
        _note_fallback("layer_norm", "dtype_or_shape", "input/weight/bias dtypes or devices "
                       "differ, an empty input, or a hidden size above "
                       f"{_MAX_NORM_DIM}")
        return type(self).forward(self, x)
    call_counts["layer_norm"] += 1
    return ops.layer_norm(x, w, b, float(self.eps))


# LlamaRMSNorm.forward's body, and the two spellings that differ from it only in where the product
# with the weight is rounded (both: (weight * fp32 x_hat) cast once to the input dtype). Compared
# as normalized ASTs of the forward body (argument renamed to x, docstring and comments dropped).
_LLAMA_RMS_FORMS = (
    """input_dtype = x.dtype
x = x.to(torch.float32)
variance = x.pow(2).mean(-1, keepdim=True)
x = x * torch.rsqrt(variance + self.variance_epsilon)
return self.weight * x.to(input_dtype)""",
    """input_dtype = x.dtype
x = x.to(torch.float32)
variance = x.pow(2).mean(-1, keepdim=True)
x = x * torch.rsqrt(variance + self.variance_epsilon)
return (self.weight * x).to(input_dtype)""",
    """input_dtype = x.dtype
x = x.to(torch.float32)
variance = x.pow(2).mean(-1, keepdim=True)
x = x * torch.rsqrt(variance + self.variance_epsilon)
return (self.weight.to(torch.float32) * x).to(input_dtype)""",
)
_rms_verdicts: dict = {}  # class -> None (Llama's math) or the reason it is left alone


class _RenameArg(ast.NodeTransformer):
    def __init__(self, name):
        self.name = name

    def visit_Name(self, node):
        if node.id == self.name:
            return ast.copy_location(ast.Name(id="x", ctx=node.ctx), node)
        return node


def _normalized_forward_body(fn) -> str | None:
    """ast.dump of `fn`'s body with its one argument renamed to x and its docstring dropped; None
    when fn is not `def forward(self, <arg>)` or its source cannot be read."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef):
        return None
    a = node.args
    if (len(a.args) != 2 or a.vararg or a.kwarg or a.kwonlyargs or a.posonlyargs or a.defaults
            or node.decorator_list):
        return None
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    mod = _RenameArg(a.args[1].arg).visit(ast.Module(body=body, type_ignores=[]))
    return ast.dump(mod, annotate_fields=False)


@functools.lru_cache(maxsize=None)
def _llama_forms() -> frozenset:
    return frozenset(ast.dump(ast.parse(src), annotate_fields=False) for src in _LLAMA_RMS_FORMS)


def _rms_norm_verdict(cls) -> str | None:
    """None when cls.forward is LlamaRMSNorm's math (y = weight * cast(x_f32 * rsqrt(mean(x_f32^2)
    + variance_epsilon))); otherwise why it is left alone. Cached per class."""
    if cls in _rms_verdicts:
        return _rms_verdicts[cls]
    reason = None
    body = _normalized_forward_body(cls.forward)
    if body is None:
        reason = "forward source unreadable or not forward(self, x)"
    elif body not in _llama_forms():
        try:
            text = ast.unparse(ast.parse(textwrap.dedent(inspect.getsource(cls.forward))))
        except Exception:  # pragma: no cover - getsource worked a moment ago
            text = ""
        if "1.0 + self.weight" in text or "1 + self.weight" in text:
            reason = "scales by (1 + weight) (Gemma-style)"
        elif "self.weight" not in text:
            reason = "no weight in forward (unweighted RMSNorm)"
        elif "with_scale" in text:
            reason = "optional weight (with_scale)"
        else:
            reason = "forward differs from LlamaRMSNorm's"
    _rms_verdicts[cls] = reason
    return reason


def _rms_norm_candidate(m) -> bool:
    return type(m).__name__.lower().endswith("rmsnorm") and isinstance(m, nn.Module)


def _is_hf_rms_norm(m) -> bool:
    """A module whose class forward is LlamaRMSNorm's math, with a 1-D weight and a float
    variance_epsilon (Llama, Mistral, Qwen2/2.5-VL/3/3-VL, Phi-3, ... and remote-code copies)."""
    return (_rms_norm_candidate(m) and _rms_norm_verdict(type(m)) is None
            and isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 1
            and isinstance(getattr(m, "variance_epsilon", None), (float, int)))


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
_ATTN_WHY = {
    "dropout": "attention dropout > 0 (training) is not implemented by the kernel",
    "output_attentions": "output_attentions needs the attention weights",
    "softcap": "logit softcapping and this build's ops.flash_attn_func has no softcap argument",
    "sliding_window": "a sliding window shorter than the keys, and this build's "
                      "ops.flash_attn_func has no window_size argument (or the module is not "
                      "causal)",
    "s_aux": "attention sinks (s_aux) are not implemented by the kernel",
    "position_bias": "a position bias is not implemented by the kernel",
    "cache": "a paged cache is not supported",
    "shape": "q/k/v are not 4-D (B,H,S,D)",
    "dtype": "q/k/v differ in dtype or are not float32/float16/bfloat16",
    "device": "q/k/v are on different devices",
    "head_dim": f"k/v head dims differ from q's or exceed {_MAX_HEAD_DIM}",
    "heads": "Hq is not a multiple of Hkv",
    "mask": "the attention mask is not a boolean (B,1,Sq,Sk) mask (a custom or float mask)",
    "mask_not_padding": "the mask is not causal/bidirectional attention over one contiguous run "
                        "of valid keys per row (packed sequences, a sliding window that cuts, "
                        "padding in the middle, a custom mask)",
    "mask_traced": "a padding mask under torch.compile / CUDA graph capture (packing it needs "
                   "data-dependent shapes)",
}


_features_cache: list = [None, None, frozenset()]


def _kernel_features() -> frozenset:
    """Which of flash-attn 2's "window_size" and "softcap" both ops.flash_attn_func and
    ops.flash_attn_varlen_func accept (the signature changed in issue 9; checked once per
    function object)."""
    fn, vfn = ops.flash_attn_func, ops.flash_attn_varlen_func
    c = _features_cache
    if c[0] is not fn or c[1] is not vfn:
        try:
            common = (set(inspect.signature(fn).parameters)
                      & set(inspect.signature(vfn).parameters))
        except (TypeError, ValueError):  # pragma: no cover - a builtin without a signature
            common = set()
        _features_cache[:] = [fn, vfn, frozenset(common & {"window_size", "softcap"})]
    return _features_cache[2]


def _attn_unsupported(query, key, value, attention_mask, dropout, kwargs, module
                      ) -> tuple[str | None, dict, int | None]:
    """(fallback reason or None, extra keyword arguments for the kernel, the HF sliding window
    to read the mask with (None: no window, or one that cannot cut))."""
    extra, window = {}, None
    if dropout and dropout > 0.0:
        return "dropout", extra, window
    if kwargs.get("output_attentions", False):
        return "output_attentions", extra, window
    # gradients: the ops' autograd is FlashAttention-2's backward (hires_lmm::flash_attn_bwd /
    # flash_attn_varlen_bwd, O(S) memory) for every case the forward takes, so training stays on
    # the kernel (no fallback for grad mode any more)
    for name in ("s_aux", "position_bias", "cache"):
        if kwargs.get(name) is not None:
            return name, extra, window
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "shape", extra, window
    softcap = kwargs.get("softcap")
    if softcap:  # HF (Gemma 2): scores = softcap * tanh(q k^T * scaling / softcap), as flash-attn
        if "softcap" not in _kernel_features():
            return "softcap", extra, window
        extra["softcap"] = float(softcap)
    sw = kwargs.get("sliding_window")
    # HF's window: key j is seen by query i when i - j < window; it can cut only when the keys
    # span more than the window (sdpa_mask then also encodes it in the mask)
    if sw is not None and key.shape[2] > sw:
        causal = getattr(module, "is_causal", True)
        if "window_size" not in _kernel_features() or not causal:
            if attention_mask is None:
                return "sliding_window", extra, window
        else:
            window = int(sw)
            if attention_mask is None:
                extra["window_size"] = (window - 1, 0)  # flash-attn: i - left <= j <= i + right
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _FLOAT_DTYPES:
        return "dtype", extra, window
    if not (query.device == key.device == value.device):
        return "device", extra, window
    D = query.shape[-1]
    if key.shape[-1] != D or value.shape[-1] != D or D > _MAX_HEAD_DIM:
        return "head_dim", extra, window
    if key.shape[1] == 0 or query.shape[1] % key.shape[1] != 0 or key.shape[1] != value.shape[1]:
        return "heads", extra, window
    return None, extra, window


# ---- padding masks -> varlen ------------------------------------------------------------------
class _PaddingPlan(types.SimpleNamespace):
    """How to run a padded batch as packed sequences: qb/qs (total_q,) batch and position of each
    kept query row, kb/ks the same for keys, cu_q/cu_k (B+1,) int32, max_q/max_k, causal,
    all_q (every query row kept, in order: no scatter needed), tail: None or (tb, ts, cu_t,
    max_t) for the pad queries after a causal row's run (they see all its valid keys), and
    window_size: None or flash-attn's (left, 0) for a sliding window the mask encodes, and dense:
    no padding at all (only the window or causality in the mask): the dense kernel, no packing."""


_plan_cache: list = [None]  # (weakref to the mask, its _version, plan): one mask per forward


def _padding_plan(mask, B, Sq, Sk, window=None):
    """Read a boolean HF mask (B,1,Sq,Sk) (True = attend) as per-row padding: returns
    (plan, None), or (None, reason) when it is anything else.

    The keys a row attends at all, kv[b] = any over query rows, must be one contiguous run
    [s_b, e_b) (left padding, right padding, a static cache's empty tail, or both ends), and the
    whole mask must equal exactly one of
      bidirectional: M[b,i,j] = kv[b,j]                      -> every query row is kept;
      causal:        M[b,i,j] = kv[b,j] and j <= i + off     -> query i is kept when key i + off is
                                                                valid (its own token);
    with off = Sk - Sq (dynamic cache / no cache) or off = max_b e_b - Sq (a static cache's empty
    slots past the last token). Packed causal rows are then bottom-right aligned per sequence,
    which is the mask's causality. With `window` (HF's sliding window, when the kernel takes
    window_size), also causal and i + off - j < window (no pad queries after a run allowed
    then). One host sync per new mask; cached while the same mask tensor is passed again (every
    layer of one forward)."""
    if mask.dtype != torch.bool or mask.dim() != 4 or tuple(mask.shape) != (B, 1, Sq, Sk):
        return None, "mask"
    if torch.compiler.is_compiling() or (mask.is_cuda
                                         and torch.cuda.is_current_stream_capturing()):
        return None, "mask_traced"
    c = _plan_cache[0]
    if c is not None and c[0]() is mask and c[1] == mask._version and c[2] == window:
        return c[3], c[4]
    plan, reason = _build_padding_plan(mask[:, 0], B, Sq, Sk, window)
    try:
        _plan_cache[0] = (weakref.ref(mask), mask._version, window, plan, reason)
    except TypeError:  # pragma: no cover - tensors support weak references
        pass
    return plan, reason


def _build_padding_plan(m, B, Sq, Sk, window=None):
    dev = m.device
    kv = m.any(1)                                           # (B,Sk)
    pos = torch.arange(Sk, device=dev)
    n = kv.sum(1)
    first = torch.where(kv, pos, Sk).amin(1)
    last = torch.where(kv, pos, -1).amax(1)
    contiguous = ((n > 0) & (last - first + 1 == n)).all()
    bidir = (m == kv[:, None, :]).all()
    rows = torch.arange(Sq, device=dev)[:, None]

    def causal_ok(off, w=None):
        seen = pos[None, :] <= rows + off
        if w is not None:
            seen = seen & (pos[None, :] > rows + off - w)
        return (m == (kv[:, None, :] & seen)).all()

    off2 = last.amax() + 1 - Sq
    checks = [contiguous, bidir, causal_ok(Sk - Sq), causal_ok(off2)]
    if window is not None:
        checks += [causal_ok(Sk - Sq, window), causal_ok(off2, window)]
    flags = torch.stack(checks).tolist()
    contiguous, bidir, c1, c2 = flags[:4]
    window_size = None
    if window is not None and not (bidir or c1 or c2) and (flags[4] or flags[5]):
        c1, c2, window_size = flags[4], flags[5], (window - 1, 0)
    if not contiguous:
        return None, "mask_not_padding"
    if bidir:
        causal, qsel = False, torch.ones(B, Sq, dtype=torch.bool, device=dev)
    elif c1 or c2:
        off = Sk - Sq if c1 else int(off2)
        kpos = torch.arange(Sq, device=dev) + off
        inside = (kpos >= 0) & (kpos < Sk)
        causal, qsel = True, kv[:, kpos.clamp(0, Sk - 1)] & inside
    else:
        return None, "mask_not_padding"
    # causal right padding: the pad queries past the run see every valid key (HF computes them,
    # and generate() reads the last one): a second, bidirectional call over the same keys
    tail = (kpos >= last[:, None] + 1) & inside if causal else None
    nq = qsel.sum(1)
    nt = tail.sum(1) if causal else torch.zeros_like(nq)
    counts = torch.stack([nq.amin(), nq.amax(), n.amax(), nt.amax(), n.amin()]).tolist()
    if counts[0] == 0 or (window_size is not None and counts[3] > 0):
        # a row without any query of its own in this chunk, or pad queries after the run that
        # see a window of it (not one alignment per row)
        return None, "mask_not_padding"
    qb, qs = qsel.nonzero(as_tuple=True)
    kb, ks = kv.nonzero(as_tuple=True)
    zero = torch.zeros(1, dtype=torch.int32, device=dev)
    cu_q = torch.cat([zero, nq.cumsum(0).to(torch.int32)])
    cu_k = torch.cat([zero, n.cumsum(0).to(torch.int32)])
    plan = _PaddingPlan(qb=qb, qs=qs, kb=kb, ks=ks, cu_q=cu_q, cu_k=cu_k, max_q=int(counts[1]),
                        max_k=int(counts[2]), causal=causal, all_q=bool(qb.numel() == B * Sq),
                        tail=None, window_size=window_size,
                        dense=bool(counts[4] == Sk and qb.numel() == B * Sq
                                   and (not causal or off == Sk - Sq)))
    if counts[3] > 0:
        tb, ts = tail.nonzero(as_tuple=True)
        plan.tail = (tb, ts, torch.cat([zero, nt.cumsum(0).to(torch.int32)]), int(counts[3]))
    return plan, None


def _varlen_attention(plan, query, key, value, scaling, extra):
    """query (B,Hq,Sq,D), key/value (B,Hkv,Sk,D) -> (B,Sq,Hq,D): the kept rows packed, one
    flash_attn_varlen_func call, scattered back. Causal right padding: the pad queries past a
    row's valid run see all its valid keys (as in HF's mask): one more varlen call (causal=False)
    computes them. Pad queries that see no key (causal left padding) are 0, as SDPA gives for a
    fully masked row (HF's eager gives the mean of V there)."""
    B, Hq, Sq, D = query.shape
    q = query.transpose(1, 2)[plan.qb, plan.qs]             # (total_q,Hq,D)
    k = key.transpose(1, 2)[plan.kb, plan.ks]               # (total_k,Hkv,D)
    v = value.transpose(1, 2)[plan.kb, plan.ks]
    if plan.window_size is not None:
        extra = dict(extra, window_size=plan.window_size)
    o = ops.flash_attn_varlen_func(q, k, v, plan.cu_q, plan.cu_k, plan.max_q, plan.max_k,
                                   softmax_scale=scaling, causal=plan.causal, **extra)
    if plan.all_q:
        return o.view(B, Sq, Hq, D)
    out = o.new_zeros(B, Sq, Hq, D)
    out[plan.qb, plan.qs] = o
    if plan.tail is not None:
        tb, ts, cu_t, max_t = plan.tail
        out[tb, ts] = ops.flash_attn_varlen_func(query.transpose(1, 2)[tb, ts], k, v, cu_t,
                                                 plan.cu_k, max_t, plan.max_k,
                                                 softmax_scale=scaling, causal=False, **extra)
    return out


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
    (attn_output (B,Sq,Hq,D), None) through ops.flash_attn_func, or ops.flash_attn_varlen_func
    for a padding mask; see the module docstring for when it falls back to the module's original
    implementation."""
    reason, extra, window = _attn_unsupported(query, key, value, attention_mask, dropout,
                                              kwargs, module)
    plan = None
    if reason is None and attention_mask is not None:
        plan, reason = _padding_plan(attention_mask, query.shape[0], query.shape[2],
                                     key.shape[2], window)
    if reason is not None:
        _note_fallback("attention", reason, _ATTN_WHY.get(reason, reason))
        return _fallback_attention(module, query, key, value, attention_mask, dropout, scaling,
                                   is_causal, kwargs)
    call_counts["attention"] += 1
    if plan is not None and plan.dense:  # a mask without padding (a sliding window's)
        if plan.window_size is not None:
            extra = dict(extra, window_size=plan.window_size)
        out = ops.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2),
                                  value.transpose(1, 2), softmax_scale=scaling,
                                  causal=plan.causal, **extra)
        return out, None
    if plan is not None:
        call_counts["attention_varlen"] += 1
        return _varlen_attention(plan, query, key, value, scaling, extra), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    Sq, Sk = query.shape[2], key.shape[2]
    causal = bool(causal) and Sq > 1  # one query row sees every key (decode), as SDPA
    if causal and Sk > Sq:
        # no mask with Sk > Sq > 1 only happens for a prefill into an empty static cache: the
        # keys past Sq are empty slots (SDPA slices them off the same way)
        key, value = key[:, :, :Sq], value[:, :, :Sq]
    out = ops.flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                              softmax_scale=scaling, causal=causal, **extra)
    return out, None


_registered = False
_HOOK_MODULE = "transformers.modeling_utils"  # defines AttentionInterface


def _register_attention():
    global _registered
    if _registered:
        return
    from transformers.modeling_utils import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, hires_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


class _RegisterAfterExec:
    """Loader wrapper: runs the real loader, then registers "hires_lmm" with transformers."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, name):  # get_source, get_filename, ... for inspect/linecache
        if name == "_loader":
            raise AttributeError(name)
        return getattr(self._loader, name)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            _register_attention()
        except Exception as e:  # never break importing transformers
            logger.warning("hires_lmm: could not register attention implementation %r with "
                           "transformers: %s: %s", ATTN_NAME, type(e).__name__, e)


class _TransformersImportHook(importlib.abc.MetaPathFinder):
    """sys.meta_path finder that fires once, when transformers.modeling_utils is imported
    (by `from transformers import AutoModel...` or any model class): it lets the other finders find
    the module and wraps its loader so the registration runs right after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOK_MODULE:
            return None
        _remove_hook()
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec  # pragma: no cover - an unusual loader: accelerate() still registers
        spec.loader = _RegisterAfterExec(spec.loader)
        return spec


_hook = _TransformersImportHook()


def _remove_hook():
    try:
        sys.meta_path.remove(_hook)
    except ValueError:
        pass


def register_attention_with_transformers() -> bool:
    """Make attn_implementation="hires_lmm" available to transformers without importing it.

    If transformers.modeling_utils is already imported, registers "hires_lmm" (attention function
    hires_attention_forward, mask function HF's sdpa_mask) in transformers.AttentionInterface and
    AttentionMaskInterface now and returns True. Otherwise installs a one-shot import hook
    (sys.meta_path) that registers right after transformers.modeling_utils is first imported,
    and returns False; nothing happens when transformers is never imported or not installed.
    Called by `import hires_lmm`; idempotent. Then
    `AutoModelForCausalLM.from_pretrained(path, attn_implementation="hires_lmm")` runs the model's
    attention through our kernels (norms and the rest stay HF's: use accelerate() for those)."""
    if _registered:
        return True
    mu = sys.modules.get(_HOOK_MODULE)
    if mu is not None and hasattr(mu, "AttentionInterface"):
        try:
            _register_attention()
        except Exception as e:
            logger.warning("hires_lmm: could not register attention implementation %r with "
                           "transformers: %s: %s", ATTN_NAME, type(e).__name__, e)
            return False
        return True
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
    return False


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

    attention: Llama / CLIP / Qwen3-VL / Mistral / Qwen2 / Phi-3 / ... attention ->
        ops.flash_attn_func through transformers.AttentionInterface ("hires_lmm"), padding masks
        -> ops.flash_attn_varlen_func (with gradients: their FlashAttention-2 backward), with a
        fallback to the original implementation for other masks, dropout in training, output_attentions and other
        unsupported cases (module docstring lists them);
    norms: RMSNorms with LlamaRMSNorm's forward -> ops.rms_norm (others skipped, with the
        reason in `model._hires_lmm_skipped`), nn.LayerNorm -> ops.layer_norm (when dtypes
        match);
    convnext: ConvNextLayer -> ops.convnext_block (NHWC inside);
    deepstack: Qwen3VLTextModel._deepstack_process -> ops.deepstack_inject.

    Idempotent (a second call returns the model untouched). `undo=True` restores what a previous
    call patched. Sets `model._hires_lmm_patched` to {"attention", "rms_norm",
    "rms_norm_skipped", "layer_norm", "convnext", "deepstack"} module counts and
    `model._hires_lmm_skipped` to {class name: (count, reason)}; `accelerate.call_counts` counts
    calls at run time ("attention_varlen" among "attention": padded batches)."""
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
        model.__dict__.pop("_hires_lmm_skipped", None)
        return model
    if state is not None:
        return model  # already accelerated

    state = {"patched": [], "configs": [], "attn_modules": []}
    counts = {"attention": 0, "rms_norm": 0, "rms_norm_skipped": 0, "layer_norm": 0,
              "convnext": 0, "deepstack": 0}
    skipped = {}  # class name -> [count, reason]
    for m in model.modules():
        d = m.__dict__
        if norms and _is_hf_rms_norm(m) and "_hires_lmm_orig_forward" not in d:
            _set_forward(m, "forward", _rms_norm_forward, state)
            counts["rms_norm"] += 1
        elif norms and _rms_norm_candidate(m) and "_hires_lmm_orig_forward" not in d:
            reason = _rms_norm_verdict(type(m)) or "weight not 1-D or no float variance_epsilon"
            skipped.setdefault(type(m).__name__, [0, reason])[0] += 1
            counts["rms_norm_skipped"] += 1
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
    for name, (n, reason) in skipped.items():
        logger.info("hires_lmm.accelerate: %d %s module(s) left unpatched: %s", n, name, reason)
    model.__dict__["_hires_lmm_state"] = state
    model.__dict__["_hires_lmm_patched"] = counts
    model.__dict__["_hires_lmm_skipped"] = {k: tuple(v) for k, v in skipped.items()}
    return model


accelerate.call_counts = call_counts
