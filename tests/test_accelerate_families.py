"""hires_lmm.accelerate across Hugging Face decoder families (tiny random models, fp32): every
RMSNorm whose forward is LlamaRMSNorm's runs ops.rms_norm, the ones that differ (Gemma's
1 + weight, ...) are left alone and reported; and attn_implementation="hires_lmm" works in
from_pretrained right after `import hires_lmm`, without accelerate()."""
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import hires_lmm
from hires_lmm import accelerate

transformers = pytest.importorskip("transformers")
A = sys.modules["hires_lmm.accelerate"]

RTOL = 1e-4  # fp32, relative to the largest output magnitude

_SMALL = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _close(got, ref):
    err = (got.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    assert err <= RTOL * max(scale, 1e-6), (err, scale)


def _family(name, **extra):
    kw = dict(_SMALL, **extra)
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    if name == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    if name == "qwen3":
        return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=8, **kw))
    if name == "phi3":
        return transformers.Phi3ForCausalLM(transformers.Phi3Config(**kw))
    if name == "gemma":
        return transformers.GemmaForCausalLM(transformers.GemmaConfig(head_dim=8, **kw))
    if name == "qwen2_5_vl_text":
        from transformers.models.qwen2_5_vl import configuration_qwen2_5_vl as qc
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qm
        cfg = qc.Qwen2_5_VLTextConfig(
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [1, 1, 2]}, **kw)
        return qm.Qwen2_5_VLTextModel(cfg)
    raise ValueError(name)


# family -> (RMSNorms patched, skipped) with 1 decoder layer: input + post-attention + final
# norm; Qwen3 adds q_norm and k_norm; Gemma's (1 + weight) norms are left alone
FAMILIES = {"llama": (3, 0), "mistral": (3, 0), "qwen2": (3, 0), "qwen2_5_vl_text": (3, 0),
            "qwen3": (5, 0), "phi3": (3, 0), "gemma": (0, 3)}


@pytest.fixture(autouse=True)
def _clear_counts():
    accelerate.call_counts.clear()
    yield


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_norms_and_attention(name):
    torch.manual_seed(0)
    m = _family(name).eval()
    with torch.no_grad():  # non-trivial norm weights, so the norms matter
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(torch.rand_like(mod.weight) + 0.5)
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    out = (lambda r: r.logits) if hasattr(m, "lm_head") else (lambda r: r.last_hidden_state)
    with torch.no_grad():
        ref = out(m(ids))
        hires_lmm.accelerate(m)
        got = out(m(ids))
    patched, skipped = FAMILIES[name]
    p, c = m._hires_lmm_patched, dict(accelerate.call_counts)
    assert p["rms_norm"] == patched and p["rms_norm_skipped"] == skipped
    assert c.get("rms_norm", 0) == patched and "rms_norm_fallback" not in c
    assert p["attention"] == 1 and c["attention"] == 1 and "attention_fallback" not in c
    if skipped:
        (cls, (n, reason)), = m._hires_lmm_skipped.items()
        assert cls == "GemmaRMSNorm" and n == skipped and "1 + weight" in reason
    else:
        assert m._hires_lmm_skipped == {}
    _close(got, ref)


def test_mistral_window_longer_than_keys_is_no_constraint():
    """Mistral passes sliding_window on every call; with no more keys than the window (and no
    mask) it cannot cut, so the dense kernel runs whatever the ops' signature."""
    torch.manual_seed(0)
    m = _family("mistral", sliding_window=7).eval()
    ids = torch.randint(3, 101, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = m(ids).logits
        hires_lmm.accelerate(m)
        got = m(ids).logits
    c = accelerate.call_counts
    assert c["attention"] == 1 and "attention_varlen" not in c and "attention_fallback" not in c
    _close(got, ref)


class _CenteredRMSNorm(nn.Module):  # a look-alike with different math: must not be patched
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, hidden_states):
        hidden_states = hidden_states - hidden_states.mean(-1, keepdim=True)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * hidden_states * torch.rsqrt(variance + self.variance_epsilon)


class _CopiedLlamaRMSNorm(nn.Module):  # Llama's forward, copied (as remote code does)
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        """Same math, other argument name, a docstring and comments."""
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)  # fp32 statistics
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)


def test_rms_norm_classification():
    from transformers.models.llama4.modeling_llama4 import Llama4TextRMSNorm
    assert A._rms_norm_verdict(_CopiedLlamaRMSNorm) is None
    assert A._rms_norm_verdict(_CenteredRMSNorm) == "forward differs from LlamaRMSNorm's"
    assert A._rms_norm_verdict(Llama4TextRMSNorm) == "forward differs from LlamaRMSNorm's"
    assert A._rms_norm_verdict(nn.RMSNorm) is not None  # torch's: input-dtype math, other eps
    m = nn.Sequential(_CopiedLlamaRMSNorm(8), _CenteredRMSNorm(8), nn.RMSNorm(8))
    hires_lmm.accelerate(m)
    assert m._hires_lmm_patched["rms_norm"] == 1 and m._hires_lmm_patched["rms_norm_skipped"] == 2
    assert set(m._hires_lmm_skipped) == {"_CenteredRMSNorm", "RMSNorm"}


