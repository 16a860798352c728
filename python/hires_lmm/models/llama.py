"""Llama / Vicuna decoder (Hugging Face names) with DeepStack-L injection and a KV cache.

    model = Llama.from_pretrained("path/to/llama", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids)                                             # (B, S, V)
    logits = model(inputs_embeds=e, visual_pos_masks=m,                   # DeepStack-L
                   deepstack_visual_embeds=[ds0, ds1, ds2])
    out_ids = model.generate(input_ids, max_new_tokens=32)                # greedy

Every op goes through hires_lmm.ops (rms_norm, flash_attn_func, deepstack_inject_rms_norm,
visual_index), so hires_lmm.set_backend("reference") switches the whole model to PyTorch.

DeepStack-L (Qwen3-VL semantics, specs/deepstack.md 3.4): level k (rows in the row-major (b, s)
order of `hidden[visual_pos_masks]`) is added to the residual stream after decoder layer k, for
k < min(len(levels), num_hidden_layers); extra levels are ignored like HF's range(). A general
schedule is `deepstack_layers`: level k is added BEFORE decoder layer deepstack_layers[k]
(num_hidden_layers = before the final norm), which is how the paper's DeepStack-L runs
(specs/deepstack.md 1.3: stack k before layer start + k * interval); Qwen3-VL's default is
deepstack_layers = [1, 2, ...]. The add is fused into that layer's input_layernorm (or the final
norm) through ops.deepstack_inject_rms_norm, so no separate pass over the hidden states exists.
The visual index is built once per forward. Decode steps (no visual_pos_masks) inject nothing;
forward_packed takes the visual rows of the packed tokens (visual_index) and the same levels.

Batches of different lengths: forward_packed (prefill of the sequences packed one after the
other, ops.flash_attn_varlen_func, K/V into a StaticKVCache) and forward_decode (one token per
sequence at its own cache length, flash_attn_with_kvcache); hires_lmm.generation drives them.
Not supported: attention masks / padding inside a batch of forward() (prompts of one batch must
have the same length, or be right-padded with the padded logits ignored), rope types other than default,
linear, dynamic and llama3 (an error names the type)."""
import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._weights import load_into, read_config

__all__ = ["LlamaConfig", "Llama", "KVCache", "StaticKVCache", "rope_inv_freq"]

