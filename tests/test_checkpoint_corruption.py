"""Checkpoint-corruption suite over every loader: open_checkpoint, each model's from_pretrained
(Llama, ClipVisionTower, ConvNeXtTower, SliMEVisual, through load_into / from_state_dict) and
python -m hires_lmm.convert. Small checkpoints with real key names are built in tmp_path, then
damaged: truncation, header damage, wrong shapes and dtypes, index damage (missing shard, key in two
shards, paths leaving the folder, weight_map not an object), bad configs (missing fields, wrong
types, zero / negative / huge values, a checkpoint of another kind). Every case must raise
CheckpointError (a ValueError) whose message names the file or the field; nothing hangs, nothing
loads a wrong model, no advice to load with weights_only=False is ever given."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hires_lmm
from hires_lmm import CheckpointError
from hires_lmm.checkpoint import CheckpointNotFoundError, open_checkpoint
from hires_lmm.convert import main as convert_main
from hires_lmm.models import (ClipVisionConfig, ClipVisionTower, ConvNeXtConfig, ConvNeXtTower,
                              Llama, LlamaConfig, SliMEConfig, SliMEVisual)
from hires_lmm.models import _weights


# ---- small checkpoints with real key names ----------------------------------------------------
LLAMA_CFG = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=11,
                 hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=32,
                 tie_word_embeddings=False, hidden_act="silu", rope_theta=10000.0)
CLIP_CFG = dict(model_type="clip_vision_model", architectures=["CLIPVisionModel"], hidden_size=16,
                intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_channels=3,
                image_size=8, patch_size=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)
CONVNEXT_CFG = dict(model_type="convnext", architectures=["ConvNextModel"], num_channels=3,
                    hidden_sizes=[8, 16], depths=[1, 2], num_stages=2, patch_size=4,
                    layer_scale_init_value=1e-6, layer_norm_eps=1e-12, hidden_act="gelu",
                    image_size=32)
SLIME_CFG = dict(model_type="llava_llama", hidden_size=32, mm_hidden_size=128, mm_resampler_dim=16,
                 mm_resampler_topp=0.95, mm_resampler_temp=1.0, seperator=11,
                 mm_projector_type="gated", mm_resampler_type="cosine", global_grid=4)


def _convnext_hf_names(sd):
    """Our ConvNeXtTower names -> HF ConvNextModel names (the inverse of the 'hf' key map)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] == "stem":
            name = f"embeddings.patch_embeddings.{parts[1]}"
        elif parts[0] == "stem_norm":
            name = f"embeddings.layernorm.{parts[1]}"
        elif parts[2] in ("down_norm", "down"):
            name = f"encoder.stages.{parts[1]}.downsampling_layer.{0 if parts[2] == 'down_norm' else 1}.{parts[3]}"
        else:   # stages.i.blocks.j.<leaf>
            leaf = {"dw_weight": "dwconv.weight", "dw_bias": "dwconv.bias",
                    "ln_weight": "layernorm.weight", "ln_bias": "layernorm.bias",
                    "fc1_weight": "pwconv1.weight", "fc1_bias": "pwconv1.bias",
                    "fc2_weight": "pwconv2.weight", "fc2_bias": "pwconv2.bias",
                    "gamma": "layer_scale_parameter"}[parts[4]]
            name = f"encoder.stages.{parts[1]}.layers.{parts[3]}.{leaf}"
        out[name] = v
    return out


def _state(kind):
    """{checkpoint key: tensor} of a small random model of this kind, real key names."""
    torch.manual_seed(0)
    if kind == "llama":
        m = Llama(LlamaConfig.from_dict(LLAMA_CFG))
        return {(k if k.startswith("lm_head") else "model." + k): v.detach().clone()
                for k, v in m.state_dict().items()}
    if kind == "clip":
        m = ClipVisionTower(ClipVisionConfig.from_dict(CLIP_CFG))
        return {"vision_model." + k: v.detach().clone() for k, v in m.state_dict().items()}
    if kind == "convnext":
        m = ConvNeXtTower(ConvNeXtConfig.from_dict(CONVNEXT_CFG))
        return _convnext_hf_names({k: v.detach().clone() for k, v in m.state_dict().items()})
    m = SliMEVisual(SliMEConfig.from_dict(SLIME_CFG))
    sd = {}
    for k, v in m.state_dict().items():
        pre = "model.mm_projector." if k.startswith("projector.") else "model.sampler.post_qformer."
        sd[pre + k.split(".", 1)[1]] = v.detach().clone().contiguous()
    sd["model.embed_tokens.weight"] = torch.zeros(3, 32)
    return sd