def test_from_pretrained_after_import(tmp_path):
    """`import hires_lmm` does not import transformers, yet registers "hires_lmm" as soon as a
    model class is imported: from_pretrained(attn_implementation="hires_lmm") runs our kernel
    and matches SDPA."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**_SMALL)).save_pretrained(tmp_path)
    script = textwrap.dedent(f"""
        import sys
        import torch
        import hires_lmm
        assert "transformers" not in sys.modules, "import hires_lmm imported transformers"
        from transformers import LlamaForCausalLM
        ours = LlamaForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="hires_lmm")
        ref = LlamaForCausalLM.from_pretrained({str(tmp_path)!r}, attn_implementation="sdpa")
        assert ours.config._attn_implementation == "hires_lmm"
        ids = torch.randint(3, 101, (2, 11), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            got, want = ours(ids).logits, ref(ids).logits
        err = (got - want).abs().max().item()
        assert err <= 1e-4 * want.abs().max().item(), err
        assert hires_lmm.accelerate.call_counts["attention"] == 1, dict(hires_lmm.accelerate.call_counts)
        print("OK")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr


# ---- sliding window and softcap (flash-attn 2's window_size / softcap, issue 9) ------------------
def _dense_attn(q, k, v, scale, causal, window_size, softcap):
    """flash-attn semantics on one sequence: q (Sq,H,D), k/v (Sk,Hkv,D); bottom-right aligned
    window (left, right) (-1 unbounded; causal: right = 0); a row that sees no key gives 0."""
    Sq, H, D = q.shape
    Sk = k.shape[0]
    rep = H // k.shape[1]
    k, v = k.repeat_interleave(rep, 1).double(), v.repeat_interleave(rep, 1).double()
    s = torch.einsum("qhd,khd->hqk", q.double(), k) * (scale or D ** -0.5)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    left, right = window_size
    right = 0 if causal else right
    seen = torch.ones(Sq, Sk, dtype=torch.bool)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    p = torch.softmax(s.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)


def _fake_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
               softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    return torch.stack([_dense_attn(q[b], k[b], v[b], softmax_scale, causal, window_size, softcap)
                        for b in range(q.shape[0])])


def _fake_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                 softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                 alibi_slopes=None, deterministic=False, return_attn_probs=False):
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    out = torch.zeros_like(q)
    for b in range(len(cq) - 1):
        if cq[b + 1] > cq[b]:
            out[cq[b]:cq[b + 1]] = _dense_attn(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]],
                                               v[ck[b]:ck[b + 1]], softmax_scale, causal,
                                               window_size, softcap)
    return out


@pytest.fixture(params=["flash_attn_2_api", "this_build"])
def attn_ops(request, monkeypatch):
    """flash_attn_2_api: ops replaced by a dense model of flash-attn 2's signature (window_size,
    softcap), to test what accelerate passes; this_build: the ops as built (window/softcap run the
    kernel if its signature has them, else the original attention)."""
    if request.param == "flash_attn_2_api":
        monkeypatch.setattr(hires_lmm.ops, "flash_attn_func", _fake_func)
        monkeypatch.setattr(hires_lmm.ops, "flash_attn_varlen_func", _fake_varlen)
    return request.param


@pytest.mark.parametrize("pad", [False, True])
def test_mistral_sliding_window(attn_ops, pad):
    """A window (4) shorter than the sequence (9): HF's mask encodes it; read as causal + window
    (+ left padding) -> varlen with window_size=(3, 0) when the kernel takes it."""
    torch.manual_seed(0)
    m = _family("mistral", sliding_window=4).eval()
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    am = torch.ones(2, 9, dtype=torch.long)
    if pad:
        am[0, :2] = 0
    with torch.no_grad():
        ref = m(ids, attention_mask=am).logits
        hires_lmm.accelerate(m)
        got = m(ids, attention_mask=am).logits
    c = accelerate.call_counts
    if "window_size" in A._kernel_features():  # no padding: dense kernel with the window
        assert c["attention"] == 1 and c["attention_varlen"] == int(pad)
        assert "attention_fallback" not in c
    else:
        assert attn_ops == "this_build" and c["attention_fallback_mask_not_padding"] == 1
    valid = am.bool()
    _close(got[valid], ref[valid])


def test_gemma2_softcap(attn_ops):
    """Gemma 2: logit softcap on every layer (1.0, with q scaled up so it bites) and a sliding
    window (4 < 9 tokens: it cuts) on every other layer."""
    def gemma2(softcap):
        kw = dict(_SMALL, num_hidden_layers=2, head_dim=8, attn_logit_softcapping=softcap,
                  sliding_window=4, attn_implementation="eager")
        torch.manual_seed(0)
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**kw)).eval()
        with torch.no_grad():
            for layer in m.model.layers:
                layer.self_attn.q_proj.weight.mul_(30.0)
                layer.self_attn.k_proj.weight.mul_(30.0)
        return m

    m = gemma2(1.0)
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = m(ids).logits
        plain = gemma2(None)(ids).logits
        hires_lmm.accelerate(m)
        got = m(ids).logits
    c = accelerate.call_counts
    if {"window_size", "softcap"} <= A._kernel_features():
        assert c["attention"] == 2 and "attention_fallback" not in c
    else:
        assert attn_ops == "this_build" and c["attention_fallback"] == 2
    _close(got, ref)
    # the softcap changed the result (far beyond the tolerance)
    assert (plain - ref).abs().max() > 100 * RTOL * ref.abs().max()