_ROPE_TYPES = ("linear", "dynamic", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None (plain RoPE) or a dict with "rope_type" in _ROPE_TYPES and that type's parameters
    # ("factor"; llama3 also "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings").
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        """From an HF config.json dict: transformers 4.x keys (rope_theta, rope_scaling with
        "type" or "rope_type") and 5.x keys (rope_parameters holding rope_theta and rope_type).
        Required: vocab_size, hidden_size, intermediate_size, num_hidden_layers,
        num_attention_heads (a `text_config` object is read when the top level has no
        hidden_size). Absent or null optional fields take HF's defaults; every value is checked
        (types and ranges, __post_init__): a bad one raises ValueError naming the field."""
        from ._weights import MAX_HEADS as _MAX_HEADS, MAX_SIZE as _MAX_SIZE, check_int
        if not isinstance(d, dict):
            raise ValueError(f"LlamaConfig: expected a config object (dict), got {type(d).__name__}")
        if "hidden_size" not in d and "text_config" in d:
            d = d["text_config"]
            if not isinstance(d, dict):
                raise ValueError(f"LlamaConfig: field 'text_config' must be an object, got "
                                 f"{type(d).__name__}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads"):
            if d.get(name) is None:
                raise ValueError(f"LlamaConfig: field '{name}' is "
                                 f"{'null' if name in d else 'missing'}; a Llama config needs it")

        def opt(name, default):
            v = d.get(name)
            return default if v is None else v

        rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ValueError(f"LlamaConfig: field 'rope_scaling' must be an object or null, got "
                             f"{type(rope).__name__} {rope!r}")
        rope = dict(rope)
        theta = opt("rope_theta", rope.get("rope_theta", 10000.0))
        rtype = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        rope.pop("type", None)
        rope.pop("rope_theta", None)
        if rtype == "default":
            scaling = None
        elif rtype in _ROPE_TYPES:
            scaling = {"rope_type": rtype, **rope}
        else:
            raise ValueError(f"LlamaConfig: argument 'rope_scaling' has rope_type {rtype!r}; "
                             f"supported: default, {', '.join(_ROPE_TYPES)}")
        hidden = check_int("LlamaConfig", "hidden_size", d["hidden_size"], 1, _MAX_SIZE)
        n_heads = check_int("LlamaConfig", "num_attention_heads", d["num_attention_heads"], 1,
                            _MAX_HEADS)
        head_dim = d.get("head_dim")
        if head_dim is None:                       # derived only when absent
            if hidden % n_heads:
                raise ValueError(f"LlamaConfig: field 'num_attention_heads' ({n_heads}) must divide "
                                 f"hidden_size ({hidden}) when head_dim is not given")
            head_dim = hidden // n_heads
        return cls(
            vocab_size=d["vocab_size"], hidden_size=hidden,
            intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=n_heads,
            num_key_value_heads=opt("num_key_value_heads", n_heads),
            head_dim=head_dim, rms_norm_eps=opt("rms_norm_eps", 1e-6), rope_theta=theta,
            rope_scaling=scaling, max_position_embeddings=opt("max_position_embeddings", 2048),
            tie_word_embeddings=opt("tie_word_embeddings", False),
            attention_bias=opt("attention_bias", False),
            mlp_bias=opt("mlp_bias", False), hidden_act=opt("hidden_act", "silu"))

    def __post_init__(self):
        """Types and ranges of every field (ValueError naming the field): sizes are integers
        (not bools, not floats) in [1, bound]; num_key_value_heads divides num_attention_heads;
        head_dim is even (RoPE); rms_norm_eps and rope_theta are finite positive numbers;
        rope_scaling carries its type's parameters."""
        from ._weights import (MAX_HEADS as _MAX_HEADS, MAX_LAYERS, MAX_POSITIONS,
                               MAX_SIZE as _MAX_SIZE, MAX_VOCAB, check_bool, check_int, check_real,
                               check_str)
        o = "LlamaConfig"
        check_int(o, "vocab_size", self.vocab_size, 1, MAX_VOCAB)
        check_int(o, "hidden_size", self.hidden_size, 1, _MAX_SIZE)
        check_int(o, "intermediate_size", self.intermediate_size, 1, _MAX_SIZE)
        check_int(o, "num_hidden_layers", self.num_hidden_layers, 1, MAX_LAYERS)
        check_int(o, "num_attention_heads", self.num_attention_heads, 1, _MAX_HEADS)
        check_int(o, "num_key_value_heads", self.num_key_value_heads, 1, _MAX_HEADS)
        check_int(o, "head_dim", self.head_dim, 2, 1024)
        if self.head_dim % 2:
            raise ValueError(f"{o}: field 'head_dim' must be even (RoPE rotates pairs), got "
                             f"{self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"LlamaConfig: argument 'num_key_value_heads' ({self.num_key_value_heads}) "
                             f"must divide num_attention_heads ({self.num_attention_heads})")
        check_real(o, "rms_norm_eps", self.rms_norm_eps, 0.0, 1.0, lo_open=True, hi_open=True)
        check_real(o, "rope_theta", self.rope_theta, 0.0, lo_open=True)
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        check_int(o, "max_position_embeddings", self.max_position_embeddings, 1, MAX_POSITIONS)
        for name in ("tie_word_embeddings", "attention_bias", "mlp_bias"):
            check_bool(o, name, getattr(self, name))
        check_str(o, "hidden_act", self.hidden_act)
        if self.hidden_act != "silu":
            raise ValueError(f"LlamaConfig: argument 'hidden_act' must be 'silu', got "
                             f"{self.hidden_act!r}")
        sc = self.rope_scaling
        if sc is not None:
            if not isinstance(sc, dict) or sc.get("rope_type") not in _ROPE_TYPES:
                raise ValueError(f"{o}: field 'rope_scaling' must be null or an object with "
                                 f"rope_type in {list(_ROPE_TYPES)}, got {sc!r}")
            if "factor" not in sc:
                raise ValueError(f"{o}: field 'rope_scaling' ({sc['rope_type']}) needs 'factor'")
            check_real(o, "rope_scaling.factor", sc["factor"], 0.0, lo_open=True)
            if sc["rope_type"] == "dynamic" and self.head_dim < 4:
                raise ValueError(f"{o}: dynamic RoPE needs head_dim >= 4, got {self.head_dim}")
            if sc["rope_type"] == "llama3":
                for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if k not in sc:
                        raise ValueError(f"{o}: field 'rope_scaling' (llama3) needs {k!r}")
                lo = check_real(o, "rope_scaling.low_freq_factor", sc["low_freq_factor"], 0.0,
                                lo_open=True)
                hi = check_real(o, "rope_scaling.high_freq_factor", sc["high_freq_factor"], 0.0,
                                lo_open=True)
                if hi <= lo:
                    raise ValueError(f"{o}: field 'rope_scaling.high_freq_factor' ({hi}) must be "
                                     f"> low_freq_factor ({lo})")
                check_int(o, "rope_scaling.original_max_position_embeddings",
                          sc["original_max_position_embeddings"], 1, MAX_POSITIONS)


# ---- RoPE (HF modeling_rope_utils formulas) ----------------------------------------------------
def rope_inv_freq(cfg: LlamaConfig, seq_len: Optional[int] = None, device=None):
    """-> (inv_freq (head_dim/2,) fp32, attention_scaling). seq_len only matters for "dynamic"
    (the largest position + 1 of the current forward, as HF's dynamic_rope_update)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    exps = torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float) / dim
    sc = cfg.rope_scaling
    rtype = None if sc is None else sc["rope_type"]
    if rtype == "dynamic":
        # _compute_dynamic_ntk_parameters: base grows once seq_len > max_position_embeddings
        # (computed in fp32 tensors like HF's forward-time update).
        mp = cfg.max_position_embeddings
        s = torch.tensor(max(int(seq_len or mp), mp), dtype=torch.int64, device=device)
        factor = sc["factor"]
        base = base * ((factor * s / mp) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** exps)
    if rtype == "linear":
        inv_freq = inv_freq / sc["factor"]
    elif rtype == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old_ctx = sc["original_max_position_embeddings"]
        low_freq_wavelen, high_freq_wavelen = old_ctx / lo, old_ctx / hi
        wavelen = 2 * math.pi / inv_freq
        inv_l = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium, smoothed, inv_l)
    return inv_freq, 1.0


def _rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def _apply_rope(x, cos, sin):
    # x (B, S, H, D); cos/sin (B, S, D) of x's dtype (HF casts them before the multiply)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return x * cos + _rotate_half(x) * sin


# ---- KV cache -----------------------------------------------------------------------------------
class KVCache:
    """Per-layer K/V buffers (B, capacity, Hkv, D), preallocated and grown by doubling when a
    forward needs more room. `length` tokens are valid; views [:, :length] go to attention."""

    def __init__(self, num_layers: int, capacity: int = 0):
        self.num_layers = num_layers
        self.capacity = capacity
        self.length = 0
        self.k: List[Optional[torch.Tensor]] = [None] * num_layers
        self.v: List[Optional[torch.Tensor]] = [None] * num_layers

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, start: int):
        """Write k/v (B, S, Hkv, D) at [start, start+S) of `layer`; return the valid views."""
        end = start + k.shape[1]
        buf = self.k[layer]
        if buf is None or buf.shape[1] < end or buf.shape[0] != k.shape[0] or buf.dtype != k.dtype:
            cap = max(end, self.capacity, 2 * (buf.shape[1] if buf is not None else 0))
            newk = k.new_empty((k.shape[0], cap) + tuple(k.shape[2:]))
            newv = v.new_empty((v.shape[0], cap) + tuple(v.shape[2:]))
            if buf is not None and start > 0:
                newk[:, :start] = self.k[layer][:, :start]
                newv[:, :start] = self.v[layer][:, :start]
            self.k[layer], self.v[layer] = newk, newv
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]


class StaticKVCache:
    """Static per-layer K/V buffers (B, max_len, Hkv, D) and per-sequence lengths `seqlens`
    (B,) int32 on the device, for batched generation (packed prefill, then decode steps that each
    append one token per sequence at seqlens[b]). Nothing is reallocated, so a decode step can be
    captured in a CUDA graph over it."""

    def __init__(self, config: "LlamaConfig", batch: int, max_len: int, dtype, device):
        shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_hidden_layers)]
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.batch, self.max_len = batch, max_len


# ---- modules ------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return ops.rms_norm(x, self.weight, self.eps)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.hq, self.hkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        b = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.hq * self.d, bias=b)
        self.k_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=b)
        self.v_proj = nn.Linear(cfg.hidden_size, self.hkv * self.d, bias=b)
        self.o_proj = nn.Linear(self.hq * self.d, cfg.hidden_size, bias=b)

    def forward(self, x, cos, sin, cache: Optional[KVCache], layer: int, start: int):
        B, S, _ = x.shape
        q = _apply_rope(self.q_proj(x).view(B, S, self.hq, self.d), cos, sin)
        k = _apply_rope(self.k_proj(x).view(B, S, self.hkv, self.d), cos, sin)
        v = self.v_proj(x).view(B, S, self.hkv, self.d)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)
        # GQA without repeating K/V; causal is aligned bottom-right, which is what a cache needs.
        o = ops.flash_attn_func(q, k, v, softmax_scale=self.d ** -0.5, causal=True)
        return self.o_proj(o.reshape(B, S, self.hq * self.d))

    def forward_packed(self, x, cos, sin, cu_seqlens, max_seqlen: int, k_cache, v_cache, rows):
        """Packed prefill: x (T, hidden) = the sequences one after the other (cu_seqlens (B+1,)
        int32), cos/sin (T, D). K/V are also written to the static cache (B, S_max, Hkv, D) seen
        as (B*S_max, Hkv, D) at `rows` (T,) = b * S_max + position."""
        T = x.shape[0]
        q = _apply_rope(self.q_proj(x).view(1, T, self.hq, self.d), cos[None], sin[None])[0]
        k = _apply_rope(self.k_proj(x).view(1, T, self.hkv, self.d), cos[None], sin[None])[0]
        v = self.v_proj(x).view(T, self.hkv, self.d)
        nb, smax = k_cache.shape[0], k_cache.shape[1]
        k_cache.view(nb * smax, self.hkv, self.d).index_copy_(0, rows, k.to(k_cache.dtype))
        v_cache.view(nb * smax, self.hkv, self.d).index_copy_(0, rows, v.to(v_cache.dtype))
        o = ops.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                       softmax_scale=self.d ** -0.5, causal=True)
        return self.o_proj(o.reshape(T, self.hq * self.d))

    def forward_decode(self, x, cos, sin, k_cache, v_cache, cache_seqlens):
        """One new token per sequence: x (B, 1, hidden), cos/sin (B, 1, D); K/V appended at
        cache_seqlens[b] (flash_attn_with_kvcache)."""
        B, S, _ = x.shape
        q = _apply_rope(self.q_proj(x).view(B, S, self.hq, self.d), cos, sin)
        k = _apply_rope(self.k_proj(x).view(B, S, self.hkv, self.d), cos, sin)
        v = self.v_proj(x).view(B, S, self.hkv, self.d)
        o = ops.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens,
                                    softmax_scale=self.d ** -0.5, causal=True)
        return self.o_proj(o.reshape(B, S, self.hq * self.d))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        b = cfg.mlp_bias
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=b)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=b)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block. forward takes the residual stream `h` and `normed` =
    input_layernorm(h) (computed by the caller so a DeepStack add can be fused into it)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.self_attn = LlamaAttention(cfg)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, normed, cos, sin, cache, layer: int, start: int):
        h = h + self.self_attn(normed, cos, sin, cache, layer, start)
        return h + self.mlp(self.post_attention_layernorm(h))


def _llama_key(key: str) -> Optional[str]:
    """HF checkpoint name -> our parameter name (None: ignored)."""
    if key.endswith("rotary_emb.inv_freq"):       # old checkpoints stored the RoPE buffer
        return None
    if key.startswith("model."):
        return key[len("model."):]
    return key                                    # lm_head.weight (and anything unexpected)


class Llama(nn.Module):
    """LlamaForCausalLM-compatible decoder; parameters carry HF names without the `model.` prefix."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = (None if config.tie_word_embeddings
                        else nn.Linear(config.hidden_size, config.vocab_size, bias=False))
        self._inv_freq = {}

    # -- loading --
    @classmethod
    def from_pretrained(cls, ckpt_dir: str, dtype: Optional[torch.dtype] = None, device=None) -> "Llama":
        """config.json + safetensors (single, or sharded with model.safetensors.index.json) or
        .bin. Checked before anything is built: the keys are a Llama's (else the error says what
        the checkpoint is), the config's types and ranges, and num_hidden_layers against the
        layers the keys hold; then built on meta and loaded strictly (hires_lmm.models._weights).
        dtype None keeps the checkpoint's dtype (mixed floating dtypes: an error, pass dtype=).
        Every problem raises hires_lmm.CheckpointError naming the file or the field."""
        from ._weights import (CheckpointError, check_count, check_kind, layer_indices,
                               open_pretrained, parse_config)
        pre = open_pretrained("Llama.from_pretrained", ckpt_dir)
        check_kind(pre, "Llama")
        config = parse_config(pre, LlamaConfig.from_dict)
        layers = layer_indices(pre.reader.keys(), r"(?:model\.)?layers\.(\d+)\.")
        check_count(pre, "num_hidden_layers", config.num_hidden_layers,
                    layers[-1] + 1 if layers else 0, "decoder layers (model.layers.N.*)")
        tied = config.tie_word_embeddings
        r = pre.reader
        if tied and "lm_head.weight" in r and "model.embed_tokens.weight" in r:
            # a tied checkpoint may carry the copy; a different matrix would be dropped silently
            head, emb = r.get("lm_head.weight"), r.get("model.embed_tokens.weight")
            if head.shape != emb.shape or not torch.equal(head, emb.to(head.dtype)):
                raise CheckpointError(
                    f"{pre.owner}: config file {pre.config_path} says tie_word_embeddings = true "
                    f"but lm_head.weight in {r.file('lm_head.weight')} differs from "
                    f"model.embed_tokens.weight; set it to false to load both")
        with torch.device("meta"):
            model = cls(config)

        def key_map(key):
            if tied and key == "lm_head.weight":   # a tied checkpoint may still carry the copy
                return None
            return _llama_key(key)

        load_into(model, ckpt_dir, key_map, dtype=dtype, device=device, reader=pre.reader)
        return model.eval()

    # -- helpers --
    def _rope(self, position_ids, dtype):
        dev = position_ids.device
        if self.config.rope_scaling is not None and self.config.rope_scaling["rope_type"] == "dynamic":
            inv, scale = rope_inv_freq(self.config, int(position_ids.max()) + 1, dev)
        else:
            if dev not in self._inv_freq:
                self._inv_freq[dev] = rope_inv_freq(self.config, None, dev)
            inv, scale = self._inv_freq[dev]
        freqs = position_ids[..., None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

    def _lm_head_weight(self):
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    # -- forward --
    def forward(self, input_ids=None, inputs_embeds=None, visual_pos_masks=None,
                deepstack_visual_embeds: Optional[Sequence[torch.Tensor]] = None,
                position_ids=None, past_key_values: Optional[KVCache] = None,
                cache: Optional[KVCache] = None, use_cache: bool = False,
                deepstack_layers: Optional[Sequence[int]] = None):
        """input_ids (B, S) int64 or inputs_embeds (B, S, hidden); visual_pos_masks (B, S) bool;
        deepstack_visual_embeds: list of (mask.sum(), hidden) tensors, level k added after decoder
        layer k (Qwen3-VL), or before decoder layer deepstack_layers[k] when deepstack_layers is
        given (the paper's schedule; num_hidden_layers = before the final norm);
        position_ids (B, S) (default: cache length + arange(S)); past_key_values / cache:
        a KVCache to extend. Returns logits (B, S, V), or (logits, cache) with use_cache=True or a
        cache given."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Llama.forward: give exactly one of argument 'input_ids' or 'inputs_embeds'")
        if past_key_values is not None and cache is not None and past_key_values is not cache:
            raise ValueError("Llama.forward: argument 'cache' and 'past_key_values' are aliases; give one")
        cache = cache if cache is not None else past_key_values
        return_cache = use_cache or cache is not None
        if use_cache and cache is None:
            cache = KVCache(self.config.num_hidden_layers)
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        B, S, _ = h.shape
        start = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + S, device=h.device).unsqueeze(0).expand(B, S)
        cos, sin = self._rope(position_ids, h.dtype)

        levels, index = self._deepstack_levels(h, visual_pos_masks, deepstack_visual_embeds,
                                               deepstack_layers)
        inject = self.deepstack_schedule(len(levels), deepstack_layers)
        eps = self.config.rms_norm_eps
        for i, layer in enumerate(self.layers):
            w = layer.input_layernorm.weight
            if i in inject:                             # level added before layer i, fused
                normed, h = ops.deepstack_inject_rms_norm(h, levels[inject[i]], index, w, eps)
            else:
                normed = ops.rms_norm(h, w, eps)
            h = layer(h, normed, cos, sin, cache, i, start)
        h = self._final_norm(h, inject, levels, index)
        logits = F.linear(h, self._lm_head_weight())
        if cache is not None:
            cache.length = start + S
        return (logits, cache) if return_cache else logits

    # -- batched generation over a StaticKVCache (hires_lmm.generation) --
    def deepstack_schedule(self, n_levels: int, deepstack_layers: Optional[Sequence[int]] = None):
        """{layer i: level k} with level k added to the residual stream before decoder layer i
        (i == num_hidden_layers: before the final norm). Default (Qwen3-VL): level k after layer
        k, i.e. before layer k + 1, for k < min(n_levels, num_hidden_layers)."""
        L = self.config.num_hidden_layers
        if deepstack_layers is None:
            return {k + 1: k for k in range(min(n_levels, L))}
        layers = [int(i) for i in deepstack_layers]
        if len(layers) != n_levels:
            raise ValueError(f"Llama.forward: argument 'deepstack_layers' must hold one layer per "
                             f"level ({n_levels}), got {len(layers)}")
        if any(not 0 <= i <= L for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(f"Llama.forward: argument 'deepstack_layers' must hold distinct layers "
                             f"in [0, {L}] (num_hidden_layers = before the final norm), got {layers}")
        return {i: k for k, i in enumerate(layers)}

    def _final_norm(self, h, inject, levels, index):
        L, eps = self.config.num_hidden_layers, self.config.rms_norm_eps
        if L in inject:                                 # level after the last layer -> final norm
            h, _ = ops.deepstack_inject_rms_norm(h, levels[inject[L]], index, self.norm.weight, eps)
            return h
        return ops.rms_norm(h, self.norm.weight, eps)

    def _layers_then_head(self, h, attn, inject=None, levels=(), index=None):
        eps = self.config.rms_norm_eps
        inject = inject or {}
        for i, layer in enumerate(self.layers):
            w = layer.input_layernorm.weight
            if i in inject:
                normed, h = ops.deepstack_inject_rms_norm(h, levels[inject[i]], index, w, eps)
            else:
                normed = ops.rms_norm(h, w, eps)
            h = h + attn(i, layer.self_attn, normed)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self._final_norm(h, inject, levels, index)

    def forward_packed(self, inputs_embeds, cu_seqlens, max_seqlen: int, cache: "StaticKVCache",
                       last_only: bool = True, visual_index=None,
                       deepstack_visual_embeds: Optional[Sequence[torch.Tensor]] = None,
                       deepstack_layers: Optional[Sequence[int]] = None):
        """Prefill of B sequences of different lengths, packed: inputs_embeds (T, hidden) (the
        sequences one after the other), cu_seqlens (B+1,) int32 prefix sums starting at 0,
        max_seqlen >= every length. Each sequence has positions 0..len-1 and attends only to
        itself (ops.flash_attn_varlen_func), so padding or batch-mates never change its result.
        K/V go to cache rows [0, len_b) of batch element b and cache.seqlens is set to the
        lengths. Returns the logits of each sequence's last token (B, V), or of every token
        (T, V) with last_only=False.
        DeepStack-L: visual_index (Nv,) int64 rows of the packed tokens (strictly increasing:
        the true positions of the images' rows, any number per sequence, none for text-only
        ones); deepstack_visual_embeds: levels of (Nv, hidden) in that row order; schedule as in
        forward (deepstack_layers)."""
        T = inputs_embeds.shape[0]
        B = cu_seqlens.numel() - 1
        dev = inputs_embeds.device
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
        seq = torch.repeat_interleave(torch.arange(B, device=dev), lens, output_size=T)
        pos = torch.arange(T, device=dev) - cu_seqlens[:-1].to(torch.long)[seq]
        rows = seq * cache.max_len + pos
        cos, sin = self._rope(pos, inputs_embeds.dtype)
        levels, inject = [], {}
        if deepstack_visual_embeds is not None and len(deepstack_visual_embeds):
            if visual_index is None:
                raise ValueError("Llama.forward_packed: argument 'visual_index' is required with "
                                 "deepstack_visual_embeds")
            visual_index = visual_index.to(device=dev, dtype=torch.long)
            n, D = visual_index.numel(), inputs_embeds.shape[-1]
            for k, e in enumerate(deepstack_visual_embeds):
                if e.dim() != 2 or e.shape[0] != n or e.shape[1] != D:
                    raise ValueError(f"Llama.forward_packed: argument 'deepstack_visual_embeds[{k}]' "
                                     f"must be ({n}, {D}) (one row per visual_index entry), got "
                                     f"{tuple(e.shape)}")
            levels = [e.to(dev) for e in deepstack_visual_embeds]
            if deepstack_layers is None:
                levels = levels[: self.config.num_hidden_layers]
            inject = self.deepstack_schedule(len(levels), deepstack_layers)
        h = self._layers_then_head(inputs_embeds, lambda i, attn, x: attn.forward_packed(
            x, cos, sin, cu_seqlens, max_seqlen, cache.k[i], cache.v[i], rows),
            inject, levels, visual_index)
        cache.seqlens.copy_(lens.to(torch.int32))
        if last_only:
            h = h[cu_seqlens[1:].to(torch.long) - 1]
        return F.linear(h, self._lm_head_weight())

    def forward_decode(self, input_ids, cache: "StaticKVCache"):
        """One decode step for every sequence: input_ids (B,) int64 at positions cache.seqlens;
        K/V appended at cache.seqlens[b] (which the caller then advances). -> logits (B, V).
        No host synchronisation (CUDA-graph capturable)."""
        h = self.embed_tokens(input_ids[:, None])
        pos = cache.seqlens.to(torch.long)[:, None]
        cos, sin = self._rope(pos, h.dtype)
        h = self._layers_then_head(h, lambda i, attn, x: attn.forward_decode(
            x, cos, sin, cache.k[i], cache.v[i], cache.seqlens))
        return F.linear(h[:, 0], self._lm_head_weight())

    def _deepstack_levels(self, h, mask, levels, deepstack_layers=None):
        """-> (levels to inject, at most num_hidden_layers of them without deepstack_layers;
        visual_index or None)."""
        if levels is None or len(levels) == 0:
            return [], None
        if mask is None:
            raise ValueError("Llama.forward: argument 'visual_pos_masks' is required with "
                             "deepstack_visual_embeds")
        B, S = h.shape[:2]
        if mask.shape != (B, S) or mask.dtype != torch.bool:
            raise ValueError(f"Llama.forward: argument 'visual_pos_masks' must be a ({B}, {S}) bool "
                             f"tensor, got {tuple(mask.shape)} {mask.dtype}")
        levels = list(levels)
        if deepstack_layers is None:
            levels = levels[: self.config.num_hidden_layers]   # HF: range(len(levels)) over layers
        index = ops.visual_index(mask.to(h.device))
        n = index.numel()
        for k, e in enumerate(levels):
            if e.dim() != 2 or e.shape[0] != n or e.shape[1] != h.shape[-1]:
                raise ValueError(f"Llama.forward: argument 'deepstack_visual_embeds[{k}]' must be "
                                 f"({n}, {h.shape[-1]}) (visual_pos_masks.sum() rows), got "
                                 f"{tuple(e.shape)}")
        return [e.to(h.device) for e in levels], index

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int, eos_token_id: Optional[int] = None,
                 inputs_embeds=None, visual_pos_masks=None, deepstack_visual_embeds=None,
                 deepstack_layers=None):
        """Greedy decoding: one prefill (with DeepStack injection when given), then one token per
        step from the KV cache (steps inject nothing). input_ids (B, S) -> (B, S + new) ids; with
        inputs_embeds only the generated ids (B, new) are returned. Sequences that emitted
        eos_token_id keep emitting it; the loop stops when all have."""
        prompt = input_ids if inputs_embeds is None else None
        S = (inputs_embeds if inputs_embeds is not None else input_ids).shape[1]
        cache = KVCache(self.config.num_hidden_layers, capacity=S + max_new_tokens)
        logits, cache = self(input_ids=None if inputs_embeds is not None else input_ids,
                             inputs_embeds=inputs_embeds, visual_pos_masks=visual_pos_masks,
                             deepstack_visual_embeds=deepstack_visual_embeds, cache=cache,
                             deepstack_layers=deepstack_layers)
        out = []
        done = None
        for step in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                if done is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done = (nxt == eos_token_id) if done is None else done | (nxt == eos_token_id)
            out.append(nxt)
            if step + 1 == max_new_tokens or (done is not None and bool(done.all())):
                break
            logits, cache = self(input_ids=nxt[:, None], cache=cache)
        B = (inputs_embeds if inputs_embeds is not None else input_ids).shape[0]
        new = torch.stack(out, 1) if out else torch.empty((B, 0), dtype=torch.long)
        return new if prompt is None else torch.cat([prompt, new.to(prompt.device)], 1)