CONFIGS = {"llama": LLAMA_CFG, "clip": CLIP_CFG, "convnext": CONVNEXT_CFG, "slime": SLIME_CFG}
LOADERS = {"llama": Llama.from_pretrained, "clip": ClipVisionTower.from_pretrained,
           "convnext": ConvNeXtTower.from_pretrained, "slime": SliMEVisual.from_pretrained}
CLASS = {"llama": "Llama", "clip": "ClipVisionTower", "convnext": "ConvNeXtTower",
         "slime": "SliMEVisual"}
KINDS = list(CONFIGS)


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """kind -> a folder with config.json + model.safetensors that loads."""
    out = {}
    for kind in KINDS:
        d = tmp_path_factory.mktemp(kind)
        (d / "config.json").write_text(json.dumps(CONFIGS[kind]))
        save_file(_state(kind), str(d / "model.safetensors"))
        out[kind] = d
    Llama.from_pretrained(out["llama"])   # torch's one-time imports on the first meta build
    return out


def _copy(src, tmp_path, name="ck"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _config(d, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DROP:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


_DROP = object()


def _raises(fn, *names, exc=CheckpointError):
    """fn() must raise exc (a ValueError) whose message holds every string in names; never the
    advice to set weights_only=False."""
    with pytest.raises(exc) as e:
        fn()
    assert isinstance(e.value, ValueError)
    msg = str(e.value)
    for n in names:
        assert str(n) in msg, (n, msg)
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg
    return msg


# ---- the good ones load ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_good_checkpoints_load(good, kind):
    model = LOADERS[kind](good[kind])
    ref = _state(kind)
    assert len(model.state_dict()) >= 1
    if kind == "llama":
        assert torch.equal(model.state_dict()["embed_tokens.weight"], ref["model.embed_tokens.weight"])


def test_checkpoint_error_is_exported():
    from hires_lmm.models._weights import CheckpointError as W
    assert CheckpointError is W is hires_lmm.checkpoint.CheckpointError
    assert issubclass(CheckpointError, ValueError)
    assert issubclass(CheckpointNotFoundError, CheckpointError)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


# ---- damaged weight files ---------------------------------------------------------------------
def _truncate(f: Path, keep):
    data = f.read_bytes()
    f.write_bytes(data[:keep(len(data))])


SAFETENSORS_DAMAGE = {
    "truncated": lambda f: _truncate(f, lambda n: n - 7),
    "header_only": lambda f: _truncate(f, lambda n: 20),
    "empty": lambda f: f.write_bytes(b""),
    "header_length": lambda f: f.write_bytes((10 ** 15).to_bytes(8, "little") + f.read_bytes()[8:]),
    "header_json": lambda f: f.write_bytes(f.read_bytes()[:8] + b"#" + f.read_bytes()[9:]),
    "garbage": lambda f: f.write_bytes(bytes(range(255, -1, -1)) * 2),
}


@pytest.mark.parametrize("damage", list(SAFETENSORS_DAMAGE))
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_safetensors_every_loader(good, tmp_path, kind, damage):
    d = _copy(good[kind], tmp_path)
    SAFETENSORS_DAMAGE[damage](d / "model.safetensors")
    _raises(lambda: LOADERS[kind](d), "model.safetensors")
    _raises(lambda: open_checkpoint(d), "model.safetensors")


def test_model_safetensors_is_a_folder(good, tmp_path):
    d = _copy(good["llama"], tmp_path)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").mkdir()
    _raises(lambda: Llama.from_pretrained(d), "model.safetensors", "folder")


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/hires_lmm_pwned_by_checkpoint",))


def _damaged_bin_bytes(case, tmp_path):
    torch.save(_state("llama"), tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    return {"empty": b"", "truncated": data[: len(data) // 2],
            "garbage": b"\x80\x02garbage and more garbage" * 5,
            "text": b"this is not a pickle"}[case]


@pytest.mark.parametrize("case", ["empty", "truncated", "garbage", "text", "old_truncated", "evil",
                                  "not_a_dict"])
def test_damaged_bin(good, tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    f = src / "pytorch_model.bin"
    if case == "evil":
        torch.save({"a": _Evil()}, f)
    elif case == "not_a_dict":
        torch.save([torch.zeros(2)], f)
    elif case == "old_truncated":
        torch.save(_state("llama"), f, _use_new_zipfile_serialization=False)
        _truncate(f, lambda n: n // 2)
    else:
        f.write_bytes(_damaged_bin_bytes(case, tmp_path))
    (src / "config.json").write_text(json.dumps(LLAMA_CFG))
    if os.path.exists("/tmp/hires_lmm_pwned_by_checkpoint"):
        os.unlink("/tmp/hires_lmm_pwned_by_checkpoint")
    _raises(lambda: open_checkpoint(src), "pytorch_model.bin")
    _raises(lambda: Llama.from_pretrained(src), "pytorch_model.bin")
    assert not os.path.exists("/tmp/hires_lmm_pwned_by_checkpoint")
    if case == "evil":
        msg = _raises(lambda: open_checkpoint(src), "weights_only=True")
        assert "system" in msg                       # what was refused is named


# ---- wrong shapes and dtypes ------------------------------------------------------------------
SHAPE_KEY = {"llama": "model.layers.1.mlp.up_proj.weight",
             "clip": "vision_model.encoder.layers.1.mlp.fc1.weight",
             "convnext": "encoder.stages.1.layers.1.pwconv1.weight",
             "slime": "model.mm_projector.w_gate"}


@pytest.mark.parametrize("kind", KINDS)
def test_wrong_shape_and_dtype(good, tmp_path, kind):
    key = SHAPE_KEY[kind]
    sd = _state(kind)
    d = _copy(good[kind], tmp_path, "shape")
    save_file({**sd, key: torch.zeros(3, 5)}, str(d / "model.safetensors"))
    _raises(lambda: LOADERS[kind](d), key, "(3, 5)")
    d = _copy(good[kind], tmp_path, "dtype")
    save_file({**sd, key: torch.zeros(sd[key].shape, dtype=torch.int32)}, str(d / "model.safetensors"))
    _raises(lambda: LOADERS[kind](d), key, "int32")


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_floating_dtypes(good, tmp_path, kind):
    """dtype=None on a checkpoint mixing fp32 and bf16: an error naming keys of both; with dtype=
    every floating tensor is cast."""
    sd = _state(kind)
    key = SHAPE_KEY[kind]
    d = _copy(good[kind], tmp_path)
    save_file({**sd, key: sd[key].to(torch.bfloat16)}, str(d / "model.safetensors"))
    _raises(lambda: LOADERS[kind](d), key, "torch.bfloat16", "torch.float32", "dtype=")
    model = LOADERS[kind](d, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


# ---- several files and the index --------------------------------------------------------------
def _shard(d, sd, n=2, fmt="safetensors", index=True):
    """Write sd as n shards (+ index); returns (index path or None, {shard name: keys})."""
    (d / "model.safetensors").unlink(missing_ok=True)
    keys = sorted(sd)
    parts = {}
    for i in range(n):
        name = (f"model-{i + 1:05d}-of-{n:05d}.safetensors" if fmt == "safetensors"
                else f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin")
        ks = keys[i::n]
        parts[name] = ks
        if fmt == "safetensors":
            save_file({k: sd[k] for k in ks}, str(d / name))
        else:
            torch.save({k: sd[k] for k in ks}, d / name)
    if not index:
        return None, parts
    idx = d / ("model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json")
    idx.write_text(json.dumps({"metadata": {}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}))
    return idx, parts


def _edit_index(idx, fn):
    data = json.loads(idx.read_text())
    fn(data)
    idx.write_text(json.dumps(data))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_loads_and_index_damage(good, tmp_path, fmt):
    sd = _state("llama")
    d = _copy(good["llama"], tmp_path, "ok")
    idx, parts = _shard(d, sd, fmt=fmt)
    m = Llama.from_pretrained(d)
    assert torch.equal(m.state_dict()["norm.weight"], sd["model.norm.weight"])
    first, second = list(parts)
    k0 = parts[first][0]

    # a shard named by the index is missing: CheckpointError and FileNotFoundError, naming it
    d = _copy(good["llama"], tmp_path, "missing")
    idx, parts = _shard(d, sd, fmt=fmt)
    (d / second).unlink()
    _raises(lambda: Llama.from_pretrained(d), second, exc=CheckpointNotFoundError)
    with pytest.raises(FileNotFoundError):
        open_checkpoint(d)

    # the same key in two shards: an error naming both, whatever the index says
    d = _copy(good["llama"], tmp_path, "dup")
    idx, parts = _shard(d, sd, fmt=fmt)
    extra = {k: sd[k] for k in parts[second]}
    extra[k0] = torch.zeros_like(sd[k0])
    (save_file(extra, str(d / second)) if fmt == "safetensors" else torch.save(extra, d / second))
    _raises(lambda: Llama.from_pretrained(d), k0, first, second)

    # the index maps a key to a shard that does not hold it
    d = _copy(good["llama"], tmp_path, "moved")
    idx, parts = _shard(d, sd, fmt=fmt)
    _edit_index(idx, lambda data: data["weight_map"].__setitem__(k0, second))
    _raises(lambda: open_checkpoint(d), k0, idx.name)

    # a shard holds a key the index does not list
    d = _copy(good["llama"], tmp_path, "unlisted")
    idx, parts = _shard(d, sd, fmt=fmt)
    _edit_index(idx, lambda data: data["weight_map"].pop(k0))
    _raises(lambda: open_checkpoint(d), k0, idx.name)


@pytest.mark.parametrize("bad,names", [
    ({"weight_map": ["a", "b"]}, ["weight_map", "object"]),
    ({"weight_map": "model.safetensors"}, ["weight_map"]),
    ({"metadata": {}}, ["weight_map"]),
    ([1, 2, 3], ["weight_map"]),
    ({"weight_map": {}}, ["empty"]),
    ({"weight_map": {"model.norm.weight": 3}}, ["shard file name"]),
    ({"weight_map": {"model.norm.weight": "../outside.safetensors"}}, ["..", "inside"]),
    ({"weight_map": {"model.norm.weight": "/tmp/outside.safetensors"}}, ["absolute"]),
    ({"weight_map": {"model.norm.weight": "sub/../../outside.safetensors"}}, [".."]),
])
def test_index_structure_and_paths(good, tmp_path, bad, names):
    d = _copy(good["llama"], tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((d / "model.safetensors").read_bytes())
    (d / "model.safetensors.index.json").write_text(json.dumps(bad))
    _raises(lambda: open_checkpoint(d), "model.safetensors.index.json", *names)
    _raises(lambda: Llama.from_pretrained(d), "model.safetensors.index.json")


def test_index_bad_json_and_folder(good, tmp_path):
    d = _copy(good["llama"], tmp_path)
    (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": "model.safetensors",}')
    _raises(lambda: open_checkpoint(d), "model.safetensors.index.json", "line 1")
    (d / "model.safetensors.index.json").unlink()
    (d / "model.safetensors.index.json").mkdir()
    _raises(lambda: open_checkpoint(d), "model.safetensors.index.json", "folder")


def test_same_key_in_two_files_without_index(good, tmp_path):
    d = _copy(good["llama"], tmp_path)
    sd = _state("llama")
    (d / "model.safetensors").unlink()
    save_file(sd, str(d / "a.safetensors"))
    save_file({"model.norm.weight": torch.zeros(16)}, str(d / "b.safetensors"))
    _raises(lambda: Llama.from_pretrained(d), "model.norm.weight", "a.safetensors", "b.safetensors")


def test_bin_shards_are_read_one_at_a_time(good, tmp_path):
    """Two .bin shards: metadata for all keys, but at most one shard's state dict held, and keys()
    grouped by shard so a load pass reads each shard once."""
    d = _copy(good["llama"], tmp_path)
    sd = _state("llama")
    idx, parts = _shard(d, sd, fmt="bin")
    reader = open_checkpoint(d)
    files = [reader.file(k).name for k in reader.keys()]
    assert files == sorted(files) and set(files) == set(parts)
    loads = []
    orig = reader._load_pickle

    def counting(f):
        if reader._pickle[0] != f:
            loads.append(f.name)
        return orig(f)

    reader._load_pickle = counting
    for k in reader.keys():
        assert torch.equal(reader.get(k), sd[k])
        assert reader._pickle[0] == reader.file(k)       # only the shard being read is held
    assert loads == sorted(parts)                         # each shard loaded once in a pass


# ---- configs ----------------------------------------------------------------------------------
BAD_FIELDS = {
    # kind: [(field, value, words in the message)]
    "llama": [("vocab_size", _DROP, "missing"), ("hidden_size", None, "null"),
              ("hidden_size", "16", "integer"), ("hidden_size", 16.0, "integer"),
              ("num_hidden_layers", True, "integer"), ("num_attention_heads", 0, "in [1,"),
              ("num_attention_heads", -2, "got -2"), ("num_attention_heads", 3, "divide"),
              ("num_key_value_heads", 0, "in [1,"), ("rms_norm_eps", "1e-5", "number"),
              ("rms_norm_eps", -1e-5, ">"), ("rope_theta", float("nan"), "finite"),
              ("num_hidden_layers", 1e12, "integer"), ("num_hidden_layers", 10 ** 12, "1024"),
              ("intermediate_size", 10 ** 12, "in [1,"), ("tie_word_embeddings", "false", "true or false"),
              ("rope_scaling", {"rope_type": "linear"}, "factor"),
              ("rope_scaling", "linear", "object")],
    "clip": [("hidden_size", "16", "integer"), ("num_attention_heads", 0, "in [1,"),
             ("num_attention_heads", 3, "divide"), ("num_hidden_layers", 1e12, "integer"),
             ("num_hidden_layers", 10 ** 12, "1024"), ("layer_norm_eps", "1e-5", "number"),
             ("patch_size", 16, "in [1, 8]"), ("hidden_act", "relu6", "hidden_act"),
             ("image_size", 8.5, "integer")],
    "convnext": [("depths", [1, 2.0], "depths[1]"), ("depths", [1, 1e12], "depths[1]"),
                 ("depths", [1, 10 ** 12], "1024"), ("depths", "12", "list"),
                 ("hidden_sizes", [8, -16], "hidden_sizes[1]"), ("hidden_sizes", None, None),
                 ("num_stages", 2.0, "integer"), ("num_stages", 3, "entries"),
                 ("layer_norm_eps", "1e-12", "number"), ("patch_size", 0, "in [1,")],
    "slime": [("hidden_size", "32", "integer"), ("mm_hidden_size", 100, "128"),
              ("mm_resampler_dim", 15, "square"), ("mm_resampler_topp", 1.5, "<= 1"),
              ("mm_resampler_topp", "0.9", "number"), ("mm_resampler_temp", 0, "> 0"),
              ("global_grid", 10 ** 9, "in [1, 64]"), ("seperator", 1.5, "integer")],
}
_BAD_CASES = [(k, f, v, w) for k, cases in BAD_FIELDS.items() for f, v, w in cases]


@pytest.mark.parametrize("kind,field,value,word", _BAD_CASES,
                         ids=[f"{k}-{f}-{v!r}" for k, f, v, _ in _BAD_CASES])
def test_bad_config_fields(good, tmp_path, kind, field, value, word):
    d = _config(_copy(good[kind], tmp_path), **{field: value})
    t0 = time.perf_counter()
    if kind == "convnext" and field == "hidden_sizes" and value is None:
        # null means "HF's default" (96, 192, ...): the checkpoint's widths then disagree
        _raises(lambda: LOADERS[kind](d), "mis-shaped")
        return
    names = [field, "config.json"] + ([word] if word else [])
    _raises(lambda: LOADERS[kind](d), *names)
    assert time.perf_counter() - t0 < 5.0          # rejected up front, nothing huge was built


@pytest.mark.parametrize("kind", KINDS)
def test_config_json_damage(good, tmp_path, kind):
    d = _copy(good[kind], tmp_path)
    (d / "config.json").write_text('{"hidden_size": 16,,}')
    _raises(lambda: LOADERS[kind](d), "config.json", "line 1")
    (d / "config.json").write_bytes(b"\xff\xfe not utf-8")
    _raises(lambda: LOADERS[kind](d), "config.json")
    if kind != "convnext":          # ConvNeXt infers its config from the shapes without one
        (d / "config.json").write_text("[1, 2]")
        _raises(lambda: LOADERS[kind](d), "config.json", "object")
        (d / "config.json").unlink()
        _raises(lambda: LOADERS[kind](d), "config.json", exc=CheckpointNotFoundError)


@pytest.mark.parametrize("kind,field,value,what", [
    ("llama", "num_hidden_layers", 900, "holds 2"),
    ("clip", "num_hidden_layers", 1000, "holds 2"),
    ("convnext", "depths", [1, 1000], "stages.1.blocks.2.*"),
    ("slime", "hidden_size", 64, "model.mm_projector.projection.0.weight"),
])
def test_config_disagrees_with_keys_before_building(good, tmp_path, kind, field, value, what):
    """A config asking for more than the keys hold fails before anything is built."""
    d = _config(_copy(good[kind], tmp_path), **{field: value})
    t0 = time.perf_counter()
    _raises(lambda: LOADERS[kind](d), what, "config.json", "nothing was built")
    assert time.perf_counter() - t0 < 5.0


@pytest.mark.parametrize("want", KINDS)
@pytest.mark.parametrize("have", KINDS)
def test_wrong_kind_says_what_it_found(good, want, have):
    if want == have:
        return
    msg = _raises(lambda: LOADERS[want](good[have]))
    assert CLASS[have] in msg, msg                              # which kind the keys hold
    assert repr(CONFIGS[have]["model_type"]) in msg, msg        # config.json's model_type
    assert "KeyError" not in msg


def test_describe_checkpoint_without_known_keys():
    text = _weights.describe_checkpoint({"model_type": "bert"}, ["encoder.layer.0.attention.self.query.weight"])
    assert "'bert'" in text and "match no model" in text


def test_config_dataclasses_refuse_bad_values_directly():
    with pytest.raises(ValueError, match="num_hidden_layers"):
        LlamaConfig.from_dict({**LLAMA_CFG, "num_hidden_layers": 2.0})
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig.from_dict({**LLAMA_CFG, "head_dim": 7})
    with pytest.raises(ValueError, match="depths"):
        ConvNeXtConfig(hidden_sizes=(8,), depths=(1.5,), num_stages=1)
    with pytest.raises(ValueError, match="layer_norm_eps"):
        ClipVisionConfig.from_dict({**CLIP_CFG, "layer_norm_eps": float("inf")})
    with pytest.raises(ValueError, match="presoftmax_temperature"):
        SliMEConfig.from_dict(SLIME_CFG, presoftmax_temperature=-1.0)
    # explicit values are never replaced by a derived default
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig.from_dict({**LLAMA_CFG, "num_key_value_heads": 0})


# ---- python -m hires_lmm.convert --------------------------------------------------------------
def test_convert_honours_the_bin_index(good, tmp_path, capsys):
    sd = _state("llama")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_CFG))
    idx, parts = _shard(src, sd, n=2, fmt="bin")
    torch.save({"stray": torch.zeros(1)}, src / "stray.bin")      # not in the index: not converted
    dst = tmp_path / "dst"
    assert convert_main([str(src), str(dst)]) == 0
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(sd)
    assert sorted(set(index["weight_map"].values())) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for name in set(index["weight_map"].values()):
        shard = load_file(str(dst / name))
        assert {k for k, n in index["weight_map"].items() if n == name} == set(shard)
        for k, v in shard.items():
            assert torch.equal(v, sd[k]), k
    assert not (dst / "stray.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in sd.values())
    m = Llama.from_pretrained(dst)
    assert torch.equal(m.state_dict()["norm.weight"], sd["model.norm.weight"])


@pytest.mark.parametrize("damage", ["missing_shard", "dup_key", "truncated", "escape"])
def test_convert_fails_loudly(good, tmp_path, capsys, damage):
    sd = _state("llama")
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_CFG))
    idx, parts = _shard(src, sd, n=3, fmt="bin")
    names = list(parts)
    if damage == "missing_shard":
        (src / names[1]).unlink()
        want = names[1]
    elif damage == "dup_key":
        k = parts[names[0]][0]
        torch.save({**{q: sd[q] for q in parts[names[2]]}, k: sd[k]}, src / names[2])
        want = k
    elif damage == "truncated":
        _truncate(src / names[2], lambda n: n // 3)
        want = names[2]
    else:
        _edit_index(idx, lambda data: data["weight_map"].__setitem__(parts[names[0]][0], "../x.bin"))
        want = "../x.bin"
    dst = tmp_path / "dst"
    capsys.readouterr()
    assert convert_main([str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert want in err and "weights_only=False" not in err
    assert not dst.exists()                               # nothing written before the checks


def test_convert_single_damaged_file(tmp_path, capsys):
    (tmp_path / "x.bin").write_bytes(b"")
    assert convert_main([str(tmp_path / "x.bin"), str(tmp_path / "x.safetensors")]) == 1
    assert "x.bin" in capsys.readouterr().err


def test_convert_single_bin_ignores_other_pickles(tmp_path, capsys):
    """A Trainer folder: pytorch_model.bin + training_args.bin (an arbitrary pickle, never
    loaded): the checkpoint converts, the other pickle is neither run nor copied."""
    sd = _state("llama")
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(LLAMA_CFG))
    torch.save(sd, src / "pytorch_model.bin")
    torch.save({"args": _Evil()}, src / "training_args.bin")
    if os.path.exists("/tmp/hires_lmm_pwned_by_checkpoint"):
        os.unlink("/tmp/hires_lmm_pwned_by_checkpoint")
    assert convert_main([str(src), str(dst)]) == 0
    assert not os.path.exists("/tmp/hires_lmm_pwned_by_checkpoint")
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert set(load_file(str(dst / "model.safetensors"))) == set(sd)


def test_config_from_json_names_the_file(tmp_path):
    f = tmp_path / "config.json"
    f.write_text('{"depths": [1, 1.5], "hidden_sizes": [8, 16], "num_stages": 2}')
    _raises(lambda: ConvNeXtConfig.from_json(f), str(f), "depths[1]")
    f.write_text('{"hidden_size": 32,')
    _raises(lambda: SliMEConfig.from_json(str(tmp_path)), str(f), "line 1")


# ---- seeded fuzz: only CheckpointError ever escapes ---------------------------------------------
_FUZZ_VALUES = [None, 0, -1, 1, 2, 3, 7, 10 ** 12, 1e12, 1.5, -0.5, "16", True, False, [], {},
                [1, 2], {"rope_type": "llama3"}, float("nan"), float("inf")]


@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_config_values(good, tmp_path, kind):
    """100 seeded (field, value) corruptions per model: each either loads or raises CheckpointError
    naming the field (or, for a well-formed value the weights do not fit, the mismatch); no other
    exception type, no hang."""
    import random
    rng = random.Random(1234 + KINDS.index(kind))
    fields = sorted(CONFIGS[kind]) + ["head_dim", "rope_scaling", "vision_config", "text_config"]
    d = _copy(good[kind], tmp_path)
    base = (d / "config.json").read_text()
    for _ in range(100):
        field, value = rng.choice(fields), rng.choice(_FUZZ_VALUES)
        cfg = json.loads(base)
        cfg[field] = value
        (d / "config.json").write_text(json.dumps(cfg))
        t0 = time.perf_counter()
        try:
            LOADERS[kind](d)
        except CheckpointError as e:
            msg = str(e)
            assert (field in msg or "does not match" in msg or "nothing was built" in msg
                    or "not a" in msg), (field, value, msg)
        assert time.perf_counter() - t0 < 5.0, (field, value)


@pytest.mark.parametrize("kind", ["llama", "convnext"])
def test_fuzz_safetensors_bytes(good, tmp_path, kind):
    """60 seeded byte flips in the header and the data of model.safetensors: each case loads (a flip
    in the data) or raises CheckpointError naming the file; no other exception type."""
    import random
    rng = random.Random(99)
    d = _copy(good[kind], tmp_path)
    data = (d / "model.safetensors").read_bytes()
    n_header = 8 + int.from_bytes(data[:8], "little")
    for i in range(60):
        buf = bytearray(data)
        lo, hi = (0, n_header) if i % 4 else (n_header, len(data))   # mostly the header
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(lo, hi)] = rng.randrange(256)
        (d / "model.safetensors").write_bytes(bytes(buf))
        try:
            LOADERS[kind](d)
        except CheckpointError as e:
            assert "model.safetensors" in str(e) or "does not match" in str(e) or "mix" in str(e), str(e)


def test_tied_config_with_a_different_lm_head(good, tmp_path):
    """tie_word_embeddings = true would drop lm_head.weight: allowed only when it is a copy."""
    sd = _state("llama")
    d = _config(_copy(good["llama"], tmp_path), tie_word_embeddings=True)
    _raises(lambda: Llama.from_pretrained(d), "tie_word_embeddings", "lm_head.weight", "config.json")
    save_file({**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}, str(d / "model.safetensors"))
    m = Llama.from_pretrained(d)
    assert m.lm_head is None
